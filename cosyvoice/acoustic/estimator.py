"""The flow-matching vector field: a 1-D U-Net of causal ResNet and Transformer blocks.

Parameter names follow CosyVoice2's ``CausalConditionalDecoder`` (built on Matcha-TTS's decoder
components) so the released ``flow.pt`` loads under ``decoder.estimator``. With the recipe's single
channel level (``channels: [256]``) nothing is down- or up-sampled in time: the "down" and "up"
blocks end in causal convolutions, so every frame depends only on frames before it, except through
attention, which is chunk-causal (50 frames) when streaming and full otherwise.

Inputs are the CFG batch the solver builds (conditional + unconditional rows); a
:class:`~cosyvoice.acoustic.chunks.Pass` says which frames are new and keeps, per solver step, what
the following frames need from the complete chunks.

Training runs :meth:`CausalConditionalDecoder.padded` over a padded batch with upstream's masking:
every convolution block sees its input times the frame mask and masks its output, attention skips
padded keys, the output is masked; dropout (0 in the recipe) where upstream's transformer blocks
have it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice.acoustic.chunks import PLAIN, Pass, chunk_mask
from cosyvoice.acoustic.packing import PackedLinear


def timestep_features(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal features of the flow time ``t`` (B,) -> (B, dim): sines then cosines."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    angle = scale * t[:, None] * freq[None]
    return torch.cat((angle.sin(), angle.cos()), dim=-1)


class TimestepMLP(nn.Module):
    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(t)))


class CausalConv1d(nn.Conv1d):
    """Convolution over the current and ``kernel - 1`` previous frames (zeros before the first)."""

    def __init__(self, dim_in: int, dim_out: int, kernel: int):
        super().__init__(dim_in, dim_out, kernel)
        self.past = kernel - 1

    def forward(self, x: torch.Tensor, run: Pass) -> torch.Tensor:
        return super().forward(run.left_context(self, x, self.past))


class _ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, T) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class CausalConvBlock(nn.Module):
    """causal conv -> channel LayerNorm -> Mish (``block.0``, ``block.2`` as in the released keys)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.block = nn.ModuleList([CausalConv1d(dim_in, dim_out, 3), nn.Identity(), _ChannelNorm(dim_out),
                                    nn.Identity(), nn.Mish()])

    def forward(self, x: torch.Tensor, run: Pass) -> torch.Tensor:
        return self.block[4](self.block[2](self.block[0](x, run)))

    def padded(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x`` already multiplied by the (B, 1, T) frame ``mask``; the output is masked too."""
        return self.forward(x, PLAIN) * mask


class CausalResnetBlock(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, time_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_dim, dim_out))
        self.block1 = CausalConvBlock(dim_in, dim_out)
        self.block2 = CausalConvBlock(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim_in, dim_out, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, run: Pass) -> torch.Tensor:
        h = self.block1(x, run) + self.mlp(t)[:, :, None]
        return self.block2(h, run) + self.res_conv(x)

    def padded(self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x * mask
        h = self.block1.padded(x, mask) + self.mlp(t)[:, :, None]
        return self.block2.padded(h * mask, mask) + self.res_conv(x)


class _Projection(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        if isinstance(self.proj, PackedLinear):
            return self.proj(x, activation="gelu")
        return F.gelu(self.proj(x))


#: up to this many keys attention runs as plain matmul + softmax (faster than the CPU flash kernel)
SMALL_ATTENTION = 128


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.dropout = dropout  # after the output projection, in training
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Identity()])

    def _split(self, x):
        return x.view(x.shape[0], -1, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, run: Pass, chunk: int) -> torch.Tensor:
        q = self._split(self.to_q(x))
        k, v = run.keys_values(self, self._split(self.to_k(x)), self._split(self.to_v(x)))
        mask = chunk_mask(run.start, run.end, k.shape[2], chunk, x.device)
        if k.shape[2] <= SMALL_ATTENTION:  # plain products beat the flash kernel's setup on a few frames
            scores = torch.matmul(q, k.transpose(-2, -1)) * (self.head_dim ** -0.5)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            out = torch.matmul(torch.softmax(scores, dim=-1), v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out[0](out.transpose(1, 2).reshape(x.shape[0], -1, self.heads * self.head_dim))

    def padded(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Training: (B, T, C) attending to the keys the boolean ``mask`` (B, 1, 1 or T, T) allows."""
        q, k, v = self._split(self.to_q(x)), self._split(self.to_k(x)), self._split(self.to_v(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.to_out[0](out.transpose(1, 2).reshape(x.shape[0], -1, self.heads * self.head_dim))
        return F.dropout(out, self.dropout, self.training)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout  # after the attention and inside the feed-forward, in training
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = SelfAttention(dim, heads, head_dim, dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([_Projection(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor, run: Pass, chunk: int) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), run, chunk)
        return x + self.ff.net[2](self.ff.net[0](self.norm3(x)))

    def padded(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1.padded(self.norm1(x), mask)
        h = F.dropout(self.ff.net[0](self.norm3(x)), self.dropout, self.training)
        return x + self.ff.net[2](h)


def _stage(dim_in: int, dim: int, time_dim: int, blocks: int, heads: int, head_dim: int,
           closing: bool, dropout: float = 0.0) -> nn.ModuleList:
    """resnet, transformer blocks[, closing causal conv]: the released ``<stage>.{0,1.N,2}`` keys."""
    parts = nn.ModuleList([CausalResnetBlock(dim_in, dim, time_dim),
                           nn.ModuleList(TransformerBlock(dim, heads, head_dim, dropout) for _ in range(blocks))])
    if closing:
        parts.append(CausalConv1d(dim, dim, 3))
    return parts


class CausalConditionalDecoder(nn.Module):
    def __init__(self, in_channels: int = 320, out_channels: int = 80, channels: int = 256, head_dim: int = 64,
                 blocks: int = 4, mid_blocks: int = 12, heads: int = 8, chunk: int = 50, dropout: float = 0.0):
        super().__init__()
        self.in_channels, self.chunk = in_channels, chunk
        time_dim = channels * 4
        self.time_mlp = TimestepMLP(in_channels, time_dim)
        stage = dict(time_dim=time_dim, blocks=blocks, heads=heads, head_dim=head_dim, dropout=dropout)
        self.down_blocks = nn.ModuleList([_stage(in_channels, channels, closing=True, **stage)])
        self.mid_blocks = nn.ModuleList(_stage(channels, channels, closing=False, **stage)
                                        for _ in range(mid_blocks))
        self.up_blocks = nn.ModuleList([_stage(2 * channels, channels, closing=True, **stage)])
        self.final_block = CausalConvBlock(channels, channels)
        self.final_proj = nn.Conv1d(channels, out_channels, 1)

    @staticmethod
    def _run_stage(parts: nn.ModuleList, x, t, run, chunk):
        """-> (output, the transformer output before the closing conv: the U-Net skip)."""
        x = parts[0](x, t, run).transpose(1, 2)
        for block in parts[1]:
            x = block(x, run, chunk)
        skip = x.transpose(1, 2)
        return (parts[2](skip, run) if len(parts) > 2 else skip), skip

    def forward(self, x: torch.Tensor, mu: torch.Tensor, t: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor,
                run: Pass, chunked: bool) -> torch.Tensor:
        """Velocity of the frames ``[run.start, run.end)``; inputs (B, 80, new frames), spks (B, 80), t (B,)."""
        chunk = self.chunk if chunked else 0
        t = self.time_mlp(timestep_features(t, self.in_channels).to(t.dtype))
        h = torch.cat([x, mu, spks[:, :, None].expand(-1, -1, x.shape[2]), cond], dim=1)
        h, skip = self._run_stage(self.down_blocks[0], h, t, run, chunk)
        for parts in self.mid_blocks:
            h, _ = self._run_stage(parts, h, t, run, chunk)
        h, _ = self._run_stage(self.up_blocks[0], torch.cat([h, skip], dim=1), t, run, chunk)
        return self.final_proj(self.final_block(h, run))

    @staticmethod
    def _padded_stage(parts: nn.ModuleList, x, t, mask, attn_mask):
        x = parts[0].padded(x, t, mask).transpose(1, 2)
        for block in parts[1]:
            x = block.padded(x, attn_mask)
        skip = x.transpose(1, 2)
        return (parts[2](skip * mask, PLAIN) if len(parts) > 2 else skip), skip

    def padded(self, x: torch.Tensor, mu: torch.Tensor, t: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor,
               mask: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """Training: velocity (B, 80, T) of a padded batch, zero on padded frames.

        ``mask`` (B, 1, T) marks real frames (float), ``attn_mask`` (B, 1, 1 or T, T) the keys each
        frame may attend to (boolean: key padding, and chunk-causal when streaming).
        """
        t = self.time_mlp(timestep_features(t, self.in_channels).to(t.dtype))
        h = torch.cat([x, mu, spks[:, :, None].expand(-1, -1, x.shape[2]), cond], dim=1)
        h, skip = self._padded_stage(self.down_blocks[0], h, t, mask, attn_mask)
        for parts in self.mid_blocks:
            h, _ = self._padded_stage(parts, h, t, mask, attn_mask)
        h, _ = self._padded_stage(self.up_blocks[0], torch.cat([h, skip], dim=1), t, mask, attn_mask)
        h = self.final_block.padded(h * mask, mask)
        return self.final_proj(h * mask) * mask
