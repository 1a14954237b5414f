"""Jobs, schedule, sensors, retries and pool limits, evaluated in process against test instances."""

import json
import os
import shutil
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer

import dagster as dg
import pytest

from assets.manifest import manifest
from assets.shards import training_data_lists
from pipelines.definitions import defs
from pipelines.instance import apply_pool_limits, gpu_pool_limit, write_instance_yaml
from pipelines.jobs import retrain_selection
from pipelines.partitions import SHARDS
from pipelines.resources import CorpusResource, DataStore
from pipelines.retries import is_transient, retry_transient_only
from pipelines.schedules import RETRAIN_CRON, failing_checks, gate_check_keys, retrain_schedule
from pipelines.sensors import corpus_sensor, prepare_subset_shards, report_run_failures


def keys(selection_or_job, definitions=defs):
    graph = definitions.resolve_asset_graph()
    return {k.to_user_string() for k in selection_or_job.resolve(graph)}


def test_retrain_job_includes_the_data_lists_and_every_training_group_asset():
    assert "training_data_lists" in keys(retrain_selection)
    assert defs.resolve_job_def("retrain") is not None

    @dg.asset(group_name="training", deps=[training_data_lists])
    def fake_checkpoint() -> None: ...

    @dg.asset(group_name="training", deps=[fake_checkpoint])
    def fake_average() -> None: ...

    extended = dg.Definitions(assets=[*defs.assets, fake_checkpoint, fake_average], jobs=list(defs.jobs),
                              resources=defs.resources)
    graph = extended.resolve_asset_graph()
    training_group = {k.to_user_string() for k in dg.AssetSelection.groups("training").resolve(graph)}
    assert {"fake_checkpoint", "fake_average"} <= training_group
    assert keys(retrain_selection, extended) == {"training_data_lists"} | training_group
    job_keys = extended.resolve_job_def("retrain").asset_layer.executable_asset_keys
    assert {k.to_user_string() for k in job_keys} == {"training_data_lists"} | training_group
    assert not {"manifest", "speech_tokens", "parquet_shards"} & {k.to_user_string() for k in job_keys}


def test_prepare_subset_is_partitioned_by_subset_and_the_schedule_is_weekly_by_default():
    job = defs.resolve_job_def("prepare_subset")
    assert job.partitions_def.get_partition_keys()[0] == "dev-clean"
    assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == {"manifest"}
    assert RETRAIN_CRON == "0 3 * * 0" and retrain_schedule.cron_schedule == "0 3 * * 0"
    gate = {k.to_user_string() for k in gate_check_keys(defs.resolve_asset_graph())}
    assert {"manifest:wavs_exist", "speech_tokens:codes_in_vocabulary", "parquet_shards:row_count"} <= gate


def test_corpus_sensor_requests_new_subsets_then_only_changed_ones(broken_corpus, tmp_path):
    corpus = tmp_path / "LibriTTS"
    shutil.copytree(os.path.join(broken_corpus, "dev-clean"), corpus / "dev-clean")
    (corpus / "not-a-subset").mkdir()
    resource = CorpusResource(root=str(corpus))
    with dg.instance_for_test() as instance:
        def tick(cursor):
            context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"corpus": resource})
            result = corpus_sensor(context)
            return [r.partition_key for r in result.run_requests], result.cursor

        first, cursor = tick(None)
        assert first == ["dev-clean"]
        assert tick(cursor)[0] == []
        shutil.copytree(os.path.join(broken_corpus, "train-clean-100"), corpus / "train-clean-100")
        second, cursor = tick(cursor)
        assert second == ["train-clean-100"]
        wav = next(corpus.joinpath("dev-clean").rglob("*.wav"))
        data = bytearray(wav.read_bytes())
        data[-1] ^= 0xFF  # same size, new content (and mtime)
        time.sleep(0.01)
        wav.write_bytes(bytes(data))
        third, cursor = tick(cursor)
        assert third == ["dev-clean"]
        assert tick(cursor)[0] == []


