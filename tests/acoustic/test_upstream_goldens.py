"""Our Token2Wav against upstream's token2wav outputs recorded on the tiny reference models.

The goldens come from upstream's own code (bench/upstream_goldens.py runs CosyVoice2Model.token2wav
with flow + HiFT from a source checkout); here the same files, inputs and vocoder seeds must give
the same mel (1e-4) and waveform (1e-3) for every offline and streaming call, with the stream cache
on and off.
"""

from __future__ import annotations

import hashlib
import os
import sys

import numpy as np
import pytest
import torch

from cosyvoice.acoustic.reference import write_acoustic_models
from cosyvoice.acoustic.token2wav import Token2Wav

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import upstream_goldens as goldens  # noqa: E402

GOLDENS = os.path.join(os.path.dirname(__file__), "data", "upstream_tiny.npz")


@pytest.fixture(scope="module")
def recorded():
    return dict(np.load(GOLDENS))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, recorded):
    out = str(tmp_path_factory.mktemp("tiny_acoustic"))
    write_acoustic_models(out, seed=0, size="tiny")
    for name in ("flow.pt", "hift.pt"):
        digest = hashlib.sha256(open(os.path.join(out, name), "rb").read()).hexdigest()
        assert digest == str(recorded[f"sha256_{name.replace('.', '_')}"]), (
            f"the tiny reference {name} changed since the goldens were recorded; re-run bench/upstream_goldens.py")
    return out


@pytest.mark.parametrize("stream_cache", [True, False])
@pytest.mark.parametrize("name", sorted(goldens.SCENARIOS))
def test_matches_upstream(model_dir, recorded, name, stream_cache):
    runtime = Token2Wav(model_dir, device="cpu", stream_cache=stream_cache)
    x = goldens.scenario_inputs(name)
    for i, (n, offset, finalize) in enumerate(goldens.calls(name)):
        wav, mel = runtime.synthesize(x["tokens"][:n], x["prompt_tokens"], x["prompt_feat"], x["embedding"],
                                      token_offset=offset, finalize=finalize, request_id=name, return_mel=True,
                                      generator=torch.Generator().manual_seed(goldens.vocoder_seed(name, i)))
        want_mel, want_wav = recorded[f"{name}/{i}/mel"], recorded[f"{name}/{i}/wav"]
        assert mel.shape == want_mel.shape, f"{name} call {i}"
        assert wav.shape == want_wav.shape, f"{name} call {i}"
        assert np.abs(mel.numpy() - want_mel).max() < 1e-4, f"{name} call {i}: mel"
        assert np.abs(wav - want_wav).max() < 1e-3, f"{name} call {i}: waveform"
    assert runtime.live_streams == 0  # the final call released the stream
