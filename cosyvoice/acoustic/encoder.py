"""The flow's token encoder: tokens (25 Hz) -> 512-d features at the mel rate (50 Hz).

Layout and parameter names follow CosyVoice2's ``UpsampleConformerEncoder`` so the released
``flow.pt`` loads strictly: a linear input embedding, a pre-lookahead layer (each token sees the 3
tokens after it), 6 Conformer blocks with relative-position self-attention (espnet variant), a
nearest x2 upsampling + causal convolution, a second embedding and 4 more blocks, then a final norm.
No convolution module and no macaron feed-forward (the CosyVoice2 recipe's settings).

Every stage is position-wise or causal except attention, which is chunk-causal when streaming (25
tokens in the first stack, 50 frames in the second). That is what lets :class:`~.chunks.Pass`
resume a stream at its last complete chunk instead of re-running the prefix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice.acoustic.chunks import Pass, chunk_mask


class LinearEmbed(nn.Module):
    """Linear + LayerNorm, scaled by sqrt(d) (what the relative positional encoding expects)."""

    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(dim_in, dim), nn.LayerNorm(dim, eps=1e-5))
        self.scale = math.sqrt(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x) * self.scale


def relative_positions(first: int, last: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Sinusoidal codes of the relative distances ``last, last-1, ..., first`` (rows), (n, dim).

    The espnet relative encoding: row for distance r is ``sin(r w_k), cos(r w_k)`` interleaved,
    for queries to the right of keys (r > 0) and to the left (r < 0) alike.
    """
    r = torch.arange(last, first - 1, -1, dtype=torch.float32, device=device)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / dim))
    pe = torch.zeros(r.shape[0], dim, device=device)
    pe[:, 0::2] = torch.sin(r * freq)
    pe[:, 1::2] = torch.cos(r * freq)
    return pe.to(dtype)


