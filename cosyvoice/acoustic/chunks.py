"""Chunk-causal passes that resume where the previous call of a stream stopped.

CosyVoice2's flow is chunk-causal when streaming: with static chunks of ``C`` positions, position
``i`` sees every position before the end of its own chunk, ``(i // C + 1) * C``, and nothing after.
So once a chunk is complete (the sequence reaches its end), every layer's output on it is final: a
later call over a longer prefix computes the same values. A :class:`ChunkState` keeps, per layer,
what later positions need from those final chunks (attention keys and values, the last inputs of a
causal convolution), so a call computes only the positions after the last complete chunk.

A pass over positions ``[start, end)`` is described by a :class:`Pass`: layers ask it for their
cached left context and hand back what to keep; it commits only positions before ``commit`` (the
last chunk boundary not after ``end``), because the partial chunk at the end changes when the
sequence grows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch


@functools.lru_cache(maxsize=32)
def chunk_mask(q_start: int, q_end: int, k_end: int, chunk: int, device=None) -> torch.Tensor | None:
    """Boolean (queries, keys) mask: query ``i`` in ``[q_start, q_end)`` sees keys ``j < (i//chunk+1)*chunk``.

    ``chunk <= 0`` means full attention (no mask, returned as None). Keys are ``[0, k_end)``. None
    too when every query sees every key (all in one chunk), so attention takes its unmasked kernels.
    Memoized: every attention layer and solver step of a call asks for the same mask (read-only).
    """
    if chunk <= 0 or k_end <= (q_start // chunk + 1) * chunk:
        return None
    q = torch.arange(q_start, q_end, device=device)
    limit = (torch.div(q, chunk, rounding_mode="floor") + 1) * chunk
    return torch.arange(k_end, device=device)[None, :] < limit[:, None]


@dataclass
class ChunkState:
    """What a stream's earlier calls computed for its complete chunks, per layer and solver step."""

    #: tokens of the stream whose chunks are complete (the flow's own bookkeeping)
    done: int = 0
    store: dict = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for v in self.store.values() for t in v)


class Pass:
    """One chunk-causal forward over positions ``[start, end)`` of a stream.

    ``state`` None means a plain pass from position 0 with nothing cached or kept. Positions are in
    the time base of the layers that use the pass (tokens or mel frames); several passes can share
    one state because entries are keyed by layer and solver step.
    """

    def __init__(self, state: ChunkState | None, start: int, end: int, commit: int, step: int | str = 0):
        self.state, self.start, self.end, self.commit, self.step = state, start, end, commit, step

    def at_step(self, step) -> Pass:
        return Pass(self.state, self.start, self.end, self.commit, step)

    def _key(self, module: torch.nn.Module, kind: str):
        return (self.step, id(module), kind)

    def left_context(self, module: torch.nn.Module, x: torch.Tensor, width: int) -> torch.Tensor:
        """``x`` (B, C, T new positions) with the ``width`` inputs before ``start`` prepended (zeros at 0).

        Keeps the ``width`` inputs before ``commit`` for the next call.
        """
        if self.state is None or self.start == 0:
            past = x.new_zeros(x.shape[0], x.shape[1], width)
        else:
            (past,) = self.state.store[self._key(module, "conv")]
        full = torch.cat([past, x], dim=2)
        if self.state is not None:
            # full[:, :, k] is position start - width + k
            lo = self.commit - width - (self.start - width)
            self.state.store[self._key(module, "conv")] = (full[:, :, lo:lo + width].clone(),)
        return full

    def keys_values(self, module: torch.nn.Module, k: torch.Tensor, v: torch.Tensor):
        """Keys and values (B, H, T, D) of ``[0, end)``: the cached ones before ``start`` + the new ones.

        Keeps those before ``commit``.
        """
        if self.state is not None and self.start > 0:
            k0, v0 = self.state.store[self._key(module, "kv")]
            k, v = torch.cat([k0, k], dim=2), torch.cat([v0, v], dim=2)
        if self.state is not None:
            self.state.store[self._key(module, "kv")] = (k[:, :, :self.commit], v[:, :, :self.commit])
        return k, v


#: a plain pass (nothing cached, full attention): what the compiled estimator is traced with
PLAIN = Pass(None, 0, 0, 0)
