"""A CosyVoice1 model dir (cosyvoice.yaml) through the published sample preview and ``synthesize``: both load
``Token2WavV1`` by the dir (runtimes.load_token2wav), speak 50 Hz tokens at 22.05 kHz, and an SFT speaker entry
without speech tokens is a skipped sample, never an error."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import torch

from cosyvoice.acoustic.preview import render_png, sample_preview
from cosyvoice.acoustic.reference import REFERENCE_SPEAKER, write_v1_model_files
from cosyvoice.acoustic.synthesis import synthesize, token_rate
from cosyvoice.acoustic.token2wav_v1 import Token2WavV1

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def v1_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("v1-dir"))
    write_v1_model_files(out, seed=0, size="tiny", parts=["flow", "hift", "config", "spk2info"])
    return out


@pytest.fixture(scope="module")
def v1_tokens() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 4096, 150).astype(np.int64)


def test_the_v1_sample_is_two_seconds_of_50hz_tokens_at_22khz_and_an_embedding_only_speaker_is_skipped(
        v1_dir, v1_tokens, tmp_path):
    reference = f"{v1_dir}/spk2info.pt"  # the reference dir's SFT table: embeddings only
    skipped = sample_preview(v1_dir, reference, speaker=REFERENCE_SPEAKER)
    assert skipped.status == "skipped" and skipped.png is None and "has no speech_token" in skipped.reason
    assert skipped.as_metadata() == {"sample_status": "skipped", "sample_reason": skipped.reason}

    embedding = torch.load(reference, weights_only=True)[REFERENCE_SPEAKER]["embedding"]
    spk2info = tmp_path / "spk2info.pt"
    torch.save({"001": {"speech_token": torch.from_numpy(v1_tokens)[None], "embedding": embedding}}, spk2info)
    assert token_rate(v1_dir) == 50
    preview = sample_preview(v1_dir, str(spk2info), utterance="u1")
    assert preview.status == "rendered" and preview.tokens == 100, preview.reason  # 2 s of 50 Hz tokens
    samples = Token2WavV1(v1_dir, device="cpu", seed=0).synthesize(v1_tokens[:100], embedding=embedding[0].numpy())
    assert len(samples) == 172 * 256 and preview.seconds == len(samples) / 22050  # int(100 / 50 * 22050 / 256) frames
    title = f"{preview.seconds:.2f} s from 100 speech tokens of speaker 001 (u1)"
    assert preview.png == render_png(samples, 22050, title=title)


def test_synthesize_speaks_v1_tokens_at_22khz_and_refuses_what_the_v1_dir_has_no_counterpart_for(
        v1_dir, v1_tokens, tmp_path):
    token_file = tmp_path / "tokens.txt"
    token_file.write_text(" ".join(map(str, v1_tokens[:60])))
    out = tmp_path / "out.wav"
    report = synthesize(v1_dir, str(out), tokens=str(token_file), seed=3, device="cpu")
    audio, rate = sf.read(io.BytesIO(out.read_bytes()), dtype="float32")
    assert rate == report.sample_rate == 22050 and report.tokens == 60
    expected = Token2WavV1(v1_dir, device="cpu", seed=3).synthesize(v1_tokens[:60])
    np.testing.assert_array_equal(audio, expected)

    with pytest.raises(ValueError, match="chunk_causal_final"):
        synthesize(v1_dir, str(tmp_path / "x.wav"), tokens=str(token_file), chunk_causal_final=True, device="cpu")
    with pytest.raises(ValueError, match="CosyVoice1 model dir: text goes through"):
        synthesize(v1_dir, str(tmp_path / "x.wav"), text="hello", llm_dir=str(tmp_path), device="cpu")
    token_file.write_text("5 4096")  # a CosyVoice2 id: outside the v1 codebook
    with pytest.raises(ValueError, match="4096"):
        synthesize(v1_dir, str(tmp_path / "x.wav"), tokens=str(token_file), device="cpu")
    assert not (tmp_path / "x.wav").exists()
