"""The flow's token encoder: tokens (25 Hz) -> 512-d features at the mel rate (50 Hz).

Layout and parameter names follow CosyVoice2's ``UpsampleConformerEncoder`` so the released
``flow.pt`` loads strictly: a linear input embedding, a pre-lookahead layer (each token sees the 3
tokens after it), 6 Conformer blocks with relative-position self-attention (espnet variant), a
nearest x2 upsampling + causal convolution, a second embedding and 4 more blocks, then a final norm.
No convolution module and no macaron feed-forward (the CosyVoice2 recipe's settings).

Every stage is position-wise or causal except attention, which is chunk-causal when streaming (25
tokens in the first stack, 50 frames in the second). That is what lets :class:`~.chunks.Pass`
resume a stream at its last complete chunk instead of re-running the prefix.

Training runs :meth:`UpsampleConformerEncoder.padded` instead: a padded batch with upstream's
key-padding (and chunk) masks and its dropout (after the input norm, after the positional scaling,
on the relative position codes, on the attention weights, inside and after each sub-layer), drawn
in upstream's order. Padded positions are not masked anywhere else, as upstream: a shorter
utterance's last tokens look ahead into the embedded padding, not into zeros.
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

    def padded(self, x: torch.Tensor, dropout: float, positional_dropout: float) -> torch.Tensor:
        """Training: dropout after the norm, then after the scaling (upstream's embed + positional encoding)."""
        h = F.dropout(self.out(x), dropout, self.training)
        return F.dropout(h * self.scale, positional_dropout, self.training)


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

    def __init__(self, heads: int, dim: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.dropout = dropout  # on the attention weights, in training
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

    def padded(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Training over a padded batch ``x`` (B, T, D): every position attends to the keys ``mask``
        (B, 1, 1 or T, T) allows; ``pos`` (2T - 1, D) codes the distances T-1 .. -(T-1)."""
        b, t, _ = x.shape
        h, d = self.heads, self.head_dim
        q = self.linear_q(x).view(b, t, h, d)
        k, v = self._split(self.linear_k(x)), self._split(self.linear_v(x))
        p = self.linear_pos(pos).view(-1, h, d).transpose(0, 1)  # (H, 2T-1, d)
        content = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        # the position codes are shared by the batch: one product per head over all B x T queries
        qv = (q + self.pos_bias_v).permute(2, 0, 1, 3).reshape(h, b * t, d)
        position = torch.matmul(qv, p.transpose(-2, -1))  # (H, B T, 2T-1), contiguous
        # entry (i, j) wants distance i - j, i.e. column (t - 1) - i + j: a view with row stride 2t - 2
        width = 2 * t - 1
        position = position.as_strided((h, b, t, t), (b * t * width, t * width, width - 1, 1),
                                       position.storage_offset() + t - 1).transpose(0, 1)
        scores = (content + position) / math.sqrt(d)
        attn = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        attn = F.dropout(attn, self.dropout, self.training)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, t, h * d)
        return self.linear_out(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden)
        self.w_2 = nn.Linear(hidden, dim)
        self.dropout = dropout  # between the two projections, in training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.dropout(F.silu(self.w_1(x)), self.dropout, self.training))


class ConformerBlock(nn.Module):
    """Pre-norm attention + feed-forward (the recipe's Conformer without its convolution module)."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float = 0.0, attention_dropout: float = 0.0):
        super().__init__()
        self.self_attn = RelPositionAttention(heads, dim, attention_dropout)
        self.feed_forward = FeedForward(dim, hidden, dropout)
        self.norm_ff = nn.LayerNorm(dim, eps=1e-12)
        self.norm_mha = nn.LayerNorm(dim, eps=1e-12)
        self.dropout = dropout  # on each sub-layer's output, in training

    def forward(self, x: torch.Tensor, run: Pass, chunk: int) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), run, chunk)
        return x + self.feed_forward(self.norm_ff(x))

    def padded(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + F.dropout(self.self_attn.padded(self.norm_mha(x), pos, mask), self.dropout, self.training)
        return x + F.dropout(self.feed_forward.padded(self.norm_ff(x)), self.dropout, self.training)


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

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """Training: the same function at the token rate, a third of the products.

        Frame ``s i + m`` of the repeated sequence sees tokens ``i - 2 .. i`` only, each through the
        sum of the kernel taps that fall on it, so one convolution over the tokens with ``s`` such
        summed kernels (3 taps each) gives all frames, interleaved afterwards.
        """
        s, w = self.stride, self.conv.weight
        taps = [[w[..., k] for k in range(2 * s + 1) if (m + k) // s == j] for m in range(s) for j in range(3)]
        kernel = torch.stack([sum(group[1:], group[0]) for group in taps], dim=-1)  # (D, D, s * 3)
        kernel = kernel.view(*w.shape[:2], s, 3).permute(2, 0, 1, 3).reshape(s * w.shape[0], w.shape[1], 3)
        out = F.conv1d(F.pad(x, (2, 0)), kernel, self.conv.bias.repeat(s))  # (B, s D, T): frame phase m first
        b, _, t = out.shape
        return out.view(b, s, -1, t).permute(0, 2, 3, 1).reshape(b, -1, s * t)


class UpsampleConformerEncoder(nn.Module):
    def __init__(self, dim: int = 512, heads: int = 8, hidden: int = 2048, blocks: int = 6, up_blocks: int = 4,
                 chunk: int = 25, lookahead: int = 3, dropout: float = 0.0, positional_dropout: float = 0.0,
                 attention_dropout: float = 0.0):
        super().__init__()
        self.chunk, self.lookahead = chunk, lookahead
        self.dropout, self.positional_dropout = dropout, positional_dropout
        self.embed = LinearEmbed(dim, dim)
        self.pre_lookahead_layer = PreLookahead(dim, lookahead)
        self.encoders = nn.ModuleList(ConformerBlock(dim, heads, hidden, dropout, attention_dropout)
                                      for _ in range(blocks))
        self.up_layer = TokenUpsample(dim)
        self.up_embed = LinearEmbed(dim, dim)
        self.up_encoders = nn.ModuleList(ConformerBlock(dim, heads, hidden, dropout, attention_dropout)
                                         for _ in range(up_blocks))
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

    def _positions(self, size: int, like: torch.Tensor) -> torch.Tensor:
        pe = relative_positions(-(size - 1), size - 1, like.shape[-1], like.device, like.dtype)
        return F.dropout(pe, self.positional_dropout, self.training)

    def padded(self, tokens: torch.Tensor, token_mask: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """Training: features (B, 2S, D) of a padded batch of embedded tokens (B, S, D).

        ``token_mask`` (B, 1, 1 or S, S) and ``frame_mask`` (B, 1, 1 or 2S, 2S) are the boolean
        attention masks of the two stacks (key padding, and chunk-causal when streaming). The
        look-ahead reads whatever follows an utterance's last token in the batch (upstream's
        behaviour) and zeros after the last position.
        """
        x = self.embed.padded(tokens, self.dropout, self.positional_dropout)
        pos = self._positions(x.shape[1], x)
        x = self.pre_lookahead_layer(x, 0, 0, 0)
        for block in self.encoders:
            x = block.padded(x, pos, token_mask)
        x = self.up_layer.padded(x.transpose(1, 2)).transpose(1, 2)
        x = self.up_embed.padded(x, self.dropout, self.positional_dropout)
        pos = self._positions(x.shape[1], x)
        for block in self.up_encoders:
            x = block.padded(x, pos, frame_mask)
        return self.after_norm(x)
