"""Drop-in for upstream ``tools/make_parquet_list.py``: a data dir (+ optional ``.pt`` features) ->
parquet shards, ``utt2parquet_*.json``, ``spk2parquet_*.json``, ``data.list``, ``utt2data.list`` and
``spk2data.list``.

Fixed upstream defects: ``spk2parquet_*.json`` is really written (D1); a failing shard raises
instead of being swallowed by ``apply_async``; DPO reject tokens missing from the reject set are
``[]``, not null (D7); an utterance whose features are missing is reported, not a ``KeyError``.

Every utterance of ``wav.scp`` is accounted for in files: it is a row of a shard, or a line of
``failed_make_parquet.tsv`` in the output dir (``cosyvoice.problems``). An utterance that a feature
stage already failed (listed in the source dir's ``failed_extract_embedding.tsv`` /
``failed_extract_speech_token.tsv``) keeps that stage and reason instead of becoming a second,
vaguer ``missing_utt_embedding``; so ``rows + failures == utterances`` holds from the files alone.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from cosyvoice import storage
from cosyvoice.corpus.checks import DEFAULT_MAX_FAILED_FRACTION, CheckOutcome, failure_checks
from cosyvoice.corpus.kaldi import read_table
from cosyvoice.corpus.shard_plan import PLAN_FILE, ShardKey, read_plan
from cosyvoice.problems import (
    UtteranceProblem,
    failures_name,
    failures_next_to,
    read_failures,
    write_failures,
)
from cosyvoice.shards.parquet import Columns, ShardReport, ShardRow, write_shard

STAGE = "make_parquet"
#: the feature stage that produces what a ``missing_*`` reason lacks
_PRODUCER = {"missing_utt_embedding": "extract_embedding", "missing_spk_embedding": "extract_embedding",
             "missing_speech_token": "extract_speech_token"}
_DETAIL = {"missing_text": "no line in text", "missing_speaker": "no line in utt2spk",
           "missing_utt_embedding": "no vector in utt2embedding", "missing_spk_embedding": "no speaker vector",
           "missing_speech_token": "no tokens in utt2speech_token", "missing_instruct": "no line in instruct"}


def parquet_name(index: int) -> str:
    return f"parquet_{index:09d}.tar"


@dataclass
class Features:
    """The optional per-utterance inputs of a shard set."""

    utt2embedding: dict[str, list[float]] | None = None
    spk2embedding: dict[str, list[float]] | None = None
    utt2speech_token: dict[str, list[int]] | None = None
    utt2instruct: dict[str, str] | None = None
    utt2reject: dict[str, list[int]] | None = None
    #: failures the feature stages reported, ``{stage: {utt: problem}}``
    upstream_failures: dict[str, dict[str, UtteranceProblem]] = field(default_factory=dict)

    def why_missing(self, utt: str, path: str, reason: str) -> UtteranceProblem:
        """The upstream failure that explains a missing feature, else ``reason`` as this stage's own."""
        carried = self.upstream_failures.get(_PRODUCER.get(reason, ""), {}).get(utt)
        if carried is not None:
            return carried.at(_PRODUCER[reason])
        return UtteranceProblem(utt, path, reason, _DETAIL[reason], stage=STAGE)

    def columns(self) -> Columns:
        if (self.utt2embedding is None) != (self.spk2embedding is None):
            raise ValueError("utt2embedding.pt and spk2embedding.pt must be supplied together "
                             "(the training data pipeline needs both columns or neither)")
        return Columns(embeddings=self.utt2embedding is not None, speech_token=self.utt2speech_token is not None,
                       instruct=self.utt2instruct is not None, reject_speech_token=self.utt2reject is not None)


