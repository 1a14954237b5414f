"""Checkpoints: the upstream files plus a resumable training state.

Upstream-compatible (contract 5.5 / 12.8): ``<model_dir>/<name>.pt`` = flat model state dict +
``epoch`` and ``step`` ints, and ``<name>.yaml`` with the train conf, ``epoch``, ``step``, ``tag`` and
``loss_dict`` (CV) that ``average_model.py --val_best`` reads. Names: ``init``, ``epoch_{E}_whole``,
``epoch_{E}_step_{S}``.

Ours in addition: ``<name>.state.pt`` with optimizer, scheduler, every rank's RNG states and the
data position, so ``--checkpoint <name>.pt`` continues exactly where the run stopped. Rank 0 writes
it (and the ``.pt``/``.yaml``); under DeepSpeed each rank also writes its own optimizer shard in
DeepSpeed's ``<name>/`` directory. All loads are
``weights_only=True``; all writes are atomic (temporary name, then rename).
"""

from __future__ import annotations

import glob
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import yaml

META_KEYS = ("epoch", "step")


def _atomic_torch_save(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_text(text: str, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_model_files(state_dict: dict, model_dir: str, name: str, info: dict) -> str:
    """``<name>.pt`` (flat state dict + epoch/step) and ``<name>.yaml``; returns the .pt path."""
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, f"{name}.pt")
    flat = {strip_compile_prefix(k): v.detach().cpu() for k, v in state_dict.items()}
    flat["epoch"], flat["step"] = int(info.get("epoch", -1)), int(info.get("step", 0))
    _atomic_torch_save(flat, path)
    info = {**info, "save_time": time.strftime("%d/%m/%Y %H:%M:%S")}
    _atomic_text(yaml.safe_dump(_plain(info), sort_keys=True), os.path.join(model_dir, f"{name}.yaml"))
    return path


def _plain(value):
    """YAML-safe copy (tensors -> floats, tuples -> lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


_COMPILE_PREFIX = "_orig_mod."


def strip_compile_prefix(key: str) -> str:
    """``torch.compile(module)`` wraps a module and adds ``_orig_mod.`` to its keys; checkpoints
    never carry it, so a compiled and an eager run write (and load) the same keys."""
    return key.replace(_COMPILE_PREFIX, "")


def load_model_weights(path: str) -> tuple[dict, int | None, int | None]:
    """A flat ``.pt`` (ours or upstream's) -> (state dict without epoch/step, epoch, step).
    ``_orig_mod.`` prefixes of files written by earlier ``--compile`` runs are removed."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if any(_COMPILE_PREFIX in k for k in sd):
        sd = {strip_compile_prefix(k): v for k, v in sd.items()}
    epoch, step = sd.pop("epoch", None), sd.pop("step", None)
    return sd, (int(epoch) if epoch is not None else None), (int(step) if step is not None else None)


@dataclass
class TrainState:
    """Everything besides the weights that an exact resume needs."""

    epoch: int
    step: int  # optimizer updates done
    batch_in_epoch: int  # batches of ``epoch`` already consumed (0 = epoch not started)
    optimizer: dict | None
    scheduler: dict | None
    rng: dict  # this rank's RNG states
    rank_rngs: list[dict] | None = None  # every rank's RNG states (index = rank), gathered when saving
    world_size: int = 1
    engine: str | None = None  # torch_ddp | deepspeed (None: written before this was recorded)
    model: str | None = None  # llm | flow | hifigan (None: written before this was recorded)
    extra: dict | None = None  # trained tensors outside the .pt layout (the GAN's discriminator)

    @staticmethod
    def capture_rng() -> dict:
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def restore_rng(self) -> None:
        random.setstate(self.rng["python"])
        np.random.set_state(self.rng["numpy"])
        torch.set_rng_state(self.rng["torch"])
        if "cuda" in self.rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.rng["cuda"])


def state_path(pt_path: str) -> str:
    return pt_path[:-3] + ".state.pt" if pt_path.endswith(".pt") else pt_path + ".state.pt"


def _rank_state_path(pt_path: str, rank: int) -> str:
    """Per-rank state files of earlier versions (each rank wrote its optimizer copy); read only."""
    return state_path(pt_path).replace(".state.pt", f".state.rank{rank}.pt")


def save_train_state(state: TrainState, pt_path: str) -> str:
    """One file per checkpoint, ``<name>.state.pt``, written by rank 0 only: the optimizer and
    scheduler (identical on every DDP rank; ``None`` under DeepSpeed, whose ranks write their own
    shards) and the RNG states of all ranks (``rank_rngs``, gathered by the caller). A full-size
    optimizer state is therefore never written once per rank."""
    path = state_path(pt_path)
    rngs = state.rank_rngs if state.rank_rngs is not None else [state.rng]
    _atomic_torch_save({"epoch": state.epoch, "step": state.step, "batch_in_epoch": state.batch_in_epoch,
                        "optimizer": state.optimizer, "scheduler": state.scheduler, "rng": _rng_to_plain(state.rng),
                        "rank_rngs": [_rng_to_plain(r) for r in rngs], "world_size": len(rngs),
                        "engine": state.engine, "model": state.model, "extra": state.extra}, path)
    return path


def load_train_state(pt_path: str, rank: int = 0) -> TrainState | None:
    """The state next to ``pt_path`` with ``rng`` = this rank's RNG states (from ``rank_rngs``, or
    from an older per-rank file), or None when there is no state file (a weights-only checkpoint)."""
    path = state_path(pt_path)
    if not os.path.exists(path):
        return None
    raw = torch.load(path, map_location="cpu", weights_only=True)
    rank_rngs = [_rng_from_plain(r) for r in raw.get("rank_rngs") or []]
    if rank < len(rank_rngs):
        rng = rank_rngs[rank]
    elif rank and os.path.exists(_rank_state_path(pt_path, rank)):
        rng = _rng_from_plain(torch.load(_rank_state_path(pt_path, rank), map_location="cpu", weights_only=True)["rng"])
    else:
        rng = _rng_from_plain(raw["rng"])
    return TrainState(raw["epoch"], raw["step"], raw["batch_in_epoch"], raw["optimizer"], raw["scheduler"], rng,
                      rank_rngs or None, int(raw.get("world_size", 1)), raw.get("engine"), raw.get("model"),
                      raw.get("extra"))


def _rng_to_plain(rng: dict) -> dict:
    rng = dict(rng)
    rng["python"] = _python_rng_to_tensors(rng["python"])
    rng["numpy"] = _numpy_rng_to_plain(rng["numpy"])
    return rng


def _rng_from_plain(rng: dict) -> dict:
    rng = dict(rng)
    rng["python"] = _python_rng_from_tensors(rng["python"])
    rng["numpy"] = _numpy_rng_from_plain(rng["numpy"])
    return rng


# random/numpy RNG states hold tuples and numpy arrays, which weights_only loading refuses; store
# them as tensors and plain lists instead.
def _python_rng_to_tensors(state):
    version, internal, gauss = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _python_rng_from_tensors(state):
    return state["version"], tuple(int(x) for x in state["internal"].tolist()), state["gauss"]


def _numpy_rng_to_plain(state):
    kind, keys, pos, has_gauss, cached = state
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _numpy_rng_from_plain(state):
    return (state["kind"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"], state["cached"])


# -- averaging (bin/average_model.py) ------------------------------------------------------------
def read_checkpoint_yamls(src_path: str) -> list[dict]:
    """Every ``*.yaml`` of a model dir except ``train*``/``init*``, with CV loss, epoch, step."""
    out = []
    for path in sorted(glob.glob(os.path.join(src_path, "*.yaml"))):
        base = os.path.basename(path)
        if base.startswith(("train", "init")):
            continue
        with open(path) as f:
            info = yaml.safe_load(f) or {}
        loss = (info.get("loss_dict") or {}).get("loss")
        if loss is None or "epoch" not in info:
            continue
        out.append({"yaml": path, "name": base[:-5], "loss": float(loss), "epoch": int(info["epoch"]),
                    "step": int(info.get("step", 0))})
    return out


@dataclass
class AverageReport:
    dst_model: str
    sources: list[str]
    losses: list[float]


def average_checkpoints(src_path: str, dst_model: str, num: int = 5, val_best: bool = True, *,
                        allow_fewer: bool = False) -> AverageReport:
    """Average ``num`` checkpoints of ``src_path`` into a plain state dict at ``dst_model``.

    ``val_best``: the ``num`` lowest CV losses (each yaml maps to its own ``.pt`` when it exists,
    else to its epoch's ``epoch_{E}_whole.pt`` as upstream); otherwise the ``num`` most recent
    (by epoch, step). Duplicates are removed. DeepSpeed runs write the same flat ``.pt`` files.
    Fewer than ``num`` distinct checkpoints is an error unless ``allow_fewer`` (a short run)."""
    entries = read_checkpoint_yamls(src_path)
    if val_best:
        entries.sort(key=lambda e: e["loss"])
    else:
        entries.sort(key=lambda e: (e["epoch"], e["step"]), reverse=True)
    paths, losses = [], []
    for e in entries:
        own = os.path.join(src_path, e["name"] + ".pt")
        path = own if os.path.exists(own) else os.path.join(src_path, f"epoch_{e['epoch']}_whole.pt")
        if path in paths or not os.path.exists(path):
            continue
        paths.append(path)
        losses.append(e["loss"])
        if len(paths) == num:
            break
    if not paths:
        raise FileNotFoundError(f"{src_path}: no checkpoints with a CV loss in their .yaml to average")
    if len(paths) < num and not allow_fewer:
        raise ValueError(f"{src_path}: asked to average {num} checkpoints but only {len(paths)} exist: {paths}")
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for path in paths:
        sd, _, _ = load_model_weights(path)
        for k, v in sd.items():
            dtypes[k] = v.dtype
            total[k] = total[k] + v.double() if k in total else v.double()
    avg = {k: (v / len(paths)).to(dtypes[k]) for k, v in total.items()}
    os.makedirs(os.path.dirname(os.path.abspath(dst_model)), exist_ok=True)
    _atomic_torch_save(avg, dst_model)
    return AverageReport(dst_model, paths, losses)
