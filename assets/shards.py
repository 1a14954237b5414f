"""``parquet_shards`` (one training shard per shard partition) and ``training_data_lists``."""

import dagster as dg

from assets.features import (
    RETRY,
    SHARDS_PER_RUN,
    budget_field,
    check_result,
    check_specs,
    shard_report,
    shard_url,
    speaker_embeddings,
    speaker_means,
    speech_tokens,
)
from cosyvoice import storage
from cosyvoice.corpus.manifest import LIBRITTS_SUBSETS
from cosyvoice.corpus.shard_plan import loads_plan, shard_subset
from cosyvoice.shards.lists import subset_lists, write_training_lists
from cosyvoice.shards.make_parquet import (
    check_pipeline_shard,
    read_kaldi_tables,
    shard_features,
    write_pipeline_shard,
)
from pipelines.partitions import SHARDS
from pipelines.resources import DataStore
from pipelines.retries import retry_transient_only

SHARD_CHECKS = ("row_count", "schema_matches_contract", "failure_budget")


class ParquetShardsConfig(dg.Config):
    max_failed_fraction: float = budget_field()


def _plan(store: DataStore, subset: str) -> dict[str, list[str]]:
    return loads_plan(storage.read_text(store.url("manifest", subset, "shards.json")))


@dg.asset(
    partitions_def=SHARDS,
    deps=[speaker_embeddings, speech_tokens, dg.AssetDep(speaker_means, partition_mapping=dg.AllPartitionMapping())],
    group_name="shards", kinds={"parquet"}, backfill_policy=dg.BackfillPolicy.multi_run(SHARDS_PER_RUN),
    retry_policy=RETRY,
    check_specs=check_specs("parquet_shards", SHARD_CHECKS),
)
@retry_transient_only
def parquet_shards(context: dg.AssetExecutionContext, config: ParquetShardsConfig,
                   store: DataStore) -> dg.MaterializeResult:
    """``parquet/<subset>/parquet_{i:09d}.tar`` (+ utt2parquet/spk2parquet json) in the upstream training format,
    built from this shard's embeddings and tokens only; ``parquet_{i:09d}.failed.tsv`` lists the planned
    utterances it lacks, with the feature stage's reason where a feature stage failed them."""
    kaldi_cache: dict[str, dict] = {}  # one read of the subset's kaldi files and plan per run
    plans: dict[str, dict[str, list[str]]] = {}
    per_shard, outcomes = {}, {name: [] for name in SHARD_CHECKS}
    for shard in context.partition_keys:
        subset = shard_subset(shard)
        manifest_dir = store.url("manifest", subset)
        kaldi = kaldi_cache.setdefault(subset, read_kaldi_tables(manifest_dir))
        features = shard_features(shard_url(store, "speaker_embeddings", shard),
                                  store.url("speaker_means", f"{subset}.parquet"),
                                  shard_url(store, "speech_tokens", shard), kaldi.get("instruct"))
        planned = plans.setdefault(subset, _plan(store, subset))[shard]
        report = write_pipeline_shard(store.url("parquet", subset), int(shard.rsplit("-", 1)[1]), planned,
                                      manifest_dir, features, kaldi)
        for problem in report.skipped:
            context.log.warning(f"{shard}: ({problem.stage}) {problem}")
        results = check_pipeline_shard(report.shard.url, features.columns(), planned,
                                       max_failed_fraction=config.max_failed_fraction)
        for name, result in results.items():
            outcomes[name].append((shard, result))
        per_shard[shard] = {"rows": report.shard.rows, "bytes": report.shard.bytes,
                            "audio_hours": round(report.shard.audio_seconds / 3600, 5), "skipped": len(report.skipped),
                            **shard_report(results["failure_budget"], report.failures_url,
                                           [f"{p.utt}: {p.stage} {p.reason}" for p in report.skipped])}
    return dg.MaterializeResult(
        metadata={"shards": len(per_shard), "rows": sum(v["rows"] for v in per_shard.values()),
                  "bytes": sum(v["bytes"] for v in per_shard.values()),
                  "audio_hours": round(sum(v["audio_hours"] for v in per_shard.values()), 5),
                  "skipped": sum(v["skipped"] for v in per_shard.values()),
                  "quarantined_utterances": sum(v["quarantined"] for v in per_shard.values()),
                  "per_shard": dg.MetadataValue.json(per_shard)},
        check_results=[check_result(name, rows) for name, rows in outcomes.items()])


class DataListsConfig(dg.Config):
    train_subsets: list[str] = [s for s in LIBRITTS_SUBSETS if s.startswith("train-")]
    cv_subsets: list[str] = [s for s in LIBRITTS_SUBSETS if s.startswith("dev-")]


@dg.asset(deps=[dg.AssetDep(parquet_shards, partition_mapping=dg.AllPartitionMapping())], group_name="shards")
def training_data_lists(context: dg.AssetExecutionContext, config: DataListsConfig,
                        store: DataStore) -> dg.MaterializeResult:
    """``train.data.list`` / ``cv.data.list`` (and per-subset ``data.list``) over every prepared subset."""
    per_subset = {}
    for subset in sorted(set(config.train_subsets) | set(config.cv_subsets)):
        if not storage.exists(store.url("manifest", subset, "shards.json")):
            context.log.info(f"{subset}: no manifest, not listed")
            continue
        indices = [int(k.rsplit("-", 1)[1]) for k in _plan(store, subset)]
        per_subset[subset] = subset_lists(store.url("parquet", subset), indices)
    report = write_training_lists(store.root, per_subset, config.train_subsets, config.cv_subsets)
    return dg.MaterializeResult(metadata={
        "train_shards": len(report.train), "cv_shards": len(report.cv),
        "subsets": dg.MetadataValue.json(report.subsets), "train_list": dg.MetadataValue.path(store.url("train.data.list")),
    })
