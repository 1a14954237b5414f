"""The feature stages as drop-ins for upstream ``tools/extract_embedding.py`` and
``tools/extract_speech_token.py``, plus the per-shard form the pipeline uses.

Every run also stores the utterances it could not extract, with their reasons: the drop-ins write
``failed_extract_embedding.tsv`` / ``failed_extract_speech_token.tsv`` into their output dir, the
per-shard form ``<shard>.failed.tsv`` beside the shard's parquet file (``cosyvoice.problems``).
Those files are written before the features, so visible features always have their failure list.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from cosyvoice import storage
from cosyvoice.corpus.checks import DEFAULT_MAX_FAILED_FRACTION, CheckOutcome, failure_checks
from cosyvoice.corpus.kaldi import read_table
from cosyvoice.corpus.shard_plan import loads_plan
from cosyvoice.features.extract import (
    STAGES,
    ExtractionReport,
    default_workers,
    run_extraction,
    speaker_means,
)
from cosyvoice.features.store import save_pt
from cosyvoice.problems import failures_name, failures_next_to, read_failures, write_failures


class ShardSource:
    """A manifest's ``wav.scp`` and shard plan, read once and then sliced per shard."""

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        self.wavs = read_table(data_dir, "wav.scp")
        self.plan_url = storage.join(data_dir, "shards.json")
        self._plan: dict[str, list[str]] | None = None

    @property
    def plan(self) -> dict[str, list[str]]:
        if self._plan is None:
            if not storage.exists(self.plan_url):
                raise FileNotFoundError(f"{self.plan_url} does not exist: shards need a manifest written by prepare-libritts")
            self._plan = loads_plan(storage.read_text(self.plan_url))
        return self._plan

    def items(self, shard: str | None) -> list[tuple[str, str]]:
        """``(utt, path)`` for the whole data dir, or for one shard of its ``shards.json``."""
        if shard is None:
            return sorted(self.wavs.items())
        if shard not in self.plan:
            raise ValueError(f"shard {shard!r} is not in {self.plan_url} "
                             f"(it has {len(self.plan)} shards, e.g. {next(iter(self.plan), '-')})")
        missing = [u for u in self.plan[shard] if u not in self.wavs]
        if missing:
            raise ValueError(f"{len(missing)} utterance(s) of shard {shard} are not in wav.scp, e.g. {missing[0]}")
        return [(u, self.wavs[u]) for u in self.plan[shard]]


def shard_items(data_dir: str, shard: str | None) -> list[tuple[str, str]]:
    return ShardSource(data_dir).items(shard)


def _output_dir(data_dir: str, shard: str | None) -> str:
    return data_dir if shard is None else storage.join(data_dir, "shards", shard)


def extract_embedding(data_dir: str, onnx_path: str, *, num_thread: int | None = None, shard: str | None = None,
                      progress: Callable[[Iterable], Iterable] | None = None) -> ExtractionReport:
    """CAM++ embeddings for ``wav.scp`` -> ``utt2embedding.pt`` and ``spk2embedding.pt``."""
    utt2spk = read_table(data_dir, "utt2spk")
    items = shard_items(data_dir, shard)
    missing = [utt for utt, _ in items if utt not in utt2spk]
    if missing:  # upstream fails with a KeyError after extracting everything; say it before starting
        raise ValueError(f"{len(missing)} utterance(s) of wav.scp have no speaker in utt2spk, e.g. {missing[0]}")
    report = run_extraction("embedding", items, onnx_path,
                            num_workers=num_thread or default_workers(), progress=progress)
    out = _output_dir(data_dir, shard)
    report.failures_url = write_failures(storage.join(out, failures_name(STAGES["embedding"])), report.failures).url
    save_pt(storage.join(out, "utt2embedding.pt"), report.results)
    save_pt(storage.join(out, "spk2embedding.pt"), speaker_means(report.results, utt2spk))
    return report


