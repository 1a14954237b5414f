"""Feature assets, partitioned by shard: ``speaker_embeddings``, ``speech_tokens``; per subset:
``speaker_means`` and ``upstream_feature_files`` (the ``.pt`` files the upstream tools read)."""

import dagster as dg
from pydantic import Field

from assets.manifest import manifest
from cosyvoice import storage
from cosyvoice.corpus.checks import DEFAULT_MAX_FAILED_FRACTION
from cosyvoice.corpus.kaldi import read_table
from cosyvoice.corpus.shard_plan import loads_plan, shard_subset
from cosyvoice.features.stages import (
    ShardSource,
    check_embedding_shard,
    check_token_shard,
    export_upstream_features,
    extract_shard,
    reduce_speaker_means,
)
from pipelines.k8s import gpu_op_tags
from pipelines.partitions import SHARDS, SUBSETS
from pipelines.resources import DataStore, ModelStore
from pipelines.retries import retry_transient_only, transient_retry_policy

#: a backfill loads each model once per run of this many shards
SHARDS_PER_RUN = 8
RETRY = transient_retry_policy()  # bodies are wrapped in retry_transient_only: bad data is not retried
GPU_K8S = gpu_op_tags()  # nvidia.com/gpu limit, GPU node selector and tolerations (pipelines/k8s.py)
EMBEDDING_CHECKS = ("dim_192_finite", "all_utterances_present", "failure_budget")
TOKEN_CHECKS = ("codes_in_vocabulary", "token_rate", "all_utterances_present", "failure_budget")
#: checks that fail the step (and so hold back what depends on it) when they fail
BLOCKING_CHECKS = frozenset({"failure_budget"})
#: quarantined utterances listed per shard in the metadata (all of them are in the shard's .failed.tsv)
LISTED_PER_SHARD = 20


def budget_field():
    return Field(default=DEFAULT_MAX_FAILED_FRACTION, ge=0.0, le=1.0, description=(
        "Failure budget: the blocking check `failure_budget` fails when more than this fraction of a "
        "shard's utterances is missing from the output (quarantined with a reason or unaccounted). "
        "0.01 = 1 %; 0 tolerates no failure."))


def shard_report(budget, failures_url: str, quarantined: list[str]) -> dict:
    """Per-shard metadata: the counts the budget check measured and the first quarantined utterances."""
    return {**budget.metadata, "quarantine_file": failures_url, "quarantined_utterances": quarantined[:LISTED_PER_SHARD]}


def check_result(name: str, rows: list) -> dg.AssetCheckResult:
    """One evaluation of ``name`` over the run's shards (``rows``: ``(shard, CheckOutcome)``)."""
    metadata = {"failing_shards": dg.MetadataValue.json({s: r.detail for s, r in rows if not r.passed}),
                "examples": dg.MetadataValue.json([e for _, r in rows for e in r.examples][:20])}
    if name == "failure_budget":
        metadata["per_shard"] = dg.MetadataValue.json({s: r.metadata for s, r in rows})
    return dg.AssetCheckResult(check_name=name, passed=all(r.passed for _, r in rows), metadata=metadata)


class ExtractionConfig(dg.Config):
    num_workers: int = 0  # 0: one worker process per core
    device: str = "cpu"  # speech tokens only: cpu | cuda
    long_audio: str = "skip"  # speech tokens only: skip (upstream: []) | chunk
    batch_size: int = 1  # speech tokens only: length-sorted padded batches
    runtime: str = "onnxruntime"  # speech tokens only: onnxruntime | torch (log-mel on the device, bf16)
    precision: str = "fp32"  # speech tokens, torch runtime: fp32 (upstream's tokens) | bf16 (agreement reported)
    max_failed_fraction: float = budget_field()


def shard_url(store: DataStore, stage: str, shard: str) -> str:
    return store.url(stage, shard_subset(shard), f"{shard}.parquet")


def _shard_plan(store: DataStore, subset: str) -> dict[str, list[str]]:
    return loads_plan(storage.read_text(store.url("manifest", subset, "shards.json")))


def _run_shards(context: dg.AssetExecutionContext, kind: str, stage: str, checks: tuple[str, ...],
                config: ExtractionConfig, store: DataStore, models: ModelStore) -> dg.MaterializeResult:
    from cosyvoice.problems import failures_next_to

    model = models.url(models.campplus if kind == "embedding" else models.speech_tokenizer)
    per_shard, failed, outcomes = {}, 0, {name: [] for name in checks}
    totals = {"utterances": 0, "audio_hours": 0.0, "wall_seconds": 0.0}
    sources: dict[str, ShardSource] = {}  # one read of wav.scp / shards.json per subset and run
    for shard in context.partition_keys:
        subset = shard_subset(shard)
        out = shard_url(store, stage, shard)
        source = sources.setdefault(subset, ShardSource(store.url("manifest", subset)))
        report = extract_shard(kind, source, shard, model, out,
                               num_workers=config.num_workers or None, device=config.device,
                               long_audio=config.long_audio, batch_size=config.batch_size,
                               runtime=config.runtime, precision=config.precision)
        for failure in report.failures:
            context.log.warning(str(failure))
        meta = report.as_metadata()
        failed += len(report.failures)
        for key in totals:
            totals[key] += meta[key]
        expected = source.plan[shard]
        budget = config.max_failed_fraction
        results = (check_embedding_shard(out, expected, max_failed_fraction=budget) if kind == "embedding"
                   else check_token_shard(out, expected, models.tokenizer_version, max_failed_fraction=budget))
        for name, result in results.items():
            outcomes[name].append((shard, result))
        per_shard[shard] = {**meta, **shard_report(results["failure_budget"], failures_next_to(out),
                                                   [f"{f.utt}: {f.reason}" for f in report.failures])}
    return dg.MaterializeResult(
        metadata={**totals, "shards": len(per_shard), "failed_utterances": failed,
                  "quarantined_utterances": sum(m["quarantined"] for m in per_shard.values()),
                  "throughput_audio_s_per_s": round(totals["audio_hours"] * 3600 / max(totals["wall_seconds"], 1e-9), 2),
                  "per_shard": dg.MetadataValue.json(per_shard), "model": dg.MetadataValue.path(model)},
        check_results=[check_result(name, rows) for name, rows in outcomes.items()])


