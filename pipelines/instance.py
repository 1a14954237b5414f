"""The Dagster instance of the embedded deployment: ``dagster.yaml`` and the pool limits.

``python -m pipelines.instance`` writes ``$DAGSTER_HOME/dagster.yaml`` when there is none (sqlite,
or PostgreSQL with ``--postgres``; the connection comes from ``DAGSTER_PG_*`` variables, the
password is referenced, never written) and then sets the concurrency limit of the ``gpu`` pool
from ``COSYVOICE_GPU_POOL_LIMIT`` (default 1: one GPU step at a time per instance). ``make ui``
runs it; on Kubernetes the same command runs as a Job (``k8s/pool-limits-job.yaml``).
"""

import argparse
import os
from pathlib import Path

import dagster as dg
import yaml

GPU_POOL = "gpu"


def positive_int_env(name: str, default: int, why: str) -> int:
    """An integer >= 1 from the environment variable ``name``; ``why`` says what a smaller value would mean."""
    value = os.environ.get(name, str(default))
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{name} must be >= 1 ({why}), got {number}")
    return number


def gpu_pool_limit() -> int:
    return positive_int_env("COSYVOICE_GPU_POOL_LIMIT", 1, "0 would block every GPU step")


def postgres_storage() -> dict:
    """``storage.postgres`` from the environment. The scheme is explicit: SQLAlchemy 2.1 maps a bare
    ``postgresql://`` to psycopg 3, while dagster-postgres ships psycopg2."""
    return {"postgres": {"postgres_db": {
        "hostname": os.environ.get("DAGSTER_PG_HOST", "127.0.0.1"),
        "port": int(os.environ.get("DAGSTER_PG_PORT", "5432")),
        "db_name": os.environ.get("DAGSTER_PG_DB", "dagster"),
        "username": os.environ.get("DAGSTER_PG_USER", "dagster"),
        "password": {"env": "DAGSTER_PG_PASSWORD"},
        "scheme": "postgresql+psycopg2",
    }}}


def instance_config(*, postgres: bool = False, max_concurrent_runs: int = 4) -> dict:
    """Queued runs, op-granularity pools (``pool_slots`` and per-step GPU limits work), run monitoring
    so a crashed or cancelled run frees its pool slots, and automatic retries of crashed runs only
    (asset failures are handled by the per-asset RetryPolicy)."""
    config = {
        "run_coordinator": {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator"},
        "concurrency": {"runs": {"max_concurrent_runs": max_concurrent_runs},
                        "pools": {"granularity": "op"}},
        "run_monitoring": {"enabled": True, "free_slots_after_run_end_seconds": 300},
        "run_retries": {"enabled": True, "max_retries": 2, "retry_on_asset_or_op_failure": False},
        "telemetry": {"enabled": False},
    }
    if postgres:
        config["storage"] = postgres_storage()
    return config


def write_instance_yaml(home: str | os.PathLike, *, postgres: bool = False, overwrite: bool = False) -> Path:
    path = Path(home) / "dagster.yaml"
    if overwrite or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(instance_config(postgres=postgres), sort_keys=False))
    return path


def apply_pool_limits(instance: dg.DagsterInstance, limits: dict[str, int] | None = None) -> dict[str, int]:
    """Set each pool's slot count on the instance (idempotent); returns what was set."""
    limits = {GPU_POOL: gpu_pool_limit()} if limits is None else limits
    for pool, limit in limits.items():
        instance.event_log_storage.set_concurrency_slots(pool, limit)
    return limits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.instance", description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", default=os.environ.get("DAGSTER_HOME"), help="DAGSTER_HOME (default: $DAGSTER_HOME)")
    parser.add_argument("--postgres", action="store_true", help="write PostgreSQL storage into a new dagster.yaml")
    parser.add_argument("--no-yaml", action="store_true", help="leave dagster.yaml alone (e.g. the Helm chart owns it)")
    args = parser.parse_args(argv)
    if not args.home:
        parser.error("set DAGSTER_HOME or pass --home")
    if not args.no_yaml:
        print(f"instance config: {write_instance_yaml(args.home, postgres=args.postgres)}")
    with dg.DagsterInstance.from_config(args.home) as instance:
        for pool, limit in apply_pool_limits(instance).items():
            print(f"pool {pool!r}: {limit} slot(s)")


if __name__ == "__main__":
    main()
