"""DPO objective of the recipe (``utils/losses.py`` DPOLoss, beta 0.01, no label smoothing, not IPO)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.01, label_smoothing: float = 0.0,
             ipo: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean loss over pairs and the per-pair rewards ``beta * (policy - reference)``.

    ``logits = (pi_c - pi_r) - (ref_c - ref_r)``; the loss falls as the policy prefers the chosen
    sequence more than the reference does."""
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if ipo:
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    chosen_reward = beta * (policy_chosen - ref_chosen).detach()
    rejected_reward = beta * (policy_rejected - ref_rejected).detach()
    if losses.numel() == 0:  # no pair in this batch has rejected tokens
        return logits.sum() * 0.0, chosen_reward, rejected_reward
    return losses.mean(), chosen_reward, rejected_reward