def extract_speech_token(data_dir: str, onnx_path: str, *, num_thread: int | None = None, device: str = "cpu",
                         long_audio: str = "skip", shard: str | None = None,
                         progress: Callable[[Iterable], Iterable] | None = None, batch_size: int = 1,
                         runtime: str = "onnxruntime", precision: str = "fp32",
                         agreement_sample: int = 64) -> ExtractionReport:
    """S3 speech tokens for ``wav.scp`` -> ``utt2speech_token.pt`` (``[]`` for skipped > 30 s audio).
    ``batch_size`` > 1 runs length-sorted padded batches (on onnxruntime this needs a batch-capable
    tokenizer; the torch runtime batches any tokenizer file)."""
    report = run_extraction("speech_token", shard_items(data_dir, shard), onnx_path,
                            num_workers=num_thread or default_workers(), device=device, long_audio=long_audio,
                            progress=progress, batch_size=batch_size, runtime=runtime, precision=precision,
                            agreement_sample=agreement_sample)
    out = _output_dir(data_dir, shard)
    report.failures_url = write_failures(storage.join(out, failures_name(STAGES["speech_token"])), report.failures).url
    save_pt(storage.join(out, "utt2speech_token.pt"), report.results)
    return report


# --- per-shard form used by the pipeline -------------------------------------------------------

TOKENIZER_RATES = {"v1": (50, 4096), "v2": (25, 6561), "v3": (25, 6561)}  # tokens/s, vocabulary


def extract_shard(kind: str, source: ShardSource, shard: str, model_path: str, out_url: str, *,
                  num_workers: int | None = None, device: str = "cpu", long_audio: str = "skip",
                  batch_size: int = 1, runtime: str = "onnxruntime", precision: str = "fp32") -> ExtractionReport:
    """Extract one shard of a manifest and store it as one parquet file (atomically), its failures
    in ``<shard>.failed.tsv`` beside it (written first)."""
    from cosyvoice.features.store import embedding_table, token_table, write_parquet

    report = run_extraction(kind, source.items(shard), model_path, num_workers=num_workers or default_workers(),
                            device=device, long_audio=long_audio, batch_size=batch_size, runtime=runtime,
                            precision=precision)
    table = (embedding_table(report.results, report.durations) if kind == "embedding"
             else token_table(report.results, report.durations, report.long_skipped, report.long_chunked))
    report.failures_url = write_failures(failures_next_to(out_url), report.failures).url
    write_parquet(out_url, table)
    return report


CheckResult = CheckOutcome


def _presence_checks(url: str, expected_utts: list[str], present: list[str],
                     max_failed_fraction: float) -> dict[str, CheckResult]:
    """``all_utterances_present`` (present + quarantined) and ``failure_budget``, from the stored files."""
    return failure_checks(expected_utts, present, read_failures(failures_next_to(url)) or [], max_failed_fraction)


def check_embedding_shard(url: str, expected_utts: list[str], *,
                          max_failed_fraction: float = DEFAULT_MAX_FAILED_FRACTION) -> dict[str, CheckResult]:
    import numpy as np

    from cosyvoice.features.store import read_parquet

    table = read_parquet(url)
    utts = table.column("utt").to_pylist()
    vectors = table.column("embedding").to_pylist()
    bad = [u for u, v in zip(utts, vectors) if len(v) != 192 or not np.isfinite(np.asarray(v, dtype=np.float32)).all()]
    return {
        "dim_192_finite": CheckResult(not bad, f"{len(bad)} vector(s) not 192 finite floats", bad[:10]),
        **_presence_checks(url, expected_utts, utts, max_failed_fraction),
    }


