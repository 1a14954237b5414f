"""The flow-target mel spectrogram of the CosyVoice2 recipe (Matcha-TTS/HiFi-GAN style).

Reflect-pad ``(n_fft - hop) / 2`` on both sides, STFT without centring, Hann window, magnitude
``sqrt(re^2 + im^2 + 1e-9)``, a Slaney-scale, Slaney-normalised mel filterbank (librosa's
defaults), natural log of the values clamped at 1e-5. CosyVoice2: 24 kHz, n_fft = win = 1920,
hop 480, 80 bins, fmax 8000 -> exactly 2 frames per 25 Hz speech token.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch


@dataclass(frozen=True)
class MelConfig:
    sample_rate: int = 24000
    n_fft: int = 1920
    hop: int = 480
    win: int = 1920
    n_mels: int = 80
    fmin: float = 0.0
    fmax: float | None = 8000.0  # None: Nyquist (CosyVoice3)


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    mel = hz / (200.0 / 3)
    log_region = hz >= 1000.0
    return np.where(log_region, 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / (np.log(6.4) / 27.0), mel)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0)), mel * (200.0 / 3))


@lru_cache(maxsize=8)
def mel_filterbank(config: MelConfig) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) float32 triangular filters with Slaney area normalisation."""
    fmax = config.fmax if config.fmax is not None else config.sample_rate / 2
    fft_freqs = np.linspace(0, config.sample_rate / 2, 1 + config.n_fft // 2)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(config.fmin), _hz_to_mel(fmax), config.n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    weights = np.zeros((config.n_mels, len(fft_freqs)), dtype=np.float32)
    for i in range(config.n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:config.n_mels + 2] - mel_f[:config.n_mels]))[:, None]
    return torch.from_numpy(weights)


@lru_cache(maxsize=16)
def _on_device(config: MelConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(filterbank, Hann window) on ``device``: built and copied once, not on every call (the GAN's
    mel loss runs every step, on the GPU). Made outside inference mode, so autograd can save them
    even when the first call came from an inference-mode caller."""
    with torch.inference_mode(False):
        return mel_filterbank(config).to(device), torch.hann_window(config.win, device=device)


def mel_spectrogram(speech: torch.Tensor, config: MelConfig = MelConfig()) -> torch.Tensor:
    """``(B, N)`` float32 audio -> ``(B, n_mels, frames)`` log-mel."""
    filterbank, window = _on_device(config, speech.device)
    pad = (config.n_fft - config.hop) // 2
    padded = torch.nn.functional.pad(speech.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    spec = torch.stft(padded, config.n_fft, hop_length=config.hop, win_length=config.win,
                      window=window, center=False, normalized=False, onesided=True, return_complex=True)
    magnitude = torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1) + 1e-9)
    mel = torch.matmul(filterbank, magnitude)
    return torch.log(torch.clamp(mel, min=1e-5))