class RelPositionAttention(nn.Module):
    """Multi-head self-attention with Transformer-XL relative position terms (biases u and v)."""

    def __init__(self, heads: int, dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.linear_q = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim)
        self.linear_v = nn.Linear(dim, dim)
        self.linear_out = nn.Linear(dim, dim)
        self.linear_pos = nn.Linear(dim, dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(heads, self.head_dim))
        self.pos_bias_v = nn.Parameter(torch.zeros(heads, self.head_dim))

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, H, T, d)
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, run: Pass, chunk: int) -> torch.Tensor:
        """``x``: positions ``[run.start, run.end)``; keys are ``[0, run.end)`` (cached + new)."""
        b, tq, _ = x.shape
        q = self.linear_q(x).view(b, tq, self.heads, self.head_dim)
        k, v = run.keys_values(self, self._split(self.linear_k(x)), self._split(self.linear_v(x)))
        tk = k.shape[2]
        content = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        # distances i - j run from start - (tk - 1) (first query, last key) to end - 1
        pe = relative_positions(run.start - tk + 1, run.end - 1, self.heads * self.head_dim, x.device, x.dtype)
        p = self.linear_pos(pe).view(-1, self.heads, self.head_dim).transpose(0, 1)  # (H, R, d)
        position = torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))  # (B, H, tq, R)
        # the row of distance (start + i) - j is (end - 1) - (start + i - j)
        index = (torch.arange(tk, device=x.device)[None, :] - torch.arange(tq, device=x.device)[:, None]
                 + (run.end - 1 - run.start))
        position = torch.gather(position, 3, index.expand(b, self.heads, tq, tk))
        scores = (content + position) / math.sqrt(self.head_dim)
        mask = chunk_mask(run.start, run.end, tk, chunk, x.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        attn = torch.softmax(scores, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, tq, self.heads * self.head_dim)
        return self.linear_out(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden)
        self.w_2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerBlock(nn.Module):
    """Pre-norm attention + feed-forward (the recipe's Conformer without its convolution module)."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.self_attn = RelPositionAttention(heads, dim)
        self.feed_forward = FeedForward(dim, hidden)
        self.norm_ff = nn.LayerNorm(dim, eps=1e-12)
        self.norm_mha = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: torch.Tensor, run: Pass, chunk: int) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), run, chunk)
        return x + self.feed_forward(self.norm_ff(x))


class PreLookahead(nn.Module):
    """Each token sees the ``lookahead`` tokens after it (conv1), then a causal conv (conv2) + residual."""

    def __init__(self, dim: int, lookahead: int):
        super().__init__()
        self.lookahead = lookahead
        self.conv1 = nn.Conv1d(dim, dim, kernel_size=lookahead + 1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3)

    def forward(self, x: torch.Tensor, start: int, lo: int, n_context: int) -> torch.Tensor:
        """``x``: embedded tokens at positions ``[lo, end + n_context)`` with ``lo = max(start - 2, 0)``;
        returns positions ``[start, end)``. Missing look-ahead past the end is zeros."""
        h = F.pad(x.transpose(1, 2), (0, self.lookahead - n_context))
        h = F.leaky_relu(self.conv1(h))  # positions [lo, end)
        h = F.pad(h, (2 - (start - lo), 0))  # zeros before position 0, real outputs otherwise
        h = self.conv2(h).transpose(1, 2)  # positions [start, end)
        return h + x[:, start - lo:start - lo + h.shape[1]]


class TokenUpsample(nn.Module):
    """Nearest x2 upsampling followed by a causal convolution over 4 past frames."""

    def __init__(self, dim: int, stride: int = 2):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(dim, dim, kernel_size=2 * stride + 1)

    def forward(self, x: torch.Tensor, run: Pass) -> torch.Tensor:
        """``x``: (B, D, tokens ``[run.start, run.end)``) -> (B, D, frames ``[2 start, 2 end)``)."""
        x = run.left_context(self, x, 2)  # the 2 tokens before start give the 4 frames the conv needs
        return self.conv(torch.repeat_interleave(x, self.stride, dim=2))


class UpsampleConformerEncoder(nn.Module):
    def __init__(self, dim: int = 512, heads: int = 8, hidden: int = 2048, blocks: int = 6, up_blocks: int = 4,
                 chunk: int = 25, lookahead: int = 3):
        super().__init__()
        self.chunk, self.lookahead = chunk, lookahead
        self.embed = LinearEmbed(dim, dim)
        self.pre_lookahead_layer = PreLookahead(dim, lookahead)
        self.encoders = nn.ModuleList(ConformerBlock(dim, heads, hidden) for _ in range(blocks))
        self.up_layer = TokenUpsample(dim)
        self.up_embed = LinearEmbed(dim, dim)
        self.up_encoders = nn.ModuleList(ConformerBlock(dim, heads, hidden) for _ in range(up_blocks))
        self.after_norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, tokens: torch.Tensor, n_context: int, chunked: bool, token_run: Pass,
                frame_run: Pass) -> torch.Tensor:
        """``tokens``: embedded tokens (B, end + n_context, D), the last ``n_context`` only look-ahead.

        Returns the features of frames ``[frame_run.start, frame_run.end)``, i.e. tokens
        ``[token_run.start, token_run.end)`` at 2 frames each. ``chunked`` selects chunk-causal
        attention (streaming); otherwise every position sees the whole sequence.
        """
        start = token_run.start
        lo = max(start - 2, 0)
        x = self.pre_lookahead_layer(self.embed(tokens[:, lo:]), start, lo, n_context)
        for block in self.encoders:
            x = block(x, token_run, self.chunk if chunked else 0)
        x = self.up_layer(x.transpose(1, 2), token_run).transpose(1, 2)
        x = self.up_embed(x)
        for block in self.up_encoders:
            x = block(x, frame_run, self.chunk * self.up_layer.stride if chunked else 0)
        return self.after_norm(x)
