"""Feature files: upstream ``.pt`` dicts and our per-shard parquet files.

``utt2embedding.pt`` / ``spk2embedding.pt`` / ``utt2speech_token.pt`` are ``torch.save`` of plain
``dict[str, list]`` exactly as the upstream tools write them (loadable with
``torch.load(..., weights_only=True)``). The pipeline's own per-shard files are parquet
(``utt``, the vector or tokens, ``duration``), written atomically.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from cosyvoice import storage
from cosyvoice.features.pt import load_pt  # noqa: F401  (re-exported: the .pt reader lives with no heavy imports)

EMBEDDING_SCHEMA = pa.schema([("utt", pa.string()), ("embedding", pa.list_(pa.float32())), ("duration", pa.float64())])
TOKEN_SCHEMA = pa.schema([("utt", pa.string()), ("speech_token", pa.list_(pa.int32())), ("duration", pa.float64()),
                          ("long_audio", pa.string())])
SPEAKER_SCHEMA = pa.schema([("spk", pa.string()), ("embedding", pa.list_(pa.float32())), ("utterances", pa.int64())])


def save_pt(url: str, table: dict) -> storage.WriteResult:
    import torch

    buffer = io.BytesIO()
    torch.save(dict(table), buffer)
    return storage.write_bytes(url, buffer.getvalue())


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def write_parquet(url: str, table: pa.Table) -> storage.WriteResult:
    return storage.write_bytes(url, _parquet_bytes(table))


def read_parquet(url: str) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(url)))


def embedding_table(results: dict[str, list[float]], durations: dict[str, float]) -> pa.Table:
    utts = sorted(results)
    return pa.table({"utt": utts, "embedding": [results[u] for u in utts],
                     "duration": [durations[u] for u in utts]}, schema=EMBEDDING_SCHEMA)


def token_table(results: dict[str, list[int]], durations: dict[str, float],
                skipped: list[str], chunked: list[str]) -> pa.Table:
    utts = sorted(results)
    status = {**dict.fromkeys(skipped, "skipped"), **dict.fromkeys(chunked, "chunked")}
    return pa.table({"utt": utts, "speech_token": [results[u] for u in utts],
                     "duration": [durations[u] for u in utts], "long_audio": [status.get(u) for u in utts]},
                    schema=TOKEN_SCHEMA)


def speaker_table(means: dict[str, list[float]], counts: dict[str, int]) -> pa.Table:
    spks = sorted(means)
    return pa.table({"spk": spks, "embedding": [means[s] for s in spks], "utterances": [counts[s] for s in spks]},
                    schema=SPEAKER_SCHEMA)
