"""Scheduled retraining, gated on the data checks upstream of training.

``retrain_schedule`` fires on ``COSYVOICE_RETRAIN_CRON`` (default ``0 3 * * 0``: Sundays 03:00) in
``COSYVOICE_RETRAIN_TIMEZONE`` (default UTC) and requests a ``retrain`` run only when no check on
an asset upstream of the run's assets currently fails with ERROR severity -- the checks that block
(Dagster's default severity). "Currently" means the latest evaluation per partition, where the
evaluation of a multi-partition run speaks for every partition of its range, counting only
partitions that still exist (a shard dropped from the plan no longer blocks). So a shard that
failed in a backfill and passed when re-run alone (or in another range) no longer holds the gate.
Otherwise the tick is skipped, naming the failing checks and partitions; the next tick tries again.

Per-utterance failures hold the gate only through the checks: the feature and shard assets'
``all_utterances_present`` / ``row_count`` count quarantined utterances (listed with a reason) as
accounted for, and their ``failure_budget`` check fails only when more than ``max_failed_fraction``
of a shard failed. One permanently bad clip in a large shard is quarantined and does not block.
"""

import os

import dagster as dg
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from pipelines.jobs import retrain, retrain_selection

RETRAIN_CRON = os.environ.get("COSYVOICE_RETRAIN_CRON", "0 3 * * 0")
RETRAIN_TIMEZONE = os.environ.get("COSYVOICE_RETRAIN_TIMEZONE", "UTC")
#: how many evaluations of one check are read to find the latest per partition
CHECK_HISTORY = 5000


def gate_check_keys(asset_graph) -> list[dg.AssetCheckKey]:
    """Checks on assets strictly upstream of what ``retrain`` materializes."""
    targets = retrain_selection.resolve(asset_graph)
    upstream = retrain_selection.upstream().resolve(asset_graph) - targets
    return sorted((k for k in asset_graph.asset_check_keys if k.asset_key in upstream), key=lambda k: k.to_user_string())


def _current_partitions(asset_graph, instance, asset_key: dg.AssetKey) -> list[str] | None:
    partitions_def = asset_graph.get(asset_key).partitions_def
    if partitions_def is None:
        return None
    return list(partitions_def.get_partition_keys(dynamic_partitions_store=instance))


def _covered(scope: str | None, partitions: list[str] | None, index: dict[str, int]) -> list[str | None]:
    """The existing partitions an evaluation speaks for (a range expands to its partitions)."""
    if scope is None or partitions is None:
        return [scope]
    if "..." in scope:
        start, end = scope.split("...", 1)
        if start not in index or end not in index:
            return []  # the range's partitions are gone (e.g. shards dropped from the plan)
        return partitions[index[start]:index[end] + 1]
    return [scope] if scope in index else []


def _scope(record, tags_by_run: dict[str, dict]) -> str | None:
    """The partition(s) an evaluation speaks for. Checks of partitioned assets are evaluated per run, so
    an unpartitioned record gets the partition or partition range of the run that produced it."""
    if record.partition is not None:
        return record.partition
    tags = tags_by_run.get(record.run_id, {})
    if "dagster/partition" in tags:
        return tags["dagster/partition"]
    if "dagster/asset_partition_range_start" in tags:
        return f"{tags['dagster/asset_partition_range_start']}...{tags['dagster/asset_partition_range_end']}"
    return None


def failing_checks(instance: dg.DagsterInstance, asset_graph) -> dict[str, list[str | None]]:
    """``{check: [partition, ...]}`` for each blocking check whose latest evaluation of a partition failed
    (``[None]`` for an unpartitioned asset)."""
    failing: dict[str, list[str | None]] = {}
    done = {AssetCheckExecutionRecordStatus.SUCCEEDED, AssetCheckExecutionRecordStatus.FAILED}
    for key in gate_check_keys(asset_graph):
        records = instance.event_log_storage.get_asset_check_execution_history(key, limit=CHECK_HISTORY, status=done)
        if not records:
            continue
        runs = instance.get_runs(filters=dg.RunsFilter(run_ids=list({r.run_id for r in records})))
        tags_by_run = {run.run_id: run.tags for run in runs}
        partitions = _current_partitions(asset_graph, instance, key.asset_key)
        index = {p: i for i, p in enumerate(partitions or [])}
        latest: dict[str | None, bool] = {}  # partition -> its latest evaluation blocks
        for record in records:  # newest first
            blocking = _blocking_partitions(record)
            for partition in _covered(_scope(record, tags_by_run), partitions, index):
                latest.setdefault(partition, blocking is not None and (blocking == "all" or partition in blocking))
        for scope, blocks in sorted(latest.items(), key=lambda item: index.get(item[0], -1)):
            if blocks:
                failing.setdefault(key.to_user_string(), []).append(scope)
    return failing


def _blocking_partitions(record) -> set[str] | str | None:
    """None when the evaluation does not block (passed, or failed with WARN severity); else the shards it
    names as failing (its ``failing_shards`` metadata, written by the per-shard assets), or ``"all"``."""
    if record.status != AssetCheckExecutionRecordStatus.FAILED:
        return None
    evaluation = record.event.dagster_event.event_specific_data if record.event else None
    if getattr(evaluation, "severity", dg.AssetCheckSeverity.ERROR) != dg.AssetCheckSeverity.ERROR:
        return None
    named = (getattr(evaluation, "metadata", None) or {}).get("failing_shards")
    data = getattr(named, "value", None)
    return set(data) if isinstance(data, dict) and data else "all"


@dg.schedule(
    job=retrain,
    cron_schedule=RETRAIN_CRON,
    execution_timezone=RETRAIN_TIMEZONE,
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Periodic retraining; skipped while a blocking data check upstream of training fails.",
)
def retrain_schedule(context: dg.ScheduleEvaluationContext):
    failing = failing_checks(context.instance, context.repository_def.asset_graph)
    if failing:
        detail = "; ".join(f"{check}: {', '.join(p or '(unpartitioned)' for p in parts[:5])}"
                           + (f" (+{len(parts) - 5} more)" if len(parts) > 5 else "")
                           for check, parts in sorted(failing.items()))
        return dg.SkipReason(f"retraining held back, failing blocking checks upstream of training: {detail}")
    return dg.RunRequest(run_key=f"retrain-{context.scheduled_execution_time:%Y%m%dT%H%M}",
                         tags={"cosyvoice/trigger": "schedule"})