def build_rows(utts: list[str], wav: dict[str, str], text: dict[str, str], utt2spk: dict[str, str],
               features: Features) -> tuple[list[ShardRow], list[UtteranceProblem]]:
    """Rows for ``utts``; utterances lacking a required input are returned as problems (carrying the
    feature stage's own failure when it reported one)."""
    rows, skipped = [], []
    for utt in utts:
        path, spk = wav.get(utt, ""), utt2spk.get(utt)
        reason = None
        if utt not in text:
            reason = "missing_text"
        elif spk is None:
            reason = "missing_speaker"
        elif features.utt2embedding is not None and utt not in features.utt2embedding:
            reason = "missing_utt_embedding"
        elif features.spk2embedding is not None and spk not in features.spk2embedding:
            reason = "missing_spk_embedding"
        elif features.utt2speech_token is not None and utt not in features.utt2speech_token:
            reason = "missing_speech_token"
        elif features.utt2instruct is not None and utt not in features.utt2instruct:
            reason = "missing_instruct"
        if reason:
            skipped.append(features.why_missing(utt, path, reason))
            continue
        rows.append(ShardRow(
            utt=utt, wav=path, text=text[utt], spk=spk,
            utt_embedding=features.utt2embedding[utt] if features.utt2embedding is not None else None,
            spk_embedding=features.spk2embedding[spk] if features.spk2embedding is not None else None,
            speech_token=features.utt2speech_token[utt] if features.utt2speech_token is not None else None,
            instruct=features.utt2instruct[utt] if features.utt2instruct is not None else None,
            reject_speech_token=features.utt2reject.get(utt, []) if features.utt2reject is not None else None,
        ))
    return rows, skipped


def write_shard_set(des_dir: str, index: int, rows: list[ShardRow], columns: Columns) -> ShardReport:
    """One shard: the parquet file plus its ``utt2parquet`` / ``spk2parquet`` JSON files."""
    parquet = storage.join(des_dir, parquet_name(index))
    report = write_shard(parquet, rows, columns)
    unreadable = {p.utt for p in report.skipped}
    written = [r for r in rows if r.utt not in unreadable]
    storage.write_text(storage.join(des_dir, f"utt2parquet_{index:09d}.json"),
                       json.dumps({r.utt: parquet for r in written}, ensure_ascii=False, indent=2))
    storage.write_text(storage.join(des_dir, f"spk2parquet_{index:09d}.json"),
                       json.dumps({s: parquet for s in sorted({r.spk for r in written})}, ensure_ascii=False, indent=2))
    return report


def _job(args: tuple, env: dict | None = None) -> ShardReport:
    if env:
        storage.use_environment(env)
    return write_shard_set(*args)


def _bounded_pool_map(jobs, workers: int) -> list[ShardReport]:
    """``pool.map`` in order, with at most ``2 * workers`` shards submitted at a time; re-raises the
    first worker error (upstream's ``apply_async`` silently dropped them)."""
    from collections import deque

    context = multiprocessing.get_context("forkserver")
    results: list[ShardReport] = []
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.submit(_job, job, storage.environment()))
            if len(pending) >= 2 * workers:
                results.append(pending.popleft().result())
        while pending:
            results.append(pending.popleft().result())
    return results


@dataclass
class MakeParquetReport:
    des_dir: str
    shards: list[ShardReport]
    skipped: list[UtteranceProblem] = field(default_factory=list)
    seconds: float = 0.0
    failures_url: str = ""
    planned: list[str] = field(default_factory=list)  # one shard: the utterances its plan lists

    @property
    def audio_seconds(self) -> float:
        return sum(s.audio_seconds for s in self.shards)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def failed_upstream(self) -> int:
        return sum(p.stage != STAGE for p in self.skipped)

    def summary(self) -> str:
        skipped = f"{len(self.skipped)} skipped"
        if self.skipped:
            skipped += f" ({self.failed_upstream} failed in a feature stage), listed in {self.failures_url}"
        return (f"{len(self.shards)} shard(s), {self.rows} rows, {self.bytes / 1e6:.1f} MB -> {self.des_dir}"
                f"; {skipped}; in {self.seconds:.1f} s")


def load_features(src_dir: str, dpo: bool) -> Features:
    from cosyvoice.features.pt import load_pt_compact

    def optional_pt(name: str, folder: str = src_dir, dtype: str = "float64"):
        url = storage.join(folder, name)
        return load_pt_compact(url, dtype) if storage.exists(url) else None

    reject = None
    if dpo:
        reject = optional_pt("utt2speech_token.pt", src_dir.rstrip("/") + "_reject", "int64") or {}
    upstream = {stage: read_failures(storage.join(src_dir, failures_name(stage)))
                for stage in ("extract_embedding", "extract_speech_token")}
    return Features(
        utt2embedding=optional_pt("utt2embedding.pt"), spk2embedding=optional_pt("spk2embedding.pt"),
        utt2speech_token=optional_pt("utt2speech_token.pt", dtype="int64"),
        utt2instruct=read_table(src_dir, "instruct", joined=True, required=False),
        utt2reject=reject,
        upstream_failures={stage: {p.utt: p for p in problems} for stage, problems in upstream.items() if problems},
    )


