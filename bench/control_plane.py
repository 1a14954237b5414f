"""Control plane at scale: the project's Definitions on PostgreSQL with the real webserver and daemon.

Registers N ``shards`` partitions, launches one backfill of ``speaker_embeddings`` + ``speech_tokens`` +
``parquet_shards`` over all of them through GraphQL ``launchPartitionBackfill`` (the UI's button), and
measures what an operator of a 50k-shard corpus waits for: the time until every run is requested and
until the backfill completes, the runs the BackfillPolicy makes, the asset page's partition-status
queries, one evaluation of each sensor and of the retrain schedule's check gate, and PostgreSQL growth.

Only the work is missing: runs are launched by ``bench.recording_launcher.RecordingRunLauncher``, which
stores each run's materializations and check evaluations and marks it successful, so the backfill
daemon, the QueuedRunCoordinator run queue and the storage all do their real work.

    DAGSTER_PG_PASSWORD=... python bench/control_plane.py --partitions 50000 --json out.json

A baseline in the same run (``--baseline``, default N/10) gives the per-partition cost ratio: about 1.0
means the control plane scales linearly. Needs PostgreSQL on ``DAGSTER_PG_HOST:DAGSTER_PG_PORT`` with a
role that may create databases (``.ci/postgres``); each measurement gets a fresh database, dropped
afterwards unless ``--keep``.

What the knobs compare (each is deployment configuration, not code):
``--batch`` shards per backfill run (the three assets share partitions and policy, so one run takes all
three: runs = ceil(N / batch)); ``--planned-events subset`` sets ``DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS``
on the stack (one planned event per asset and run instead of one per partition, each of which the daemon
stores on a new PostgreSQL connection); ``--metadata shard|run`` whether each partition's materialization
carries its own shard's report (the assets) or the whole run's (the assets before); ``--pgbouncer`` puts
a PgBouncer between the stack and PostgreSQL (k8s/pgbouncer.yaml). Besides wall times the figures include
what does not depend on how busy the machine is: CPU seconds per stack process and PostgreSQL sessions
(server connections) per run.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the project's packages and tests.* next to it
    sys.path.insert(0, str(REPO))

import dagster as dg  # noqa: E402
import yaml  # noqa: E402

from bench.recording_launcher import read_launches  # noqa: E402
from cosyvoice.corpus.manifest import LIBRITTS_SUBSETS  # noqa: E402
from cosyvoice.corpus.shard_plan import shard_key  # noqa: E402
from pipelines.instance import apply_pool_limits, instance_config  # noqa: E402
from tests.pipelines.dagster_stack import BIN, DagsterStack  # noqa: E402

SHARD_ASSETS = ("speaker_embeddings", "speech_tokens", "parquet_shards")
BACKFILL_TAG = "dagster/backfill"
GOALS = {"all_runs_requested_s": 600.0, "partition_status_query_s": 3.0, "sensor_tick_s": 5.0, "schedule_gate_s": 5.0}
GOAL_PARTITIONS = 50_000  # the request-time goal is stated for 50k shards x 3 assets
REGISTER_BATCH = 10_000
POLL_S = 2.0
#: dagster's switch for one ASSET_MATERIALIZATION_PLANNED event per asset and run (with the run's partition
#: subset) instead of one per partition; the UI then does not mark a failed run's partitions as failed
PLANNED_EVENTS_ENV = "DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS"

#: the query the asset page sends for a partitioned asset's partition bar (dagster-webserver's
#: PartitionHealthQuery, the parts a dynamic partitions definition answers)
PARTITION_HEALTH = """
query PartitionHealthQuery($assetKey: AssetKeyInput!) {
  assetNodeOrError(assetKey: $assetKey) {
    ... on AssetNode {
      id
      partitionKeysByDimension { name type partitionKeys }
      assetPartitionStatuses {
        ... on DefaultPartitionStatuses { materializedPartitions materializingPartitions failedPartitions }
      }
    }
  }
}"""

#: the asset catalog's and asset page header's counts (dagster-webserver's AssetStaleStatusQuery)
PARTITION_STATS = """
query AssetStaleStatusQuery($assetKeys: [AssetKeyInput!]!) {
  assetNodes(assetKeys: $assetKeys) {
    id
    assetKey { path }
    staleStatus
    partitionStats { numMaterialized numMaterializing numPartitions numFailed }
  }
}"""

COUNTED_TABLES = ("event_logs", "runs", "run_tags", "asset_event_tags", "asset_check_executions",
                  "dynamic_partitions", "bulk_actions")


@dataclass(frozen=True)
class Postgres:
    """Where the measurement databases are created; the password comes from the environment only."""

    host: str
    port: str
    user: str
    password: str

    @classmethod
    def from_env(cls) -> Postgres:
        password = os.environ.get("DAGSTER_PG_PASSWORD")
        if password is None:
            raise SystemExit("set DAGSTER_PG_PASSWORD (and DAGSTER_PG_HOST/PORT/USER if not 127.0.0.1:5432/dagster); "
                             "the role must be allowed to create databases (.ci/postgres sets one up)")
        return cls(os.environ.get("DAGSTER_PG_HOST", "127.0.0.1"), os.environ.get("DAGSTER_PG_PORT", "5432"),
                   os.environ.get("DAGSTER_PG_USER", "dagster"), password)

    def connect(self, dbname: str = "postgres"):
        import psycopg2

        conn = psycopg2.connect(dbname=dbname, host=self.host, port=self.port, user=self.user,
                                password=self.password, connect_timeout=5)
        conn.autocommit = True
        return conn

    def env(self, dbname: str) -> dict[str, str]:
        return {"DAGSTER_PG_HOST": self.host, "DAGSTER_PG_PORT": str(self.port), "DAGSTER_PG_USER": self.user,
                "DAGSTER_PG_PASSWORD": self.password, "DAGSTER_PG_DB": dbname}

    def create_database(self) -> str:
        name = f"dagster_cp_{uuid.uuid4().hex[:10]}"
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return name

    def drop_database(self, name: str, attempts: int = 20) -> None:
        """Drop ``name``, ending its sessions. A session of another role (an autovacuum worker, a bouncer's
        server connection being closed) makes FORCE refuse for a moment: retried."""
        import psycopg2

        for attempt in range(attempts):
            conn = self.connect()
            try:
                with conn.cursor() as cur:
                    cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                return
            except psycopg2.errors.InsufficientPrivilege:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.5)
            finally:
                conn.close()

    def size(self, name: str) -> dict:
        """``pg_database_size`` and the row counts of the tables a backfill grows."""
        conn = self.connect(name)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_database_size(current_database())")
                size = cur.fetchone()[0]
                cur.execute("SELECT sessions, xact_commit FROM pg_stat_database WHERE datname = current_database()")
                sessions, commits = cur.fetchone()
                rows = {}
                for table in COUNTED_TABLES:
                    cur.execute(f"SELECT count(*) FROM {table}")
                    rows[table] = cur.fetchone()[0]
        finally:
            conn.close()
        return {"bytes": size, "rows": rows, "sessions": sessions, "commits": commits}

    def connect_seconds(self, samples: int = 20) -> float:
        """Median time to open a connection: dagster-postgres opens one per storage call outside the webserver
        (NullPool), so this sets the price of every daemon write."""
        times = []
        for _ in range(samples):
            start = time.perf_counter()
            self.connect().close()
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def plan_shard_keys(partitions: int, subsets: tuple[str, ...] = LIBRITTS_SUBSETS) -> list[str]:
    """``partitions`` shard keys spread over the subsets in contiguous blocks, in registration order (a
    subset's shards are registered together when its manifest runs)."""
    per_subset = math.ceil(partitions / len(subsets))
    keys = [shard_key(subset, i) for subset in subsets for i in range(per_subset)]
    return keys[:partitions]


def subset_of(key: str) -> str:
    return key.rsplit("-", 1)[0]


class BenchStack(DagsterStack):
    """The tests' stack (code server of ``pipelines.definitions``, webserver) with the daemon started
    separately, so the backfill can be launched first and the daemon's first iteration takes it."""

    def start(self) -> BenchStack:
        workspace = self.home / "workspace.yaml"
        workspace.write_text(f"load_from:\n  - grpc_server:\n      host: 127.0.0.1\n      port: {self.grpc_port}\n"
                             f"      location_name: cosyvoice\n")
        self._spawn("code-server", [str(BIN / "dagster"), "api", "grpc", "-h", "127.0.0.1", "-p", str(self.grpc_port),
                                    "-m", "pipelines.definitions", "-d", str(REPO), "--location-name", "cosyvoice"])
        self._spawn("webserver", [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(self.port),
                                  "-w", str(workspace)])
        return self

    def start_daemon(self) -> None:
        self._spawn("daemon", [str(BIN / "dagster-daemon"), "run", "-w", str(self.home / "workspace.yaml")])


def write_bench_instance(home: Path, record_path: Path, max_concurrent_runs: int, workers: int = 4,
                         metadata: str = "run") -> dict:
    """The deployment's instance config on PostgreSQL with the recording launcher."""
    config = instance_config(postgres=True, max_concurrent_runs=max_concurrent_runs)
    config["run_launcher"] = {"module": "bench.recording_launcher", "class": "RecordingRunLauncher",
                              "config": {"record_path": str(record_path), "workers": workers, "metadata": metadata}}
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return config


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def register_partitions(instance: dg.DagsterInstance, keys: list[str]) -> float:
    """Add the shard keys as the manifests do (in batches), then mark each subset's manifest materialized."""
    start = time.perf_counter()
    for i in range(0, len(keys), REGISTER_BATCH):
        instance.add_dynamic_partitions("shards", keys[i:i + REGISTER_BATCH])
    for subset in dict.fromkeys(subset_of(k) for k in keys):
        instance.report_runless_asset_event(dg.AssetMaterialization("manifest", partition=subset))
    return time.perf_counter() - start


def backfill_params(keys: list[str], title: str) -> dict:
    return {"partitionsByAssets": [{"assetKey": {"path": [asset]},
                                    "partitions": {"range": {"start": keys[0], "end": keys[-1]}}}
                                   for asset in SHARD_ASSETS],
            "title": title}


def _partition_count(subset) -> int:
    return subset.num_partitions_and_non_partitioned_assets


def wait_for_backfill(instance: dg.DagsterInstance, backfill_id: str, timeout: float, stack: DagsterStack) -> dict:
    """Poll the backfill row until it is final; note when its requested subset first covered the target."""
    deadline = time.time() + timeout
    all_requested_seen = None
    while time.time() < deadline:
        for proc, log in zip(stack.procs, stack.logs):
            if proc.poll() is not None:
                raise RuntimeError(f"{log.name} exited with {proc.returncode}:\n{stack.tail(log)}")
        backfill = instance.get_backfill(backfill_id)
        data = backfill.asset_backfill_data
        if all_requested_seen is None and data is not None and \
                _partition_count(data.requested_subset) >= _partition_count(data.target_subset):
            all_requested_seen = time.time()
        if backfill.status.value.startswith("COMPLETED") or backfill.status.value in ("FAILED", "CANCELED"):
            return {"status": backfill.status.value, "end_timestamp": backfill.backfill_end_timestamp,
                    "all_requested_seen": all_requested_seen,
                    "materialized": _partition_count(data.materialized_subset) if data else None,
                    "failed": _partition_count(data.failed_and_downstream_subset) if data else None}
        time.sleep(POLL_S)
    raise TimeoutError(f"backfill {backfill_id} not final after {timeout:.0f} s:\n{stack.tail(stack.logs[-1])}")


def cpu_seconds(stack: DagsterStack) -> dict[str, float]:
    """CPU seconds (user + system) so far of each stack process and what it started (its process group), the
    stand-in run worker apart: a load-independent measure next to the wall times on a shared machine."""
    tick = os.sysconf("SC_CLK_TCK")
    names = {proc.pid: log.stem for proc, log in zip(stack.procs, stack.logs)}
    out = dict.fromkeys([*names.values(), "run_worker"], 0.0)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # exited meanwhile
        group = int(fields[2])  # pgrp; the stack's processes lead their own sessions
        if group in names:
            name = "run_worker" if b"bench.recording_launcher" in cmdline else names[group]
            out[name] += (int(fields[11]) + int(fields[12])) / tick
    return {name: round(value, 2) for name, value in out.items()}


def last_run_created(instance: dg.DagsterInstance, backfill_id: str) -> tuple[int, float]:
    """(runs of the backfill, creation time of its last run)."""
    runs = dg.RunsFilter(tags={BACKFILL_TAG: backfill_id})
    count = instance.get_runs_count(runs)
    newest = instance.get_run_records(filters=runs, limit=1, order_by="create_timestamp", ascending=False)
    return count, newest[0].create_timestamp.timestamp() if newest else float("nan")


def launch_summary(records: list[dict], keys: list[str]) -> dict:
    """Runs per asset level, partitions per run, and how often each asset partition was launched."""
    index = {k: i for i, k in enumerate(keys)}
    levels: dict[str, list[int]] = collections.defaultdict(list)
    launched = {asset: collections.Counter() for asset in SHARD_ASSETS}
    for record in records:
        start, end = record["partition_range"]
        shards = keys[index[start]:index[end] + 1]
        assets = sorted(record["partitions"])
        levels["+".join(assets)].append(len(shards))
        for asset in assets:
            launched[asset].update(shards)
    return {
        "runs": len(records),
        "runs_by_level": {level: len(sizes) for level, sizes in levels.items()},
        "partitions_per_run": {level: {"min": min(s), "max": max(s), "mean": round(statistics.mean(s), 2)}
                               for level, s in levels.items()},
        "launched_partitions": {asset: sum(c.values()) for asset, c in launched.items()},
        "distinct_partitions": {asset: len(c) for asset, c in launched.items()},
        "launched_more_than_once": {asset: sum(1 for n in c.values() if n > 1) for asset, c in launched.items()},
        "last_finished_at": max((r["finished_at"] for r in records), default=float("nan")),
        "launcher_seconds": round(sum(r["finished_at"] - r["launched_at"] for r in records), 2),
    }


def query_partition_status(stack: DagsterStack, repeats: int = 3) -> dict:
    """Latency of the asset page's partition queries per asset (first call cold, then warm)."""
    out: dict = {}
    for asset in SHARD_ASSETS:
        seconds, answer = [], None
        for _ in range(repeats):
            answer, elapsed = _timed(stack.graphql, PARTITION_HEALTH, {"assetKey": {"path": [asset]}})
            seconds.append(elapsed)
        statuses = answer["assetNodeOrError"]["assetPartitionStatuses"]
        out[asset] = {"health_query_s": [round(s, 3) for s in seconds],
                      "partition_keys": len(answer["assetNodeOrError"]["partitionKeysByDimension"][0]["partitionKeys"]),
                      "materialized": len(statuses["materializedPartitions"]),
                      "failed": len(statuses["failedPartitions"]),
                      "materializing": len(statuses["materializingPartitions"])}
    stats, elapsed = _timed(stack.graphql, PARTITION_STATS, {"assetKeys": [{"path": [a]} for a in SHARD_ASSETS]})
    out["stats_query_s"] = round(elapsed, 3)
    out["stats"] = {"/".join(n["assetKey"]["path"]): n["partitionStats"] for n in stats["assetNodes"]}
    out["worst_s"] = round(max([elapsed] + [max(out[a]["health_query_s"]) for a in SHARD_ASSETS]), 3)
    return out


def evaluate_instigators(instance: dg.DagsterInstance, keys: list[str], corpus_root: str) -> dict:
    """One in-process evaluation of each sensor and of the retrain schedule's gate against the instance.

    ``prepare_subset_shards`` gets a successful ``prepare_subset`` run per subset to answer, so it builds the
    full backfill subset of every shard (the work it does after a manifest); ``corpus_sensor`` lists an
    empty corpus root (its listing cost is the object store's, not the control plane's)."""
    from pipelines.definitions import defs
    from pipelines.resources import CorpusResource
    from pipelines.schedules import retrain_schedule
    from pipelines.sensors import corpus_sensor, prepare_subset_shards

    repo = defs.get_repository_def()
    subsets = list(dict.fromkeys(subset_of(k) for k in keys))
    for subset in subsets:
        instance.add_run(dg.DagsterRun(job_name="prepare_subset", run_id=str(uuid.uuid4()),
                                       status=dg.DagsterRunStatus.SUCCESS, tags={"dagster/partition": subset}))
    out: dict = {}
    context = dg.build_sensor_context(instance=instance, repository_def=repo)
    result, elapsed = _timed(prepare_subset_shards, context)
    requests = result.run_requests or []
    out["prepare_subset_shards"] = {
        "seconds": round(elapsed, 3), "run_requests": len(requests),
        "asset_partitions": sum(_partition_count(r.asset_graph_subset) for r in requests if r.asset_graph_subset)}
    context = dg.build_sensor_context(instance=instance, repository_def=repo,
                                      resources={"corpus": CorpusResource(root=corpus_root)})
    result, elapsed = _timed(corpus_sensor, context)
    out["corpus_sensor"] = {"seconds": round(elapsed, 3), "run_requests": len(result.run_requests or []),
                            "mode": "listing, empty corpus root"}
    context = dg.build_schedule_context(instance=instance, repository_def=repo,
                                        scheduled_execution_time=datetime.now(timezone.utc))
    result, elapsed = _timed(retrain_schedule, context)
    out["retrain_schedule_gate"] = {"seconds": round(elapsed, 3), "outcome": type(result).__name__,
                                    "skip_message": getattr(result, "skip_message", None)}
    return out


def measure(partitions: int, *, workdir: Path, pg: Postgres, batch: int | None = None, keep: bool = False,
            max_concurrent_runs: int = 200, planned_events: str = "per-partition", timeout: float = 3600,
            idle_window_s: float = 0, metadata: str = "shard", pgbouncer: bool = False, log=print) -> dict:
    """One measurement at ``partitions`` shards on a fresh database (see the module docstring)."""
    if not pgbouncer:
        return _measure(partitions, workdir=workdir, pg=pg, stack_pg=pg, batch=batch, keep=keep,
                        max_concurrent_runs=max_concurrent_runs, planned_events=planned_events, timeout=timeout,
                        idle_window_s=idle_window_s, metadata=metadata, log=log)
    from bench.pgbouncer import PgBouncer

    databases: list[str] = []  # dropped once the bouncer has closed its server connections to it
    try:
        with PgBouncer(pg.host, pg.port, pg.user, pg.password) as bouncer:
            result = _measure(partitions, workdir=workdir, pg=pg,
                              stack_pg=Postgres("127.0.0.1", str(bouncer.port), pg.user, pg.password),
                              batch=batch, keep=True, max_concurrent_runs=max_concurrent_runs,
                              planned_events=planned_events, timeout=timeout, idle_window_s=idle_window_s,
                              metadata=metadata, log=log, created=databases)
    finally:
        if not keep:
            for name in databases:
                pg.drop_database(name)
    result["direct_connect_s"] = round(pg.connect_seconds(), 4)
    return result


def _measure(partitions: int, *, workdir: Path, pg: Postgres, stack_pg: Postgres, batch: int | None, keep: bool,
             max_concurrent_runs: int, planned_events: str, timeout: float, idle_window_s: float, metadata: str,
             log, created: list[str] | None = None) -> dict:
    """``measure`` with the stack (and the in-process instance) connecting through ``stack_pg``; ``pg`` creates,
    sizes and drops the database."""
    from dagster._core.storage.defs_state.base import _current_storage

    home = Path(tempfile.mkdtemp(prefix=f"cp{partitions}-", dir=workdir))
    records_path = home / "launches.jsonl"
    corpus_root = home / "corpus"
    corpus_root.mkdir()
    dbname = pg.create_database()
    if created is not None:
        created.append(dbname)
    saved = {k: os.environ.get(k) for k in stack_pg.env(dbname)}
    os.environ.update(stack_pg.env(dbname))  # the instance config references the connection from the environment
    config = write_bench_instance(home / "home", records_path, max_concurrent_runs, metadata=metadata)
    env = {**stack_pg.env(dbname), "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "COSYVOICE_DATA_ROOT": str(home / "data"), "COSYVOICE_CORPUS_ROOT": str(corpus_root),
           "COSYVOICE_MODEL_ROOT": str(home / "models"), "COSYVOICE_DEPLOYMENT": "embedded",
           "COSYVOICE_EXECUTOR": "in_process"}
    if planned_events == "subset":  # one planned event per asset and run instead of one per partition
        env[PLANNED_EVENTS_ENV] = "true"
    elif planned_events != "per-partition":
        raise ValueError(f"planned_events is 'per-partition' (dagster's default) or 'subset', got {planned_events!r}")
    if batch is not None:  # the deployment's setting (assets/_per_shard.py), read when the code location loads
        env["COSYVOICE_SHARDS_PER_RUN"] = str(batch)
    keys = plan_shard_keys(partitions)
    result: dict = {"partitions": partitions, "asset_partitions": partitions * len(SHARD_ASSETS), "database": dbname,
                    "max_concurrent_runs": max_concurrent_runs,
                    "planned_events": planned_events, "metadata": metadata, "pgbouncer": stack_pg is not pg}
    stack = BenchStack(home / "home", env)
    result["load_average_start"] = round(os.getloadavg()[0], 2)  # 2 shared cores: say how busy they were
    _current_storage.set(None)
    try:
        with dg.DagsterInstance.from_config(str(stack.home)) as instance:
            apply_pool_limits(instance)
            instance.get_runs(limit=1)
            instance.all_instigator_state()
            result["db_empty"] = pg.size(dbname)
            stack.start()  # the servers load while the partitions are registered
            result["register_s"] = round(register_partitions(instance, keys), 2)
            result["db_registered"] = pg.size(dbname)
            stack.wait_ready(timeout=300)
            from assets._per_shard import SHARDS_PER_RUN

            result["shards_per_run"] = batch or SHARDS_PER_RUN  # the stack has the bench's environment
            log(f"[{partitions}] {len(keys)} shards registered in {result['register_s']} s; launching the backfill")
            result["connect_s"] = round(stack_pg.connect_seconds(), 4)
            if idle_window_s:  # what the idle stack alone opens (webserver polling, daemon loops)
                stack.start_daemon()
                time.sleep(5)  # past the daemon's start-up
                first = pg.size(dbname)["sessions"]
                time.sleep(idle_window_s)
                result["idle_sessions_per_s"] = round((pg.size(dbname)["sessions"] - first) / idle_window_s, 2)
            result["db_before_backfill"] = pg.size(dbname)
            cpu_before = cpu_seconds(stack)
            launched_at = time.time()
            backfill_id = stack.launch_backfill(backfill_params(keys, f"control plane {partitions}"))
            result["launch_mutation_s"] = round(time.time() - launched_at, 3)
            if not idle_window_s:
                stack.start_daemon()
            final = wait_for_backfill(instance, backfill_id, timeout, stack)
            runs, last_created = last_run_created(instance, backfill_id)
            result["db_backfilled"] = pg.size(dbname)
            cpu_after = cpu_seconds(stack)
            result["backfill_cpu_s"] = {name: round(cpu_after[name] - cpu_before.get(name, 0.0), 2)
                                        for name in cpu_after}
            result["daemon_cpu_s_per_run"] = round(result["backfill_cpu_s"]["daemon"] / max(runs, 1), 3)
            result["sessions_per_run"] = round((result["db_backfilled"]["sessions"]
                                                - result["db_before_backfill"]["sessions"]) / max(runs, 1), 1)
            records = read_launches(records_path)
            summary = launch_summary([r for r in records if r.get("backfill") == backfill_id], keys)
            result.update(
                backfill_id=backfill_id, backfill_status=final["status"], runs_created=runs,
                all_runs_requested_s=round(last_created - launched_at, 1),
                backfill_completed_s=round((final["end_timestamp"] or time.time()) - launched_at, 1),
                last_run_finished_s=round(summary["last_finished_at"] - launched_at, 1),
                materialized_asset_partitions=final["materialized"], failed_asset_partitions=final["failed"],
                launches=summary)
            log(f"[{partitions}] backfill {final['status']}: {runs} runs, all requested after "
                f"{result['all_runs_requested_s']} s, completed after {result['backfill_completed_s']} s")
            result["partition_status"] = query_partition_status(stack)
            stack.stop()
            result["instigators"] = evaluate_instigators(instance, keys, str(corpus_root))
            result["db_after"] = pg.size(dbname)
            log(f"[{partitions}] partition-status worst {result['partition_status']['worst_s']} s; "
                f"gate {result['instigators']['retrain_schedule_gate']['seconds']} s")
    finally:
        stack.stop()
        _current_storage.set(None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if not keep:
            pg.drop_database(dbname)
    result["load_average_end"] = round(os.getloadavg()[0], 2)
    result["db_growth_bytes"] = result["db_after"]["bytes"] - result["db_registered"]["bytes"]
    result["instance_config"] = {k: v for k, v in config.items() if k != "storage"}
    return result


def per_partition(result: dict) -> float:
    return result["all_runs_requested_s"] / result["asset_partitions"]


def table(results: list[dict], baseline: dict | None) -> str:
    goal_scale = GOAL_PARTITIONS / max(r["partitions"] for r in results)
    lines = [f"{'partitions':>10} {'batch':>5} {'runs':>6} {'requested_s':>11} {'completed_s':>11} "
             f"{'status_q_s':>10} {'sensor_s':>8} {'gate_s':>7} {'db_MB':>7} {'s/1k_ap':>8}"]
    for r in ([baseline] if baseline else []) + results:
        inst = r["instigators"]
        lines.append(f"{r['partitions']:>10} {r['shards_per_run']:>5} {r['runs_created']:>6} "
                     f"{r['all_runs_requested_s']:>11.1f} {r['backfill_completed_s']:>11.1f} "
                     f"{r['partition_status']['worst_s']:>10.2f} {inst['prepare_subset_shards']['seconds']:>8.2f} "
                     f"{inst['retrain_schedule_gate']['seconds']:>7.2f} {r['db_growth_bytes'] / 2**20:>7.1f} "
                     f"{1000 * per_partition(r):>8.3f}")
    main = results[0]
    lines.append("")
    lines.append(f"goals (main run, {main['partitions']} shards = {main['asset_partitions']} asset-partitions):")
    requested_goal = GOALS["all_runs_requested_s"] / goal_scale if goal_scale > 1 else GOALS["all_runs_requested_s"]
    checks = [("all runs requested", main["all_runs_requested_s"], requested_goal),
              ("partition-status query", main["partition_status"]["worst_s"], GOALS["partition_status_query_s"]),
              ("prepare_subset_shards tick", main["instigators"]["prepare_subset_shards"]["seconds"],
               GOALS["sensor_tick_s"]),
              ("corpus_sensor tick", main["instigators"]["corpus_sensor"]["seconds"], GOALS["sensor_tick_s"]),
              ("retrain gate", main["instigators"]["retrain_schedule_gate"]["seconds"], GOALS["schedule_gate_s"])]
    for name, value, goal in checks:
        lines.append(f"  {name:<28} {value:9.2f} s  goal <= {goal:7.1f} s  ratio {value / goal:5.2f}  "
                     f"{'ok' if value <= goal else 'MISSED'}")
    if baseline:
        lines.append(f"  per-asset-partition request cost vs baseline ({baseline['partitions']} shards): "
                     f"{per_partition(main) / per_partition(baseline):.2f}x (1.0 = linear)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--partitions", type=int, default=GOAL_PARTITIONS, help="shard partitions (default 50000)")
    parser.add_argument("--batch", type=int, action="append",
                        help="shards per backfill run, COSYVOICE_SHARDS_PER_RUN on the stack (repeatable: one "
                             "measurement each; default: the project's SHARDS_PER_RUN)")
    parser.add_argument("--baseline", type=int, default=None,
                        help="partitions of the baseline measured first (default partitions/10; 0 = none)")
    parser.add_argument("--max-concurrent-runs", type=int, default=200,
                        help="run queue limit (the launcher finishes runs at once, so this caps launches per dequeue)")
    parser.add_argument("--planned-events", choices=("per-partition", "subset"), default="per-partition",
                        help=f"per-partition: dagster's default; subset: {PLANNED_EVENTS_ENV}=true on the stack")
    parser.add_argument("--metadata", choices=("run", "shard"), default="shard",
                        help="shard: each partition's materialization carries its own shard's report (the assets, "
                             "assets/_per_shard.add_shard_metadata); run: the whole run's, copied into every "
                             "partition's event (the assets before that change)")
    parser.add_argument("--idle-window", type=float, default=20,
                        help="seconds of an idle stack measured for its own PostgreSQL sessions (0: none; then the "
                             "daemon starts after the backfill is launched, so its first backfill iteration takes it)")
    parser.add_argument("--pgbouncer", action="store_true",
                        help="the stack connects through a PgBouncer (session pooling, bench/pgbouncer.py), as the "
                             "Kubernetes deployment does (k8s/pgbouncer.yaml)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for a backfill")
    parser.add_argument("--workdir", default=None, help="DAGSTER_HOMEs and launch records (default: a tmp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the databases (their names are in the JSON)")
    parser.add_argument("--json", help="write the figures as JSON to this path")
    args = parser.parse_args(argv)
    pg = Postgres.from_env()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="control-plane-"))
    workdir.mkdir(parents=True, exist_ok=True)
    batches = args.batch or [None]
    common = dict(workdir=workdir, pg=pg, keep=args.keep, max_concurrent_runs=args.max_concurrent_runs,
                  planned_events=args.planned_events, idle_window_s=args.idle_window, metadata=args.metadata,
                  timeout=args.timeout, pgbouncer=args.pgbouncer)
    baseline_n = args.partitions // 10 if args.baseline is None else args.baseline
    baseline = measure(baseline_n, batch=batches[0], **common) if baseline_n else None
    results = [measure(args.partitions, batch=b, **common) for b in batches]
    print(table(results, baseline))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "command": " ".join(["python", "bench/control_plane.py", *(argv if argv is not None else sys.argv[1:])]),
            "goals": GOALS, "baseline": baseline, "results": results,
            "per_partition_ratio_vs_baseline": (per_partition(results[0]) / per_partition(baseline)
                                                if baseline else None),
        }, indent=2))


if __name__ == "__main__":
    main()
