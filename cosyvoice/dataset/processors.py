"""The CosyVoice training data stages as generator functions (contract section 4.3).

Each takes an iterator of sample dicts and yields sample dicts (or batches), so they chain like
upstream's ``Processor``s. Differences from upstream, on purpose: a row that fails to decode is
dropped and counted in ``stats`` instead of ending the whole shard; a shard that cannot be read
fails the epoch unless the operator opts into skipping it; ``dynamic_batch`` never emits an empty
batch (defect D10); list columns stay numpy arrays; a row whose F0 extraction fails is dropped and
counted; ``truncate`` draws from an injected ``random.Random`` (or, without one, crops by utterance id).
"""

from __future__ import annotations

import logging
import random
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator

import numpy as np

from cosyvoice import storage

log = logging.getLogger(__name__)


class UnreadableShardError(RuntimeError):
    """A training/CV shard could not be read (after storage's retries of transient errors)."""


def parquet_opener(sources: Iterable[dict], *, batch_rows: int = 64, stats: Counter | None = None,
                   skip_unreadable_shards: bool = False) -> Iterator[dict]:
    """Stream the rows of each ``{"src": parquet_url, ...}`` in batches of ``batch_rows``: memory holds
    one row batch of encoded audio, never a whole shard.

    A transient read error (throttling, 5xx, reset, timeout; ``storage.is_transient``) reopens the
    shard after a backoff and continues after the last row already yielded, so no row is lost or
    repeated (at most ``storage.io_retries()`` times per shard). A shard that still cannot be read
    (missing, corrupt, or still failing) raises ``UnreadableShardError`` with its URL: training does
    not silently go on without it. With ``skip_unreadable_shards`` it is instead logged (URL and
    reason), counted in ``stats["unreadable_shards"]`` and the next shard is read."""
    for source in sources:
        url = source["src"]
        try:
            yield from _shard_rows(source, batch_rows)
        except Exception as exc:
            if not skip_unreadable_shards:
                raise UnreadableShardError(
                    f"{url}: cannot read training shard ({type(exc).__name__}: {exc}); fix or remove it from "
                    "the data list, or pass --skip_unreadable_shards to train without it") from exc
            log.warning("skipping unreadable shard %s (--skip_unreadable_shards): %s: %s", url, type(exc).__name__, exc)
            if stats is not None:
                stats["unreadable_shards"] += 1


def _shard_rows(source: dict, batch_rows: int) -> Iterator[dict]:
    """The rows of one shard; transient errors resume after the rows already yielded."""
    import pyarrow.parquet as pq

    url, done, delays = source["src"], 0, storage.retry_delays()
    while True:
        try:
            # pre_buffer=False: read row group by row group (pre-buffering reads the whole shard at once)
            with storage.open_read(url, retry=False) as handle, pq.ParquetFile(handle, pre_buffer=False) as parquet:
                seen = 0
                for batch in parquet.iter_batches(batch_size=batch_rows):
                    if seen + batch.num_rows <= done:  # yielded before a transient error: skip
                        seen += batch.num_rows
                        continue
                    for row in batch.to_pylist()[max(0, done - seen):]:
                        yield {**source, **row}
                        done += 1
                    seen += batch.num_rows
            return
        except Exception as exc:
            wait = next(delays, None) if storage.is_transient(exc) else None
            if wait is None:
                raise
            log.warning("%s: transient error after %d rows (%s: %s), reopening in %.2f s",
                        url, done, type(exc).__name__, exc, wait)
            time.sleep(wait)


def decode_audio(data: Iterable[dict], *, stats: Counter | None = None) -> Iterator[dict]:
    """``audio_data`` -> ``speech`` (1, N) float32, channels averaged, and ``sample_rate``."""
    from cosyvoice.features.frontend import AudioDecodeError
    from cosyvoice.features.frontend import decode_audio as decode

    for sample in data:
        try:
            audio, rate = decode(sample.pop("audio_data"), sample.get("utt", "<row>"))
        except AudioDecodeError as exc:
            log.warning("dropping %s: audio does not decode (%s)", sample.get("utt"), exc)
            if stats is not None:
                stats["undecodable_audio"] += 1
            continue
        sample["speech"] = audio.mean(dim=0, keepdim=True)
        sample["sample_rate"] = rate
        yield sample