def make_parquet(src_dir: str, des_dir: str, *, num_utts_per_parquet: int = 1000, num_processes: int = 1,
                 dpo: bool = False, shard: str | None = None, features: Features | None = None,
                 kaldi: dict[str, dict[str, str]] | None = None,
                 plan: dict[str, list[str]] | None = None) -> MakeParquetReport:
    """Write the shard set of one data dir, or only one planned ``shard`` of its ``shards.json``.

    Whole dir (upstream ``make_parquet_list.py``): shards of ``num_utts_per_parquet`` in ``wav.scp``
    order, written in parallel (any failure raises), plus ``data.list`` / ``utt2data.list`` /
    ``spk2data.list``; utterances left out go to ``<des_dir>/failed_make_parquet.tsv`` (replaced on
    every run). One shard (the pipeline's partition): ``parquet_{index:09d}.tar`` + its JSON files
    for exactly the planned utterances, the ones left out in ``parquet_{index:09d}.failed.tsv``; the
    lists are then written by the training-lists stage.

    ``features`` defaults to the ``.pt`` files of ``src_dir`` (``dpo``: the reject tokens of
    ``<src_dir>_reject``); the pipeline passes one shard's features (:func:`shard_features`).
    ``kaldi`` and ``plan`` may carry the data dir's tables and shard plan already read
    (:func:`read_kaldi_tables`, :func:`read_plan`), so a run over several shards reads them once."""
    if num_utts_per_parquet < 1:
        raise ValueError(f"num_utts_per_parquet must be >= 1, got {num_utts_per_parquet}")
    started = time.perf_counter()
    kaldi = kaldi or read_kaldi_tables(src_dir)
    features = features if features is not None else load_features(src_dir, dpo)
    if shard is not None:
        return _make_one_shard(src_dir, des_dir, shard, features, kaldi, plan, started)
    wav, text, utt2spk = kaldi["wav"], kaldi["text"], kaldi["utt2spk"]
    columns = features.columns()
    utts = list(wav)
    starts = range(0, len(utts), num_utts_per_parquet)
    skipped: list[UtteranceProblem] = []

    def jobs():  # rows are built per shard as the pool asks for them: memory ~ shards in flight
        for index, start in enumerate(starts):
            rows, missing = build_rows(utts[start:start + num_utts_per_parquet], wav, text, utt2spk, features)
            skipped.extend(missing)
            yield des_dir, index, rows, columns

    storage.makedirs(des_dir)
    workers = max(1, min(num_processes, len(starts)))
    if workers > 1:
        reports = _bounded_pool_map(jobs(), workers)
    else:
        reports = [_job(job) for job in jobs()]
    for report in reports:
        skipped += report.skipped
    failures_url = storage.join(des_dir, failures_name(STAGE))
    write_failures(failures_url, skipped)
    jobs_count = len(starts)
    parquet_files = [storage.join(des_dir, parquet_name(i)) for i in range(jobs_count)]
    storage.write_text(storage.join(des_dir, "data.list"), "".join(f"{p}\n" for p in parquet_files))
    storage.write_text(storage.join(des_dir, "utt2data.list"),
                       "".join(f"{storage.join(des_dir, f'utt2parquet_{i:09d}.json')}\n" for i in range(jobs_count)))
    storage.write_text(storage.join(des_dir, "spk2data.list"),
                       "".join(f"{storage.join(des_dir, f'spk2parquet_{i:09d}.json')}\n" for i in range(jobs_count)))
    return MakeParquetReport(des_dir=des_dir, shards=reports, skipped=sorted(skipped, key=lambda p: p.utt),
                             seconds=time.perf_counter() - started, failures_url=failures_url)


