"""A short spoken sample of a published model dir, drawn as waveform + spectrogram (PNG).

What an operator sees of a published Triton repository before listening to it: ``sample_preview``
runs the served acoustic runtime (:func:`cosyvoice.acoustic.runtimes.load_token2wav`: ``Token2Wav``
at 24 kHz for a CosyVoice2 dir, ``Token2WavV1`` at 22.05 kHz for a CosyVoice1 one) on about two
seconds of the default speaker's speech tokens (speaker ``"001"`` of the ``spk2info.pt`` the BLS
falls back to; 25 or 50 tokens per second, the dir's generation's rate) with that speaker's CAM++
embedding, and ``render_png`` draws the result. A model dir without the acoustic models, a speaker
entry without speech tokens (a CosyVoice1 SFT entry holds the embedding only), or models that do not
load give a preview that says so instead of an image (the publication does not depend on it).
"""

from __future__ import annotations

import base64
import io
import logging
import os
from dataclasses import dataclass

import numpy as np

from cosyvoice import storage

log = logging.getLogger(__name__)

DEFAULT_SECONDS = 2.0


@dataclass
class SamplePreview:
    """``status``: ``rendered`` (``png`` holds the picture), ``skipped`` (no acoustic models, or no
    speech tokens for the speaker) or ``failed`` (they did not load or run); ``reason`` says why for the last two."""

    status: str
    reason: str = ""
    png: bytes | None = None
    speaker: str = ""
    utterance: str = ""
    tokens: int = 0
    seconds: float = 0.0
    peak: float = 0.0
    rms: float = 0.0

    def markdown(self) -> str:
        """The picture inline (a data URI), or the reason there is none."""
        if self.png is None:
            return f"no sample ({self.status}): {self.reason}"
        title = f"sample: {self.seconds:.2f} s, speaker {self.speaker}"
        return f"![{title}](data:image/png;base64,{base64.b64encode(self.png).decode()})"

    def as_metadata(self) -> dict:
        meta = {"sample_status": self.status}
        if self.status == "rendered":
            meta.update(sample_seconds=round(self.seconds, 3), sample_tokens=self.tokens, sample_speaker=self.speaker,
                        sample_peak=round(self.peak, 4), sample_rms=round(self.rms, 4))
            if self.utterance:
                meta["sample_utterance"] = self.utterance
        else:
            meta["sample_reason"] = self.reason
        return meta


def render_png(samples: np.ndarray, sample_rate: int, *, title: str = "") -> bytes:
    """Waveform over a spectrogram (dB, 1024-point Hann frames every 256 samples) as PNG bytes; the same
    samples give the same bytes. Drawn on a private Agg canvas (no pyplot state, thread safe)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    if samples.size == 0 or not np.isfinite(samples).all():
        raise ValueError(f"render_png: {samples.size} samples, finite: {bool(np.isfinite(samples).all())}; "
                         "a non-empty finite waveform is needed")
    fig = Figure(figsize=(7, 4), dpi=90)
    FigureCanvasAgg(fig)
    wave_ax, spec_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1, 2]})
    times = np.arange(samples.size) / sample_rate
    wave_ax.plot(times, samples, linewidth=0.5, color="#4f6bed")
    peak = float(np.abs(samples).max())
    wave_ax.set_ylim(-max(peak, 1e-4) * 1.05, max(peak, 1e-4) * 1.05)  # scaled to the peak, which the label gives
    wave_ax.set_ylabel(f"peak {peak:.3g}")
    if title:
        wave_ax.set_title(title)
    spec_ax.imshow(_spectrogram_db(samples), origin="lower", aspect="auto", cmap="magma",
                   extent=(0, samples.size / sample_rate, 0, sample_rate / 2))
    spec_ax.set_ylabel("Hz")
    spec_ax.set_xlabel("seconds")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _spectrogram_db(samples: np.ndarray, n_fft: int = 1024, hop: int = 256, floor_db: float = -80.0) -> np.ndarray:
    """(n_fft / 2 + 1, frames) power in dB of Hann-windowed frames (zero-padded to one frame), floored
    ``floor_db`` below its maximum."""
    padded = np.pad(samples.astype(np.float64), (0, max(0, n_fft - samples.size)))
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop] * np.hanning(n_fft)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    db = 10 * np.log10(np.maximum(power, 1e-20))
    return np.maximum(db, max(db.max() + floor_db, -200.0)).T


def _speaker(spk2info_url: str, speaker: str) -> dict:
    import torch

    table = torch.load(io.BytesIO(storage.read_bytes(spk2info_url)), map_location="cpu", weights_only=True)
    if speaker not in table:
        raise ValueError(f"{spk2info_url}: no speaker {speaker!r} (it has {sorted(table)[:5]})")
    return table[speaker]


def sample_preview(model_dir: str, spk2info_url: str, *, speaker: str = "001", utterance: str = "",
                   seconds: float = DEFAULT_SECONDS, seed: int = 0, device: str | None = None) -> SamplePreview:
    """About ``seconds`` of speech from ``model_dir``'s flow + HiFT: the first tokens of ``speaker``'s
    prompt utterance in ``spk2info_url`` (``utterance`` is its id, for the label), in that speaker's
    embedding, vocoder noise seeded with ``seed``; drawn with :func:`render_png`."""
    from cosyvoice.acoustic.runtimes import load_token2wav
    from cosyvoice.acoustic.synthesis import ACOUSTIC_FILES, missing_files, token_rate

    absent = missing_files(model_dir, ACOUSTIC_FILES)
    if absent:
        return SamplePreview("skipped", f"{model_dir} has no {', '.join(absent)}: token2wav cannot speak",
                             speaker=speaker, utterance=utterance)
    entry = _speaker(spk2info_url, speaker)
    if entry.get("speech_token") is None or np.asarray(entry["speech_token"]).size == 0:
        return SamplePreview("skipped", f"speaker {speaker!r} of {spk2info_url} has no speech_token (an SFT entry "
                             "with the embedding only): no tokens to speak", speaker=speaker, utterance=utterance)
    try:
        rate = token_rate(model_dir)
    except ValueError as exc:  # a dir of both generations (or an unknown recipe): say so, publish anyway
        return SamplePreview("failed", f"{type(exc).__name__}: {exc}", speaker=speaker, utterance=utterance)
    tokens = np.asarray(entry["speech_token"]).reshape(-1)[: max(1, round(seconds * rate))]
    embedding = np.asarray(entry["embedding"], dtype=np.float32).reshape(-1)
    try:
        model = load_token2wav(model_dir, device=device, seed=seed)
        samples = model.synthesize(tokens, embedding=embedding)
        if not np.isfinite(samples).all():
            raise ValueError("non-finite samples")
    except Exception as exc:  # the preview reports a model that does not work; it never stops a publication
        log.warning("sample preview of %s failed: %s", model_dir, exc)
        return SamplePreview("failed", f"token2wav on {os.path.basename(model_dir.rstrip('/'))}: "
                             f"{type(exc).__name__}: {exc}", speaker=speaker, utterance=utterance, tokens=len(tokens))
    duration = len(samples) / model.sample_rate
    label = f"{duration:.2f} s from {len(tokens)} speech tokens of speaker {speaker}" + (
        f" ({utterance})" if utterance else "")
    return SamplePreview("rendered", png=render_png(samples, model.sample_rate, title=label), speaker=speaker,
                         utterance=utterance, tokens=len(tokens), seconds=duration,
                         peak=float(np.abs(samples).max()), rms=float(np.sqrt(np.mean(np.square(samples)))))
