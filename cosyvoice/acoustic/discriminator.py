"""The HiFi-GAN discriminators that train the HiFT vocoder (upstream's ``hifigan.discriminator``).

* :class:`MultiPeriodDiscriminator` (Matcha-TTS / HiFi-GAN's MPD): for each period p (2, 3, 5,
  7, 11) the waveform is folded into a (T/p, p) image (reflect-padded to a multiple of p) and
  scored by five strided (5 x 1) convolutions (32, 128, 512, 1024, 1024 channels) and a (3 x 1)
  output convolution;
* :class:`MultiResSpecDiscriminator`: three STFT magnitudes (fft 1024 / 2048 / 512, hop 120 /
  240 / 50, window 600 / 1200 / 240, Hann) each scored by five (3 x 9) / (3 x 3) convolutions of
  32 channels and a (3 x 3) output convolution;
* :class:`MultipleDiscriminator` runs both; its outputs are upstream's ``(y_d_rs, y_d_gs,
  fmap_rs, fmap_gs)`` (scores and per-layer feature maps of the real and the generated audio).

Every convolution is weight-normed with torch's parametrization. The state-dict keys are
upstream's: the MRD's ``<conv>.parametrizations.weight.original0``/``original1`` and the MPD's
``<conv>.weight_g``/``weight_v`` (Matcha's MPD uses torch's older weight-norm hook, whose names
are written here on saving; loading accepts both namings). An upstream ``HiFiGan`` checkpoint's
``discriminator.*`` tensors therefore load strictly into ours and ours into upstream's.

Speed: ``forward(y, y_hat)`` computes each weight-normed weight once for both inputs. On CUDA it
scores the real and the generated audio as one batch (half the kernel launches); on the CPU it
scores them one after the other, which measured faster there (oneDNN's time grows faster than the
batch: the spectral discriminator's forward + backward took 2.0 s for 2 + 2 utterances of 24480
samples and 2.6 s for one batch of 4). :meth:`MultipleDiscriminator.score` scores a single batch,
so a caller can score the real audio without autograd (the generator's turn).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["LRELU_SLOPE", "PeriodDiscriminator", "MultiPeriodDiscriminator", "SpecDiscriminator",
           "MultiResSpecDiscriminator", "MultipleDiscriminator", "WINDOWS"]

LRELU_SLOPE = 0.1
#: torch window functions a spectral discriminator may use (upstream: ``getattr(torch, window)``)
WINDOWS = ("hann_window", "hamming_window", "blackman_window", "bartlett_window")

Scores = list[torch.Tensor]
FeatureMaps = list[list[torch.Tensor]]


def _released_names(module: nn.Module, state: dict, prefix: str, local_metadata) -> None:
    """State-dict hook: write a weight-norm parametrization as ``weight_g`` / ``weight_v``."""
    for part, name in (("original0", "weight_g"), ("original1", "weight_v")):
        state[f"{prefix}{name}"] = state.pop(f"{prefix}parametrizations.weight.{part}")


def _normed(conv: nn.Conv2d, released_names: bool = False) -> nn.Conv2d:
    conv = weight_norm(conv)
    if released_names:  # loading either naming is handled by torch's compatibility hook
        conv.register_state_dict_post_hook(_released_names)
    return conv


def _split(scores: Scores, fmaps: FeatureMaps, n: int) -> tuple[Scores, Scores, FeatureMaps, FeatureMaps]:
    return ([s[:n] for s in scores], [s[n:] for s in scores],
            [[f[:n] for f in maps] for maps in fmaps], [[f[n:] for f in maps] for maps in fmaps])


class _Group(nn.Module):
    """Sub-discriminators (``self.discriminators``) scored together; upstream's ``forward(y, y_hat)``."""

    discriminators: nn.ModuleList

    def score(self, x: torch.Tensor) -> tuple[Scores, FeatureMaps]:
        """Scores and feature maps of one batch, one entry per sub-discriminator."""
        outs = [d(x) for d in self.discriminators]
        return [s for s, _ in outs], [f for _, f in outs]

    def forward(self, y: torch.Tensor, y_hat: torch.Tensor,
                batched: bool | None = None) -> tuple[Scores, Scores, FeatureMaps, FeatureMaps]:
        """Scores and feature maps of the real ``y`` and the generated ``y_hat``.

        ``batched``: score both as one batch (default: on CUDA only, see the module docstring).
        """
        if y.shape != y_hat.shape:
            raise ValueError(f"real and generated audio must have the same shape; got {tuple(y.shape)} and "
                             f"{tuple(y_hat.shape)}")
        with parametrize.cached():
            if batched if batched is not None else y.device.type == "cuda":
                scores, fmaps = self.score(torch.cat([y, y_hat]))
                return _split(scores, fmaps, y.shape[0])
            (real, real_maps), (fake, fake_maps) = self.score(y), self.score(y_hat)
        return real, fake, real_maps, fake_maps


