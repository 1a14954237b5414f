"""A real instance: dagster-webserver + dagster-daemon on 127.0.0.1 with sqlite and with PostgreSQL
storage. On each: ``dagster asset materialize --partition`` registers the shards, then a GraphQL
``launchPartitionBackfill`` (the UI's backfill button) over a range of shard partitions runs to
success in as many runs as the assets' ``BackfillPolicy.multi_run`` allows.

Both stacks start at once and their backfills overlap. Their daemons tick backfills every
``BACKFILL_INTERVAL_S`` (dagster's is 30 s) and dequeue runs every second (5 s by default): waiting on
those ticks, not work, was most of this module's wall time.
"""

import json
import math
import os
import shutil
import time
import uuid
from pathlib import Path

import dagster as dg
import pytest
import yaml

from assets.features import SHARDS_PER_RUN
from pipelines.instance import apply_pool_limits, write_instance_yaml
from tests.pipelines.dagster_stack import DagsterStack, stop_stacks

SHARD_COUNT = 15  # clean_corpus: 3 speakers x 5 utterances, one utterance per shard
FIRST, LAST = 2, 11  # the backfilled range: 10 shards
BACKFILLED = [f"dev-clean-{i:06d}" for i in range(FIRST, LAST + 1)]
GPU_POOL_LIMIT = 1
PREPARED = "train-clean-100"  # prepared through the prepare_subset job on the sqlite stack
BACKFILL_INTERVAL_S = 3
PG = {"host": "127.0.0.1", "port": os.environ.get("COSYVOICE_TEST_PG_PORT", "5432"),
      "user": os.environ.get("COSYVOICE_TEST_PG_USER", "dagster"),
      "password": os.environ.get("COSYVOICE_TEST_PG_PASSWORD", "dagster")}


@pytest.fixture(scope="module")
def postgres_env():
    """A fresh database on the local PostgreSQL (``.ci/postgres`` sets one up), dropped afterwards."""
    import psycopg2

    try:
        admin = psycopg2.connect(dbname="postgres", connect_timeout=3, **PG)
    except psycopg2.OperationalError as exc:
        yield f"PostgreSQL not reachable on {PG['host']}:{PG['port']} as {PG['user']} (run .ci/postgres as root): {exc}"
        return
    admin.autocommit = True
    name = f"dagster_test_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    yield {"DAGSTER_PG_HOST": PG["host"], "DAGSTER_PG_PORT": PG["port"], "DAGSTER_PG_USER": PG["user"],
           "DAGSTER_PG_PASSWORD": PG["password"], "DAGSTER_PG_DB": name}
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def _instance(stack: DagsterStack) -> dg.DagsterInstance:
    os.environ.update({k: v for k, v in stack.env.items() if k.startswith("DAGSTER_PG_")})
    return dg.DagsterInstance.from_config(str(stack.home))


@pytest.fixture(scope="module")
def corpus_root(clean_corpus, broken_corpus, tmp_path_factory) -> str:
    """dev-clean from the clean corpus (the backfilled shards), train-clean-100 from the broken one
    (prepared through the prepare_subset job, quarantining its broken files)."""
    root = tmp_path_factory.mktemp("instance-corpus") / "LibriTTS"
    shutil.copytree(os.path.join(clean_corpus, "dev-clean"), root / "dev-clean")
    shutil.copytree(os.path.join(broken_corpus, "train-clean-100"), root / "train-clean-100")
    return str(root)


