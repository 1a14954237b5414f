"""Model inputs computed exactly as the upstream recipe tools compute them.

* CAM++ (``tools/extract_embedding.py``): decode, resample to 16 kHz with torchaudio's default
  resampler, kaldi fbank (80 bins, dither 0, torchaudio defaults) on channel 0, per-utterance
  mean subtraction -> float32 ``(1, T, 80)``.
* S3 tokenizer (``tools/extract_speech_token.py``): decode, resample, average the channels,
  openai-whisper log-mel with 128 bins -> float32 ``(1, 128, T)`` plus int32 ``[T]``.

Decoding uses soundfile (identical samples to ``torchaudio.load`` for PCM; no FFmpeg needed).
Resamplers are built once per source rate instead of once per utterance.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
import soundfile as sf
import torch
import torchaudio
import whisper

from cosyvoice import storage

SAMPLE_RATE = 16000
MAX_TOKENIZER_SECONDS = 30
MAX_TOKENIZER_SAMPLES = MAX_TOKENIZER_SECONDS * SAMPLE_RATE


class AudioDecodeError(Exception):
    """The audio could not be decoded; ``reason`` is a stable code for reports."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def decode_audio(data: bytes, name: str = "<bytes>") -> tuple[torch.Tensor, int]:
    """``(channels, samples)`` float32 in [-1, 1] and the sample rate of an encoded file."""
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
        raise AudioDecodeError("undecodable_audio", f"{name}: {exc}") from exc
    if samples.shape[0] == 0:
        raise AudioDecodeError("no_audio_frames", f"{name}: 0 audio frames")
    return torch.from_numpy(np.ascontiguousarray(samples.T)), int(rate)


def load_audio(url: str) -> tuple[torch.Tensor, int]:
    """``decode_audio`` of a path or URL. A file that is missing or may not be read is a problem of
    this utterance (``AudioDecodeError("unreadable_file")``); a transient error (throttling, 5xx,
    reset, timeout) that outlasted storage's retries propagates unchanged, so the stage fails and
    is retried instead of losing the utterance."""
    try:
        data = storage.read_bytes(url)
    except OSError as exc:
        if storage.is_transient(exc):
            raise
        raise AudioDecodeError("unreadable_file", f"{url}: {exc}") from exc
    return decode_audio(data, url)


@lru_cache(maxsize=32)
def resampler(rate: int, target: int = SAMPLE_RATE) -> torchaudio.transforms.Resample:
    """torchaudio's default resampler (what upstream builds per utterance), built once per rate pair."""
    return torchaudio.transforms.Resample(orig_freq=rate, new_freq=target)


def to_16k(audio: torch.Tensor, rate: int) -> torch.Tensor:
    return audio if rate == SAMPLE_RATE else resampler(rate)(audio)


def campplus_input(audio: torch.Tensor, rate: int) -> np.ndarray:
    """float32 ``(1, T, 80)``: kaldi fbank of channel 0 at 16 kHz, mean-normalised over time."""
    audio = to_16k(audio, rate)
    feat = torchaudio.compliance.kaldi.fbank(audio, num_mel_bins=80, dither=0, sample_frequency=SAMPLE_RATE)
    feat = feat - feat.mean(dim=0, keepdim=True)
    return feat.unsqueeze(0).numpy()


def mono_16k(audio: torch.Tensor, rate: int) -> torch.Tensor:
    """``(1, N)`` at 16 kHz; resampled first, then channels averaged (the upstream order)."""
    audio = to_16k(audio, rate)
    if audio.shape[0] > 1:
        audio = audio.mean(dim=0, keepdim=True)
    return audio


def whisper_input(audio_16k: torch.Tensor) -> np.ndarray:
    """float32 ``(1, 128, T)`` whisper log-mel of a ``(1, N)`` 16 kHz signal (T = N // 160)."""
    return whisper.log_mel_spectrogram(audio_16k, n_mels=128).numpy()


def tokenizer_windows(audio_16k: torch.Tensor, long_audio: str) -> list[torch.Tensor]:
    """The ``(1, n)`` pieces to tokenize. Up to 30 s: the whole signal. Longer: nothing with
    ``skip`` (upstream writes an empty token list), or equal consecutive windows of at most 30 s
    with ``chunk`` (each window is normalised and encoded on its own, so tokens at the window
    boundaries differ from what a model with unlimited context would give)."""
    n = audio_16k.shape[1]
    if n <= MAX_TOKENIZER_SAMPLES:
        return [audio_16k]
    if long_audio == "skip":
        return []
    if long_audio != "chunk":
        raise ValueError(f"long_audio must be 'skip' or 'chunk', got {long_audio!r}")
    pieces = -(-n // MAX_TOKENIZER_SAMPLES)
    bounds = [round(i * n / pieces) for i in range(pieces + 1)]
    return [audio_16k[:, a:b] for a, b in zip(bounds, bounds[1:])]