def _shard_asset(name: str, checks: tuple[str, ...], **extra) -> dict:
    """Shared decorator arguments of the per-shard feature assets."""
    return dict(partitions_def=SHARDS, deps=[dg.AssetDep(manifest, partition_mapping=dg.AllPartitionMapping())],
                group_name="features", kinds={"onnx"}, backfill_policy=dg.BackfillPolicy.multi_run(SHARDS_PER_RUN),
                retry_policy=RETRY, check_specs=check_specs(name, checks), **extra)


def check_specs(asset: str, checks: tuple[str, ...]) -> list[dg.AssetCheckSpec]:
    return [dg.AssetCheckSpec(n, asset=asset, blocking=n in BLOCKING_CHECKS) for n in checks]


@dg.asset(**_shard_asset("speaker_embeddings", EMBEDDING_CHECKS))
@retry_transient_only
def speaker_embeddings(context: dg.AssetExecutionContext, config: ExtractionConfig, store: DataStore,
                       models: ModelStore) -> dg.MaterializeResult:
    """CAM++ embeddings of one shard -> ``speaker_embeddings/<subset>/<shard>.parquet`` (utt, embedding, duration)."""
    return _run_shards(context, "embedding", "speaker_embeddings", EMBEDDING_CHECKS, config, store, models)


@dg.asset(**_shard_asset("speech_tokens", TOKEN_CHECKS, pool="gpu", op_tags=GPU_K8S))
@retry_transient_only
def speech_tokens(context: dg.AssetExecutionContext, config: ExtractionConfig, store: DataStore,
                  models: ModelStore) -> dg.MaterializeResult:
    """S3 speech tokens of one shard -> ``speech_tokens/<subset>/<shard>.parquet`` (utt, speech_token, duration)."""
    return _run_shards(context, "speech_token", "speech_tokens", TOKEN_CHECKS, config, store, models)


@dg.asset(
    partitions_def=SUBSETS, deps=[dg.AssetDep(speaker_embeddings, partition_mapping=dg.AllPartitionMapping())],
    group_name="features",
    check_specs=[dg.AssetCheckSpec("every_speaker_has_a_vector", asset="speaker_means")],
)
def speaker_means(context: dg.AssetExecutionContext, store: DataStore) -> dg.MaterializeResult:
    """Per-subset speaker vectors (plain mean of the utterance vectors) -> ``speaker_means/<subset>.parquet``."""
    subset = context.partition_key
    manifest_dir = store.url("manifest", subset)
    shards = [shard_url(store, "speaker_embeddings", s) for s in _shard_plan(store, subset)]
    missing = [s for s in shards if not storage.exists(s)]
    if missing:
        raise dg.Failure(f"{len(missing)} embedding shard(s) of {subset} are not materialized yet, e.g. {missing[0]}")
    counts = reduce_speaker_means(manifest_dir, shards, store.url("speaker_means", f"{subset}.parquet"))
    speakers = set(read_table(manifest_dir, "utt2spk").values())
    without = sorted(speakers - set(counts))
    return dg.MaterializeResult(
        metadata={"speakers": len(counts), "utterances": sum(counts.values())},
        check_results=[dg.AssetCheckResult(check_name="every_speaker_has_a_vector", passed=not without,
                                           metadata={"missing": dg.MetadataValue.json(without[:20])})])


@dg.asset(
    partitions_def=SUBSETS,
    deps=[dg.AssetDep(speech_tokens, partition_mapping=dg.AllPartitionMapping()), speaker_means],
    group_name="features",
)
def upstream_feature_files(context: dg.AssetExecutionContext, store: DataStore) -> dg.MaterializeResult:
    """``utt2embedding.pt`` / ``spk2embedding.pt`` / ``utt2speech_token.pt`` in the subset's manifest dir, for
    users of the upstream tools (``make_parquet_list.py``, ``train.py``)."""
    subset = context.partition_key
    plan = _shard_plan(store, subset)
    written = export_upstream_features(
        store.url("manifest", subset),
        [shard_url(store, "speaker_embeddings", s) for s in plan],
        [shard_url(store, "speech_tokens", s) for s in plan],
        store.url("speaker_means", f"{subset}.parquet"),
    )
    return dg.MaterializeResult(metadata={**written, "path": dg.MetadataValue.path(store.url("manifest", subset))})