def test_corpus_sensor_works_on_s3(broken_corpus, s3_bucket, s3_server):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.put(os.path.join(broken_corpus, "dev-clean"), f"{s3_bucket}/LibriTTS/", recursive=True)
    resource = CorpusResource(root=f"s3://{s3_bucket}/LibriTTS")
    with dg.instance_for_test() as instance:
        result = corpus_sensor(dg.build_sensor_context(instance=instance, resources={"corpus": resource}))
        assert [r.partition_key for r in result.run_requests] == ["dev-clean"]
        cursor = result.cursor
        again = corpus_sensor(dg.build_sensor_context(instance=instance, cursor=cursor, resources={"corpus": resource}))
        assert again.run_requests == []
        path = sorted(p for p in fs.find(f"{s3_bucket}/LibriTTS/dev-clean") if p.endswith(".wav"))[0]
        fs.pipe(path, fs.cat(path)[:-2] + b"\x01\x02")  # same size, new ETag
        changed = corpus_sensor(dg.build_sensor_context(instance=instance, cursor=cursor,
                                                        resources={"corpus": resource}))
        assert [r.partition_key for r in changed.run_requests] == ["dev-clean"]


def _run_and_event(instance, job_name, partition, status):
    tags = {"dagster/partition": partition} if partition else {}
    run = instance.create_run_for_job(defs.resolve_job_def(job_name), tags=tags, status=status)
    event = dg.DagsterEvent(
        event_type_value=(dg.DagsterEventType.RUN_SUCCESS if status == dg.DagsterRunStatus.SUCCESS
                          else dg.DagsterEventType.RUN_FAILURE).value,
        job_name=job_name, message="boom: the manifest step failed")
    return run, event


def test_a_successful_prepare_subset_run_requests_a_backfill_of_exactly_that_subsets_shards():
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(SHARDS.name, ["dev-clean-000000", "dev-clean-000001", "test-clean-000000"])

        def tick(cursor):
            return prepare_subset_shards(dg.build_sensor_context(instance=instance, cursor=cursor,
                                                                 repository_def=defs.get_repository_def()))

        first = tick(None)
        assert first.run_requests == [] and first.skip_reason
        run, _ = _run_and_event(instance, "prepare_subset", "dev-clean", dg.DagsterRunStatus.SUCCESS)
        _run_and_event(instance, "prepare_subset", "test-clean", dg.DagsterRunStatus.FAILURE)
        second = tick(first.cursor)
        (request,) = second.run_requests
        assert request.requires_backfill_daemon() and request.tags["cosyvoice/after_run"] == run.run_id
        wanted = {(k.asset_key.to_user_string(), k.partition_key)
                  for k in request.asset_graph_subset.iterate_asset_partitions()}
        assert wanted == {(a, s) for a in ("speaker_embeddings", "speech_tokens", "parquet_shards")
                          for s in ("dev-clean-000000", "dev-clean-000001")} | {
            ("speaker_means", "dev-clean"), ("upstream_feature_files", "dev-clean")}
        # the sensor daemon accepts it: a backfill request inside the sensor's asset selection
        prepare_subset_shards.validate_backfill_requests(
            second.run_requests, dg.build_sensor_context(instance=instance, repository_def=defs.get_repository_def()))
        assert tick(second.cursor).run_requests == []


