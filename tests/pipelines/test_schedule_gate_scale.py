"""The retrain gate (pipelines/schedules.py) with a history deeper than any fixed window: thousands of shard
partitions, more than 5000 evaluations of one check, failures written through the instance API and the
bulk of the history through bench/gate_scale.py's writer (the same rows, thousands at a time)."""

from datetime import datetime, timezone

import dagster as dg
import pytest

from bench.gate_scale import CheckHistory, Outcome, scope_tags
from pipelines.definitions import defs
from pipelines.partitions import SHARDS
from pipelines.schedules import failing_checks, retrain_schedule

BUDGET = dg.AssetCheckKey(dg.AssetKey("speech_tokens"), "failure_budget")
VOCABULARY = dg.AssetCheckKey(dg.AssetKey("speech_tokens"), "codes_in_vocabulary")
ROWS = dg.AssetCheckKey(dg.AssetKey("parquet_shards"), "row_count")
DEV = [f"dev-clean-{i:06d}" for i in range(1000)]
OTHERS = [f"{subset}-{i:06d}" for subset in ("test-clean", "train-clean-100") for i in range(1000)]
DROPPED = [f"train-other-500-{i:06d}" for i in range(8)]
NEWER_EVALUATIONS = 5100  # of BUDGET, none of them on DEV: more than the previous gate's 5000-evaluation window


@pytest.fixture(scope="module")
def graph():
    return defs.resolve_asset_graph()


def sqlite_instance(tmp_path):
    """SQLite storage with one event-log database for all runs (the default opens one file per run:
    ~0.2 s per run written through the API)."""
    return dg.instance_for_test(overrides={"event_log_storage": {
        "module": "dagster._core.storage.event_log", "class": "ConsolidatedSqliteEventLogStorage",
        "config": {"base_dir": str(tmp_path / "event_log")}}})


def schedule_tick(instance):
    context = dg.build_schedule_context(instance=instance, repository_def=defs.get_repository_def(),
                                        scheduled_execution_time=datetime(2026, 11, 29, 3, tzinfo=timezone.utc))
    return retrain_schedule(context)


def test_a_failure_deeper_than_5000_evaluations_still_holds_the_gate_until_its_shard_passes(graph, tmp_path):
    with sqlite_instance(tmp_path) as instance:
        instance.add_dynamic_partitions(SHARDS.name, DEV + OTHERS + DROPPED)
        api, bulk = CheckHistory(instance, bulk=False), CheckHistory(instance)
        # the oldest evaluations: one shard over budget in a backfill run of 8 ...
        api.add(scope_tags(DEV[0:8]), [Outcome(BUDGET, passed=False, failing=(DEV[3],))], shards=DEV[0:8])
        # ... a range failing as a whole, of which only the first half is re-run (below) ...
        api.add(scope_tags(DEV[8:16]), [Outcome(ROWS, passed=False)], shards=DEV[8:16])
        # ... a WARN-severity failure, and a failure of shards since dropped from the plan: neither blocks
        api.add(scope_tags(DEV[16:24]), [Outcome(VOCABULARY, passed=False, severity=dg.AssetCheckSeverity.WARN)],
                shards=DEV[16:24])
        api.add(scope_tags(DROPPED), [Outcome(BUDGET, passed=False)], shards=DROPPED)
        # thousands of newer runs of other shards, alone and in ranges
        for n in range(NEWER_EVALUATIONS):
            shards = OTHERS[n % len(OTHERS):n % len(OTHERS) + 1 + n % 3]
            bulk.add(scope_tags(shards), [Outcome(BUDGET)], shards=shards)
        bulk.flush()
        api.add(scope_tags(DEV[8:12]), [Outcome(ROWS)], shards=DEV[8:12])
        instance.delete_dynamic_partition(SHARDS.name, DROPPED[0])
        assert bulk.evaluations == NEWER_EVALUATIONS  # the previous gate read the newest 5000 and missed DEV[3]

        assert failing_checks(instance, graph) == {"parquet_shards:row_count": DEV[12:16],
                                                   "speech_tokens:failure_budget": [DEV[3]]}
        skipped = schedule_tick(instance)
        assert isinstance(skipped, dg.SkipReason)
        assert f"speech_tokens:failure_budget: {DEV[3]}" in skipped.skip_message
        assert f"parquet_shards:row_count: {', '.join(DEV[12:16])}" in skipped.skip_message

        api.add(scope_tags([DEV[3]]), [Outcome(BUDGET)], shards=[DEV[3]])  # the shard re-run alone passes
        assert failing_checks(instance, graph) == {"parquet_shards:row_count": DEV[12:16]}
        api.add(scope_tags(DEV[12:16]), [Outcome(ROWS)], shards=DEV[12:16])
        assert failing_checks(instance, graph) == {}


def test_an_evaluation_without_partition_scope_speaks_for_every_partition(graph):
    with dg.instance_for_test() as instance:  # the default SQLite storage (one lock per open event-log connection)
        instance.add_dynamic_partitions(SHARDS.name, DEV[:20])
        history = CheckHistory(instance, bulk=False)
        history.add(scope_tags(DEV[:10]), [Outcome(BUDGET)], shards=DEV[:10])
        history.add({}, [Outcome(BUDGET, passed=False)])  # e.g. a run of the check alone, no partition tags
        assert failing_checks(instance, graph) == {"speech_tokens:failure_budget": DEV[:20]}
        history.add(scope_tags(DEV[5:20]), [Outcome(BUDGET)], shards=DEV[5:20])
        assert failing_checks(instance, graph) == {"speech_tokens:failure_budget": DEV[:5]}
