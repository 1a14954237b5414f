"""``manifest``: one LibriTTS subset -> kaldi data dir + shard plan (registers shard partitions)."""

import dagster as dg

from assets._metadata import histogram
from cosyvoice.corpus.checks import check_data_dir
from cosyvoice.corpus.manifest import prepare_libritts
from cosyvoice.corpus.parts import SubsetPart, parts_from_env
from cosyvoice.corpus.scan import AudioPolicy
from cosyvoice.corpus.shard_plan import ShardKey
from cosyvoice.stages import STAGES
from pipelines.partitions import SHARDS, SUBSETS
from pipelines.resources import CorpusResource, DataStore
from pipelines.retries import retry_transient_only, transient_retry_policy

CHECKS = {
    "unique_utt_ids": "no utterance id appears twice in wav.scp",
    "wavs_exist": "every kept wav.scp path exists",
    "text_non_empty": "every kept utterance has non-empty text",
}


class ManifestConfig(dg.Config):
    instruct: str = ""
    utts_per_shard: int = 1000
    num_workers: int = 8
    min_sample_rate: int = 16000
    max_channels: int = 1


@dg.asset(
    partitions_def=SUBSETS,
    group_name="data_prep",
    kinds={"python"},
    retry_policy=transient_retry_policy(),
    check_specs=[dg.AssetCheckSpec(name, asset="manifest", description=d) for name, d in CHECKS.items()],
    description=STAGES["manifest"].description,
)
@retry_transient_only
def manifest(context: dg.AssetExecutionContext, config: ManifestConfig, corpus: CorpusResource,
             store: DataStore) -> dg.MaterializeResult:
    """wav.scp / text / utt2spk / spk2utt (+instruct), shards.json and quarantine.tsv for one subset
    (or one part of a subset split by ``COSYVOICE_SUBSET_PARTS``: its key is the subset name downstream)."""
    subset = context.partition_key
    part = SubsetPart.parse(subset)
    dest = store.layout.manifest_dir(subset)
    report = prepare_libritts(
        corpus.subset_url(part.subset), dest, instruct=config.instruct or None, utts_per_shard=config.utts_per_shard,
        num_workers=config.num_workers, subset=subset, part=part, parts=parts_from_env(),
        policy=AudioPolicy(min_sample_rate=config.min_sample_rate, max_channels=config.max_channels),
    )
    for item in report.quarantined:
        context.log.warning(str(item))
    known = set(context.instance.get_dynamic_partitions(SHARDS.name))
    context.instance.add_dynamic_partitions(SHARDS.name, [k for k in report.shard_keys if k not in known])
    stale = sorted(k for k in known if ShardKey.parse(k).subset == subset and k not in set(report.shard_keys))
    for key in stale:  # the plan shrank (fewer files or a larger utts_per_shard)
        context.instance.delete_dynamic_partition(SHARDS.name, key)
    if stale:
        context.log.info(f"removed {len(stale)} shard partition(s) no longer in the plan: {stale[:5]}...")

    meta = report.as_metadata()
    meta["path"] = dg.MetadataValue.path(dest)
    meta["quarantined_by_reason"] = dg.MetadataValue.json(meta["quarantined_by_reason"])
    if report.durations:
        meta["duration_histogram"] = histogram(report.durations, title=f"{subset}: utterance durations",
                                               xlabel="seconds")
    checks = [
        dg.AssetCheckResult(check_name=name, passed=outcome.passed,
                            metadata={"detail": outcome.detail, "examples": dg.MetadataValue.json(outcome.examples)})
        for name, outcome in check_data_dir(dest).items()
    ]
    return dg.MaterializeResult(metadata=meta, check_results=checks)
