"""The published sample: waveform + spectrogram PNG of ~2 s spoken by a model dir's flow + HiFT."""

from __future__ import annotations

import base64
import io
import os
import shutil

import numpy as np
import pytest
import torch

from cosyvoice.acoustic.preview import render_png, sample_preview

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _image(png: bytes) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(io.BytesIO(png), format="png")


def test_render_png_draws_a_deterministic_picture():
    rng = np.random.default_rng(0)
    samples = (0.3 * np.sin(2 * np.pi * 220 * np.arange(24000) / 24000) + rng.normal(0, 0.01, 24000)).astype(np.float32)
    png = render_png(samples, 24000, title="a tone")
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    image = _image(png)
    assert image.shape[:2] == (360, 630) and image[..., :3].std() > 0.05  # 7 x 4 in at 90 dpi, not blank
    assert render_png(samples, 24000, title="a tone") == png
    assert render_png(samples[:100], 24000) != png  # shorter than one spectrogram frame: padded, drawn


@pytest.mark.parametrize("bad", [np.zeros(0, np.float32), np.array([0.1, np.nan], np.float32)])
def test_render_png_refuses_empty_or_non_finite_audio(bad):
    with pytest.raises(ValueError, match="a non-empty finite waveform is needed"):
        render_png(bad, 24000)


@pytest.fixture(scope="module")
def spk2info(tmp_path_factory) -> str:
    """A speaker cache in the served format: speaker "001" with 80 prompt tokens (3.2 s)."""
    rng = np.random.default_rng(5)
    entry = {"prompt_text": "hello", "speech_token": torch.from_numpy(rng.integers(0, 6561, (1, 80)).astype(np.int32)),
             "speech_feat": torch.zeros(1, 160, 80), "embedding": torch.from_numpy(rng.normal(0, 1, (1, 192)).astype(np.float32))}
    path = tmp_path_factory.mktemp("spk") / "spk2info.pt"
    torch.save({"001": entry}, path)
    return str(path)


def test_the_sample_is_two_seconds_of_the_default_speakers_tokens(tiny_models, spk2info):
    from cosyvoice.acoustic.token2wav import Token2Wav

    preview = sample_preview(tiny_models, spk2info, utterance="u1")
    assert (preview.status, preview.tokens, preview.seconds, preview.speaker) == ("rendered", 50, 2.0, "001")
    assert 0 < preview.rms <= preview.peak <= 0.99
    assert _image(preview.png).shape[:2] == (360, 630)
    markdown = preview.markdown()
    assert markdown.startswith("![sample: 2.00 s, speaker 001](data:image/png;base64,")
    assert base64.b64decode(markdown.split("base64,", 1)[1].rstrip(")")) == preview.png
    meta = preview.as_metadata()
    assert meta["sample_status"] == "rendered" and meta["sample_seconds"] == 2.0 and meta["sample_utterance"] == "u1"
    # the picture is of what Token2Wav says for those tokens and that speaker, with the seeded noise
    entry = torch.load(spk2info, weights_only=True)["001"]
    samples = Token2Wav(tiny_models, seed=0).synthesize(entry["speech_token"][0, :50].numpy(),
                                                         embedding=entry["embedding"][0].numpy())
    assert preview.png == render_png(samples, 24000, title="2.00 s from 50 speech tokens of speaker 001 (u1)")
    assert sample_preview(tiny_models, spk2info, seconds=1.0).tokens == 25


def test_a_model_dir_without_acoustic_models_records_that_instead_of_a_picture(tiny_models, spk2info, tmp_path):
    folder = tmp_path / "onnx_only"
    folder.mkdir()
    shutil.copy(os.path.join(tiny_models, "hift.pt"), folder / "hift.pt")
    preview = sample_preview(str(folder), spk2info)
    assert preview.status == "skipped" and preview.png is None and "has no flow.pt" in preview.reason
    assert preview.as_metadata() == {"sample_status": "skipped", "sample_reason": preview.reason}
    assert preview.markdown() == f"no sample (skipped): {preview.reason}"


def test_acoustic_models_that_do_not_load_are_a_failed_sample_not_a_crash(tiny_models, spk2info, tmp_path):
    folder = tmp_path / "damaged"
    folder.mkdir()
    for name in ("hift.pt", "cosyvoice2.yaml"):
        shutil.copy(os.path.join(tiny_models, name), folder / name)
    (folder / "flow.pt").write_bytes(b"not a checkpoint")
    preview = sample_preview(str(folder), spk2info)
    assert preview.status == "failed" and preview.png is None and "token2wav on damaged" in preview.reason


def test_an_unknown_speaker_is_a_clear_error(tiny_models, spk2info):
    with pytest.raises(ValueError, match="no speaker '002'"):
        sample_preview(tiny_models, spk2info, speaker="002")
