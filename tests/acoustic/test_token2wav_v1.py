"""CosyVoice1's token2wav runtime (``Token2WavV1``) against upstream's ``CosyVoiceModel`` loop.

The oracle (bench/upstream_token2wav_v1.py) is upstream's own ``tts`` on the tiny v1 flow and HiFT with
the same seeded weights, torch's generator seeded before every chunk: an offline call, one at speed
1.5 and a 235-token stream (chunks of 120 tokens at hop 100, then a 35-token final one). Ours must give
the same samples. Tolerance 5e-5 absolute (peaks ~0.27): the operations and random draws are upstream's
in upstream's order (ours differ from the oracle by 0.0 with the oracle's thread count), so only the
float32 summation order of the matrix products may differ with another thread count or BLAS; through
10 Euler steps and the vocoder that measured 7.8e-6 (one thread against a two-thread oracle).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from cosyvoice.acoustic.flow_v1 import FlowV1Config, FlowV1Model
from cosyvoice.acoustic.reference import configs_dir, seeded_state_dict
from cosyvoice.acoustic.runtimes import load_token2wav
from cosyvoice.acoustic.token2wav_v1 import Token2WavV1, stream_ends_v1

HERE = os.path.dirname(__file__)
ORACLE = os.path.join(HERE, "data", "upstream_token2wav_v1.npz")
HIFT_ORACLE = os.path.join(HERE, "data", "upstream_hift_v1.npz")  # holds the tiny v1 vocoder's weights
ATOL = 5e-5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_tiny_v1_model_dir(out: str) -> str:
    """The oracle's model dir: tiny v1 ``flow.pt`` (seeded), ``hift.pt`` (upstream_hift_v1's weights) and
    ``cosyvoice.yaml`` (configs/cosyvoice-tiny.yaml, whose sizes these are)."""
    os.makedirs(out, exist_ok=True)
    torch.save(seeded_state_dict(lambda: FlowV1Model(FlowV1Config.tiny()), 0), os.path.join(out, "flow.pt"))
    with np.load(HIFT_ORACLE) as data:
        hift = {k[len("state/"):]: torch.from_numpy(data[k]) for k in data.files if k.startswith("state/")}
    torch.save(hift, os.path.join(out, "hift.pt"))
    shutil.copyfile(os.path.join(configs_dir(), "cosyvoice-tiny.yaml"), os.path.join(out, "cosyvoice.yaml"))
    return out


def oracle() -> dict:
    with np.load(ORACLE) as data:
        record = {k: data[k] for k in data.files}
    record["speed_factor"] = float(record.pop("speed"))
    for name in ("offline", "speed", "stream"):
        record[name] = [record[f"{name}/{i}"] for i in range(int(record[f"{name}/chunks"]))]
    return record


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return write_tiny_v1_model_dir(str(tmp_path_factory.mktemp("cosyvoice1") / "CosyVoice-300M-tiny"))


@pytest.fixture(scope="module")
def recorded() -> dict:
    return oracle()


@pytest.fixture(scope="module")
def seeded(model_dir, recorded) -> Token2WavV1:
    return Token2WavV1(model_dir, device="cpu", seed=int(recorded["seed"]))


def _prompt(recorded):
    return recorded["inputs/prompt_tokens"], recorded["inputs/prompt_feat"], recorded["inputs/embedding"]


def _close(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert [len(c) for c in got] == [len(c) for c in want]
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=ATOL)


def test_the_model_dir_is_read_as_cosyvoice1_and_holds_the_oracles_weights(model_dir, seeded, recorded):
    import hashlib
    import io

    for part in ("flow", "hift"):
        buffer = io.BytesIO()
        torch.save(torch.load(os.path.join(model_dir, f"{part}.pt"), weights_only=True), buffer)
        assert hashlib.sha256(buffer.getvalue()).hexdigest() == str(recorded[f"sha256_{part}"]), part
    assert seeded.flow.config == FlowV1Config.tiny() and seeded.sample_rate == 22050
    assert type(load_token2wav(model_dir, device="cpu")) is Token2WavV1
    with pytest.raises(ValueError, match=r"no chunk_causal_final, stream_cache \(CosyVoice2 options\)"):
        load_token2wav(model_dir, stream_cache=True, chunk_causal_final=False)


def test_offline_and_speed_equal_upstreams(seeded, recorded):
    tokens = recorded["inputs/tokens"]
    _close([seeded.synthesize(tokens, *_prompt(recorded))], recorded["offline"])
    _close([seeded.synthesize(tokens, *_prompt(recorded), speed=recorded["speed_factor"])], recorded["speed"])


def test_the_stream_equals_upstreams_chunks_and_the_global_generator_gives_the_same(seeded, model_dir, recorded):
    tokens = recorded["inputs/tokens"]
    assert stream_ends_v1(len(tokens)) == recorded["stream/ends"].tolist() == [100, 200]
    _close(list(seeded.stream(tokens, *_prompt(recorded))), recorded["stream"])
    assert seeded.live_streams == 0
    # the protocol by hand, unseeded runtime: the whole prefix + where the chunk starts; torch's generator
    # seeded before each call as upstream's loop was
    unseeded = Token2WavV1(model_dir, device="cpu")
    chunks = []
    for end, offset, final in ((120, 0, False), (220, 100, False), (len(tokens), 200, True)):
        torch.manual_seed(int(recorded["seed"]))
        chunks.append(unseeded.synthesize(tokens[:end], *_prompt(recorded), token_offset=offset, finalize=final,
                                          request_id="r"))
    _close(chunks, recorded["stream"])
    assert sum(len(c) for c in chunks) == len(recorded["offline"][0]) == 256 * 404  # 404 frames of 235 tokens


def test_bad_chunks_are_refused_and_release_the_stream(seeded, recorded):
    tokens, prompt = recorded["inputs/tokens"], _prompt(recorded)
    seeded.synthesize(tokens[:120], *prompt, token_offset=0, finalize=False, request_id="a")
    with pytest.raises(ValueError, match="chunk at token_offset 120, but the stream continues at 100"):
        seeded.synthesize(tokens[:240], *prompt, token_offset=120, finalize=False, request_id="a")
    assert seeded.live_streams == 0
    with pytest.raises(ValueError, match="a non-final chunk at token_offset 0 has 30 tokens; it needs at least 41"):
        seeded.synthesize(tokens[:30], *prompt, token_offset=0, finalize=False, request_id="b")
    seeded.synthesize(tokens[:120], *prompt, token_offset=0, finalize=False, request_id="c")
    with pytest.raises(ValueError, match="final chunk of a stream at token_offset 100 has 10 tokens"):
        seeded.synthesize(tokens[:110], *prompt, token_offset=100, finalize=True, request_id="c")
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 4095\]; got 4096"):
        seeded.synthesize([1, 4096], *prompt)
    with pytest.raises(ValueError, match="speed 1.5 differs from the stream's 1.0"):
        seeded.synthesize(tokens[:120], *prompt, token_offset=0, finalize=False, request_id="d")
        seeded.synthesize(tokens, *prompt, token_offset=100, finalize=True, request_id="d", speed=1.5)
    assert seeded.live_streams == 0


def test_a_stream_at_a_speed_lasts_as_long_as_the_offline_call(seeded, recorded):
    """Upstream refuses speed when streaming; here each chunk's new frames are stretched, rounding cumulatively."""
    tokens, prompt = recorded["inputs/tokens"], _prompt(recorded)
    chunks = list(seeded.stream(tokens, *prompt, speed=0.8))
    assert sum(len(c) for c in chunks) == 256 * int(404 / 0.8)
    assert all(np.isfinite(c).all() and len(c) for c in chunks)
