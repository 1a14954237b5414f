"""Learning-rate schedules follow upstream's formulas and resume from any step."""

from __future__ import annotations

import pytest
import torch

from cosyvoice.train.schedulers import ConstantLR, NoamHoldAnnealing, WarmupLR, build_scheduler


def opt(lr=1e-3):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def lrs(sched, n):
    out = []
    for _ in range(n):
        out.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    return out


def test_warmuplr_peaks_at_the_base_lr_after_warmup_then_decays_as_inverse_sqrt():
    values = lrs(WarmupLR(opt(1e-3), warmup_steps=100), 400)
    for s, lr in enumerate(values):
        n = s + 1
        assert lr == pytest.approx(1e-3 * 100 ** 0.5 * min(n ** -0.5, n * 100 ** -1.5))
    assert max(values) == pytest.approx(1e-3) and values.index(max(values)) == 99
    assert values[399] == pytest.approx(1e-3 * (100 / 400) ** 0.5)


def test_constantlr_ignores_the_recipes_warmup_steps():
    sched = build_scheduler("constantlr", opt(1e-5), {"warmup_steps": 2500})
    assert isinstance(sched, ConstantLR) and set(lrs(sched, 5)) == {1e-5}


def test_noam_hold_annealing_warms_holds_and_decays():
    sched = NoamHoldAnnealing(opt(1.0), max_steps=1000, warmup_steps=10, hold_steps=20, decay_rate=0.5, min_lr=1e-3)
    values = lrs(sched, 1002)
    assert values[0] == pytest.approx(1 / 11) and values[10] == pytest.approx(1.0)
    assert values[15] == values[29] == 1.0
    assert values[100] == pytest.approx(max(10 ** 0.5 / (100 - 20) ** 0.5, 1e-3))
    assert values[1001] == 1e-3


def test_set_step_and_state_dict_resume_the_schedule():
    a = WarmupLR(opt(), warmup_steps=50)
    lrs(a, 30)
    b = WarmupLR(opt(), warmup_steps=50)
    b.load_state_dict(a.state_dict())
    c = WarmupLR(opt(), warmup_steps=50)
    c.set_step(30)
    assert lrs(a, 5) == lrs(b, 5) == lrs(c, 5)


def test_unknown_scheduler_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown scheduler"):
        build_scheduler("cosine", opt(), {})
