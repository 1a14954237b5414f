"""The control-plane harness (bench/control_plane.py) at 5000 shard partitions: the project's Definitions on
PostgreSQL with the real webserver, daemon and run queue, runs finished by the recording launcher.

One backfill of the three per-shard assets over every shard, launched through GraphQL as the UI does,
requests each asset partition exactly once in ceil(5000 / batch) runs; the asset page's partition-status
queries count every shard; the sensors and the retrain gate evaluate against the grown instance.
The 50k-shard figures come from ``python bench/control_plane.py`` (bench/results/control_plane.json).
"""

import math
import os

import pytest

from bench.control_plane import SHARD_ASSETS, Postgres, measure
from bench.pgbouncer import pgbouncer_binary
from cosyvoice.corpus.manifest import LIBRITTS_SUBSETS

SHARDS = 5000
BATCH = 1000  # five runs: the harness' path at a size the suite affords (the 50k run: bench/results)
PG = Postgres(host="127.0.0.1", port=os.environ.get("COSYVOICE_TEST_PG_PORT", "5432"),
              user=os.environ.get("COSYVOICE_TEST_PG_USER", "dagster"),
              password=os.environ.get("COSYVOICE_TEST_PG_PASSWORD", "dagster"))


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    import psycopg2

    try:
        PG.connect().close()
    except psycopg2.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable on {PG.host}:{PG.port} as {PG.user} (run .ci/postgres as root): {exc}")
    try:
        pgbouncer_binary()
    except SystemExit as exc:
        pytest.skip(str(exc))
    # the stack connects as the Kubernetes deployment does: through a PgBouncer (k8s/pgbouncer.yaml)
    return measure(SHARDS, workdir=tmp_path_factory.mktemp("control-plane"), pg=PG, batch=BATCH,
                   planned_events="subset", metadata="shard", pgbouncer=True, timeout=240, log=lambda _: None)


@pytest.mark.slow
def test_a_backfill_over_5000_shards_requests_every_asset_partition_once_in_ceil_n_over_batch_runs(measured):
    assert measured["backfill_status"] == "COMPLETED_SUCCESS"
    launches = measured["launches"]
    # speaker_embeddings, speech_tokens and parquet_shards share partitions and policy: one run takes all three
    assert launches["runs_by_level"] == {"+".join(sorted(SHARD_ASSETS)): math.ceil(SHARDS / BATCH)}
    assert measured["runs_created"] == math.ceil(SHARDS / BATCH)
    assert launches["distinct_partitions"] == dict.fromkeys(SHARD_ASSETS, SHARDS)
    assert launches["launched_partitions"] == dict.fromkeys(SHARD_ASSETS, SHARDS)
    assert launches["launched_more_than_once"] == dict.fromkeys(SHARD_ASSETS, 0)
    assert measured["materialized_asset_partitions"] == SHARDS * len(SHARD_ASSETS)
    assert measured["failed_asset_partitions"] == 0
    assert 0 < measured["all_runs_requested_s"] <= measured["last_run_finished_s"] <= measured["backfill_completed_s"]


@pytest.mark.slow
def test_the_asset_pages_partition_queries_count_every_shard(measured):
    status = measured["partition_status"]
    for asset in SHARD_ASSETS:
        assert status[asset]["partition_keys"] == SHARDS
        counts = status[asset]
        assert (counts["materialized"], counts["failed"], counts["materializing"]) == (SHARDS, 0, 0)
        assert status["stats"][asset] == {"numMaterialized": SHARDS, "numMaterializing": 0, "numPartitions": SHARDS,
                                          "numFailed": 0}


@pytest.mark.slow
def test_sensors_and_the_retrain_gate_evaluate_against_the_grown_instance(measured):
    instigators = measured["instigators"]
    # a successful prepare_subset run per subset: one backfill request each over its shards + per-subset assets
    shards = instigators["prepare_subset_shards"]
    assert shards["run_requests"] == len(LIBRITTS_SUBSETS)
    assert shards["asset_partitions"] == SHARDS * len(SHARD_ASSETS) + 2 * len(LIBRITTS_SUBSETS)
    assert instigators["corpus_sensor"]["run_requests"] == 0  # an empty corpus root
    # every check evaluation the runs stored passed, so the gate lets retraining run
    assert instigators["retrain_schedule_gate"]["outcome"] == "RunRequest"
    grown = measured["db_after"]["rows"]
    assert grown["dynamic_partitions"] == SHARDS
    assert grown["runs"] >= math.ceil(SHARDS / BATCH)
    assert measured["db_growth_bytes"] > 0


@pytest.mark.slow
def test_through_pgbouncer_the_stack_reuses_server_connections(measured):
    """dagster-postgres connects once per storage call (~110 per run measured directly); the bouncer turns
    those into a handful of PostgreSQL sessions, and a connect costs less than one to PostgreSQL itself."""
    assert measured["pgbouncer"] is True
    assert measured["sessions_per_run"] < 20
    assert measured["connect_s"] < measured["direct_connect_s"]


def test_shards_per_run_is_a_deployment_setting_with_a_clear_error(monkeypatch):
    from assets._per_shard import shards_per_run

    monkeypatch.delenv("COSYVOICE_SHARDS_PER_RUN", raising=False)
    assert shards_per_run() == 8
    monkeypatch.setenv("COSYVOICE_SHARDS_PER_RUN", "100")
    assert shards_per_run() == 100
    for bad, says in (("0", ">= 1"), ("lots", "must be an integer")):
        monkeypatch.setenv("COSYVOICE_SHARDS_PER_RUN", bad)
        with pytest.raises(ValueError, match=says):
            shards_per_run()
