"""A deterministic LibriTTS-shaped corpus for tests, demos and benchmarks.

Layout and file formats follow LibriTTS: ``<subset>/<spk>/<chapter>/<spk>_<chapter>_<para>_<sent>``
``.wav`` (24 kHz mono 16-bit PCM), ``.normalized.txt`` and ``.original.txt`` (no trailing newline),
plus ``<spk>_<chapter>.trans.tsv`` per chapter. Speech comes from espeak-ng with several voices,
pitches and speeds; where espeak-ng is not installed a small deterministic formant synthesiser
stands in, so the generator works everywhere (the audio is then less speech-like, nothing else
changes). ``with_broken`` adds one file per failure mode a real corpus has, under speaker 9990.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import struct
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf

SAMPLE_RATE = 24000
BROKEN_SPEAKER = "9990"

_WORDS = (
    "the a of and to in he it was that his her with as had for you on at but him not she by "
    "they from be this all were which there so have said one would what when their we into out "
    "them up or could been if no then my more some now than little about these time who only over "
    "any made after before very upon great man old well good day came down long way night see "
    "house water light hand place eyes people think know under voice again room never young looked "
    "heard small world children morning between something nothing thought father mother garden "
    "river window silence letter evening country journey winter summer forest stranger quietly "
    "question answered remember together beautiful suddenly against himself herself across"
).split()
_NUMBERS = {"1862": "eighteen sixty two", "12": "twelve", "3": "three", "40": "forty", "1921": "nineteen twenty one"}

#: espeak-ng voice variants; each speaker gets one, with its own pitch and speed
_VOICES = ("en-us+f3", "en-gb+m3", "en-us+m7", "en-gb-x-rp+f2", "en-us+klatt", "en-us+f1",
           "en-gb+m1", "en-us+f4", "en-gb+m4", "en-us+m2")

#: the broken cases ``with_broken`` adds: (utterance-file stem relative to the subset, kind)
BROKEN_CASES = (
    ("9990/1/9990_1_000000_000001", "missing_text"),
    ("9990/1/9990_1_000000_000002", "empty_text"),
    ("9990/1/9990_1_000000_000003", "zero_length_wav"),
    ("9990/1/9990_1_000000_000004", "corrupt_header"),
    ("9990/1/9990_1_000000_000005", "truncated_data"),
    ("9990/1/9990_1_000000_000006", "long_audio"),
    ("9990/1/9990_1_000000_000007", "stereo_48k"),
    ("9990/1/9990_1_000000_000008", "rate_8k"),
    ("9990/1/9990_1_000000_000009", "non_utf8_text"),
    ("9990/2 copy/9990_2_000000_000001", "space_in_path"),
    ("9990/1/9990_1_000000_000010", "header_only"),
)


@dataclass
class SyntheticReport:
    out: str
    subsets: list[str]
    utterances: int
    broken: int
    audio_seconds: float
    synthesiser: str
    files: list[str] = field(default_factory=list, repr=False)


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def _sentence(rng: random.Random) -> tuple[str, str]:
    """(normalized, original) text; the original keeps digits where the normalized spells them."""
    words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 16))]
    original = list(words)
    if rng.random() < 0.3:
        pos = rng.randrange(len(words))
        digits = rng.choice(sorted(_NUMBERS))
        words[pos:pos + 1] = _NUMBERS[digits].split()
        original[pos] = digits
    norm = " ".join(words)
    orig = " ".join(original)
    end = rng.choice([".", ".", ".", "?", "!"])
    if rng.random() < 0.3:
        cut = rng.randrange(2, len(words) - 1)
        norm = " ".join(words[:cut]) + ", " + " ".join(words[cut:])
    return norm[0].upper() + norm[1:] + end, orig[0].upper() + orig[1:] + end


def _resample(audio: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    if src_rate == dst_rate:
        return audio
    import torch
    import torchaudio.functional as AF

    return AF.resample(torch.from_numpy(audio).float(), src_rate, dst_rate).numpy()


def _espeak(text: str, voice: str, pitch: int, speed: int) -> np.ndarray:
    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        subprocess.run(["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(speed), "-w", tmp.name, text],
                       check=True, capture_output=True)
        audio, rate = sf.read(tmp.name, dtype="float32")
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    return _resample(audio, rate, SAMPLE_RATE) * 0.8


def _formant_synth(text: str, pitch: int, speed: int) -> np.ndarray:
    """A deterministic stand-in for speech: voiced vowel-like segments per syllable, noise bursts,
    pauses at word boundaries. Deterministic in (text, pitch, speed)."""
    rng = np.random.default_rng(abs(hash_text(text)) % (2**32))
    f0 = 90.0 + 1.6 * pitch
    syllable = 60.0 / max(speed, 80) / 1.4
    pieces = []
    for word in text.split():
        for _i in range(max(1, sum(c in "aeiouy" for c in word.lower()))):
            n = int(SAMPLE_RATE * syllable * rng.uniform(0.7, 1.3))
            t = np.arange(n) / SAMPLE_RATE
            contour = f0 * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(1, 3) * t))
            phase = 2 * np.pi * np.cumsum(contour) / SAMPLE_RATE
            formants = rng.uniform([300, 900, 2200], [800, 2000, 3000])
            voiced = sum(np.sin(k * phase) / k * np.exp(-((k * f0 - formants[:, None]) ** 2).min(0) / 2e5)
                         for k in range(1, 30))
            envelope = np.sin(np.pi * np.arange(n) / n) ** 0.5
            burst = rng.normal(0, 0.05, n) * (np.arange(n) < n // 6)
            pieces.append((voiced * envelope + burst).astype(np.float32))
        pieces.append(np.zeros(int(SAMPLE_RATE * 0.06), np.float32))
    audio = np.concatenate([np.zeros(int(SAMPLE_RATE * 0.2), np.float32), *pieces,
                            np.zeros(int(SAMPLE_RATE * 0.2), np.float32)])
    return (0.5 * audio / (np.abs(audio).max() + 1e-9)).astype(np.float32)


def hash_text(text: str) -> int:
    """A stable (process-independent) hash, unlike ``hash()`` with PYTHONHASHSEED."""
    h = 1469598103934665603
    for byte in text.encode():
        h = ((h ^ byte) * 1099511628211) % (1 << 64)
    return h


def _pcm16(audio: np.ndarray) -> np.ndarray:
    return (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2")


def wav_bytes(audio: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """A canonical 44-byte-header PCM16 WAV (mono or (frames, channels))."""
    pcm = _pcm16(audio)
    channels = 1 if pcm.ndim == 1 else pcm.shape[1]
    data = pcm.tobytes()
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(data), b"WAVE", b"fmt ", 16, 1, channels,
                         rate, rate * channels * 2, channels * 2, 16, b"data", len(data))
    return header + data


def _write(path: str, data: bytes | str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


@dataclass(frozen=True)
class _Job:
    stem: str
    normalized: str
    original: str
    voice: str
    pitch: int
    speed: int


def make_synthetic_corpus(
    out: str,
    *,
    subsets: tuple[str, ...] | list[str] = ("dev-clean",),
    speakers: int = 4,
    utts_per_speaker: int = 6,
    seed: int = 0,
    with_broken: bool = False,
    num_workers: int = 2,
    synthesiser: str = "auto",
) -> SyntheticReport:
    """Write the corpus below ``out`` (one folder per subset). Same arguments, same bytes."""
    use_espeak = synthesiser == "espeak" or (synthesiser == "auto" and espeak_available())
    if synthesiser == "espeak" and not espeak_available():
        raise RuntimeError("espeak-ng is not installed (apt-get install -y espeak-ng)")
    rng = random.Random(seed)
    ids = rng.sample(range(10, 9000), speakers * len(subsets))
    jobs: list[_Job] = []
    for s_index, subset in enumerate(subsets):
        for spk in ids[s_index * speakers:(s_index + 1) * speakers]:
            voice, pitch, speed = rng.choice(_VOICES), rng.randint(25, 85), rng.randint(145, 185)
            chapters = sorted(rng.sample(range(100, 99999), 2))
            for i in range(utts_per_speaker):
                chapter = chapters[i % 2]
                norm, orig = _sentence(rng)
                stem = f"{subset}/{spk}/{chapter}/{spk}_{chapter}_{i // 3:06d}_{i % 3 + 1:06d}"
                jobs.append(_Job(stem, norm, orig, voice, pitch, speed))

    def render(job: _Job) -> float:
        audio = (_espeak(job.normalized, job.voice, job.pitch, job.speed) if use_espeak
                 else _formant_synth(job.normalized, job.pitch, job.speed))
        base = os.path.join(out, job.stem)
        _write(base + ".wav", wav_bytes(audio))
        _write(base + ".normalized.txt", job.normalized)
        _write(base + ".original.txt", job.original)
        return len(audio) / SAMPLE_RATE

    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        seconds = sum(pool.map(render, jobs))
    for folder in sorted({os.path.dirname(j.stem) for j in jobs}):
        spk, chapter = folder.split("/")[-2:]
        rows = [j for j in jobs if os.path.dirname(j.stem) == folder]
        _write(os.path.join(out, folder, f"{spk}_{chapter}.trans.tsv"),
               "".join(f"{os.path.basename(j.stem)}\t{j.original}\t{j.normalized}\n" for j in rows))

    broken = 0
    if with_broken:
        for subset in subsets:
            sample = _espeak if use_espeak else None
            broken += _write_broken(os.path.join(out, subset), seed, sample)
    return SyntheticReport(out=out, subsets=list(subsets), utterances=len(jobs), broken=broken,
                           audio_seconds=seconds, synthesiser="espeak-ng" if use_espeak else "formant",
                           files=[j.stem for j in jobs])


def _write_broken(root: str, seed: int, espeak) -> int:
    """One file per failure mode; see BROKEN_CASES."""
    text = "This utterance exists to test how the pipeline handles a broken file."

    def voice(t: str) -> np.ndarray:
        return espeak(t, "en-us", 50, 170) if espeak else _formant_synth(t, 50, 170)

    clean = voice(text)
    for stem, kind in BROKEN_CASES:
        base = os.path.join(root, stem)
        good_wav = wav_bytes(clean)
        wav, txt = good_wav, text
        if kind == "missing_text":
            txt = None
        elif kind == "empty_text":
            txt = ""
        elif kind == "zero_length_wav":
            wav = b""
        elif kind == "corrupt_header":
            wav = random.Random(seed).randbytes(64) + good_wav[44:]
        elif kind == "truncated_data":
            wav = good_wav[: 44 + (len(good_wav) - 44) // 2]
        elif kind == "long_audio":
            parts, total = [], 0
            while total < 32 * SAMPLE_RATE:
                parts += [clean, np.zeros(SAMPLE_RATE // 4, np.float32)]
                total += len(clean) + SAMPLE_RATE // 4
            wav = wav_bytes(np.concatenate(parts))
        elif kind == "stereo_48k":
            up = _resample(clean, SAMPLE_RATE, 48000)
            wav = wav_bytes(np.stack([up, 0.5 * up], axis=1), 48000)
        elif kind == "rate_8k":
            wav = wav_bytes(_resample(clean, SAMPLE_RATE, 8000), 8000)
        elif kind == "header_only":
            wav = wav_bytes(np.zeros(0, np.float32))
        _write(base + ".wav", wav)
        if kind == "non_utf8_text":
            _write(base + ".normalized.txt", "Caf\xe9 cr\xe8me and na\xefve r\xe9sum\xe9.".encode("latin-1"))
        elif txt is not None:
            _write(base + ".normalized.txt", txt)
        if txt is not None:
            _write(base + ".original.txt", txt)
    return len(BROKEN_CASES)


def sine_wav(seconds: float, rate: int = SAMPLE_RATE, freq: float = 220.0, channels: int = 1) -> bytes:
    """A short test tone as WAV bytes (used by tests that need a valid file of a given shape)."""
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * math.pi * freq * t).astype(np.float32)
    return wav_bytes(tone if channels == 1 else np.stack([tone] * channels, axis=1), rate)


__all__ = ["BROKEN_CASES", "SyntheticReport", "make_synthetic_corpus", "sine_wav", "wav_bytes"]
