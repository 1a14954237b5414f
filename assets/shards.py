"""``parquet_shards`` (one training shard per shard partition) and ``training_data_lists``.

Faces of ``make_parquet`` (called with ``shard=`` and that shard's features) and ``make_data_lists``
(``cosyvoice/stages.py``)."""

import dagster as dg

from assets._per_shard import (
    BACKFILL,
    RETRY,
    add_shard_metadata,
    budget_field,
    check_result,
    check_specs,
    log_run_totals,
    shard_report,
)
from cosyvoice.corpus.shard_plan import ShardKey
from cosyvoice.shards.lists import CV_SUBSETS, TRAIN_SUBSETS, make_data_lists
from cosyvoice.shards.make_parquet import (
    check_pipeline_shard,
    make_parquet,
    read_kaldi_tables,
    shard_features,
)
from cosyvoice.stages import STAGES
from pipelines.partitions import SHARDS
from pipelines.resources import DataStore
from pipelines.retries import retry_transient_only

SHARD_CHECKS = ("row_count", "schema_matches_contract", "failure_budget")


class ParquetShardsConfig(dg.Config):
    max_failed_fraction: float = budget_field()


@dg.asset(
    partitions_def=SHARDS,
    deps=["speaker_embeddings", "speech_tokens",
          dg.AssetDep("speaker_means", partition_mapping=dg.AllPartitionMapping())],
    group_name="shards", kinds={"parquet"}, backfill_policy=BACKFILL, retry_policy=RETRY,
    check_specs=check_specs("parquet_shards", SHARD_CHECKS), description=STAGES["parquet_shards"].description,
)
@retry_transient_only
def parquet_shards(context: dg.AssetExecutionContext, config: ParquetShardsConfig,
                   store: DataStore) -> dg.MaterializeResult:
    """``parquet/<subset>/parquet_{i:09d}.tar`` (+ utt2parquet/spk2parquet json) in the upstream training format,
    built from this shard's embeddings and tokens only; ``parquet_{i:09d}.failed.tsv`` lists the planned
    utterances it lacks, with the feature stage's reason where a feature stage failed them."""
    layout = store.layout
    kaldi_cache: dict[str, dict] = {}  # one read of the subset's kaldi files and shard plan per run
    plan_cache: dict[str, dict] = {}
    per_shard, outcomes = {}, {name: [] for name in SHARD_CHECKS}
    for shard in context.partition_keys:
        subset = ShardKey.parse(shard).subset
        manifest_dir = layout.manifest_dir(subset)
        if subset not in kaldi_cache:  # (setdefault would read them again for every shard)
            kaldi_cache[subset] = read_kaldi_tables(manifest_dir)
            plan_cache[subset] = layout.shard_plan(subset)
        kaldi, plan = kaldi_cache[subset], plan_cache[subset]
        features = shard_features(layout.shard_file("speaker_embeddings", shard), layout.speaker_means(subset),
                                  layout.shard_file("speech_tokens", shard), kaldi.get("instruct"))
        report = make_parquet(manifest_dir, layout.parquet_dir(subset), shard=shard, features=features, kaldi=kaldi,
                              plan=plan)
        for problem in report.skipped:
            context.log.warning(f"{shard}: ({problem.stage}) {problem}")
        results = check_pipeline_shard(layout.shard_file("parquet_shards", shard), features.columns(),
                                       report.planned, max_failed_fraction=config.max_failed_fraction)
        for name, result in results.items():
            outcomes[name].append((shard, result))
        per_shard[shard] = {"rows": report.rows, "bytes": report.bytes,
                            "audio_hours": round(report.audio_seconds / 3600, 5), "skipped": len(report.skipped),
                            **shard_report(results["failure_budget"], report.failures_url,
                                           [f"{p.utt}: {p.stage} {p.reason}" for p in report.skipped])}
        add_shard_metadata(context, shard, per_shard[shard])
    log_run_totals(context, per_shard, ("rows", "bytes", "audio_hours", "skipped", "quarantined"))
    return dg.MaterializeResult(
        check_results=[check_result(name, rows) for name, rows in outcomes.items()])


class DataListsConfig(dg.Config):
    train_subsets: list[str] = list(TRAIN_SUBSETS)
    cv_subsets: list[str] = list(CV_SUBSETS)


@dg.asset(deps=[dg.AssetDep(parquet_shards, partition_mapping=dg.AllPartitionMapping())], group_name="shards",
          description=STAGES["training_data_lists"].description)
def training_data_lists(context: dg.AssetExecutionContext, config: DataListsConfig,
                        store: DataStore) -> dg.MaterializeResult:
    """``train.data.list`` / ``cv.data.list`` (and per-subset ``data.list``) over every prepared subset."""
    report = make_data_lists(store.layout, config.train_subsets, config.cv_subsets)
    for subset in report.unprepared:
        context.log.info(f"{subset}: no manifest, not listed")
    return dg.MaterializeResult(metadata={
        "train_shards": len(report.train), "cv_shards": len(report.cv),
        "subsets": dg.MetadataValue.json(report.subsets), "train_list": dg.MetadataValue.path(report.train_list),
    })
