"""Materialize the data stages for the demo subsets on the local instance (``make demo``): from the
manifest to the training data lists; training, export and serving are not run here.

Runs land in ``$DAGSTER_HOME`` like UI-launched runs, so ``make ui`` shows their metadata, plots
and checks afterwards. Order follows the graph: manifest -> per-shard features -> per-subset
speaker means and .pt export -> per-shard parquet -> training data lists.
"""

from __future__ import annotations

import sys

import dagster as dg

from assets.features import speaker_embeddings, speaker_means, speech_tokens, upstream_feature_files
from assets.manifest import manifest
from assets.shards import parquet_shards, training_data_lists
from cosyvoice.corpus.shard_plan import ShardKey
from pipelines.definitions import defs

DEMO_SUBSETS = ("dev-clean", "train-clean-100")


def _run(assets, instance, **kwargs) -> None:
    resources = {k: v for k, v in defs.resources.items()}
    result = dg.materialize(assets, instance=instance, resources=resources, raise_on_error=False, **kwargs)
    names = ",".join(a.key.to_user_string() for a in assets)
    where = kwargs.get("partition_key", "")
    if not result.success:
        raise SystemExit(f"materializing {names} {where} failed (run {result.run_id}); see `make ui`")
    failed = [e.check_name for e in result.get_asset_check_evaluations() if not e.passed]
    print(f"materialized {names} {where}" + (f"  (failed checks: {failed})" if failed else ""))


def main(subsets: tuple[str, ...] = DEMO_SUBSETS) -> None:
    with dg.DagsterInstance.get() as instance:
        for subset in subsets:
            _run([manifest], instance, partition_key=subset)
        shards = [k for k in instance.get_dynamic_partitions("shards") if ShardKey.parse(k).subset in subsets]
        for shard in shards:
            _run([speaker_embeddings, speech_tokens], instance, partition_key=shard)
        for subset in subsets:
            _run([speaker_means, upstream_feature_files], instance, partition_key=subset)
        for shard in shards:
            _run([parquet_shards], instance, partition_key=shard)
        _run([training_data_lists], instance)


if __name__ == "__main__":
    main(tuple(sys.argv[1:]) or DEMO_SUBSETS)
