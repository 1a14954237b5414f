"""Scheduled retraining, gated on the data checks upstream of training.

``retrain_schedule`` fires on ``COSYVOICE_RETRAIN_CRON`` (default ``0 3 * * 0``: Sundays 03:00) in
``COSYVOICE_RETRAIN_TIMEZONE`` (default UTC) and requests a ``retrain`` run only when no check on
an asset upstream of the run's assets currently fails with ERROR severity -- the checks that block
(Dagster's default severity). "Currently" means the latest evaluation per partition, where the
evaluation of a multi-partition run speaks for every partition of its range (one without any
partition scope, for every partition of the asset), counting only partitions that still exist (a
shard dropped from the plan no longer blocks). So a shard that failed in a backfill and passed when
re-run alone (or in another range) no longer holds the gate, however old the failure or long the
history. Otherwise the tick is skipped, naming the failing checks and partitions; the next tick
tries again.

Per-utterance failures hold the gate only through the checks: the feature and shard assets'
``all_utterances_present`` / ``row_count`` count quarantined utterances (listed with a reason) as
accounted for, and their ``failure_budget`` check fails only when more than ``max_failed_fraction``
of a shard failed. One permanently bad clip in a large shard is quarantined and does not block.

At 50k shard partitions a check has tens of thousands of evaluations (one per backfill run of a few
shards, per pass), so the gate reads Dagster's check-execution table directly, only what it needs:
first the failed evaluations with their events (usually none: then that one query is the whole tick),
which tell the partitions each would block; then, for the checks with such failures, the evaluations
newest first (ids and status only), a window of ids at a time, with the partition tags of their runs,
until each of those partitions has its latest evaluation. That read is bounded by the runs since the
oldest failure that still matters, not by the history; a passed evaluation's event is never read.
The instance API would deserialize every evaluation event and every run (~0.5 ms each: a minute per
tick at 50k shards), and its history limit (5000 evaluations per check) hid older partitions' latest
evaluations. ``bench/gate_scale.py`` measures both.
"""

import os
from collections.abc import Iterable, Sequence

import dagster as dg
import sqlalchemy as db
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster._core.storage.event_log.schema import AssetCheckExecutionsTable
from dagster._core.storage.event_log.sql_event_log import SqlEventLogStorage
from dagster._core.storage.runs.schema import RunTagsTable
from dagster._core.storage.runs.sql_run_storage import SqlRunStorage
from dagster_shared.serdes import deserialize_value

from pipelines.jobs import retrain, retrain_selection

RETRAIN_CRON = os.environ.get("COSYVOICE_RETRAIN_CRON", "0 3 * * 0")
RETRAIN_TIMEZONE = os.environ.get("COSYVOICE_RETRAIN_TIMEZONE", "UTC")
#: check-execution ids read by the first query, newest first; each further query reads 4x as many (up to
#: MAX_ID_WINDOW), so a failure superseded by the latest runs costs one small read and an old one a few
ID_WINDOW, MAX_ID_WINDOW = 1_000, 64_000
#: run ids per run-tag query (under SQLite's bound-parameter limit)
RUN_IDS_PER_QUERY = 5_000
PARTITION_TAG = "dagster/partition"
RANGE_START_TAG, RANGE_END_TAG = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"
FAILED = AssetCheckExecutionRecordStatus.FAILED.value
_DONE = (AssetCheckExecutionRecordStatus.SUCCEEDED.value, FAILED)


def gate_check_keys(asset_graph) -> list[dg.AssetCheckKey]:
    """Checks on assets strictly upstream of what ``retrain`` materializes."""
    targets = retrain_selection.resolve(asset_graph)
    upstream = retrain_selection.upstream().resolve(asset_graph) - targets
    return sorted((k for k in asset_graph.asset_check_keys if k.asset_key in upstream), key=lambda k: k.to_user_string())


