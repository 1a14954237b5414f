"""The HiFi-GAN that trains the HiFT vocoder (``cosyvoice-pipeline train --model hifigan``).

Upstream's ``HiFiGan`` (``cosyvoice/hifigan/hifigan.py``) as a library module with the same
losses and state-dict layout (``generator.*`` = the HiFT vocoder, ``discriminator.*`` = MPD +
multi-resolution spectral discriminator):

* generator turn: the vocoder runs on the batch's mel; its loss is
  ``loss_gen + 2.0 * loss_fm + 45 * loss_mel + 1.0 * loss_tpr + loss_f0`` with the least-squares
  adversarial loss, feature matching (L1 over every feature map, times 2 as Matcha's
  ``feature_loss`` has it), the L1 distance of log-mels (n_fft 1920, hop 480, 80 bins up to
  Nyquist), the truncated pointwise relativistic loss (tau 0.04, median-centred) and the L1 of
  the predicted F0 against the pitch targets;
* discriminator turn: the vocoder runs without autograd; the discriminator's loss is the
  least-squares real/fake loss plus the relativistic loss with real and fake in the other order.

Differences that change nothing but time: in the discriminator turn on CUDA the real and the
generated audio go through the discriminator as one batch; in the generator turn a frozen
discriminator (:func:`frozen`; upstream computes the discriminator's weight gradients there and
discards them) scores the real audio without autograd; each weight-normed weight is computed once
per turn.

One difference upstream's trainer would see: its generator step clips the norm of every
parameter's gradient, the discriminator's from the generator turn included; with a frozen
discriminator those gradients do not exist, so the clipped norm is the generator's alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from cosyvoice.acoustic.discriminator import (
    WINDOWS,
    MultiPeriodDiscriminator,
    MultipleDiscriminator,
    MultiResSpecDiscriminator,
)
from cosyvoice.acoustic.hift import HiFTConfig, HiFTGenerator, parametrize_weight_norm
from cosyvoice.dataset.mel import MelConfig, mel_spectrogram

__all__ = ["GanConfig", "HiFiGan", "frozen", "build_discriminator", "feature_loss", "generator_loss",
           "discriminator_loss", "tpr_loss", "recipe_loss_mel", "TURNS"]

TURNS = ("generator", "discriminator")
BATCH_KEYS = ("speech_feat", "speech", "pitch_feat")


@dataclass(frozen=True)
class GanConfig:
    """Settings of the GAN (upstream's ``hifigan`` and ``mel_spec_transform1`` recipe sections).

    ``hift``: the generator's settings; ``mel``: the mel-loss transform (``None``: the recipe's
    for that vocoder, :func:`recipe_loss_mel`); the loss weights keep upstream's names; the
    discriminator settings are upstream's constructor defaults (the channel widths are fixed
    upstream; smaller ones serve fast tests).
    """

    hift: HiFTConfig = field(default_factory=HiFTConfig)
    mel: MelConfig | None = None
    multi_mel_spectral_recon_loss_weight: float = 45.0
    feat_match_loss_weight: float = 2.0
    tpr_loss_weight: float = 1.0
    tpr_loss_tau: float = 0.04
    periods: tuple[int, ...] = (2, 3, 5, 7, 11)
    period_channels: tuple[int, ...] = (32, 128, 512, 1024, 1024)
    spec_fft_sizes: tuple[int, ...] = (1024, 2048, 512)
    spec_hop_sizes: tuple[int, ...] = (120, 240, 50)
    spec_win_lengths: tuple[int, ...] = (600, 1200, 240)
    spec_window: str = "hann_window"
    spec_channels: int = 32

    def __post_init__(self) -> None:
        if self.mel is None:
            object.__setattr__(self, "mel", recipe_loss_mel(self.hift))
        problems = []
        for name in ("multi_mel_spectral_recon_loss_weight", "feat_match_loss_weight", "tpr_loss_weight",
                     "tpr_loss_tau"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                problems.append(f"{name} = {value!r} (a number >= 0)")
        for name in ("periods", "period_channels", "spec_fft_sizes", "spec_hop_sizes", "spec_win_lengths"):
            value = getattr(self, name)
            if not (isinstance(value, tuple) and value and all(isinstance(v, int) and v > 0 for v in value)):
                problems.append(f"{name} = {value!r} (a non-empty tuple of positive integers)")
        if not len(self.spec_fft_sizes) == len(self.spec_hop_sizes) == len(self.spec_win_lengths):
            problems.append("spec_fft_sizes, spec_hop_sizes and spec_win_lengths differ in length")
        if any(w > f for w, f in zip(self.spec_win_lengths, self.spec_fft_sizes)):
            problems.append("a spectral window is longer than its FFT")
        if self.spec_window not in WINDOWS:
            problems.append(f"spec_window = {self.spec_window!r} (one of {WINDOWS})")
        if self.mel.hop != self.hift.samples_per_frame:
            problems.append(f"mel hop {self.mel.hop} differs from the vocoder's {self.hift.samples_per_frame} "
                            "samples per frame")
        if problems:
            raise ValueError("invalid GanConfig: " + "; ".join(problems))

    @classmethod
    def tiny(cls) -> GanConfig:
        """The tiny vocoder and narrow discriminators (same structure), for fast tests."""
        return cls(hift=HiFTConfig.tiny(), period_channels=(8, 16, 32, 32, 32), spec_channels=8)

    @classmethod
    def tiny_v1(cls) -> GanConfig:
        """The tiny CosyVoice1 (22.05 kHz) vocoder and narrow discriminators, for fast tests."""
        return cls(hift=HiFTConfig.tiny_v1(), period_channels=(8, 16, 32, 32, 32), spec_channels=8)


def recipe_loss_mel(hift: HiFTConfig) -> MelConfig:
    """The mel-loss transform of upstream's recipe for this vocoder (``mel_spec_transform1``).

    80 bins up to Nyquist; CosyVoice1 (22.05 kHz, the ``SineGen`` vocoder): n_fft = win = 1024,
    hop 256; CosyVoice2 (24 kHz): n_fft = win = 1920, hop 480.
    """
    if hift.sine_generator == "SineGen":
        return MelConfig(sample_rate=22050, n_fft=1024, hop=256, win=1024, fmax=None)
    return MelConfig(fmax=None)


def build_discriminator(config: GanConfig) -> MultipleDiscriminator:
    """Upstream's ``MultipleDiscriminator(MultiPeriodDiscriminator(), MultiResSpecDiscriminator())``."""
    return MultipleDiscriminator(
        MultiPeriodDiscriminator(config.periods, config.period_channels),
        MultiResSpecDiscriminator(config.spec_fft_sizes, config.spec_hop_sizes, config.spec_win_lengths,
                                  config.spec_window, config.spec_channels))


