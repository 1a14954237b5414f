"""Audio header validation without decoding whole files.

A manifest over 100k files must not read every sample, yet it must not let through a file that
will crash feature extraction hours later. For RIFF/WAVE (the LibriTTS format) the header is
parsed here and checked against the real file size, which finds empty, corrupt and truncated
files; anything else (e.g. FLAC stored as ``.wav``) is handed to libsndfile via ``soundfile``.
Deliberately light: no numpy/torch import on the fast path.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

#: bytes read first; a canonical WAV header is 44 bytes, larger LIST/INFO chunks trigger a re-read
FIRST_READ = 4096
HEADER_BYTES = 64 * 1024

_PCM, _FLOAT, _EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
_UNKNOWN_SIZES = (0xFFFFFFFF,)  # streamed writers that could not seek back to fix the size


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    channels: int
    frames: int
    encoding: str  # e.g. "pcm_s16", "float32", or libsndfile's subtype name

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate


class AudioProblem(Exception):
    """A file that cannot be used, with a stable machine-readable ``reason`` code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{detail} (reason: {reason})")
        self.reason = reason
        self.detail = detail


def probe_audio(read, file_size: int) -> AudioInfo:
    """Validate an audio file from its size and as few leading bytes as possible.

    ``read(n)`` returns the first ``n`` bytes of the file (``read(None)``: all of it). A
    canonical WAV costs one 4 KiB read; the whole file is only read for encodings that
    libsndfile has to open itself.
    """
    if file_size == 0:
        raise AudioProblem("empty_file", "file is 0 bytes long")
    for nbytes in (FIRST_READ, HEADER_BYTES):
        head = read(nbytes)
        if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            break
        info = _probe_riff(head, file_size)
        if info is not None:
            return info
        if len(head) >= file_size:
            break
    return _probe_with_libsndfile(read(None))


def _probe_riff(head: bytes, file_size: int) -> AudioInfo | None:
    """Parse a little-endian RIFF/WAVE header; None means "defer to libsndfile"."""
    pos, fmt = 12, None
    while pos + 8 <= len(head):
        chunk_id, chunk_size = head[pos:pos + 4], struct.unpack_from("<I", head, pos + 4)[0]
        body = pos + 8
        if chunk_id == b"fmt ":
            if chunk_size < 16 or body + 16 > len(head):
                raise AudioProblem("unreadable_header", f"fmt chunk is {chunk_size} bytes, need at least 16")
            tag, channels, rate, _byte_rate, block_align, bits = struct.unpack_from("<HHIIHH", head, body)
            if tag == _EXTENSIBLE and chunk_size >= 40 and body + 26 <= len(head):
                tag = struct.unpack_from("<H", head, body + 24)[0]
            fmt = (tag, channels, rate, block_align, bits)
        elif chunk_id == b"data":
            if fmt is None:
                raise AudioProblem("unreadable_header", "data chunk before fmt chunk")
            tag, channels, rate, block_align, bits = fmt
            if channels == 0 or rate == 0 or block_align == 0:
                raise AudioProblem("unreadable_header",
                                   f"invalid fmt chunk: {channels} channels, {rate} Hz, block align {block_align}")
            if tag not in (_PCM, _FLOAT):
                return None
            if bits == 0 or block_align != channels * ((bits + 7) // 8):
                raise AudioProblem("unreadable_header",
                                   f"inconsistent fmt chunk: {channels} ch x {bits} bit but block align {block_align}")
            available = file_size - body
            if chunk_size in _UNKNOWN_SIZES:
                chunk_size = available
            if chunk_size > available:
                raise AudioProblem("truncated_audio",
                                   f"data chunk declares {chunk_size} bytes but only {available} are in the file")
            frames = chunk_size // block_align
            if frames == 0:
                raise AudioProblem("no_audio_frames", "WAV header declares 0 audio frames")
            encoding = ("float" if tag == _FLOAT else "pcm_s" if bits > 8 else "pcm_u") + str(bits)
            return AudioInfo(sample_rate=rate, channels=channels, frames=frames, encoding=encoding)
        pos = body + chunk_size + (chunk_size & 1)  # chunks are word aligned
    if pos + 8 > file_size:
        raise AudioProblem("unreadable_header" if fmt is None else "truncated_audio",
                           "file ends before the data chunk" if fmt else "no fmt/data chunk in the file")
    return None  # header larger than what we read: let libsndfile parse it


def _probe_with_libsndfile(data: bytes) -> AudioInfo:
    import soundfile as sf  # only for non-PCM files, keeps the common path free of numpy

    try:
        f = sf.SoundFile(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
        message = str(exc).split(": ", 1)[-1] if ": " in str(exc) else str(exc)
        raise AudioProblem("unreadable_header", f"not a readable audio file ({message})") from exc
    try:
        with f:
            frames, rate, channels, subtype = f.frames, f.samplerate, f.channels, f.subtype
            if frames > 0:
                f.seek(max(frames - 1024, 0))
                f.read(1024, dtype="float32")  # decodability: the tail must decode too
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
        raise AudioProblem("undecodable_audio", f"the samples do not decode ({exc})") from exc
    if frames <= 0:
        raise AudioProblem("no_audio_frames", "the file contains 0 audio frames")
    return AudioInfo(sample_rate=rate, channels=channels, frames=frames, encoding=str(subtype).lower())
