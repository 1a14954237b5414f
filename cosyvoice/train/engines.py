"""The two distributed engines behind one small interface: forward, backward, step, save/load.

``torch_ddp``: DistributedDataParallel (or the bare model in a single process), our optimizer and
scheduler, accumulation with ``no_sync``, clipping, a step only when the grad norm is finite.
``deepspeed``: ZeRO from a ``ds_stage2.json``-style file, but with the recipe's optimizer, lr and
scheduler (upstream lets the json's AdamW lr 1e-3 replace the yaml's 1e-5 and crashes building
``ConstantLR`` with ``warmup_steps`` — defect D6).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math

import torch
import torch.distributed as dist

log = logging.getLogger("cosyvoice.train")


class DDPEngine:
    name = "torch_ddp"

    def __init__(self, model: torch.nn.Module, optimizer, scheduler, *, device, accum_grad: int, grad_clip: float,
                 world_size: int):
        self.module = model
        self.model = model
        if world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.accum_grad = accum_grad
        self.grad_clip = grad_clip

    @property
    def call(self):
        """The wrapped module to call directly (DDP's forward hooks included)."""
        return self.model

    def forward(self, method: str, batch: dict, device) -> dict:
        if method == "forward":
            return self.model(batch, device)
        # DDP only hooks __call__/forward: route DPO through forward with a flag-free wrapper
        return getattr(self.module, method)(batch, device) if self.model is self.module else _ddp_call(self.model, method, batch, device)

    def sync_context(self, boundary: bool):
        if boundary or self.model is self.module:
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum_grad).backward()

    def after_backward(self, boundary: bool) -> tuple[float, bool] | None:
        """On an accumulation boundary: clip, step if the norm is finite, zero, advance the schedule;
        returns (grad norm, stepped). Between boundaries: nothing (gradients accumulate)."""
        if not boundary:
            return None
        params = [p for p in self.module.parameters() if p.requires_grad]
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
        stepped = math.isfinite(norm)
        if stepped:
            self.optimizer.step()
        else:
            log.warning("grad norm %s is not finite: optimizer step skipped", norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm, stepped

    def state(self) -> tuple[dict, dict]:
        return self.optimizer.state_dict(), self.scheduler.state_dict()

    def load_state(self, optimizer: dict | None, scheduler: dict | None) -> None:
        if optimizer is not None:
            self.optimizer.load_state_dict(optimizer)
        if scheduler is not None:
            self.scheduler.load_state_dict(scheduler)

    def save_native(self, model_dir: str, name: str, info: dict) -> None:
        pass

    def load_native(self, model_dir: str, name: str) -> dict:
        raise NotImplementedError("torch_ddp keeps its optimizer state in <name>.state.pt")

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def _ddp_call(ddp, method: str, batch: dict, device):
    """Run ``module.<method>`` through DDP's forward so gradient hooks and buffers sync as usual."""
    module = ddp.module
    original = module.forward
    module.forward = getattr(module, method)
    try:
        return ddp(batch, device)
    finally:
        module.forward = original


def load_deepspeed_config(path: str, *, recipe_optimizer: bool = True) -> dict:
    with open(path) as f:
        cfg = json.load(f)
    if recipe_optimizer:
        for key in ("optimizer", "scheduler"):
            if key in cfg:
                log.info("deepspeed config: ignoring its %r block; the recipe's optim/scheduler are used", key)
                cfg.pop(key)
    if cfg.get("train_micro_batch_size_per_gpu", 1) != 1:
        raise ValueError(f"{path}: train_micro_batch_size_per_gpu must be 1 (the data pipeline makes the batches)")
    return cfg


def deepspeed_dtype(cfg: dict) -> torch.dtype:
    if cfg.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if cfg.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, model: torch.nn.Module, optimizer, scheduler, *, config: dict):
        import deepspeed

        params = [p for p in model.parameters() if p.requires_grad]
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        self.module = self.engine.module
        self.accum_grad = int(config.get("gradient_accumulation_steps", 1))
        self.grad_clip = float(config.get("gradient_clipping", 0))

    @property
    def call(self):
        """The DeepSpeed engine, called like the module it wraps."""
        return self.engine

    def forward(self, method: str, batch: dict, device) -> dict:
        if method == "forward":
            return self.engine(batch, device)
        original = self.module.forward
        self.module.forward = getattr(self.module, method)
        try:
            return self.engine(batch, device)
        finally:
            self.module.forward = original

    def sync_context(self, boundary: bool):
        # our boundaries, not DeepSpeed's micro-step counter: the last micro-batch of an epoch closes
        # its (possibly incomplete) accumulation window, as with DDP
        self.engine.set_gradient_accumulation_boundary(boundary)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def after_backward(self, boundary: bool) -> tuple[float, bool] | None:
        skipped = getattr(self.engine, "skipped_steps", 0)
        self.engine.step()  # called every micro-batch: DeepSpeed steps, clips and schedules on its boundaries
        if not boundary:
            return None
        norm = self.engine.get_global_grad_norm()
        return (float(norm) if norm is not None else float("nan")), getattr(self.engine, "skipped_steps", 0) == skipped

    def state(self) -> tuple[None, None]:
        return None, None  # kept by DeepSpeed's own checkpoint (save_native)

    def load_state(self, optimizer, scheduler) -> None:
        pass

    def save_native(self, model_dir: str, name: str, info: dict) -> None:
        self.engine.save_checkpoint(save_dir=model_dir, tag=name, client_state={k: v for k, v in info.items()
                                                                                if isinstance(v, (int, float, str))})

    def load_native(self, model_dir: str, name: str) -> dict:
        """Load DeepSpeed's checkpoint ``<model_dir>/<name>/`` (module strictly, optimizer, scheduler);
        returns its client state (our info: step, epoch, ...). Raises when nothing was loaded."""
        path, client = self.engine.load_checkpoint(model_dir, tag=name, load_module_strict=True,
                                                   load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"{model_dir}/{name}: DeepSpeed found no checkpoint to load")
        return client or {}

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def all_ranks_have(flag: bool, device) -> bool:
    """True while every rank still has a batch: the epoch ends for all ranks when the first one
    runs out (upstream's join semantics, without its 60 s barrier timeout per epoch)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())