def filter_samples(data: Iterable[dict], *, max_length: float = 10240, min_length: float = 10,
                   token_max_length: int = 200, token_min_length: int = 1, min_output_input_ratio: float = 0.0005,
                   max_output_input_ratio: float = 1, online_feature: bool = False,
                   stats: Counter | None = None) -> Iterator[dict]:
    """Upstream ``filter``: lengths in 10 ms frames at the original rate, text-token bounds, the
    text/audio ratio, and (offline features) non-empty ``speech_token``/``reject_speech_token``."""
    def drop(reason: str) -> None:
        if stats is not None:
            stats[reason] += 1

    for sample in data:
        frames = sample["speech"].shape[1] / sample["sample_rate"] * 100
        tokens = len(sample["text_token"])
        if frames < min_length:
            drop("too_short")
        elif frames > max_length:
            drop("too_long")
        elif tokens < token_min_length or tokens > token_max_length:
            drop("text_token_length")
        elif not online_feature and "speech_token" in sample and len(sample["speech_token"]) == 0:
            drop("empty_speech_token")
        elif not online_feature and "reject_speech_token" in sample and len(sample["reject_speech_token"] or []) == 0:
            drop("empty_reject_speech_token")
        elif frames != 0 and not min_output_input_ratio <= tokens / frames <= max_output_input_ratio:
            drop("text_audio_ratio")
        else:
            yield sample


def resample(data: Iterable[dict], *, resample_rate: int = 24000, min_sample_rate: int = 16000,
             stats: Counter | None = None) -> Iterator[dict]:
    """To ``resample_rate`` (torchaudio's default resampler); below ``min_sample_rate`` is dropped;
    peak-normalised when the resampled signal exceeds 1."""
    from cosyvoice.features.frontend import resampler

    for sample in data:
        rate = sample["sample_rate"]
        if rate != resample_rate:
            if rate < min_sample_rate:
                if stats is not None:
                    stats["low_sample_rate"] += 1
                continue
            sample["speech"] = resampler(rate, resample_rate)(sample["speech"])
            sample["sample_rate"] = resample_rate
        peak = sample["speech"].abs().max()
        if peak > 1:
            sample["speech"] = sample["speech"] / peak
        yield sample


def truncate(data: Iterable[dict], *, truncate_length: int, rng: random.Random | None = None) -> Iterator[dict]:
    """HiFT GAN training: ``speech`` cropped at a random offset to exactly ``truncate_length`` samples,
    or zero-padded at the end to it (upstream's ``truncate``; 24480 = 51 mel hops of 480 at 24 kHz).

    Offsets come from ``rng`` (the training set: a seeded ``random.Random`` per epoch/rank/worker).
    Without one the offset is a function of the utterance id alone, so a CV set crops the same way
    every epoch, on every rank and with any number of workers."""
    if truncate_length <= 0:
        raise ValueError(f"truncate_length must be a positive number of samples, got {truncate_length}")
    import torch

    for sample in data:
        speech = sample["speech"]
        n = speech.shape[1]
        if n > truncate_length:
            draw = rng or random.Random(zlib.crc32(str(sample.get("utt", "")).encode()))
            start = draw.randint(0, n - truncate_length)
            sample["speech"] = speech[:, start:start + truncate_length]
        elif n < truncate_length:
            sample["speech"] = torch.nn.functional.pad(speech, (0, truncate_length - n))
        yield sample


def shuffle(data: Iterable[dict], *, shuffle_size: int = 1000, rng: random.Random | None = None) -> Iterator[dict]:
    """Upstream's buffer shuffle: at ``shuffle_size`` samples, shuffle, emit the first half."""
    rng = rng or random.Random()
    buffer: list[dict] = []
    for sample in data:
        buffer.append(sample)
        if len(buffer) >= shuffle_size:
            rng.shuffle(buffer)
            half = len(buffer) // 2
            yield from buffer[:half]
            buffer = buffer[half:]
    rng.shuffle(buffer)
    yield from buffer


def sort(data: Iterable[dict], *, sort_size: int = 500, key: str = "speech_feat") -> Iterator[dict]:
    """Stable ascending sort by ``len(sample[key])`` within buffers of ``sort_size``."""
    buffer: list[dict] = []
    for sample in data:
        buffer.append(sample)
        if len(buffer) >= sort_size:
            buffer.sort(key=lambda s: s[key].shape[0])
            yield from buffer
            buffer = []
    buffer.sort(key=lambda s: s[key].shape[0])
    yield from buffer


def dynamic_batch(data: Iterable[dict], *, max_frames_in_batch: int = 2000, key: str = "speech_feat") -> Iterator[list[dict]]:
    """Upstream's dynamic batching (the padded batch ``longest x count`` stays within the budget);
    a sample longer than the whole budget becomes a batch of its own, never an empty batch (D10)."""
    buffer: list[dict] = []
    longest = 0
    for sample in data:
        length = sample[key].shape[0]
        new_longest = max(longest, length)
        if buffer and new_longest * (len(buffer) + 1) > max_frames_in_batch:
            yield buffer
            buffer, new_longest = [], length
        buffer.append(sample)
        longest = new_longest
    if buffer:
        yield buffer


