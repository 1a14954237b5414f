"""The feature stages as drop-ins for upstream ``tools/extract_embedding.py`` and
``tools/extract_speech_token.py``, plus the per-shard form the pipeline uses.

Every run also stores the utterances it could not extract, with their reasons: the drop-ins write
``failed_extract_embedding.tsv`` / ``failed_extract_speech_token.tsv`` into their output dir, the
per-shard form ``<shard>.failed.tsv`` beside the shard's parquet file (``cosyvoice.problems``).
Those files are written before the features, so visible features always have their failure list.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cosyvoice import storage
from cosyvoice.corpus.checks import DEFAULT_MAX_FAILED_FRACTION, CheckOutcome, failure_checks
from cosyvoice.corpus.kaldi import read_table
from cosyvoice.corpus.shard_plan import PLAN_FILE, read_plan
from cosyvoice.features.extract import FAILURE_STAGE, ExtractionReport, run_extraction, speaker_means
from cosyvoice.features.feature_files import (
    embedding_table,
    read_parquet,
    save_pt,
    speaker_table,
    token_table,
    write_parquet,
)
from cosyvoice.features.options import EmbeddingOptions, SpeechTokenOptions, with_overrides
from cosyvoice.problems import failures_name, failures_next_to, read_failures, write_failures


class ShardSource:
    """A manifest's ``wav.scp`` and shard plan, read once and then sliced per shard."""

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        self.wavs = read_table(data_dir, "wav.scp")
        self.plan_url = storage.join(data_dir, PLAN_FILE)
        self._plan: dict[str, list[str]] | None = None

    @property
    def plan(self) -> dict[str, list[str]]:
        if self._plan is None:
            self._plan = read_plan(self.plan_url)
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


def _output_dir(data_dir: str, shard: str | None) -> str:
    return data_dir if shard is None else storage.join(data_dir, "shards", shard)


def extract_embedding(data_dir: str | ShardSource, onnx_path: str, options: EmbeddingOptions | None = None, *,
                      shard: str | None = None, parquet: str | None = None,
                      progress: Callable[[Iterable], Iterable] | None = None, **overrides) -> ExtractionReport:
    """CAM++ embeddings of ``wav.scp`` (or of one ``shard`` of its ``shards.json``).

    Written as upstream's ``utt2embedding.pt`` / ``spk2embedding.pt`` into the data dir (a shard:
    ``<dir>/shards/<shard>/``), or, given ``parquet``, as that one table (utt, embedding, duration),
    the pipeline's per-shard form. ``data_dir`` may be a :class:`ShardSource` already read, so a run
    over many shards of one manifest reads ``wav.scp`` once. Failures: ``failed_extract_embedding.tsv``
    beside the ``.pt`` files, ``<name>.failed.tsv`` beside the parquet table, written first.
    ``overrides`` are fields of :class:`EmbeddingOptions` (``num_workers=1``), a shorthand for Python callers."""
    options = with_overrides(options or EmbeddingOptions(), overrides)
    source = data_dir if isinstance(data_dir, ShardSource) else ShardSource(data_dir)
    items = source.items(shard)
    utt2spk = None
    if parquet is None:  # speaker vectors need every utterance's speaker: check before any work
        utt2spk = read_table(source.data_dir, "utt2spk")
        missing = [utt for utt, _ in items if utt not in utt2spk]
        if missing:  # upstream fails with a KeyError after extracting everything
            raise ValueError(f"{len(missing)} utterance(s) of wav.scp have no speaker in utt2spk, e.g. {missing[0]}")
    report = run_extraction(items, onnx_path, options, progress=progress)
    if parquet is not None:
        return _store_table(report, parquet, embedding_table(report.results, report.durations))
    out = _output_dir(source.data_dir, shard)
    report.failures_url = write_failures(storage.join(out, failures_name(FAILURE_STAGE["embedding"])),
                                         report.failures).url
    save_pt(storage.join(out, "utt2embedding.pt"), report.results)
    save_pt(storage.join(out, "spk2embedding.pt"), speaker_means(report.results, utt2spk))
    return report