@pytest.fixture(scope="module")
def stacks(corpus_root, tiny_models, tmp_path_factory, postgres_env):
    stacks, skipped = {}, {}
    for storage in ("sqlite", "postgres"):
        if storage == "postgres" and isinstance(postgres_env, str):
            skipped[storage] = postgres_env
            continue
        root = tmp_path_factory.mktemp(f"instance-{storage}")
        env = {"COSYVOICE_DATA_ROOT": str(root / "data"), "COSYVOICE_CORPUS_ROOT": corpus_root,
               "COSYVOICE_MODEL_ROOT": tiny_models, "COSYVOICE_GPU_POOL_LIMIT": str(GPU_POOL_LIMIT),
               "COSYVOICE_DEPLOYMENT": "embedded", "COSYVOICE_EXECUTOR": "in_process", **(postgres_env if storage == "postgres" else {})}
        stack = DagsterStack(root / "home", env, backfill_interval_s=BACKFILL_INTERVAL_S)
        if storage == "postgres":
            os.environ.update(postgres_env)  # write_instance_yaml reads the connection from the environment
        instance_yaml = write_instance_yaml(stack.home, postgres=storage == "postgres")
        config = yaml.safe_load(instance_yaml.read_text())
        config["run_coordinator"]["config"] = {"dequeue_interval_seconds": 1}
        instance_yaml.write_text(yaml.safe_dump(config, sort_keys=False))
        (stack.home / "manifest.yaml").write_text("ops:\n  manifest:\n    config:\n      utts_per_shard: 1\n")
        with _instance(stack) as instance:  # creates the storage before several processes race to do it
            apply_pool_limits(instance)
            instance.get_runs(limit=1)
            instance.all_instigator_state()
        stacks[storage] = stack.start()
    try:
        clis = {storage: stack.dagster_async(
                    "asset", "materialize", "-m", "pipelines.definitions", "--select", "manifest",
                    "--partition", "dev-clean", "-c", str(stack.home / "manifest.yaml"))
                for storage, stack in stacks.items()}
        results = {}
        for storage, stack in stacks.items():
            cli = stack.finish(clis[storage])
            stack.wait_ready()
            backfill = None
            if cli.returncode == 0:
                backfill = stack.launch_backfill({
                    "partitionsByAssets": [
                        {"assetKey": {"path": [asset]},
                         "partitions": {"range": {"start": BACKFILLED[0], "end": BACKFILLED[-1]}}}
                        for asset in ("speaker_embeddings", "speech_tokens")],
                    "title": f"test backfill ({storage})",
                })
            results[storage] = (stack, cli, backfill)
        # the job a person or the corpus sensor launches; its success sensor backfills the subset's shards
        launch = stacks["sqlite"].dagster("job", "launch", "-w", str(stacks["sqlite"].home / "workspace.yaml"),
                                          "-j", "prepare_subset", "--tags", json.dumps({"dagster/partition": PREPARED}))
        assert launch.returncode == 0, launch.stderr[-3000:]
        yield results, skipped
    finally:  # nothing left to check in them: a short grace, both stacks at once
        stop_stacks(stacks.values(), grace=5)


def _get(stacks, storage):
    results, skipped = stacks
    if storage in skipped:
        pytest.skip(skipped[storage])
    return results[storage]


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["sqlite", "postgres"])
def test_cli_materializes_a_subset_partition_and_registers_its_shards(stacks, storage):
    stack, cli, _ = _get(stacks, storage)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "RUN_SUCCESS" in cli.stdout + cli.stderr
    with _instance(stack) as instance:
        shards = [k for k in instance.get_dynamic_partitions("shards") if k.startswith("dev-clean-")]
        assert shards == [f"dev-clean-{i:06d}" for i in range(SHARD_COUNT)]
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == GPU_POOL_LIMIT
        storage_class = type(instance.run_storage).__name__
    assert storage_class == {"sqlite": "SqliteRunStorage", "postgres": "PostgresRunStorage"}[storage]


@pytest.mark.slow
def test_browser_shows_every_asset_of_the_graph(stacks, tmp_path):
    """Headless Chromium opens the global asset lineage, expands the groups and finds each asset node.
    ``COSYVOICE_UPDATE_SCREENSHOTS=1`` also writes the screenshot to docs/img/ for the README."""
    from tests.pipelines.browser import Browser, chromium_binary

    if chromium_binary() is None:
        pytest.skip("chromium is not installed (Debian package `chromium`: `make sysdeps` as root)")
    stack, _, _ = _get(stacks, "sqlite")
    stack.wait_ready()
    from pipelines.definitions import defs

    names = sorted(k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys())
    nodes = "Array.from(document.querySelectorAll('foreignObject')).map(f => f.outerHTML).join(' ')"
    missing_js = f"(() => {{ const t = {nodes}; return {json.dumps(names)}.filter(n => !t.includes(n)) }})()"
    skip_dialog = ("(() => { const b = Array.from(document.querySelectorAll('button'))"
                   ".find(x => x.innerText.trim() === 'Skip'); if (b) b.click(); return !!b })()")
    browser = Browser(width=6400, height=2400)  # large enough for full (unabridged) asset nodes of the whole graph
    try:
        browser.open(f"{stack.url}/asset-groups")
        browser.wait_for(skip_dialog, timeout=20)  # the community dialog of a fresh profile
        assert browser.wait_for("document.querySelectorAll('foreignObject').length > 0", timeout=60)
        for _ in range(10):  # groups start collapsed: open each (the UI remembers it in localStorage)
            if not browser.evaluate("(() => { const g = document.querySelectorAll('[class*=collapsedGroupNodeBox]');"
                                    " g.forEach(x => x.click()); return g.length })()"):
                break
            time.sleep(0.5)
        browser.call("Page.reload")  # re-fit the expanded graph to the window
        time.sleep(1)
        browser.wait_for(skip_dialog, timeout=5)
        browser.wait_for(f"{missing_js}.length === 0", timeout=60)
        missing = browser.evaluate(missing_js)
        shot = tmp_path / "asset-graph.png"
        browser.screenshot(str(shot))
    finally:
        browser.close()
    assert missing == [], f"asset nodes not on the page: {missing}"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    if os.environ.get("COSYVOICE_UPDATE_SCREENSHOTS") == "1":
        target = Path(__file__).resolve().parents[2] / "docs" / "img" / "asset-graph.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["sqlite", "postgres"])
