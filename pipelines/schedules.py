"""Scheduled retraining, gated on the data checks upstream of training.

``retrain_schedule`` fires on ``COSYVOICE_RETRAIN_CRON`` (default ``0 3 * * 0``: Sundays 03:00) in
``COSYVOICE_RETRAIN_TIMEZONE`` (default UTC) and requests a ``retrain`` run only when no check on
an asset upstream of the run's assets currently fails with ERROR severity -- the checks that block
(Dagster's default severity). "Currently" means the latest evaluation per partition (or per
partition range of a multi-partition run), counting only partitions that still exist (a shard dropped from the plan no longer blocks). Otherwise the tick
is skipped, naming the failing checks and partitions; the next tick tries again.
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


def _current_partitions(asset_graph, instance, asset_key: dg.AssetKey) -> set[str] | None:
    partitions_def = asset_graph.get(asset_key).partitions_def
    if partitions_def is None:
        return None
    return set(partitions_def.get_partition_keys(dynamic_partitions_store=instance))


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
    """``{check: [partition or range, ...]}`` for each blocking check whose latest evaluation failed."""
    failing: dict[str, list[str | None]] = {}
    done = {AssetCheckExecutionRecordStatus.SUCCEEDED, AssetCheckExecutionRecordStatus.FAILED}
    for key in gate_check_keys(asset_graph):
        records = instance.event_log_storage.get_asset_check_execution_history(key, limit=CHECK_HISTORY, status=done)
        if not records:
            continue
        runs = instance.get_runs(filters=dg.RunsFilter(run_ids=list({r.run_id for r in records})))
        tags_by_run = {run.run_id: run.tags for run in runs}
        partitions = _current_partitions(asset_graph, instance, key.asset_key)
        latest: dict[str | None, object] = {}
        for record in records:  # newest first
            latest.setdefault(_scope(record, tags_by_run), record)
        for scope, record in latest.items():
            if scope is not None and partitions is not None and scope.split("...")[0] not in partitions:
                continue  # the partition is gone (e.g. a shard dropped from the plan)
            if record.status != AssetCheckExecutionRecordStatus.FAILED:
                continue
            evaluation = record.event.dagster_event.event_specific_data if record.event else None
            if getattr(evaluation, "severity", dg.AssetCheckSeverity.ERROR) == dg.AssetCheckSeverity.ERROR:
                failing.setdefault(key.to_user_string(), []).append(scope)
    return failing


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