class _Hook(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802 (http.server API)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append((self.headers["Content-Type"], json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_run_failure_sensor_logs_and_posts_to_the_webhook(monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("COSYVOICE_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{server.server_port}/hook")
    monkeypatch.setenv("COSYVOICE_UI_URL", "http://dagster.example:3000/")
    try:
        with dg.instance_for_test() as instance:
            run, event = _run_and_event(instance, "prepare_subset", "dev-clean", dg.DagsterRunStatus.FAILURE)
            context = dg.build_run_status_sensor_context(
                sensor_name="report_run_failures", dagster_event=event, dagster_instance=instance,
                dagster_run=run).for_run_failure()
            report_run_failures(context)
    finally:
        server.shutdown()
    (content_type, payload), = _Hook.received
    assert content_type == "application/json"
    assert payload["run_id"] == run.run_id and payload["job"] == "prepare_subset"
    assert payload["partition"] == "dev-clean" and "boom" in payload["error"]
    assert payload["text"].startswith("Dagster run failed: job prepare_subset, partition dev-clean")
    assert f"http://dagster.example:3000/runs/{run.run_id}" in payload["text"]


def test_run_failure_sensor_surfaces_an_unreachable_webhook(monkeypatch):
    monkeypatch.setenv("COSYVOICE_ALERT_WEBHOOK_URL", "http://127.0.0.1:9/unreachable")
    with dg.instance_for_test() as instance:
        run, event = _run_and_event(instance, "retrain", None, dg.DagsterRunStatus.FAILURE)
        context = dg.build_run_status_sensor_context(
            sensor_name="report_run_failures", dagster_event=event, dagster_instance=instance,
            dagster_run=run).for_run_failure()
        with pytest.raises(RuntimeError, match="COSYVOICE_ALERT_WEBHOOK_URL: POST of the failure of run"):
            report_run_failures(context)


def test_retrain_schedule_waits_while_a_blocking_upstream_check_fails(clean_corpus, tmp_path, monkeypatch):
    import assets.manifest as module
    from cosyvoice.corpus.checks import CheckOutcome, check_data_dir

    resources = {"corpus": CorpusResource(root=clean_corpus), "store": DataStore(root=str(tmp_path))}
    graph = defs.resolve_asset_graph()
    with dg.instance_for_test() as instance:
        context = dg.build_schedule_context(instance=instance, repository_def=defs.get_repository_def(),
                                            scheduled_execution_time=datetime(2026, 11, 29, 3, tzinfo=timezone.utc))
        assert isinstance(retrain_schedule(context), dg.RunRequest)  # nothing evaluated yet: nothing fails

        def damaged(url):
            outcomes = check_data_dir(url)
            outcomes["wavs_exist"] = CheckOutcome(False, "1 wav.scp path missing", ["/gone.wav"])
            return outcomes

        monkeypatch.setattr(module, "check_data_dir", damaged)
        dg.materialize([manifest], partition_key="dev-clean", instance=instance, resources=resources)
        assert failing_checks(instance, graph) == {"manifest:wavs_exist": ["dev-clean"]}
        skipped = retrain_schedule(context)
        assert isinstance(skipped, dg.SkipReason)
        assert "manifest:wavs_exist: dev-clean" in skipped.skip_message

        monkeypatch.setattr(module, "check_data_dir", check_data_dir)
        dg.materialize([manifest], partition_key="dev-clean", instance=instance, resources=resources)
        assert failing_checks(instance, graph) == {}
        request = retrain_schedule(context)
        assert isinstance(request, dg.RunRequest) and request.tags["cosyvoice/trigger"] == "schedule"
        assert request.run_key == "retrain-20261129T0300"


def test_only_transient_errors_are_retried_with_backoff():
    assert is_transient(ConnectionResetError("reset by peer"))
    assert is_transient(OSError(5, "An error occurred (SlowDown) when calling the PutObject operation"))
    wrapped = RuntimeError("while writing shard")
    wrapped.__cause__ = TimeoutError("read timed out")
    assert is_transient(wrapped)
    assert not is_transient(FileNotFoundError("s3://b/x.wav"))
    assert not is_transient(ValueError("WAV header declares 0 frames"))

    attempts = {"flaky": 0, "broken": 0}

    def make(name, exc):
        @dg.asset(name=name, retry_policy=dg.RetryPolicy(max_retries=2, delay=0.01, backoff=dg.Backoff.EXPONENTIAL))
        @retry_transient_only
        def body(context: dg.AssetExecutionContext) -> None:
            attempts[name] += 1
            if attempts[name] < 3:
                raise exc
        return body

    flaky = make("flaky", ConnectionResetError("connection reset by peer"))
    broken = make("broken", ValueError("corrupt shard plan"))
    with dg.instance_for_test() as instance:
        assert dg.materialize([flaky], instance=instance).success and attempts["flaky"] == 3
        result = dg.materialize([broken], instance=instance, raise_on_error=False)
    assert not result.success and attempts["broken"] == 1
    failure = result.failure_data_for_node("broken")
    assert "not a transient error" in failure.error.message


def test_instance_yaml_loads_and_the_gpu_pool_limit_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("COSYVOICE_GPU_POOL_LIMIT", "3")
    assert gpu_pool_limit() == 3
    write_instance_yaml(tmp_path)
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert apply_pool_limits(instance) == {"gpu": 3}
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 3
        assert instance.run_monitoring_enabled
    monkeypatch.setenv("COSYVOICE_GPU_POOL_LIMIT", "0")
    with pytest.raises(ValueError, match="must be >= 1"):
        gpu_pool_limit()