def extract_speech_token(data_dir: str | ShardSource, onnx_path: str, options: SpeechTokenOptions | None = None, *,
                         shard: str | None = None, parquet: str | None = None,
                         progress: Callable[[Iterable], Iterable] | None = None, **overrides) -> ExtractionReport:
    """S3 speech tokens of ``wav.scp`` (or of one ``shard``): upstream's ``utt2speech_token.pt``
    (``[]`` for skipped > 30 s audio) in the data dir (a shard: ``<dir>/shards/<shard>/``), or, given
    ``parquet``, that one table (utt, speech_token, duration, long_audio). Failures are stored as for
    :func:`extract_embedding`; ``overrides`` are fields of :class:`SpeechTokenOptions`."""
    options = with_overrides(options or SpeechTokenOptions(), overrides)
    source = data_dir if isinstance(data_dir, ShardSource) else ShardSource(data_dir)
    report = run_extraction(source.items(shard), onnx_path, options, progress=progress)
    if parquet is not None:
        return _store_table(report, parquet, token_table(report.results, report.durations, report.long_skipped,
                                                         report.long_chunked))
    out = _output_dir(source.data_dir, shard)
    report.failures_url = write_failures(storage.join(out, failures_name(FAILURE_STAGE["speech_token"])),
                                         report.failures).url
    save_pt(storage.join(out, "utt2speech_token.pt"), report.results)
    return report


def _store_table(report: ExtractionReport, url: str, table) -> ExtractionReport:
    """The per-shard form: failures in ``<name>.failed.tsv`` first, then the table, atomically."""
    report.failures_url = write_failures(failures_next_to(url), report.failures).url
    write_parquet(url, table)
    return report


TOKENIZER_RATES = {"v1": (50, 4096), "v2": (25, 6561), "v3": (25, 6561)}  # tokens/s, vocabulary


def _presence_checks(url: str, expected_utts: list[str], present: list[str],
                     max_failed_fraction: float) -> dict[str, CheckOutcome]:
    """``all_utterances_present`` (present + quarantined) and ``failure_budget``, from the stored files."""
    return failure_checks(expected_utts, present, read_failures(failures_next_to(url)) or [], max_failed_fraction)


def check_embedding_shard(url: str, expected_utts: list[str], *,
                          max_failed_fraction: float = DEFAULT_MAX_FAILED_FRACTION) -> dict[str, CheckOutcome]:
    import numpy as np

    table = read_parquet(url)
    utts = table.column("utt").to_pylist()
    vectors = table.column("embedding").to_pylist()
    bad = [u for u, v in zip(utts, vectors) if len(v) != 192 or not np.isfinite(np.asarray(v, dtype=np.float32)).all()]
    return {
        "dim_192_finite": CheckOutcome(not bad, f"{len(bad)} vector(s) not 192 finite floats", bad[:10]),
        **_presence_checks(url, expected_utts, utts, max_failed_fraction),
    }