def _run_stack(convs: nn.ModuleList, post: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Leaky-ReLU convolutions then the scoring conv: (flattened score, every layer's output)."""
    fmap = []
    for conv in convs:
        x = F.leaky_relu(conv(x), LRELU_SLOPE)
        fmap.append(x)
    x = post(x)
    fmap.append(x)
    return torch.flatten(x, 1, -1), fmap


class PeriodDiscriminator(nn.Module):
    """One period of the MPD (upstream's ``DiscriminatorP``): (B, 1, T) -> score (B, n), feature maps."""

    def __init__(self, period: int, kernel_size: int = 5, stride: int = 3,
                 channels: Sequence[int] = (32, 128, 512, 1024, 1024)) -> None:
        super().__init__()
        self.period = period
        widths = [1, *channels]
        # upstream pads every strided layer by 2 whatever the kernel (get_padding(5, 1))
        self.convs = nn.ModuleList(
            _normed(nn.Conv2d(widths[i], widths[i + 1], (kernel_size, 1),
                              (stride if i < len(channels) - 1 else 1, 1), padding=(2, 0)), released_names=True)
            for i in range(len(channels)))
        self.conv_post = _normed(nn.Conv2d(widths[-1], 1, (3, 1), 1, padding=(1, 0)), released_names=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b, c, t = x.shape
        if t % self.period:
            x = F.pad(x, (0, self.period - t % self.period), "reflect")
            t = x.shape[-1]
        return _run_stack(self.convs, self.conv_post, x.view(b, c, t // self.period, self.period))


class MultiPeriodDiscriminator(_Group):
    """HiFi-GAN's MPD: one :class:`PeriodDiscriminator` per period; takes (B, 1, T) audio."""

    def __init__(self, periods: Sequence[int] = (2, 3, 5, 7, 11),
                 channels: Sequence[int] = (32, 128, 512, 1024, 1024)) -> None:
        super().__init__()
        self.discriminators = nn.ModuleList(PeriodDiscriminator(p, channels=channels) for p in periods)


class SpecDiscriminator(nn.Module):
    """Convolutions over one STFT magnitude: (B, T) -> score (B, n), feature maps."""

    def __init__(self, fft_size: int = 1024, shift_size: int = 120, win_length: int = 600,
                 window: str = "hann_window", channels: int = 32) -> None:
        super().__init__()
        if window not in WINDOWS:
            raise ValueError(f"window {window!r} is not one of {WINDOWS}")
        self.fft_size, self.shift_size, self.win_length = fft_size, shift_size, win_length
        ch = channels
        self.discriminators = nn.ModuleList([
            _normed(nn.Conv2d(1, ch, kernel_size=(3, 9), padding=(1, 4))),
            *(_normed(nn.Conv2d(ch, ch, kernel_size=(3, 9), stride=(1, 2), padding=(1, 4))) for _ in range(3)),
            _normed(nn.Conv2d(ch, ch, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))),
        ])
        self.out = _normed(nn.Conv2d(ch, 1, 3, 1, 1))
        # upstream keeps the window outside the state dict
        self.register_buffer("window", getattr(torch, window)(win_length), persistent=False)

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        spec = torch.stft(y, self.fft_size, self.shift_size, self.win_length, self.window, return_complex=True)
        return _run_stack(self.discriminators, self.out, spec.abs().transpose(2, 1).unsqueeze(1))


class MultiResSpecDiscriminator(_Group):
    """One :class:`SpecDiscriminator` per STFT resolution; takes (B, T) audio."""

    def __init__(self, fft_sizes: Sequence[int] = (1024, 2048, 512), hop_sizes: Sequence[int] = (120, 240, 50),
                 win_lengths: Sequence[int] = (600, 1200, 240), window: str = "hann_window",
                 channels: int = 32) -> None:
        super().__init__()
        if not len(fft_sizes) == len(hop_sizes) == len(win_lengths):
            raise ValueError(f"fft_sizes {list(fft_sizes)}, hop_sizes {list(hop_sizes)} and win_lengths "
                             f"{list(win_lengths)} must have the same length")
        self.discriminators = nn.ModuleList(
            SpecDiscriminator(f, h, w, window, channels) for f, h, w in zip(fft_sizes, hop_sizes, win_lengths))


class MultipleDiscriminator(_Group):
    """The MPD and the multi-resolution spectral discriminator together (MPD outputs first)."""

    def __init__(self, mpd: MultiPeriodDiscriminator | None = None, mrd: MultiResSpecDiscriminator | None = None):
        super().__init__()
        self.mpd = mpd if mpd is not None else MultiPeriodDiscriminator()
        self.mrd = mrd if mrd is not None else MultiResSpecDiscriminator()

    def score(self, x: torch.Tensor) -> tuple[Scores, FeatureMaps]:
        """Scores and feature maps of one batch of audio (B, T)."""
        if x.dim() != 2 or x.shape[1] == 0:
            raise ValueError(f"the discriminator takes audio of shape (B, T); got {tuple(x.shape)}")
        scores, fmaps = self.mpd.score(x.unsqueeze(1))
        spec_scores, spec_fmaps = self.mrd.score(x)
        return scores + spec_scores, fmaps + spec_fmaps
