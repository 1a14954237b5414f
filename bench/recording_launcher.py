"""A run launcher for control-plane measurements: it records each launch and finishes the run the way a
successful run worker would for the control plane, without running any op.

Everything around it is real (the daemon's backfill logic, the QueuedRunCoordinator run queue, the
PostgreSQL run and event storage); only the work is missing. ``launch_run`` resolves the run's target
partitions and hands the run to a stand-in run worker: one child process of the daemon (as run workers
are separate processes or pods, their writes load PostgreSQL but not the daemon) with a few threads on
pooled connections. For each run it stores what the backfill daemon, the asset pages and the schedule
gate read: ``RUN_START``, one ``ASSET_MATERIALIZATION`` per target asset partition, one passing
``ASSET_CHECK_EVALUATION`` per selected check (a multi-partition run evaluates each check once, as the
per-shard assets do), then ``RUN_SUCCESS``, and
appends one JSON line to ``record_path`` (``run_id``, ``job``, ``backfill``, ``assets``, ``checks``,
``partition_range``, ``partitions``, ``launched_at``, ``finished_at``) for the harness to read.

The materializations carry a ``per_shard`` entry of the size the per-shard assets write (~20 fields) for
``metadata: run`` every shard of the run in every partition's event, as the assets do today (dagster
copies a multi-partition run's metadata into each partition's event, so a run of B shards stores B^2
entries per asset), for ``metadata: shard`` only the partition's own shard.

Configure it in ``dagster.yaml`` (the module must be importable by the daemon, e.g. ``PYTHONPATH=<repo>``):

    run_launcher:
      module: bench.recording_launcher
      class: RecordingRunLauncher
      config: {record_path: /tmp/launches.jsonl, workers: 4, metadata: run}
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
from dagster._core.events import DagsterEvent, DagsterEventType, StepMaterializationData
from dagster._core.events.log import EventLogEntry
from dagster._core.launcher import LaunchRunContext, RunLauncher
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    BACKFILL_ID_TAG,
    PARTITION_NAME_TAG,
)
from dagster._serdes import ConfigurableClass, ConfigurableClassData

METADATA_SCOPES = ("run", "shard")


class RecordingRunLauncher(RunLauncher, ConfigurableClass):
    """Records launches and completes each run successfully through a stand-in run worker process."""

    def __init__(self, record_path: str, workers: int = 4, metadata: str = "run",
                 inst_data: ConfigurableClassData | None = None):
        if metadata not in METADATA_SCOPES:
            raise ValueError(f"metadata is one of {METADATA_SCOPES}, got {metadata!r}")
        self._inst_data = inst_data
        self.record_path = record_path
        self.workers = workers
        self.metadata = metadata
        self._keys_by_name: dict[str, list[str]] = {}  # dynamic partitions: ordered keys, refreshed on a miss
        self._index_by_name: dict[str, dict[str, int]] = {}
        self._worker: subprocess.Popen | None = None
        self._lock = threading.Lock()
        super().__init__()

    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls) -> dict:
        return {"record_path": dg.Field(str, description="JSONL file that gets one line per finished run"),
                "workers": dg.Field(int, default_value=4, is_required=False,
                                    description="threads of the stand-in run worker that finish runs"),
                "metadata": dg.Field(str, default_value="run", is_required=False,
                                     description="per_shard metadata of every shard of the run (run) or the "
                                                 "partition's own (shard) in each materialization")}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]):
        return cls(inst_data=inst_data, **config_value)

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        tags = run.tags
        graph = context.workspace.asset_graph
        assets = sorted(run.asset_selection or (), key=lambda k: k.to_user_string())
        job = {
            "run_id": run.run_id, "job": run.job_name, "backfill": tags.get(BACKFILL_ID_TAG),
            "partitions": {key.to_user_string(): self._target_partitions(run, graph.get(key).partitions_def)
                           for key in assets},
            "checks": sorted(key.to_user_string() for key in run.asset_check_selection or ()),
            "partition_range": ([tags[ASSET_PARTITION_RANGE_START_TAG], tags[ASSET_PARTITION_RANGE_END_TAG]]
                                if ASSET_PARTITION_RANGE_START_TAG in tags else
                                [tags[PARTITION_NAME_TAG]] * 2 if PARTITION_NAME_TAG in tags else None),
            "launched_at": time.time(),
        }
        with self._lock:
            worker = self._running_worker()
            worker.stdin.write(json.dumps(job) + "\n")
            worker.stdin.flush()

    def _running_worker(self) -> subprocess.Popen:
        if self._worker is not None and self._worker.poll() is not None:
            raise RuntimeError(f"the stand-in run worker exited with {self._worker.returncode}; see the daemon's log")
        if self._worker is None:  # inherits DAGSTER_HOME, the DAGSTER_PG_* variables and PYTHONPATH
            self._worker = subprocess.Popen(
                [sys.executable, "-m", "bench.recording_launcher", self.record_path, str(self.workers),
                 self.metadata],
                stdin=subprocess.PIPE, text=True)
        return self._worker

    def _target_partitions(self, run: dg.DagsterRun, partitions_def) -> list[str | None]:
        """The run's partition keys for one asset: its range expanded in the partitions' order."""
        tags = run.tags
        if partitions_def is None:
            return [None]
        if ASSET_PARTITION_RANGE_START_TAG in tags:
            start, end = tags[ASSET_PARTITION_RANGE_START_TAG], tags[ASSET_PARTITION_RANGE_END_TAG]
            if isinstance(partitions_def, dg.DynamicPartitionsDefinition) and partitions_def.name:
                keys, index = self._dynamic_keys(partitions_def.name, (start, end))
                return keys[index[start]:index[end] + 1]
            return list(partitions_def.get_partition_keys_in_range(dg.PartitionKeyRange(start, end)))  # static, time
        if PARTITION_NAME_TAG in tags:
            return [tags[PARTITION_NAME_TAG]]
        raise ValueError(f"run {run.run_id} targets a partitioned asset but has no partition tags: {dict(tags)}")

    def _dynamic_keys(self, name: str, needed: Sequence[str]) -> tuple[list[str], dict[str, int]]:
        """Ordered keys of a dynamic partitions set, read once and again only when a key is unknown (reading
        50k keys per run would cost more than the run's own writes)."""
        index = self._index_by_name.get(name, {})
        if any(key not in index for key in needed):
            keys = list(self._instance.get_dynamic_partitions(name))
            index = {key: i for i, key in enumerate(keys)}
            missing = [key for key in needed if key not in index]
            if missing:
                raise ValueError(f"partition(s) {missing} are not in the dynamic partitions {name!r}")
            self._keys_by_name[name], self._index_by_name[name] = keys, index
        return self._keys_by_name[name], index

    def terminate(self, run_id: str) -> bool:
        return False  # runs finish within moments of their launch; there is nothing to stop

    def dispose(self) -> None:
        if self._worker is not None and self._worker.poll() is None:
            self._worker.stdin.close()  # the worker finishes what it was given, then exits
            try:
                self._worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._worker.kill()
                self._worker.wait()


def shard_entry(shard: str) -> dict:
    """A ``per_shard`` entry shaped like the feature assets' (extraction report + failure budget)."""
    return {"utterances": 1000, "failed": 0, "failed_by_reason": {}, "audio_hours": 2.0, "wall_seconds": 61.734,
            "model_seconds": 57.112, "throughput_audio_s_per_s": 116.63, "real_time_factor": 0.00857,
            "planned": 1000, "present": 1000, "quarantined": 0, "unaccounted": 0, "failed_fraction": 0.0,
            "max_failed_fraction": 0.01, "quarantined_by_reason": {},
            "quarantine_file": f"s3://corpus-bucket/data/features/{shard}.failed.tsv", "quarantined_utterances": []}


def run_metadata(partitions: list[str | None], partition: str | None, scope: str) -> dict:
    """A materialization's metadata: the run's totals and ``per_shard`` entries (see the module docstring)."""
    shards = [p for p in partitions if p] if scope == "run" else [partition] if partition else []
    return {"utterances": 1000 * len(partitions), "shards": len(partitions), "failed_utterances": 0,
            "per_shard": dg.MetadataValue.json({shard: shard_entry(shard) for shard in shards})}


def finish_run(instance: dg.DagsterInstance, job: dict, metadata_scope: str = "run") -> None:
    """Store the events a successful run of ``job`` (a launch line) leaves for the control plane."""
    run_id, name = job["run_id"], job["job"]
    instance.report_dagster_event(DagsterEvent(DagsterEventType.RUN_START.value, job_name=name), run_id=run_id)
    storage = instance.event_log_storage
    for asset, partitions in job["partitions"].items():
        key, step = dg.AssetKey.from_user_string(asset), asset.replace("/", "__")
        entries = [EventLogEntry(
            user_message="", level="INFO", job_name=name, run_id=run_id, error_info=None, timestamp=time.time(),
            step_key=step, dagster_event=DagsterEvent(
                DagsterEventType.ASSET_MATERIALIZATION.value, job_name=name, step_key=step,
                event_specific_data=StepMaterializationData(
                    dg.AssetMaterialization(key, partition=p, metadata=run_metadata(partitions, p, metadata_scope)))))
            for p in partitions]
        # one batch per asset: PostgreSQL inserts the rows at once and updates the asset's latest row once
        storage.store_event_batch(entries) if len(entries) > 1 else storage.store_event(entries[0])
    for check in job["checks"]:
        asset, check_name = check.rsplit(":", 1)
        evaluation = dg.AssetCheckEvaluation(asset_key=dg.AssetKey.from_user_string(asset), check_name=check_name,
                                             passed=True, metadata={"failing_shards": dg.MetadataValue.json({})})
        instance.report_dagster_event(DagsterEvent(
            DagsterEventType.ASSET_CHECK_EVALUATION.value, job_name=name, step_key=asset.replace("/", "__"),
            event_specific_data=evaluation), run_id=run_id)
    instance.report_dagster_event(DagsterEvent(DagsterEventType.RUN_SUCCESS.value, job_name=name), run_id=run_id)


def serve(record_path: str, workers: int, metadata_scope: str = "run") -> None:
    """The stand-in run worker: finish every run read from stdin; exit at its end once all are finished."""
    jobs: queue.Queue = queue.Queue(maxsize=workers * 4)
    lock = threading.Lock()
    with dg.DagsterInstance.get() as instance:
        # pooled connections (as the webserver holds them): this process stands in for many run workers
        instance.optimize_for_webserver(statement_timeout=0, pool_recycle=3600, max_overflow=workers)

        def work() -> None:
            while (job := jobs.get()) is not None:
                try:
                    finish_run(instance, job, metadata_scope)
                except Exception as exc:  # the run fails visibly (the backfill shows it) instead of hanging
                    traceback.print_exc()
                    run = instance.get_run_by_id(job["run_id"])
                    if run is not None:
                        instance.report_run_failed(run, message=f"stand-in run worker: {exc}")
                    continue
                job["finished_at"] = time.time()
                job["partitions"] = {asset: len(parts) for asset, parts in job["partitions"].items()}
                with lock, open(record_path, "a") as out:
                    out.write(json.dumps(job) + "\n")

        threads = [threading.Thread(target=work, daemon=True) for _ in range(workers)]
        for thread in threads:
            thread.start()
        for line in sys.stdin:
            if line.strip():
                jobs.put(json.loads(line))
        for _ in threads:
            jobs.put(None)
        for thread in threads:
            thread.join()


def read_launches(path: str | os.PathLike) -> list[dict]:
    """The runs a :class:`RecordingRunLauncher` finished (an absent file: none yet)."""
    if not os.path.exists(path):
        return []
    with open(path) as lines:
        return [json.loads(line) for line in lines if line.strip()]


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]), sys.argv[3])