def check_token_shard(url: str, expected_utts: list[str], version: str, *,
                      max_failed_fraction: float = DEFAULT_MAX_FAILED_FRACTION) -> dict[str, CheckOutcome]:
    rate, vocab = TOKENIZER_RATES[version]
    rows = read_parquet(url).to_pylist()
    out_of_vocab = [r["utt"] for r in rows if any(not 0 <= c < vocab for c in r["speech_token"])]
    windows = {r["utt"]: max(1, -(-round(r["duration"] * 16000) // (30 * 16000))) for r in rows}
    off_rate = [r["utt"] for r in rows if r["long_audio"] != "skipped"
                and abs(len(r["speech_token"]) - rate * r["duration"]) > 2 * windows[r["utt"]]]
    return {
        "codes_in_vocabulary": CheckOutcome(not out_of_vocab, f"{len(out_of_vocab)} utterance(s) with codes >= {vocab}",
                                           out_of_vocab[:10]),
        "token_rate": CheckOutcome(not off_rate, f"{len(off_rate)} utterance(s) not within 2 tokens of {rate}/s x duration",
                                  off_rate[:10]),
        **_presence_checks(url, expected_utts, [r["utt"] for r in rows], max_failed_fraction),
    }


@dataclass
class SpeakerMeansReport:
    url: str
    utterances: dict[str, int]  # speaker -> utterances averaged
    without_vector: list[str]  # speakers of utt2spk none of whose utterances has an embedding

    def summary(self) -> str:
        missing = f"; {len(self.without_vector)} speaker(s) without a vector" if self.without_vector else ""
        return f"{len(self.utterances)} speaker vector(s) from {sum(self.utterances.values())} utterances -> {self.url}{missing}"


def _embedding_shards(layout, subset: str) -> list[str]:
    """Every planned embedding shard of ``subset``; all must exist (a mean over part of the shards
    would be silently wrong)."""
    shards = [layout.shard_file("speaker_embeddings", key) for key in layout.shard_plan(subset)]
    missing = [url for url in shards if not storage.exists(url)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} embedding shard(s) of {subset} are not materialized yet, "
                                f"e.g. {missing[0]}")
    return shards


def reduce_speaker_means(layout, subset: str) -> SpeakerMeansReport:
    """The speaker vectors of one subset of a pipeline data root (a :class:`cosyvoice.layout.DataLayout`):
    the plain mean of each speaker's utterance embeddings, from every embedding shard of the subset,
    written to ``layout.speaker_means(subset)`` (spk, embedding, utterances)."""
    manifest_dir = layout.manifest_dir(subset)
    utt2spk = read_table(manifest_dir, "utt2spk")
    utt2embedding: dict[str, list[float]] = {}
    for url in _embedding_shards(layout, subset):
        table = read_parquet(url)
        utt2embedding.update(zip(table.column("utt").to_pylist(), table.column("embedding").to_pylist()))
    means = speaker_means(utt2embedding, utt2spk)
    per_speaker = Counter(utt2spk[u] for u in utt2embedding)  # one pass, not one per speaker
    counts = {spk: per_speaker[spk] for spk in means}
    out = layout.speaker_means(subset)
    write_parquet(out, speaker_table(means, counts))
    return SpeakerMeansReport(out, counts, sorted(set(utt2spk.values()) - set(counts)))


def export_upstream_features(layout, subset: str) -> dict[str, int]:
    """Write ``utt2embedding.pt`` / ``spk2embedding.pt`` / ``utt2speech_token.pt`` into the subset's
    manifest dir of a pipeline data root (a :class:`cosyvoice.layout.DataLayout`) from its shard
    parquet files and speaker means, so the upstream trainer and ``make_parquet_list.py`` can consume
    the pipeline's features, with the shards' failures gathered into ``failed_extract_embedding.tsv``
    / ``failed_extract_speech_token.tsv`` (what ``make-parquet`` reads to carry the reasons).
    Returns the entries written per file."""
    plan = layout.shard_plan(subset)
    dest_dir = layout.manifest_dir(subset)
    embedding_shards = [layout.shard_file("speaker_embeddings", key) for key in plan]
    token_shards = [layout.shard_file("speech_tokens", key) for key in plan]
    written: dict[str, int] = {}

    def gather(urls: list[str], column: str) -> dict:
        out: dict = {}
        for url in urls:
            table = read_parquet(url)
            out.update(zip(table.column("utt").to_pylist(), table.column(column).to_pylist()))
        return dict(sorted(out.items()))

    def failures(urls: list[str], kind: str) -> None:
        problems = [p for url in urls for p in read_failures(failures_next_to(url)) or []]
        write_failures(storage.join(dest_dir, failures_name(FAILURE_STAGE[kind])), problems)
        written[failures_name(FAILURE_STAGE[kind])] = len(problems)

    if embedding_shards:
        failures(embedding_shards, "embedding")
        utt2embedding = gather(embedding_shards, "embedding")
        save_pt(storage.join(dest_dir, "utt2embedding.pt"), utt2embedding)
        written["utt2embedding.pt"] = len(utt2embedding)
        table = read_parquet(layout.speaker_means(subset))
        spk2embedding = dict(zip(table.column("spk").to_pylist(), table.column("embedding").to_pylist()))
        save_pt(storage.join(dest_dir, "spk2embedding.pt"), spk2embedding)
        written["spk2embedding.pt"] = len(spk2embedding)
    if token_shards:
        failures(token_shards, "speech_token")
        utt2token = gather(token_shards, "speech_token")
        save_pt(storage.join(dest_dir, "utt2speech_token.pt"), utt2token)
        written["utt2speech_token.pt"] = len(utt2token)
    return written
