"""The HiFT GAN data pipeline (truncate, compute_f0, padding with gan) and flow batches without whisper."""

import functools
import os
import random
from collections import Counter

import numpy as np
import pytest
import torch

from cosyvoice.dataset.processors import compute_f0, compute_fbank, padding, truncate

SR = 24000
CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


def sample(utt: str, audio, rate: int = SR) -> dict:
    return {"utt": utt, "speech": torch.as_tensor(np.asarray(audio, dtype=np.float32))[None], "sample_rate": rate}


def tone(freq: float, seconds: float = 1.04, harmonics: int = 1) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    return 0.2 * sum(np.sin(2 * np.pi * k * freq * t) / k for k in range(1, harmonics + 1))


def test_truncate_crops_long_and_zero_pads_short_speech_to_exactly_the_length():
    long, short, exact = np.arange(30000) / 30000, np.full(5000, 0.5), np.full(24480, 0.25)
    out = list(truncate([sample("long", long), sample("short", short), sample("exact", exact)],
                        truncate_length=24480, rng=random.Random(0)))
    assert [s["speech"].shape for s in out] == [(1, 24480)] * 3
    crop = out[0]["speech"][0].numpy()
    start = int(round(crop[0] * 30000))
    np.testing.assert_allclose(crop, long[start:start + 24480].astype(np.float32))  # one contiguous window
    assert torch.all(out[1]["speech"][0, :5000] == 0.5) and torch.all(out[1]["speech"][0, 5000:] == 0)
    assert torch.all(out[2]["speech"] == 0.25)
    with pytest.raises(ValueError, match="truncate_length"):
        list(truncate([sample("x", short)], truncate_length=0))


def test_truncate_offsets_repeat_with_a_seeded_rng_and_depend_only_on_the_utterance_without_one():
    def offsets(utts, rng):
        rows = [sample(u, np.arange(40000) / 40000) for u in utts]
        return {s["utt"]: int(round(float(s["speech"][0, 0]) * 40000)) for s in truncate(rows, truncate_length=9600, rng=rng)}

    utts = [f"u{i}" for i in range(8)]
    assert offsets(utts, random.Random(3)) == offsets(utts, random.Random(3))
    assert offsets(utts, random.Random(3)) != offsets(utts, random.Random(4))
    cv = offsets(utts, None)
    assert cv == offsets(list(reversed(utts)), None) and len(set(cv.values())) > 1  # order-free, not all alike


def f0_of(rows, stats=None, hop=480):
    rows = compute_fbank(rows)
    return list(compute_f0(rows, sample_rate=SR, hop_size=hop, stats=stats))


@pytest.mark.parametrize("freq", [120.0, 220.0])
def test_compute_f0_finds_the_pitch_of_a_harmonic_tone_once_per_mel_frame(freq):
    stats = Counter()
    (out,) = f0_of([sample("saw", tone(freq, harmonics=12))], stats)
    pitch = out["pitch_feat"]
    assert pitch.dtype == torch.float32 and pitch.shape == (out["speech_feat"].shape[0],) == (52,)
    inner = pitch[1:-1].numpy()  # the edge frames interpolate towards the unvoiced outside
    assert np.all(np.abs(inner / freq - 1) < 0.03), inner
    assert stats == {}  # harvest found it: no dio fallback


def test_compute_f0_falls_back_to_dio_when_harvest_finds_almost_no_voicing():
    import pyworld

    pure = tone(180.0)
    harvest, _ = pyworld.harvest(pure.astype(np.float64), SR, frame_period=20.0)
    assert np.count_nonzero(harvest) < 5  # the premise: harvest misses a pure tone
    stats = Counter()
    (out,) = f0_of([sample("sine", pure)], stats)
    assert stats == {"f0_dio_fallback": 1}
    assert out["pitch_feat"].shape == (out["speech_feat"].shape[0],)
    assert np.all(np.abs(out["pitch_feat"][1:-1].numpy() / 180.0 - 1) < 0.03)


def test_a_row_whose_f0_extraction_raises_is_dropped_and_counted_not_fatal():
    rows = [sample("good", tone(150.0, 0.5, 8)), sample("empty", np.zeros(0)), sample("good2", tone(150.0, 0.5, 8))]
    with_feat = list(compute_fbank(rows[:1])) + [{**rows[1], "speech_feat": torch.zeros(1, 80)}] + list(
        compute_fbank(rows[2:]))
    stats = Counter()
    out = list(compute_f0(with_feat, sample_rate=SR, hop_size=480, stats=stats))
    assert [s["utt"] for s in out] == ["good", "good2"] and stats == {"f0_extraction_failed": 1}


def test_compute_f0_refuses_rows_before_compute_fbank_or_at_another_rate():
    with pytest.raises(ValueError, match="after compute_fbank"):
        list(compute_f0([sample("a", tone(150.0, 0.2))], sample_rate=SR, hop_size=480))
    with pytest.raises(ValueError, match="16000 Hz, compute_f0 expects 24000"):
        list(compute_f0(compute_fbank([sample("a", tone(150.0, 0.2), 16000)]), sample_rate=SR, hop_size=480))