# --------------------------------------------------------------------------------------------
# losses (upstream's, summed in upstream's order)


def feature_loss(fmap_r: Sequence[Sequence[torch.Tensor]], fmap_g: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """Sum over discriminators and layers of mean |real - generated|, times 2 (Matcha's factor)."""
    loss = 0
    for dr, dg in zip(fmap_r, fmap_g):
        for rl, gl in zip(dr, dg):
            loss = loss + torch.mean(torch.abs(rl - gl))
    return loss * 2


def generator_loss(disc_generated: Sequence[torch.Tensor]) -> torch.Tensor:
    """Least-squares adversarial loss of the generator: sum of mean (1 - D(G))^2."""
    loss = 0
    for dg in disc_generated:
        loss = loss + torch.mean((1 - dg) ** 2)
    return loss


def discriminator_loss(disc_real: Sequence[torch.Tensor], disc_generated: Sequence[torch.Tensor]) -> torch.Tensor:
    """Least-squares discriminator loss: sum of mean (1 - D(x))^2 + mean D(G)^2."""
    loss = 0
    for dr, dg in zip(disc_real, disc_generated):
        loss = loss + (torch.mean((1 - dr) ** 2) + torch.mean(dg ** 2))
    return loss


def tpr_loss(disc_real: Sequence[torch.Tensor], disc_generated: Sequence[torch.Tensor], tau: float) -> torch.Tensor:
    """Truncated pointwise relativistic loss (upstream's ``tpr_loss``).

    Per discriminator: m = the (lower) median of ``dr - dg``; the mean squared distance to m of
    the points with ``dr < dg + m``, truncated at ``tau``. As upstream, a discriminator with no
    such point (e.g. fewer than three scores) gives NaN.
    """
    loss = 0
    for dr, dg in zip(disc_real, disc_generated):
        diff = dr - dg
        m = torch.median(diff)
        rel = torch.mean(((diff - m) ** 2)[dr < dg + m])
        loss = loss + (tau - F.relu(tau - rel))
    return loss


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Inside the block no parameter of ``module`` requires grad; each flag is restored after.

    For the generator turn: gradients still flow through the discriminator to the generator,
    but the discriminator's own weight gradients (which upstream computes and then zeroes) are
    not computed, and :meth:`HiFiGan.generator_turn` scores the real audio without autograd.
    """
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield module
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


class HiFiGan(nn.Module):
    """HiFT generator + discriminator with upstream's two training turns.

    ``generator``: the vocoder (train it with weight norm parametrized: :func:`~cosyvoice.acoustic.
    hift.parametrize_weight_norm`, or ``load_hift(..., weight_norm=True)``); ``discriminator``:
    built from ``config`` when ``None``; ``config``: defaults to the recipe's settings for the
    generator's own ``HiFTConfig``.
    """

    def __init__(self, generator: HiFTGenerator, discriminator: MultipleDiscriminator | None = None,
                 config: GanConfig | None = None) -> None:
        super().__init__()
        config = config if config is not None else GanConfig(hift=generator.config)
        if generator.config != config.hift:
            raise ValueError(f"the generator's settings {generator.config} differ from the GAN config's "
                             f"{config.hift}")
        self.config = config
        self.generator = generator
        self.discriminator = discriminator if discriminator is not None else build_discriminator(config)

    @classmethod
    def from_config(cls, config: GanConfig) -> HiFiGan:
        """A fresh GAN (torch's default initialisation, as upstream's), weight norm parametrized."""
        return cls(parametrize_weight_norm(HiFTGenerator(config.hift)), build_discriminator(config), config)

    # -- the two turns ----------------------------------------------------------------------------

    def forward(self, batch: Mapping[str, Any], device: torch.device | str | int,
                rng: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Upstream's entry point: ``batch['turn']`` ('generator' or 'discriminator') picks the turn."""
        turn = batch.get("turn")
        if turn == "generator":
            return self.generator_turn(batch, device, rng)
        if turn == "discriminator":
            return self.discriminator_turn(batch, device, rng)
        raise ValueError(f"batch['turn'] must be one of {TURNS}; got {turn!r}")

    def generator_turn(self, batch: Mapping[str, Any], device: torch.device | str | int,
                       rng: torch.Generator | None = None, *,
                       generator: Callable | None = None) -> dict[str, torch.Tensor]:
        """Generator losses (backward ``loss`` and step the generator's optimizer).

        ``rng``: source of the vocoder's random draws (torch's global generator when ``None``, as
        upstream). ``generator``: what to call for the vocoder's forward (the trainer passes its
        DDP/DeepSpeed wrapper of ``self.generator``). Returns loss (total), loss_gen, loss_fm,
        loss_mel, loss_tpr, loss_f0.
        """
        cfg = self.config
        mel, speech, pitch = self._inputs(batch, device)
        disc = self.discriminator
        with parametrize.cached():  # each weight-normed weight computed once per turn
            generated, f0 = (generator or self.generator)(mel, rng)
            if any(p.requires_grad for p in disc.parameters()):
                y_d_rs, fmap_rs = disc.score(speech)
            else:  # frozen: the real audio's scores are constants
                with torch.no_grad():
                    y_d_rs, fmap_rs = disc.score(speech)
            y_d_gs, fmap_gs = disc.score(generated)
        loss_gen = generator_loss(y_d_gs)
        loss_fm = feature_loss(fmap_rs, fmap_gs)
        with torch.no_grad():
            mel_real = mel_spectrogram(speech, cfg.mel)
        loss_mel = F.l1_loss(mel_spectrogram(generated, cfg.mel), mel_real)
        if cfg.tpr_loss_weight != 0:
            loss_tpr = tpr_loss(y_d_gs, y_d_rs, cfg.tpr_loss_tau)
        else:
            loss_tpr = torch.zeros((), device=generated.device)
        loss_f0 = F.l1_loss(f0, pitch)
        loss = (loss_gen + cfg.feat_match_loss_weight * loss_fm + cfg.multi_mel_spectral_recon_loss_weight * loss_mel
                + cfg.tpr_loss_weight * loss_tpr + loss_f0)
        return {"loss": loss, "loss_gen": loss_gen, "loss_fm": loss_fm, "loss_mel": loss_mel, "loss_tpr": loss_tpr,
                "loss_f0": loss_f0}

    def discriminator_turn(self, batch: Mapping[str, Any], device: torch.device | str | int,
                           rng: torch.Generator | None = None, *,
                           discriminator: Callable | None = None) -> dict[str, torch.Tensor]:
        """Discriminator losses on real vs freshly generated (no-autograd) audio: loss, loss_disc, loss_tpr.

        ``discriminator``: what to call for the discriminator's forward (the trainer's wrapper)."""
        cfg = self.config
        mel, speech, _ = self._inputs(batch, device)
        with torch.no_grad():
            generated, _ = self.generator(mel, rng)
        y_d_rs, y_d_gs, _, _ = (discriminator or self.discriminator)(speech, generated.detach())
        loss_disc = discriminator_loss(y_d_rs, y_d_gs)
        if cfg.tpr_loss_weight != 0:
            loss_tpr = tpr_loss(y_d_rs, y_d_gs, cfg.tpr_loss_tau)
        else:
            loss_tpr = torch.zeros((), device=generated.device)
        loss = loss_disc + cfg.tpr_loss_weight * loss_tpr
        return {"loss": loss, "loss_disc": loss_disc, "loss_tpr": loss_tpr}

    # -- inputs -----------------------------------------------------------------------------------

    def _inputs(self, batch: Mapping[str, Any], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mel (B, 80, T), speech (B, N), pitch (B, T)) on ``device``, checked against each other."""
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise ValueError(f"the GAN batch lacks {missing} (a hifigan data pipeline gives speech_feat, speech and "
                             "pitch_feat)")
        feat, speech, pitch = (batch[k] for k in BATCH_KEYS)
        for key, value, dims in (("speech_feat", feat, 3), ("speech", speech, 2), ("pitch_feat", pitch, 2)):
            if not isinstance(value, torch.Tensor) or value.dim() != dims or value.dtype != torch.float32:
                got = (f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                       else type(value).__name__)
                raise ValueError(f"batch[{key!r}] must be a float32 tensor with {dims} dimensions; got {got}")
        b, frames, bins = feat.shape
        hop = self.config.hift.samples_per_frame
        if bins != self.config.hift.in_channels:
            raise ValueError(f"batch['speech_feat'] must be (B, T, {self.config.hift.in_channels}); got {tuple(feat.shape)}")
        if speech.shape != (b, frames * hop):
            raise ValueError(f"batch['speech'] must be (B, {hop} * T) = {(b, frames * hop)} for speech_feat "
                             f"{tuple(feat.shape)}; got {tuple(speech.shape)}")
        if pitch.shape != (b, frames):
            raise ValueError(f"batch['pitch_feat'] must be (B, T) = {(b, frames)}; got {tuple(pitch.shape)}")
        return (feat.transpose(1, 2).to(device, non_blocking=True), speech.to(device, non_blocking=True),
                pitch.to(device, non_blocking=True))