def _make_one_shard(src_dir: str, des_dir: str, shard: str, features: Features, kaldi: dict[str, dict[str, str]],
                    plan: dict[str, list[str]] | None, started: float) -> MakeParquetReport:
    """The planned utterances of ``shard`` -> its parquet file and ``.failed.tsv`` (every planned
    utterance that is not a row, with the feature stage's reason when that stage failed it)."""
    plan_url = storage.join(src_dir, PLAN_FILE)
    plan = plan if plan is not None else read_plan(plan_url)
    if shard not in plan:
        raise ValueError(f"shard {shard!r} is not in {plan_url} (it has {len(plan)} shards, e.g. {next(iter(plan), '-')})")
    rows, missing = build_rows(plan[shard], kaldi["wav"], kaldi["text"], kaldi["utt2spk"], features)
    written = write_shard_set(des_dir, ShardKey.parse(shard).index, rows, features.columns())
    skipped = sorted(missing + written.skipped, key=lambda p: p.utt)
    failures_url = write_failures(failures_next_to(written.url), skipped).url
    return MakeParquetReport(des_dir=des_dir, shards=[written], skipped=skipped,
                             seconds=time.perf_counter() - started, failures_url=failures_url, planned=plan[shard])


# --- per-shard form used by the pipeline -------------------------------------------------------

def shard_features(embedding_url: str | None, speaker_means_url: str | None, token_url: str | None,
                   utt2instruct: dict[str, str] | None) -> Features:
    """Features of one shard from the pipeline's per-shard parquet files (memory ~ one shard), with the
    failures the feature stages listed beside them."""
    import numpy as np

    from cosyvoice.features.feature_files import read_parquet

    def column_map(url: str | None, key: str, column: str, dtype: str) -> dict | None:
        if url is None:
            return None
        table = read_parquet(url)
        return {k: np.asarray(v, dtype=dtype) for k, v in zip(table.column(key).to_pylist(), table.column(column).to_pylist())}

    return Features(
        utt2embedding=column_map(embedding_url, "utt", "embedding", "float64"),
        spk2embedding=column_map(speaker_means_url, "spk", "embedding", "float64"),
        utt2speech_token=column_map(token_url, "utt", "speech_token", "int64"),
        utt2instruct=utt2instruct,
        upstream_failures={stage: {p.utt: p for p in read_failures(failures_next_to(url)) or []}
                           for stage, url in (("extract_embedding", embedding_url), ("extract_speech_token", token_url))
                           if url is not None},
    )


def read_kaldi_tables(data_dir: str) -> dict[str, dict[str, str]]:
    """wav / text / utt2spk (+ instruct) of a data dir, values as upstream's readers see them."""
    tables = {
        "wav": {k: v.split()[0] for k, v in read_table(data_dir, "wav.scp").items() if v},
        "text": read_table(data_dir, "text", joined=True),
        "utt2spk": {k: v.split()[0] for k, v in read_table(data_dir, "utt2spk").items() if v},
    }
    instruct = read_table(data_dir, "instruct", joined=True, required=False)
    if instruct is not None:
        tables["instruct"] = instruct
    return tables


def _schema_matches(actual, columns: Columns) -> tuple[bool, str]:
    expected = columns.schema()
    same = actual.names == expected.names and all(
        str(a.type).replace("element", "item") == str(e.type).replace("element", "item")
        for a, e in zip(actual, expected))
    return same, f"columns {actual.names} types {[str(t) for t in actual.types]}"


def check_pipeline_shard(url: str, columns: Columns, planned: list[str], *,
                         max_failed_fraction: float = DEFAULT_MAX_FAILED_FRACTION) -> dict[str, CheckOutcome]:
    """The stored shard and its ``.failed.tsv``: ``row_count`` (every planned utterance is a row or
    listed with a reason), ``failure_budget`` and ``schema_matches_contract``."""
    import pyarrow.parquet as pq

    def footer_and_utts(url: str) -> tuple[tuple[bool, str], list[str]]:
        # the footer and the utt column only: the audio column is never downloaded
        with storage.open_read(url, retry=False) as handle, pq.ParquetFile(handle) as f:
            return _schema_matches(f.schema_arrow, columns), f.read(columns=["utt"]).column("utt").to_pylist()

    (same, detail), utts = storage.retrying(footer_and_utts, url, what=f"check {url}")
    checks = failure_checks(planned, utts, read_failures(failures_next_to(url)) or [], max_failed_fraction)
    return {"row_count": checks["all_utterances_present"], "failure_budget": checks["failure_budget"],
            "schema_matches_contract": CheckOutcome(same, detail)}
