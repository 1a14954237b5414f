"""The Triton ``token2wav`` model serving a CosyVoice1 model dir (a real CPU tritonserver, 127.0.0.1).

The server is the package's shared CosyVoice1 one (tests/triton/conftest.py ``v1_server``): its token2wav runs
the default runtime on the oracle's flow.pt / hift.pt (tests/acoustic/test_token2wav_v1.py) with
``token2wav_seed`` = the oracle's seed; ``sample_rate`` comes out 22050 (the dir's ``cosyvoice.yaml``).
Speech tokens go in as the BLS sends them (LLM ids, 151663 + k, k < 4096; prompt mel and embedding as FP16): offline, at speed 1.5 and as a stream of three chunks (the prefix up to each
chunk's end + 20 overlap tokens, ``token_offset`` where it starts), each equal to upstream's
``CosyVoiceModel`` (bench/upstream_token2wav_v1.py) within the library test's tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest

from cosyvoice.triton.runtime import ORIGINAL_VOCAB_SIZE
from tests.acoustic.test_token2wav_v1 import ATOL

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def recorded(v1_oracle) -> dict:
    return v1_oracle


@pytest.fixture(scope="module")
def client(v1_server):
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(v1_server.grpc_url)


def _ids(tokens) -> np.ndarray:
    return (np.asarray(tokens, dtype=np.int64) + ORIGINAL_VOCAB_SIZE).astype(np.int32)[None]


def _call(client, recorded, tokens, request_id, **controls):
    """One token2wav request with the oracle's prompt; the waveform, or the error message."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    arrays = {"target_speech_tokens": _ids(tokens), "prompt_speech_tokens": _ids(recorded["inputs/prompt_tokens"]),
              "prompt_speech_feat": recorded["inputs/prompt_feat"].astype(np.float16)[None],
              "prompt_spk_embedding": recorded["inputs/embedding"].astype(np.float16)[None], **controls}
    types = {np.dtype(np.int32): "INT32", np.dtype(np.float16): "FP16", np.dtype(np.float32): "FP32",
             np.dtype(np.bool_): "BOOL"}
    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), types[array.dtype])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    try:
        return client.infer("token2wav", inputs, request_id=request_id).as_numpy("waveform").reshape(-1)
    except InferenceServerException as exc:
        return str(exc)


def _close(got, want):
    assert [len(c) for c in got] == [len(c) for c in want]
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=ATOL)


def test_a_cosyvoice1_dir_is_served_at_22050_hz_offline_and_at_a_speed_as_upstream(client, recorded):
    config = client.get_model_config("token2wav").config
    assert config.parameters["sample_rate"].string_value == "22050"
    tokens = recorded["inputs/tokens"]
    _close([_call(client, recorded, tokens, "offline")], recorded["offline"])
    speed = np.array([[recorded["speed_factor"]]], dtype=np.float32)
    _close([_call(client, recorded, tokens, "fast", speed=speed)], recorded["speed"])
    error = _call(client, recorded, np.array([1, 4096]), "bad")
    assert "ids must lie in [0, 4095]; got 4096" in error


def test_a_stream_of_v1_chunks_is_upstreams_stream(client, recorded):
    tokens = recorded["inputs/tokens"]
    chunks = [_call(client, recorded, tokens[:end], "stream", token_offset=np.array([[offset]], dtype=np.int32),
                    finalize=np.array([[final]]))
              for end, offset, final in ((120, 0, False), (220, 100, False), (len(tokens), 200, True))]
    _close(chunks, recorded["stream"])