def check_token_shard(url: str, expected_utts: list[str], version: str, *,
                      max_failed_fraction: float = DEFAULT_MAX_FAILED_FRACTION) -> dict[str, CheckResult]:
    from cosyvoice.features.store import read_parquet

    rate, vocab = TOKENIZER_RATES[version]
    rows = read_parquet(url).to_pylist()
    out_of_vocab = [r["utt"] for r in rows if any(not 0 <= c < vocab for c in r["speech_token"])]
    windows = {r["utt"]: max(1, -(-round(r["duration"] * 16000) // (30 * 16000))) for r in rows}
    off_rate = [r["utt"] for r in rows if r["long_audio"] != "skipped"
                and abs(len(r["speech_token"]) - rate * r["duration"]) > 2 * windows[r["utt"]]]
    return {
        "codes_in_vocabulary": CheckResult(not out_of_vocab, f"{len(out_of_vocab)} utterance(s) with codes >= {vocab}",
                                           out_of_vocab[:10]),
        "token_rate": CheckResult(not off_rate, f"{len(off_rate)} utterance(s) not within 2 tokens of {rate}/s x duration",
                                  off_rate[:10]),
        **_presence_checks(url, expected_utts, [r["utt"] for r in rows], max_failed_fraction),
    }


def reduce_speaker_means(manifest_dir: str, shard_urls: list[str], out_url: str) -> dict[str, int]:
    """Per-subset speaker vectors from its embedding shards -> parquet; returns utterances per speaker."""
    from cosyvoice.features.store import read_parquet, speaker_table, write_parquet

    utt2spk = read_table(manifest_dir, "utt2spk")
    utt2embedding: dict[str, list[float]] = {}
    for url in shard_urls:
        table = read_parquet(url)
        utt2embedding.update(zip(table.column("utt").to_pylist(), table.column("embedding").to_pylist()))
    means = speaker_means(utt2embedding, utt2spk)
    counts = {spk: sum(1 for u in utt2embedding if utt2spk[u] == spk) for spk in means}
    write_parquet(out_url, speaker_table(means, counts))
    return counts


def export_upstream_features(dest_dir: str, embedding_shards: list[str], token_shards: list[str],
                             speaker_means_url: str | None) -> dict[str, int]:
    """Write ``utt2embedding.pt`` / ``spk2embedding.pt`` / ``utt2speech_token.pt`` from shard parquet files,
    so the upstream trainer and ``make_parquet_list.py`` can consume the pipeline's features, with the
    shards' failures gathered into ``failed_extract_embedding.tsv`` / ``failed_extract_speech_token.tsv``
    (what ``make-parquet`` reads to carry the reasons)."""
    from cosyvoice.features.store import read_parquet

    written: dict[str, int] = {}

    def gather(urls: list[str], column: str) -> dict:
        out: dict = {}
        for url in urls:
            table = read_parquet(url)
            out.update(zip(table.column("utt").to_pylist(), table.column(column).to_pylist()))
        return dict(sorted(out.items()))

    def failures(urls: list[str], kind: str) -> None:
        problems = [p for url in urls for p in read_failures(failures_next_to(url)) or []]
        write_failures(storage.join(dest_dir, failures_name(STAGES[kind])), problems)
        written[failures_name(STAGES[kind])] = len(problems)

    if embedding_shards:
        failures(embedding_shards, "embedding")
        utt2embedding = gather(embedding_shards, "embedding")
        save_pt(storage.join(dest_dir, "utt2embedding.pt"), utt2embedding)
        written["utt2embedding.pt"] = len(utt2embedding)
    if speaker_means_url:
        table = read_parquet(speaker_means_url)
        spk2embedding = dict(zip(table.column("spk").to_pylist(), table.column("embedding").to_pylist()))
        save_pt(storage.join(dest_dir, "spk2embedding.pt"), spk2embedding)
        written["spk2embedding.pt"] = len(spk2embedding)
    if token_shards:
        failures(token_shards, "speech_token")
        utt2token = gather(token_shards, "speech_token")
        save_pt(storage.join(dest_dir, "utt2speech_token.pt"), utt2token)
        written["utt2speech_token.pt"] = len(utt2token)
    return written
