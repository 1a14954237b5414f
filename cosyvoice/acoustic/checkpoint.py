"""Strict loading of released acoustic checkpoints (``flow.pt``, ``hift.pt``).

Upstream loads them with ``strict=True``; a file from another model version must fail loudly with
the keys that differ, never load half a model. Files are plain tensor state dicts, read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch

StateSource = str | os.PathLike | Mapping[str, torch.Tensor] | bytes


def read_state_dict(source: StateSource, what: str) -> tuple[dict[str, Any], str]:
    """(state dict, where it came from) of a path, bytes or mapping; a clear error for anything else."""
    if isinstance(source, Mapping):
        return dict(source), f"{what} state dict"
    if isinstance(source, bytes):
        where, handle = f"{what} bytes", io.BytesIO(source)
    else:
        where = handle = os.fspath(source)
        if not os.path.isfile(where):
            raise FileNotFoundError(f"{where}: no such {what} checkpoint")
    try:
        obj = torch.load(handle, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors name the offending global
        raise ValueError(f"{where}: not a plain tensor state dict loadable with weights_only=True ({exc})") from exc
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a state dict (mapping of tensors), got {type(obj).__name__}")
    return dict(obj), where


def describe_keys(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{len(keys)}: {shown}{more}"


def _shape(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else f"{type(value).__name__} (not a tensor)"


def check_state(state: Mapping[str, Any], expected: Mapping[str, torch.Tensor], where: str, *,
                missing: Sequence[str] = (), mismatched: Sequence[str] = (), handled: Collection[str] = ()) -> None:
    """Raise ValueError naming missing / unexpected keys and shape mismatches (none tolerated).

    ``missing`` / ``mismatched``: problems the caller found itself (e.g. half of a weight-norm
    pair), listed first; ``handled``: expected keys the caller accounts for, not reported missing.
    """
    missing = [*missing, *sorted(set(expected) - set(state) - set(handled))]
    unexpected = sorted(set(state) - set(expected))
    mismatched = [*mismatched, *(f"{k}: file {_shape(state[k])}, model {tuple(expected[k].shape)}"
                                 for k in sorted(set(state) & set(expected))
                                 if not isinstance(state[k], torch.Tensor) or state[k].shape != expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys {describe_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {describe_keys(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches {describe_keys(mismatched)}")
    if problems:
        raise ValueError(f"{where} does not match the model: " + "; ".join(problems))


def load_released(model: torch.nn.Module, source: StateSource, what: str) -> torch.nn.Module:
    """``model`` with a released plain state dict (path, bytes or dict) loaded strictly, in eval mode: every
    key and shape must match, and a mismatch names the keys."""
    state, where = read_state_dict(source, what)
    check_state(state, model.state_dict(), where)
    model.load_state_dict(state, strict=True)
    return model.eval()