class _LatestPerPartition:
    """The partitions of one check and which already have their latest evaluation: evaluations arrive newest
    first and each takes the positions of its scope that no newer one took; a "next untaken position"
    pointer per position (with path halving) makes a range cost what it takes, not its length."""

    def __init__(self, partitions: Sequence[str] | None, index: dict[str, int]):
        self.partitions, self.index = partitions, index
        self._next = list(range((1 if partitions is None else len(partitions)) + 1))  # unpartitioned: one position
        self.would_block: dict[int, set[int]] = {}  # failed evaluation (id) -> the positions it blocks if latest
        self.pending: set[int] = set()  # positions some failed evaluation would block, not yet taken
        self.blocked: list[int] = []  # positions whose latest evaluation failed and blocks

    def span(self, partition: str | None, tags: dict[str, str]) -> tuple[int, int] | None:
        """The positions an evaluation speaks for: its own partition, else its run's partition or range, else
        (no scope at all) every partition; None when they no longer exist (e.g. shards dropped from the plan)."""
        if self.partitions is None:
            return 0, 0
        single = partition if partition is not None else tags.get(PARTITION_TAG)
        if single is not None:
            position = self.index.get(single)
            return None if position is None else (position, position)
        if RANGE_START_TAG in tags:
            first, last = self.index.get(tags[RANGE_START_TAG]), self.index.get(tags.get(RANGE_END_TAG, ""))
            return None if first is None or last is None else (first, last)
        return 0, len(self.partitions) - 1

    def take(self, first: int, last: int) -> list[int]:
        taken, pointers = [], self._next
        position = first
        while position <= last:
            while pointers[position] != position:  # jump to the next untaken position (halving the path)
                pointers[position] = pointers[pointers[position]]
                position = pointers[position]
            if position > last:
                break
            taken.append(position)
            pointers[position] = position + 1
            position += 1
        self.pending.difference_update(taken)
        return taken


def failing_checks(instance: dg.DagsterInstance, asset_graph) -> dict[str, list[str | None]]:
    """``{check: [partition, ...]}`` for each blocking check whose latest evaluation of a partition failed
    (``[None]`` for an unpartitioned asset)."""
    events, runs = instance.event_log_storage, instance.run_storage
    if not isinstance(events, SqlEventLogStorage) or not isinstance(runs, SqlRunStorage):
        raise TypeError(f"the retrain gate reads Dagster's SQL storage (sqlite or PostgreSQL); this instance "
                        f"uses {type(events).__name__} / {type(runs).__name__}")
    keys = {(key.asset_key.to_string(), key.name): key for key in gate_check_keys(asset_graph)}
    with events.index_connection() as checks_db:
        failed, newest = _failed_evaluations(checks_db, keys.values())
    if not failed:
        return {}
    # listed while no connection is open: SQLite's event log holds a process-wide lock per open connection
    checks = _with_current_partitions(instance, asset_graph, {(asset, name): keys[(asset, name)]
                                                              for _, asset, name, *_ in failed})
    # then one connection to each database for the rest (dagster-postgres opens one per call otherwise)
    with events.index_connection() as checks_db, runs.connect() as runs_db:
        tags_by_run = _scope_tags(runs_db, {run_id for _, _, _, run_id, partition, _ in failed if partition is None})
        for evaluation_id, asset_key, check_name, run_id, partition, event in failed:
            check = checks[(asset_key, check_name)]
            span = check.span(partition, tags_by_run.get(run_id, {}))
            if span and (blocks := _blocking(range(span[0], span[1] + 1), event, check.partitions)):
                check.would_block[evaluation_id] = blocks
                check.pending.update(blocks)
        _follow_back(checks_db, runs_db, keys, checks, tags_by_run, newest)
    failing: dict[str, list[str | None]] = {}
    for name, check in sorted(checks.items(), key=lambda item: keys[item[0]].to_user_string()):
        if check.blocked:
            partitions = check.partitions
            failing[keys[name].to_user_string()] = [None] if partitions is None else [
                partitions[p] for p in sorted(check.blocked)]
    return failing


def _with_current_partitions(instance, asset_graph, keys: dict) -> dict[tuple[str, str], _LatestPerPartition]:
    """A fresh tracker per check over its asset's current partitions (each partitions definition listed once)."""
    listed: dict[int, tuple[list[str] | None, dict[str, int]]] = {}
    checks = {}
    for name, key in keys.items():
        partitions_def = asset_graph.get(key.asset_key).partitions_def
        if id(partitions_def) not in listed:
            partitions = (None if partitions_def is None
                          else list(partitions_def.get_partition_keys(dynamic_partitions_store=instance)))
            listed[id(partitions_def)] = partitions, {p: i for i, p in enumerate(partitions or [])}
        checks[name] = _LatestPerPartition(*listed[id(partitions_def)])
    return checks


