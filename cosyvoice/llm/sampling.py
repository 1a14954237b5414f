"""Token samplers with the upstream call signature ``f(weighted_scores, decoded_tokens, sampling) -> int``.

``weighted_scores`` are the log-probabilities of one step (1-D). ``ras_sampling`` is VALL-E 2's
repetition-aware sampling as configured in the recipes (top-p 0.8, top-k 25, window 10, tau 0.1).
"""

from __future__ import annotations

import torch


def greedy_sampling(weighted_scores: torch.Tensor, decoded_tokens: list[int], sampling=None) -> int:
    """Deterministic argmax; what tests and the HF/TRT-LLM agreement checks use."""
    return int(weighted_scores.argmax().item())


def random_sampling(weighted_scores: torch.Tensor, decoded_tokens: list[int], sampling=None) -> int:
    return int(weighted_scores.softmax(dim=0).multinomial(1, replacement=True).item())


def nucleus_sampling(weighted_scores: torch.Tensor, top_p: float = 0.8, top_k: int = 25) -> int:
    """Sample among the most probable ids until their mass reaches ``top_p`` (at most ``top_k`` ids)."""
    probs, ids = weighted_scores.softmax(dim=0).sort(descending=True, stable=True)
    probs, ids = probs[:top_k], ids[:top_k]
    # keep id i while the mass *before* it is below top_p (so the first id is always kept)
    before = torch.cumsum(probs, dim=0) - probs
    keep = before < top_p
    probs, ids = probs[keep], ids[keep]
    return int(ids[probs.multinomial(1, replacement=True)].item())


def ras_sampling(weighted_scores: torch.Tensor, decoded_tokens: list[int], sampling=None, top_p: float = 0.8,
                 top_k: int = 25, win_size: int = 10, tau_r: float = 0.1) -> int:
    """Nucleus sampling; if the pick repeats too often in the recent window, resample from the full
    distribution without it."""
    top_id = nucleus_sampling(weighted_scores, top_p=top_p, top_k=top_k)
    repeats = sum(1 for t in decoded_tokens[-win_size:] if t == top_id)
    if repeats >= win_size * tau_r:
        weighted_scores = weighted_scores.clone()
        weighted_scores[top_id] = -float("inf")
        top_id = random_sampling(weighted_scores, decoded_tokens, sampling)
    return top_id