def lm_sequence_length(sample: dict) -> int:
    """Positions the sample occupies in the LLM sequence: sos + instruct + text + task_id + speech + eos
    (bistream interleaving adds a fill per 15 speech tokens; the budget keeps a margin for it)."""
    speech = sample.get("speech_token")
    n_speech = len(speech) if speech is not None and len(speech) else sample["speech_feat"].shape[0] // 2
    return (3 + len(sample["text_token"]) + len(sample.get("instruct_token") or ()) + n_speech
            + n_speech // 15)


def token_batch(data: Iterable[dict], *, max_tokens_in_batch: int = 16384) -> Iterator[list[dict]]:
    """Batches by *real* LLM tokens (no padding counted): with packed sequences the step cost is
    proportional to this sum, so every step does about the same work."""
    buffer: list[dict] = []
    total = 0
    for sample in data:
        n = lm_sequence_length(sample)
        if buffer and total + n > max_tokens_in_batch:
            yield buffer
            buffer, total = [], 0
        buffer.append(sample)
        total += n
    if buffer:
        yield buffer


def static_batch(data: Iterable[dict], *, batch_size: int = 16) -> Iterator[list[dict]]:
    buffer: list[dict] = []
    for sample in data:
        buffer.append(sample)
        if len(buffer) >= batch_size:
            yield buffer
            buffer = []
    if buffer:
        yield buffer


def batch(data: Iterable[dict], *, batch_type: str = "dynamic", max_frames_in_batch: int = 2000,
          batch_size: int = 16, max_tokens_in_batch: int = 16384) -> Iterator[list[dict]]:
    """Upstream's ``batch`` stage (``static`` | ``dynamic`` frame budget) plus ``token``: a budget of
    real LLM tokens for packed training."""
    if batch_type == "dynamic":
        return dynamic_batch(data, max_frames_in_batch=max_frames_in_batch)
    if batch_type == "static":
        return static_batch(data, batch_size=batch_size)
    if batch_type == "token":
        return token_batch(data, max_tokens_in_batch=max_tokens_in_batch)
    raise ValueError(f"batch_type must be static, dynamic or token, got {batch_type!r}")


def _pad(items: list, dtype, value=0):
    import torch

    tensors = [torch.as_tensor(np.asarray(x), dtype=dtype) for x in items]
    lengths = torch.tensor([t.shape[0] for t in tensors], dtype=torch.int32)
    return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=value), lengths


def padding(batches: Iterable[list[dict]], *, use_spk_embedding: bool = False, dpo: bool = False,
            gan: bool = False) -> Iterator[dict]:
    """A list of samples -> the training batch dict (contract section 4.3, item 13), samples ordered
    by raw speech length, longest first. Optional keys appear only when every sample has them.
    ``gan`` adds the HiFT GAN targets: ``speech`` (B, N) float32 (the waveform as compute_fbank
    padded it) / ``speech_len`` int32 and ``pitch_feat`` (B, T_mel) float32 / ``pitch_feat_len``."""
    import torch

    for batch in batches:
        order = sorted(range(len(batch)), key=lambda i: batch[i]["speech"].shape[1], reverse=True)
        samples = [batch[i] for i in order]
        out: dict = {"utts": [s["utt"] for s in samples], "text": [s["text"] for s in samples]}
        out["text_token"], out["text_token_len"] = _pad([s["text_token"] for s in samples], torch.int64)
        if all("speech_feat" in s for s in samples):
            out["speech_feat"], out["speech_feat_len"] = _pad([s["speech_feat"] for s in samples], torch.float32)
        for name in ("utt_embedding", "spk_embedding"):
            if all(name in s for s in samples):
                out[name] = torch.stack([torch.as_tensor(np.asarray(s[name]), dtype=torch.float32) for s in samples])
        for name, dtype in (("instruct_token", torch.int64), ("whisper_feat", torch.float32),
                            ("speech_token", torch.int64)):
            if all(name in s for s in samples):
                out[name], out[f"{name}_len"] = _pad([s[name] for s in samples], dtype)
        if gan:
            for s in samples:
                if "pitch_feat" not in s:
                    raise ValueError(f"{s.get('utt')}: no pitch_feat for the gan batch; run compute_f0 before padding")
            out["speech"], out["speech_len"] = _pad([s["speech"].squeeze(0) for s in samples], torch.float32)
            out["pitch_feat"], out["pitch_feat_len"] = _pad([s["pitch_feat"] for s in samples], torch.float32)
        if dpo:
            out["reject_speech_token"], out["reject_speech_token_len"] = _pad(
                [s.get("reject_speech_token") if s.get("reject_speech_token") is not None else [] for s in samples],
                torch.int64)
        if "utt_embedding" in out:
            out["embedding"] = out["spk_embedding"] if use_spk_embedding else out["utt_embedding"]
        yield out


