"""Learning-rate schedules of the recipes, with upstream's formulas (``cosyvoice/utils/scheduler.py``).

All are ``LambdaLR``-style multipliers of the optimizer's base lr, indexed by the optimizer step
``s`` (``last_epoch``), so they resume exactly from a saved ``state_dict`` and ``set_step`` puts
them anywhere (upstream's ``--checkpoint`` behaviour).
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class _StepScheduler(LRScheduler):
    def factor(self, step: int) -> float:  # multiplier of the base lr at optimizer step ``step``
        raise NotImplementedError

    def get_lr(self) -> list[float]:
        return [self.factor(self.last_epoch) * base for base in self.base_lrs]

    def set_step(self, step: int) -> None:
        self.last_epoch = step
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]


class WarmupLR(_StepScheduler):
    """lr = base * warmup^0.5 * min(n^-0.5, n * warmup^-1.5) with n = step + 1: linear warm-up to the
    base lr at ``warmup_steps``, then inverse square-root decay."""

    def __init__(self, optimizer: Optimizer, warmup_steps: float = 25000, last_epoch: int = -1):
        self.warmup_steps = warmup_steps
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        n = step + 1
        if self.warmup_steps == 0:
            return n ** -0.5
        return self.warmup_steps ** 0.5 * min(n ** -0.5, n * self.warmup_steps ** -1.5)


class ConstantLR(_StepScheduler):
    """The base lr. Accepts (and ignores) the recipe's ``scheduler_conf`` such as ``warmup_steps``,
    which upstream's DeepSpeed path passes and crashes on (defect D6)."""

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1, **_recipe_conf):
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        return 1.0


class NoamHoldAnnealing(_StepScheduler):
    """Linear warm-up, hold at the base lr, then ``(warmup^d) / (s - hold)^d`` decay floored at
    ``min_lr`` (NeMo's schedule as configured upstream; ``decay_rate`` 0.5 = Noam)."""

    def __init__(self, optimizer: Optimizer, *, max_steps: int, warmup_steps: int | None = None,
                 warmup_ratio: float | None = None, hold_steps: int | None = None, hold_ratio: float | None = None,
                 decay_rate: float = 0.5, min_lr: float = 0.0, last_epoch: int = -1):
        if warmup_steps is not None and warmup_ratio is not None:
            raise ValueError("NoamHoldAnnealing: give warmup_steps or warmup_ratio, not both")
        if hold_steps is not None and hold_ratio is not None:
            raise ValueError("NoamHoldAnnealing: give hold_steps or hold_ratio, not both")
        self.max_steps = max_steps
        self.warmup_steps = warmup_steps if warmup_steps is not None else int((warmup_ratio or 0) * max_steps)
        if not self.warmup_steps:
            raise ValueError("NoamHoldAnnealing needs warm-up steps")
        hold = hold_steps if hold_steps is not None else int((hold_ratio or 0) * max_steps)
        self.hold_steps = hold  # steps held after the warm-up
        self.decay_rate = decay_rate
        self.min_lr = min_lr
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        step = self.last_epoch
        if step <= self.warmup_steps:
            return [base * (step + 1) / (self.warmup_steps + 1) for base in self.base_lrs]
        if self.hold_steps and step < self.warmup_steps + self.hold_steps:
            return list(self.base_lrs)
        if step > self.max_steps:
            return [self.min_lr for _ in self.base_lrs]
        warm = max(1.0, self.warmup_steps ** self.decay_rate)
        decay = max(1.0, (step - self.hold_steps) ** self.decay_rate)
        return [max(base * warm / decay, self.min_lr) for base in self.base_lrs]


SCHEDULERS = {"warmuplr": WarmupLR, "constantlr": ConstantLR, "NoamHoldAnnealing": NoamHoldAnnealing}


def build_scheduler(name: str, optimizer: Optimizer, conf: dict | None) -> _StepScheduler:
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    conf = dict(conf or {})
    if name == "warmuplr":
        conf = {k: v for k, v in conf.items() if k == "warmup_steps"}
    return SCHEDULERS[name](optimizer, **conf)
