"""CosyVoice1's flow-matching vector field: a non-causal 1-D U-Net (Matcha-TTS's decoder).

Parameter names follow upstream's ``ConditionalDecoder`` so a released CosyVoice-300M ``flow.pt``
loads under ``decoder.estimator``. Unlike CosyVoice2's causal estimator (:mod:`.estimator`), the
recipe's two channel levels (``channels: [256, 256]``) halve the time axis once: the first level
ends in a stride-2 convolution, the mid blocks run at half the frame rate, and a transposed
convolution brings the frames back before the skip connection of the first level. Convolutions
are centred (every frame sees one frame on each side) and normalised with GroupNorm, whose
statistics span the whole padded sequence, so in a padded batch a short utterance's output depends
on how much padding follows it; that is upstream's behaviour and it is kept.

The transformer blocks, the time embedding and its MLP are the same modules as CosyVoice2's (shared
with :mod:`.estimator`). One ``forward`` serves training and sampling: ``mask`` (B, 1, T) marks the
real frames; every convolution block sees its input times the mask and masks its output, attention
skips padded keys (no mask at all when every frame is real, as in sampling).
"""

from __future__ import annotations

import torch
from torch import nn

from cosyvoice.acoustic.estimator import TimestepMLP, TransformerBlock, timestep_features


class ConvBlock(nn.Module):
    """conv (kernel 3, centred) -> GroupNorm -> Mish on masked input, masked output (``block.{0,1}``)."""

    def __init__(self, dim_in: int, dim_out: int, groups: int = 8):
        super().__init__()
        self.block = nn.Sequential(nn.Conv1d(dim_in, dim_out, 3, padding=1), nn.GroupNorm(groups, dim_out), nn.Mish())

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.block(x * mask) * mask


class ResnetBlock(nn.Module):
    """Two conv blocks with the time embedding added between them, plus a 1x1 residual projection."""

    def __init__(self, dim_in: int, dim_out: int, time_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_dim, dim_out))
        self.block1 = ConvBlock(dim_in, dim_out)
        self.block2 = ConvBlock(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim_in, dim_out, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.block1(x, mask) + self.mlp(t)[:, :, None]
        return self.block2(h, mask) + self.res_conv(x * mask)


class Downsample(nn.Module):
    """Stride-2 convolution: T frames -> ceil(T / 2)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Transposed stride-2 convolution: T frames -> 2 T (the caller trims to the skip's length)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _transformers(dim: int, blocks: int, heads: int, head_dim: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList(TransformerBlock(dim, heads, head_dim, dropout) for _ in range(blocks))


class ConditionalDecoder(nn.Module):
    """The U-Net: ``down_blocks.{level}``, ``mid_blocks.{n}``, ``up_blocks.{level}``, ``final_block``, ``final_proj``.

    Each down / up level is ``[resnet, transformer blocks, closing conv]``; the closing conv
    halves (down) or doubles (up) the frames except on the last level, where it is a plain
    centred convolution.
    """

    def __init__(self, in_channels: int = 320, out_channels: int = 80, channels: tuple[int, ...] = (256, 256),
                 head_dim: int = 64, blocks: int = 4, mid_blocks: int = 12, heads: int = 8, dropout: float = 0.0):
        super().__init__()
        channels = tuple(channels)
        if not channels:
            raise ValueError("the U-Net needs at least one channel level")
        self.in_channels = in_channels
        time_dim = channels[0] * 4
        self.time_mlp = TimestepMLP(in_channels, time_dim)
        stack = dict(blocks=blocks, heads=heads, head_dim=head_dim, dropout=dropout)
        self.down_blocks = nn.ModuleList()
        dim_in = in_channels
        for level, dim in enumerate(channels):
            last = level == len(channels) - 1
            closing = nn.Conv1d(dim, dim, 3, padding=1) if last else Downsample(dim)
            self.down_blocks.append(nn.ModuleList([ResnetBlock(dim_in, dim, time_dim),
                                                   _transformers(dim, **stack), closing]))
            dim_in = dim
        self.mid_blocks = nn.ModuleList(
            nn.ModuleList([ResnetBlock(channels[-1], channels[-1], time_dim), _transformers(channels[-1], **stack)])
            for _ in range(mid_blocks))
        up = channels[::-1] + (channels[0],)
        self.up_blocks = nn.ModuleList()
        for level in range(len(channels)):
            last = level == len(channels) - 1
            dim = up[level + 1]
            closing = nn.Conv1d(dim, dim, 3, padding=1) if last else Upsample(dim)
            self.up_blocks.append(nn.ModuleList([ResnetBlock(2 * up[level], dim, time_dim),
                                                 _transformers(dim, **stack), closing]))
        self.final_block = ConvBlock(up[-1], up[-1])
        self.final_proj = nn.Conv1d(up[-1], out_channels, 1)
        self._initialize()

    def _initialize(self) -> None:
        """Upstream's initialisation (Kaiming-normal convolutions and linears, zero biases), so training
        from scratch starts from the same distribution; a loaded checkpoint overrides it."""
        for module in self.modules():
            if isinstance(module, (nn.Conv1d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @staticmethod
    def _level(resnet: ResnetBlock, transformers: nn.ModuleList, x: torch.Tensor, mask: torch.Tensor,
               t: torch.Tensor) -> torch.Tensor:
        h = resnet(x, mask, t).transpose(1, 2)
        keys = None if bool(mask.all()) else mask.bool()[:, :, None, :]  # (B, 1, 1, T): padded keys skipped
        for block in transformers:
            h = block.padded(h, keys)
        return h.transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor, spks: torch.Tensor,
                cond: torch.Tensor) -> torch.Tensor:
        """Velocity (B, 80, T), zero on padded frames; ``x``, ``mu``, ``cond`` (B, 80, T), ``mask`` (B, 1, T)
        float, ``t`` (B,), ``spks`` (B, 80)."""
        t = self.time_mlp(timestep_features(t, self.in_channels).to(t.dtype))
        h = torch.cat([x, mu, spks[:, :, None].expand(-1, -1, x.shape[2]), cond], dim=1)
        masks, skips = [mask], []
        for resnet, transformers, closing in self.down_blocks:
            level_mask = masks[-1]
            h = self._level(resnet, transformers, h, level_mask, t)
            skips.append(h)
            h = closing(h * level_mask)
            masks.append(level_mask[:, :, ::2])
        masks.pop()  # the mask after the last level: that level does not downsample
        for resnet, transformers in self.mid_blocks:
            h = self._level(resnet, transformers, h, masks[-1], t)
        for resnet, transformers, closing in self.up_blocks:
            level_mask, skip = masks.pop(), skips.pop()
            h = torch.cat([h[:, :, :skip.shape[2]], skip], dim=1)
            h = closing(self._level(resnet, transformers, h, level_mask, t) * level_mask)
        h = self.final_block(h, mask)
        return self.final_proj(h * mask) * mask