def test_graphql_backfill_of_a_shard_range_succeeds_in_multi_run_batches(stacks, storage):
    stack, cli, backfill = _get(stacks, storage)
    assert backfill, cli.stderr[-3000:]
    state = stack.wait_backfill(backfill)
    assert state["status"] == "COMPLETED_SUCCESS", state
    runs = state["runs"]
    assert {r["status"] for r in runs} == {"SUCCESS"}
    # BackfillPolicy.multi_run(8) on both assets (same partitions, same policy): ceil(10 / 8) runs,
    # each over a contiguous key range of at most 8 shards, together exactly the requested range
    assert len(runs) == math.ceil(len(BACKFILLED) / SHARDS_PER_RUN) == 2
    covered = []
    for run in runs:
        tags = {t["key"]: t["value"] for t in run["tags"]}
        first, last = tags["dagster/asset_partition_range_start"], tags["dagster/asset_partition_range_end"]
        keys = BACKFILLED[BACKFILLED.index(first):BACKFILLED.index(last) + 1]
        assert 1 <= len(keys) <= SHARDS_PER_RUN and tags["dagster/backfill"] == backfill
        covered += keys
    assert sorted(covered) == BACKFILLED
    data = stack.home.parent / "data"
    for stage in ("speaker_embeddings", "speech_tokens"):
        written = sorted(p.stem for p in (data / stage / "dev-clean").glob("*.parquet"))
        assert written == BACKFILLED, stage
    with _instance(stack) as instance:
        for asset in ("speaker_embeddings", "speech_tokens"):
            materialized = instance.get_materialized_partitions(dg.AssetKey(asset))
            assert {k for k in materialized if k.startswith("dev-clean-")} == set(BACKFILLED)


@pytest.mark.slow
def test_a_prepare_subset_run_is_followed_by_a_backfill_of_that_subsets_shards(stacks):
    """prepare_subset (manifest) -> sensor prepare_subset_shards -> one asset backfill over the subset's
    shards -> features, speaker means, .pt files and parquet shards, through the real daemon."""
    stack, _, _ = _get(stacks, "sqlite")
    deadline = time.time() + 420
    backfill = None
    while time.time() < deadline:
        with _instance(stack) as instance:
            backfills = [b for b in instance.get_backfills() if b.tags.get("cosyvoice/subset") == PREPARED]
            runs = instance.get_runs(filters=dg.RunsFilter(job_name="prepare_subset"))
            shards = [k for k in instance.get_dynamic_partitions("shards") if k.startswith(PREPARED)]
        if backfills and backfills[0].status.value.startswith("COMPLETED"):
            backfill = backfills[0]
            break
        time.sleep(1)
    assert backfill is not None, f"no finished backfill for {PREPARED}:\n{stack.tail(stack.logs[-1])}"
    assert [r.status for r in runs] == [dg.DagsterRunStatus.SUCCESS]
    assert backfill.status.value == "COMPLETED_SUCCESS" and backfill.tags["cosyvoice/after_run"] == runs[0].run_id
    assert shards == [f"{PREPARED}-000000"]
    data = stack.home.parent / "data"
    assert (data / "speech_tokens" / PREPARED / f"{PREPARED}-000000.parquet").exists()
    assert (data / "manifest" / PREPARED / "utt2speech_token.pt").exists()
    assert (data / "parquet" / PREPARED / "parquet_000000000.tar").exists()
