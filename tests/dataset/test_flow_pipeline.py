"""Flow training data: tokens and mel cut to the same duration (offline tokens are off by one now and then)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from cosyvoice.dataset.processors import align_tokens_to_mel


def _sample(utt: str, tokens: int, frames: int) -> dict:
    return {"utt": utt, "speech_token": np.arange(tokens), "speech_feat": torch.randn(frames, 80)}


def test_tokens_and_mel_are_cut_to_the_shorter_duration_and_mismatches_are_dropped_and_counted():
    stats: Counter = Counter()
    rows = [_sample("one_token_short", 110, 222), _sample("one_frame_pair_short", 112, 222),
            _sample("aligned", 50, 100), _sample("other_tokenizer", 100, 100), _sample("empty", 0, 4)]
    out = {s["utt"]: s for s in align_tokens_to_mel(iter(rows), token_mel_ratio=2, stats=stats)}
    assert sorted(out) == ["aligned", "one_frame_pair_short", "one_token_short"]
    for sample in out.values():
        assert sample["speech_feat"].shape[0] == 2 * len(sample["speech_token"])
    assert len(out["one_token_short"]["speech_token"]) == 110 and out["one_token_short"]["speech_feat"].shape[0] == 220
    assert len(out["one_frame_pair_short"]["speech_token"]) == 111
    assert torch.equal(out["aligned"]["speech_feat"], rows[2]["speech_feat"])
    assert stats == Counter(token_mel_mismatch=2)
