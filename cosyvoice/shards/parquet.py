"""Training shards: ``parquet_{i:09d}.tar`` files (parquet despite the suffix) as upstream writes them.

Columns, in order, with the Arrow types upstream's pandas writer produces: ``utt`` string,
``audio_data`` binary (the whole encoded file), ``wav`` string, ``text`` string, ``spk`` string,
then when available ``utt_embedding`` / ``spk_embedding`` list<double>, ``speech_token``
list<int64>, ``instruct`` string and (DPO) ``reject_speech_token`` list<int64> — ``[]`` for a
missing reject set, never null (null crashes upstream's filter, defect D7).

Unlike upstream (which holds every feature dict in every process and a whole shard of audio in
memory), a shard is streamed to disk in small row groups, so memory is bounded by a row group.
Dictionary encoding is off for the columns whose values are unique per row.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from cosyvoice import storage
from cosyvoice.problems import UtteranceProblem

ROWS_PER_GROUP = 64
_UNIQUE_COLUMNS = ["utt", "audio_data", "wav", "text"]


@dataclass(frozen=True)
class Columns:
    """Which optional columns a shard set has (all shards of one data dir share it)."""

    embeddings: bool = False
    speech_token: bool = False
    instruct: bool = False
    reject_speech_token: bool = False

    def schema(self) -> pa.Schema:
        fields = [("utt", pa.string()), ("audio_data", pa.binary()), ("wav", pa.string()), ("text", pa.string()),
                  ("spk", pa.string())]
        if self.embeddings:
            fields += [("utt_embedding", pa.list_(pa.float64())), ("spk_embedding", pa.list_(pa.float64()))]
        if self.speech_token:
            fields.append(("speech_token", pa.list_(pa.int64())))
        if self.instruct:
            fields.append(("instruct", pa.string()))
        if self.reject_speech_token:
            fields.append(("reject_speech_token", pa.list_(pa.int64())))
        return pa.schema(fields)


@dataclass
class ShardRow:
    utt: str
    wav: str
    text: str
    spk: str
    utt_embedding: list[float] | None = None
    spk_embedding: list[float] | None = None
    speech_token: list[int] | None = None
    instruct: str | None = None
    reject_speech_token: list[int] | None = None


@dataclass
class ShardReport:
    url: str
    rows: int
    bytes: int
    audio_bytes: int
    audio_seconds: float = 0.0
    skipped: list[UtteranceProblem] = field(default_factory=list)  # rows whose audio could not be read


def _batch(rows: list[ShardRow], audio: list[bytes], columns: Columns) -> pa.RecordBatch:
    data = {"utt": [r.utt for r in rows], "audio_data": audio, "wav": [r.wav for r in rows],
            "text": [r.text for r in rows], "spk": [r.spk for r in rows]}
    if columns.embeddings:
        data["utt_embedding"] = [r.utt_embedding for r in rows]
        data["spk_embedding"] = [r.spk_embedding for r in rows]
    if columns.speech_token:
        data["speech_token"] = [r.speech_token for r in rows]
    if columns.instruct:
        data["instruct"] = [r.instruct for r in rows]
    if columns.reject_speech_token:
        data["reject_speech_token"] = [[] if r.reject_speech_token is None else r.reject_speech_token for r in rows]
    return pa.RecordBatch.from_pydict(data, schema=columns.schema())


def _chunks(rows: Iterable[ShardRow], size: int) -> Iterator[list[ShardRow]]:
    chunk: list[ShardRow] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_shard(url: str, rows: Iterable[ShardRow], columns: Columns, *, rows_per_group: int = ROWS_PER_GROUP) -> ShardReport:
    """Stream ``rows`` (audio read as it goes) into one parquet file, stored atomically at ``url``.

    A row whose audio file is missing or may not be read is skipped and reported; a transient read
    error that outlasted storage's retries fails the shard (nothing is dropped for a throttle); an
    empty shard is still written (with the schema) so that every planned shard exists.
    """
    staged = storage.staging_path(url)
    skipped: list[UtteranceProblem] = []
    count = audio_bytes = 0
    seconds = 0.0
    try:
        with pq.ParquetWriter(staged, columns.schema(), compression="snappy",
                              use_dictionary=[c for c in columns.schema().names if c not in _UNIQUE_COLUMNS]) as writer:
            for chunk in _chunks(rows, rows_per_group):
                kept, audio = [], []
                for row in chunk:
                    try:
                        audio.append(storage.read_bytes(row.wav))
                        kept.append(row)
                    except OSError as exc:
                        if storage.is_transient(exc):  # retried by storage already: fail the shard, do not drop
                            raise
                        skipped.append(UtteranceProblem.from_exception(row.utt, row.wav, "unreadable_audio", exc)
                                       .at("make_parquet"))
                if kept:
                    writer.write_batch(_batch(kept, audio, columns))
                    count += len(kept)
                    audio_bytes += sum(map(len, audio))
                    seconds += sum(_duration(blob) for blob in audio)
        size = os.path.getsize(staged)
        storage.publish(staged, url)
    finally:
        if os.path.exists(staged):
            os.unlink(staged)
    return ShardReport(url=url, rows=count, bytes=size, audio_bytes=audio_bytes, audio_seconds=seconds, skipped=skipped)


def _duration(blob: bytes) -> float:
    """Seconds of audio in an encoded file, from its header (0 if it cannot be parsed)."""
    from cosyvoice.corpus.audio import AudioProblem, probe_audio

    try:
        return probe_audio(lambda n: blob if n is None else blob[:n], len(blob)).duration
    except AudioProblem:
        return 0.0
