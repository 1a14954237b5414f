import io
import struct

import numpy as np
import pytest
import soundfile as sf

from cosyvoice.corpus.audio import AudioProblem, probe_audio
from cosyvoice.corpus.synthetic import sine_wav, wav_bytes


def probe(data: bytes):
    return probe_audio(lambda n: data if n is None else data[:n], len(data))


def reason_of(data: bytes) -> str:
    with pytest.raises(AudioProblem) as info:
        probe(data)
    return info.value.reason


def test_canonical_pcm16_wav_reports_rate_channels_frames():
    info = probe(sine_wav(1.5, rate=24000))
    assert (info.sample_rate, info.channels, info.frames, info.encoding) == (24000, 1, 36000, "pcm_s16")
    assert info.duration == pytest.approx(1.5)


def test_stereo_and_float_wavs_are_parsed_from_the_header():
    buf = io.BytesIO()
    sf.write(buf, np.zeros((4800, 2), np.float32), 48000, format="WAV", subtype="FLOAT")
    info = probe(buf.getvalue())
    assert (info.sample_rate, info.channels, info.frames, info.encoding) == (48000, 2, 4800, "float32")


def test_large_chunk_before_data_triggers_a_second_read():
    good = sine_wav(0.5)
    info_chunk = b"LIST" + struct.pack("<I", 10000) + b"\0" * 10000
    data = good[:12] + good[12:36] + info_chunk + good[36:]
    data = data[:4] + struct.pack("<I", len(data) - 8) + data[8:]
    reads = []

    def read(n):
        reads.append(n)
        return data if n is None else data[:n]

    info = probe_audio(read, len(data))
    assert info.frames == 12000 and len(reads) == 2 and None not in reads


def test_zero_byte_file_is_empty_file():
    assert reason_of(b"") == "empty_file"


def test_garbage_header_is_unreadable_header():
    assert reason_of(b"\x13\x37" * 40 + b"\0" * 1000) == "unreadable_header"


def test_data_shorter_than_declared_is_truncated_audio():
    good = sine_wav(1.0)
    assert reason_of(good[: len(good) // 2]) == "truncated_audio"


def test_header_without_samples_is_no_audio_frames():
    assert reason_of(wav_bytes(np.zeros(0, np.float32))) == "no_audio_frames"


def test_inconsistent_block_align_is_unreadable_header():
    good = bytearray(sine_wav(0.1))
    good[32:34] = struct.pack("<H", 3)  # block align 3 for mono 16 bit
    assert reason_of(bytes(good)) == "unreadable_header"


def test_odd_trailing_byte_is_tolerated_like_decoders_do():
    good = sine_wav(0.1)
    data = good[:40] + struct.pack("<I", len(good) - 44 + 1) + good[44:] + b"\0"
    assert probe(data).frames == 2400


def test_streamed_header_with_unknown_size_uses_the_file_size():
    good = sine_wav(0.2)
    data = good[:40] + struct.pack("<I", 0xFFFFFFFF) + good[44:]
    assert probe(data).frames == 4800


def test_flac_named_wav_is_validated_by_libsndfile():
    buf = io.BytesIO()
    sf.write(buf, np.zeros(16000, np.float32) + 0.1, 16000, format="FLAC")
    info = probe(buf.getvalue())
    assert (info.sample_rate, info.channels, info.frames) == (16000, 1, 16000)


def test_undecodable_flac_body_is_reported():
    buf = io.BytesIO()
    sf.write(buf, np.random.default_rng(0).normal(0, 0.1, 48000).astype(np.float32), 16000, format="FLAC")
    data = buf.getvalue()
    assert reason_of(data[: len(data) // 3]) in ("undecodable_audio", "truncated_audio")