def test_padding_with_gan_adds_speech_and_pitch_longest_raw_speech_first():
    batch = [{"utt": f"u{n}", "text": "t", "text_token": [1, 2], "speech": torch.full((1, frames * 480), n + 1.0),
              "speech_feat": torch.ones(frames, 80), "pitch_feat": torch.full((frames,), 100.0 * (n + 1)),
              "utt_embedding": np.ones(192), "spk_embedding": np.ones(192)}
             for n, frames in enumerate([40, 60, 50])]
    (out,) = list(padding([batch], gan=True))
    assert out["utts"] == ["u1", "u2", "u0"]
    assert out["speech"].dtype == torch.float32 and out["speech"].shape == (3, 60 * 480)
    assert out["speech_len"].dtype == torch.int32 and out["speech_len"].tolist() == [28800, 24000, 19200]
    assert out["speech"][:, 0].tolist() == [2.0, 3.0, 1.0] and out["speech"][2, 19200:].abs().sum() == 0
    assert out["pitch_feat"].dtype == torch.float32 and out["pitch_feat"].shape == (3, 60)
    assert out["pitch_feat_len"].dtype == torch.int32 and out["pitch_feat_len"].tolist() == [60, 50, 40]
    assert out["pitch_feat"][:, 0].tolist() == [200.0, 300.0, 100.0] and out["pitch_feat"][2, 40:].abs().sum() == 0
    (plain,) = list(padding([batch]))
    assert "speech" not in plain and "pitch_feat" not in plain
    del batch[2]["pitch_feat"]
    with pytest.raises(ValueError, match="u2: no pitch_feat"):
        list(padding([batch], gan=True))


@pytest.fixture(scope="module")
def tiny_recipe():
    from cosyvoice.config import load_recipe
    from cosyvoice.dataset.text import bundled_qwen_tokenizer_dir

    overrides = {"llm": None, "flow": None, "hift": None, "hifigan": None,
                 "qwen_pretrain_path": bundled_qwen_tokenizer_dir()}
    return load_recipe(os.path.join(CONFIGS, "cosyvoice2-tiny.yaml"), overrides)


def test_from_recipe_reads_the_gan_stages_whether_implemented_or_named_only(tiny_recipe):
    from cosyvoice.config import not_implemented
    from cosyvoice.dataset.pipeline import PipelineConfig

    ours = PipelineConfig.from_recipe(tiny_recipe, gan=True)
    assert (ours.gan, ours.truncate_length, ours.f0_hop, ours.resample_rate) == (True, 9600, 480, 24000)
    named = {"truncate": functools.partial(not_implemented, truncate_length=24960),
             "compute_f0": functools.partial(not_implemented, sample_rate=24000, hop_size=240)}
    assert (PipelineConfig.from_recipe(named).truncate_length, PipelineConfig.from_recipe(named).f0_hop) == (24960, 240)
    assert (PipelineConfig.from_recipe({}).truncate_length, PipelineConfig.from_recipe({}).gan) == (24480, False)
    with pytest.raises(ValueError, match="compute_f0 sample_rate 22050 differs from the resample rate 24000"):
        PipelineConfig.from_recipe({"compute_f0": functools.partial(not_implemented, sample_rate=22050, hop_size=480)})


def test_gan_batches_hold_480_samples_per_mel_frame_with_pitch_and_no_whisper_feat(training_list, tiny_recipe):
    """24480 samples (51 hops) are padded by compute_fbank to 26 x 960 = 24960 = 52 frames x 480, the
    HiFT generator's samples per frame; pitch_feat has one value per mel frame."""
    from cosyvoice.dataset.pipeline import PipelineConfig, TrainingDataset

    config = PipelineConfig.from_recipe(tiny_recipe, gan=True, truncate_length=24480)
    assert config.whisper_feat  # the recipe's LLM setting; the gan chain leaves whisper out regardless
    dataset = TrainingDataset(training_list, config, seed=1)
    dataset.set_epoch(0)
    batches = list(dataset)
    assert sum(len(b["utts"]) for b in batches) == 15 and not dataset.stats
    for b in batches:
        n = len(b["utts"])
        assert "whisper_feat" not in b and b["speech"].dtype == torch.float32 and b["pitch_feat"].dtype == torch.float32
        assert b["speech"].shape == (n, 24960) and b["speech_len"].tolist() == [24960] * n
        assert b["speech_feat"].shape[:2] == (n, 52) and b["speech"].shape[1] == 480 * b["speech_feat"].shape[1]
        assert torch.equal(b["pitch_feat_len"], b["speech_feat_len"]) and b["pitch_feat"].shape == (n, 52)
        assert b["speech"][:, 24480:].abs().sum() == 0 and (b["pitch_feat"] > 0).any(dim=1).all()  # speech is voiced


def test_gan_cv_crops_repeat_across_epochs(training_list, tiny_recipe):
    from cosyvoice.dataset.pipeline import PipelineConfig, TrainingDataset

    config = PipelineConfig.from_recipe(tiny_recipe, gan=True)  # 9600 samples: 20 frames
    dataset = TrainingDataset(training_list, config, train=False)

    def crops(epoch):
        dataset.set_epoch(epoch)
        return {u: b["speech"][i] for b in dataset for i, u in enumerate(b["utts"])}

    first, second = crops(0), crops(1)
    assert len(first) == 15 and all(torch.equal(first[u], second[u]) for u in first)
    assert {tuple(s.shape) for s in first.values()} == {(9600,)}


def test_flow_batches_from_the_recipe_with_whisper_feat_false_have_tokens_and_no_whisper_feat(training_list, tiny_recipe):
    from cosyvoice.dataset.pipeline import PipelineConfig, TrainingDataset

    config = PipelineConfig.from_recipe(tiny_recipe, whisper_feat=False)
    assert config.whisper_feat is False and not config.gan
    batches = list(TrainingDataset(training_list, config, train=False))
    assert sum(len(b["utts"]) for b in batches) == 15
    for b in batches:
        assert "whisper_feat" not in b and "speech" not in b and "pitch_feat" not in b
        assert b["speech_token"].dtype == torch.int64 and b["speech_feat"].shape[2] == 80
        assert b["embedding"].shape == (len(b["utts"]), 192)