def tokenize(data: Iterable[dict], *, tokenizer) -> Iterator[dict]:
    """``text_token`` (and ``instruct_token`` when the row has an ``instruct``) from ``tokenizer.encode``."""
    for sample in data:
        sample["text_token"] = tokenizer.encode(sample["text"])
        if sample.get("instruct") is not None:
            sample["instruct_token"] = tokenizer.encode(sample["instruct"])
        yield sample


def align_tokens_to_mel(data: Iterable[dict], *, token_mel_ratio: int = 2, tolerance: int = 2,
                        stats: Counter | None = None) -> Iterator[dict]:
    """Flow training: ``speech_token`` and ``speech_feat`` cut to the same duration, ``token_mel_ratio``
    mel frames per token. Offline tokens come from the unpadded audio at 16 kHz, while compute_fbank
    pads to whole tokens at 24 kHz, so one token more or less is common; upstream's flow would then
    fail on the shape mismatch. A difference above ``tolerance`` tokens means tokens and audio do
    not belong together (another tokenizer or frame rate): the row is dropped and counted
    (``stats["token_mel_mismatch"]``)."""
    for sample in data:
        tokens, feat = sample["speech_token"], sample["speech_feat"]
        n = min(len(tokens), feat.shape[0] // token_mel_ratio)
        if abs(len(tokens) - feat.shape[0] / token_mel_ratio) > tolerance or n == 0:
            log.warning("dropping %s: %d speech tokens for %d mel frames (%d per token expected)",
                        sample.get("utt"), len(tokens), feat.shape[0], token_mel_ratio)
            if stats is not None:
                stats["token_mel_mismatch"] += 1
            continue
        sample["speech_token"] = tokens[:n]
        sample["speech_feat"] = feat[:n * token_mel_ratio]
        yield sample


def check_token_rate(data: Iterable[dict], *, tokens_per_second: float, frames_per_second: float,
                     tolerance: float = 2, stats: Counter | None = None) -> Iterator[dict]:
    """CosyVoice1 flow training (whole utterances): a row whose ``speech_token`` count is not the duration of
    its ``speech_feat`` at ``tokens_per_second`` (within ``tolerance`` tokens + 2 %) is dropped, logged and
    counted (``stats["token_rate_mismatch"]``). Upstream checks nothing and its interpolating length
    regulator stretches any token count to the frames, so tokens of another tokenizer or rate (25 Hz codes
    in a 50 Hz recipe) would train silently. Offline tokens come from the 16 kHz audio and the mel from the
    resampled speech, so a token or so of difference is normal."""
    for sample in data:
        expected = sample["speech_feat"].shape[0] / frames_per_second * tokens_per_second
        found = len(sample["speech_token"])
        if abs(found - expected) > tolerance + 0.02 * expected:
            log.warning("dropping %s: %d speech tokens for %.2f s of mel (%.0f expected at %g tokens/s)",
                        sample.get("utt"), found, expected / tokens_per_second, expected, tokens_per_second)
            if stats is not None:
                stats["token_rate_mismatch"] += 1
            continue
        yield sample


def compute_fbank(data: Iterable[dict], *, mel_config=None, samples_per_token: int = 960) -> Iterator[dict]:
    """Zero-pad ``speech`` to a multiple of ``samples_per_token`` (960 = one 25 Hz token at 24 kHz;
    0 disables) and compute ``speech_feat`` (T_mel, n_mels) with the recipe's mel."""
    import torch

    from cosyvoice.dataset.mel import MelConfig, mel_spectrogram

    config = mel_config or MelConfig()  # hop 480 + the padding below = 2 mel frames per token
    for sample in data:
        speech = sample["speech"]
        if samples_per_token:
            extra = (-speech.shape[1]) % samples_per_token
            if extra:
                speech = torch.nn.functional.pad(speech, (0, extra))
                sample["speech"] = speech
        sample["speech_feat"] = mel_spectrogram(speech, config).squeeze(0).transpose(0, 1)
        yield sample


def compute_f0(data: Iterable[dict], *, sample_rate: int, hop_size: int,
               stats: Counter | None = None) -> Iterator[dict]:
    """HiFT GAN training: ``pitch_feat`` (T_mel,) float32, the F0 in Hz (0 = unvoiced) of ``speech``
    at one value per ``speech_feat`` frame. WORLD's harvest at a frame period of one hop; when it
    finds fewer than 5 voiced frames (it misses pure tones, for one) dio is used instead; stonemask
    refines either; the frames are linearly interpolated to the mel length (upstream's ``compute_f0``).

    Runs after ``compute_fbank`` (it needs ``speech_feat``) on speech at ``sample_rate``. A row whose
    extraction raises is dropped, logged and counted (``stats["f0_extraction_failed"]``); dio
    fallbacks are counted too (``stats["f0_dio_fallback"]``)."""
    import pyworld
    import torch

    if hop_size <= 0 or sample_rate <= 0:
        raise ValueError(f"compute_f0 needs a positive sample_rate and hop_size, got {sample_rate} and {hop_size}")
    frame_period = hop_size * 1000 / sample_rate  # ms
    for sample in data:
        utt = sample.get("utt")
        if "speech_feat" not in sample:
            raise ValueError(f"{utt}: no speech_feat; compute_f0 runs after compute_fbank")
        if sample["sample_rate"] != sample_rate:
            raise ValueError(f"{utt}: speech is at {sample['sample_rate']} Hz, compute_f0 expects {sample_rate} Hz; "
                             "resample first or set compute_f0's sample_rate")
        try:
            x = sample["speech"].squeeze(0).numpy().astype(np.float64)
            f0, times = pyworld.harvest(x, sample_rate, frame_period=frame_period)
            if np.count_nonzero(f0) < 5:
                f0, times = pyworld.dio(x, sample_rate, frame_period=frame_period)
                if stats is not None:
                    stats["f0_dio_fallback"] += 1
            f0 = pyworld.stonemask(x, f0, times, sample_rate)
            frames = torch.nn.functional.interpolate(torch.from_numpy(f0).view(1, 1, -1),
                                                     size=sample["speech_feat"].shape[0], mode="linear")
        except Exception as exc:
            log.warning("dropping %s: F0 extraction failed (%s: %s)", utt, type(exc).__name__, exc)
            if stats is not None:
                stats["f0_extraction_failed"] += 1
            continue
        sample["pitch_feat"] = frames.view(-1).to(torch.float32)
        yield sample


def parse_embedding(data: Iterable[dict], *, normalize: bool = True, stats: Counter | None = None,
                    campplus_onnx: str | None = None) -> Iterator[dict]:
    """``utt_embedding`` / ``spk_embedding`` as float32 tensors, L2-normalised (all recipes set
    ``normalize: True``). A row without embeddings gets both from CAM++ on its speech when
    ``campplus_onnx`` is given (online features; the whole utterance, not a random 10 s crop, so
    epochs agree); otherwise it is dropped and counted."""
    import torch

    session = None
    for sample in data:
        if sample.get("utt_embedding") is None or sample.get("spk_embedding") is None:
            if campplus_onnx is None:
                if stats is not None:
                    stats["no_embedding"] += 1
                continue
            if session is None:
                from cosyvoice.features.onnx import make_session

                session = make_session(campplus_onnx)
            from cosyvoice.features.frontend import campplus_input

            feats = campplus_input(sample["speech"], sample["sample_rate"])
            vector = session.run(None, {session.get_inputs()[0].name: feats})[0].reshape(-1)
            sample["utt_embedding"] = sample["spk_embedding"] = vector
            if stats is not None:
                stats["online_embedding"] += 1
        for name in ("utt_embedding", "spk_embedding"):
            vector = torch.as_tensor(np.asarray(sample[name]), dtype=torch.float32)
            sample[name] = torch.nn.functional.normalize(vector, dim=0) if normalize else vector
        yield sample


def compute_whisper_fbank(data: Iterable[dict], *, samples_per_token: int = 960) -> Iterator[dict]:
    """``whisper_feat`` (T_w, 128): whisper log-mel of the padded speech resampled to 16 kHz
    (4 frames per 25 Hz token)."""
    import whisper

    from cosyvoice.features.frontend import resampler

    for sample in data:
        speech = sample["speech"]
        if samples_per_token and speech.shape[1] % samples_per_token:
            raise ValueError(f"{sample.get('utt')}: speech not padded to {samples_per_token} samples; run compute_fbank first")
        speech_16k = resampler(sample["sample_rate"], 16000)(speech) if sample["sample_rate"] != 16000 else speech
        sample["whisper_feat"] = whisper.log_mel_spectrogram(speech_16k, n_mels=128).squeeze(0).transpose(0, 1)
        yield sample