def _follow_back(checks_db, runs_db, keys: dict, checks: dict[tuple[str, str], _LatestPerPartition],
                 tags_by_run: dict, newest: int) -> None:
    """Read the evaluations of the checks with pending positions newest first, in growing windows of ids,
    until each pending position has its latest evaluation; a failed one blocks what it would block."""
    # nothing older than the oldest failure that would block can be the latest evaluation of what it blocks
    oldest = min((i for check in checks.values() for i in check.would_block), default=newest + 1)
    high, window_size = newest + 1, ID_WINDOW
    while high > oldest and (open_checks := {name: check for name, check in checks.items() if check.pending}):
        low, window_size = max(oldest, high - window_size), min(4 * window_size, MAX_ID_WINDOW)
        window = _evaluations_newest_first(checks_db, [keys[name] for name in open_checks], low, high)
        tags_by_run.update(_scope_tags(
            runs_db, {run_id for _, _, _, run_id, partition, _ in window if partition is None} - tags_by_run.keys()))
        for evaluation_id, asset_key, check_name, run_id, partition, status in window:
            check = open_checks[(asset_key, check_name)]
            span = check.span(partition, tags_by_run.get(run_id, {})) if check.pending else None
            taken = check.take(*span) if span else []
            if taken and status == FAILED:
                blocks = check.would_block.get(evaluation_id, set())
                check.blocked.extend(p for p in taken if p in blocks)
        high = low


def _of_checks(keys: Iterable[dg.AssetCheckKey]):
    table = AssetCheckExecutionsTable
    return db.or_(*(db.and_(table.c.asset_key == key.asset_key.to_string(), table.c.check_name == key.name)
                    for key in keys))


def _failed_evaluations(checks_db, keys: Iterable[dg.AssetCheckKey]) -> tuple[list, int]:
    """Every failed evaluation of ``keys``, newest first, as ``(id, asset key, check name, run id, partition,
    serialized event)``, and the newest check-execution id."""
    table = AssetCheckExecutionsTable
    query = (db.select(table.c.id, table.c.asset_key, table.c.check_name, table.c.run_id, table.c.partition,
                       table.c.evaluation_event)
             .where(_of_checks(keys), table.c.execution_status == FAILED).order_by(table.c.id.desc()))
    failed = [tuple(row) for row in checks_db.execute(query)]
    newest = checks_db.execute(db.select(db.func.max(table.c.id))).scalar() if failed else 0
    return failed, newest


def _evaluations_newest_first(checks_db, keys: Iterable[dg.AssetCheckKey], low: int, high: int) -> list:
    """Finished evaluations of ``keys`` with ids in ``[low, high)``, newest first, as tuples ``(id, asset key,
    check name, run id, partition, status)``: no events (passed ones are never read, failed ones were)."""
    table = AssetCheckExecutionsTable
    query = (db.select(table.c.id, table.c.asset_key, table.c.check_name, table.c.run_id, table.c.partition,
                       table.c.execution_status)
             .where(table.c.id >= low, table.c.id < high, _of_checks(keys), table.c.execution_status.in_(_DONE))
             .order_by(table.c.id.desc()))
    return [tuple(row) for row in checks_db.execute(query)]


def _scope_tags(runs_db, run_ids: set[str]) -> dict[str, dict[str, str]]:
    """The partition and partition-range tags of these runs (a run without them maps to ``{}``)."""
    tags: dict[str, dict[str, str]] = {run_id: {} for run_id in run_ids}
    table = RunTagsTable
    ordered = sorted(run_ids)
    for chunk in (ordered[i:i + RUN_IDS_PER_QUERY] for i in range(0, len(ordered), RUN_IDS_PER_QUERY)):
        query = db.select(table.c.run_id, table.c.key, table.c.value).where(
            table.c.key.in_((PARTITION_TAG, RANGE_START_TAG, RANGE_END_TAG)), table.c.run_id.in_(chunk))
        for run_id, key, value in runs_db.execute(query):
            tags[run_id][key] = value
    return tags


def _blocking(span: Iterable[int], event_text: str | None, partitions: Sequence[str] | None) -> set[int]:
    """The positions of its span a failed evaluation blocks (if it is their latest): none when it failed with
    WARN severity; else the shards its ``failing_shards`` metadata names (written by the per-shard
    assets), or all of them."""
    event = deserialize_value(event_text) if event_text else None
    evaluation = event.dagster_event.event_specific_data if event and event.dagster_event else None
    if getattr(evaluation, "severity", dg.AssetCheckSeverity.ERROR) != dg.AssetCheckSeverity.ERROR:
        return set()
    named = getattr((getattr(evaluation, "metadata", None) or {}).get("failing_shards"), "value", None)
    if not isinstance(named, dict) or not named or partitions is None:
        return set(span)
    return {p for p in span if partitions[p] in named}


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
