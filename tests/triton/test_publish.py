"""Versioned publishing: LATEST switches only after a verified upload; rollback; pull; local and S3 (moto)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from cosyvoice import storage
from cosyvoice.cli import main
from cosyvoice.layout import DataLayout
from cosyvoice.triton import publish
from cosyvoice.triton.validate import validate_repo


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory) -> str:
    """Stands in for trtllm-build output (no TensorRT-LLM on CPU): the files the validator and
    publisher handle, config.json + rank0.engine."""
    out = tmp_path_factory.mktemp("engine")
    (out / "config.json").write_text(json.dumps({"version": "0.20.0", "pretrained_config": {"architecture": "Qwen2ForCausalLM"}}))
    (out / "rank0.engine").write_bytes(os.urandom(4096))
    return str(out)


def _publish(root, engine_dir, hf_dir, model_dir, **kw):
    return publish.publish_triton_repo(root, engine_dir=engine_dir, hf_dir=hf_dir, model_dir=model_dir,
                                       load_test="skip", bls_instances=2, **kw)


def test_versions_latest_rollback_and_pull_on_a_local_root(tmp_path, engine_dir, hf_dir, model_dir, capsys):
    root = str(tmp_path / "triton" / "cosyvoice2")
    first = _publish(root, engine_dir, hf_dir, model_dir)
    assert (first.version, first.previous) == (1, None) and publish.latest(root) == 1
    assert first.models == ["audio_tokenizer", "cosyvoice2", "speaker_embedding", "tensorrt_llm", "token2wav"]
    manifest = publish.read_manifest(root, 1)
    assert manifest["validation"]["valid"] and manifest["server_load_test"]["status"] == "skipped"
    assert (manifest["llm_backend"], manifest["channel"], manifest["engine_present"], manifest["deployable"]) == (
        "tensorrtllm", "gpu", True, True)
    assert manifest["files"]["trt_engines/rank0.engine"]["bytes"] == 4096
    assert set(manifest["model_bytes"]) == set(first.models) and first.files == len(manifest["files"])
    second = _publish(root, engine_dir, hf_dir, model_dir, overrides={"dynamic_chunk_strategy": "time_based"})
    assert (second.version, second.previous) == (2, 1) and publish.latest(root) == 2
    assert publish.versions(root) == {1: True, 2: True} and publish.verify_version(root, 2) == []

    dest = str(tmp_path / "served")
    assert publish.pull(root, dest) == 2
    bls = open(os.path.join(dest, "model_repo", "cosyvoice2", "config.pbtxt")).read()
    assert '"/models/cosyvoice2/cosyvoice2_model"' in bls and 'string_value: "time_based"' in bls
    assert validate_repo(os.path.join(dest, "model_repo"), path_map={"/models/cosyvoice2": dest}).ok
    assert os.path.exists(os.path.join(dest, "cosyvoice2_model", "spk2info.pt")) is os.path.exists(
        os.path.join(model_dir, "spk2info.pt"))

    assert main(["triton-publish", "--root", root, "--rollback"]) == 0
    assert "LATEST 2 -> 1" in capsys.readouterr().out and publish.latest(root) == 1
    with pytest.raises(publish.PublishError, match="no complete deployable gpu version older than 1"):
        publish.rollback(root)
    assert main(["triton-publish", "--root", root, "--rollback", "--to", "2"]) == 0 and publish.latest(root) == 2
    assert main(["triton-pull", "--root", root, "--dest", dest, "--version", "1"]) == 0
    assert "dynamic_chunk_strategy\" value" not in open(os.path.join(dest, "model_repo", "cosyvoice2", "config.pbtxt")).read()


def test_an_interrupted_or_corrupted_version_is_never_pointed_at(tmp_path, engine_dir, hf_dir, model_dir, monkeypatch):
    root = str(tmp_path / "root")
    _publish(root, engine_dir, hf_dir, model_dir)
    real_upload, calls = storage.upload_file, []

    def flaky(local, url):
        calls.append(url)
        if len(calls) == 5:
            raise ConnectionError("network dropped")
        real_upload(local, url)

    monkeypatch.setattr(storage, "upload_file", flaky)
    with pytest.raises(ConnectionError):
        _publish(root, engine_dir, hf_dir, model_dir)
    monkeypatch.setattr(storage, "upload_file", real_upload)
    assert publish.latest(root) == 1 and publish.versions(root) == {1: True, 2: False}
    with pytest.raises(publish.PublishError, match="version 2 is not a complete version"):
        publish.rollback(root, to=2)
    third = _publish(root, engine_dir, hf_dir, model_dir)
    assert third.version == 3 and publish.latest(root) == 3  # the partial number is skipped

    # bytes changed after upload: verification catches it, and rollback refuses to point at it
    engine = os.path.join(root, "1", "trt_engines", "rank0.engine")
    with open(engine, "r+b") as f:
        f.write(b"corrupt!")
    assert publish.verify_version(root, 1) == ["trt_engines/rank0.engine: sha256 differs from the manifest"]
    with pytest.raises(publish.PublishError, match="fails verification, LATEST left at 3"):
        publish.rollback(root, to=1)
    assert publish.latest(root) == 3


def test_an_invalid_repository_publishes_nothing(tmp_path, hf_dir, model_dir):
    not_an_engine = tmp_path / "engine"
    not_an_engine.mkdir()
    (not_an_engine / "config.json").write_text("{}")
    root = str(tmp_path / "root")
    with pytest.raises(publish.PublishError, match="holds no TensorRT-LLM engine"):
        _publish(root, str(not_an_engine), hf_dir, model_dir)
    assert not os.path.exists(root)


def test_publish_rollback_and_pull_on_s3(s3_bucket, tmp_path, engine_dir, hf_dir, model_dir):
    root = f"s3://{s3_bucket}/data/triton/cosyvoice2"
    assert _publish(root, engine_dir, hf_dir, model_dir).version == 1
    report = _publish(root, engine_dir, hf_dir, model_dir, max_batch_size=8)
    assert report.version == 2 and storage.read_text(f"{root}/LATEST") == "2\n"
    assert publish.verify_version(root, 2) == []
    dest = str(tmp_path / "pulled")
    assert publish.pull(root, dest) == 2
    local = tmp_path / "local"
    publish.build_bundle(str(local), engine_dir=engine_dir, hf_dir=hf_dir, model_dir=model_dir, max_batch_size=8,
                         bls_instances=2)
    for folder, _, names in os.walk(local):
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), local)
            with open(os.path.join(folder, name), "rb") as a, open(os.path.join(dest, rel), "rb") as b:
                assert a.read() == b.read(), rel
    assert publish.rollback(root) == (2, 1) and storage.read_text(f"{root}/LATEST") == "1\n"


@pytest.mark.slow
def test_triton_model_repo_asset_load_tests_and_publishes(tmp_path, data_dir, hf_dir, tiny_models, triton_env):
    """The asset: spk2info from the manifest, HF export served by the python backend (no engine),
    a real tritonserver load test as a blocking check, then version 1 published."""
    import dagster as dg

    from assets.serving import triton_model_repo
    from pipelines.resources import DataStore, ModelStore

    layout = DataLayout(str(tmp_path / "data"))
    shutil.copytree(data_dir, layout.manifest_dir("dev-clean"))
    shutil.copytree(hf_dir, layout.export_dir("hf"))  # where hf_checkpoint writes; no engine (CPU)
    result = dg.materialize([triton_model_repo], resources={"store": DataStore(root=layout.root),
                                                            "models": ModelStore(root=tiny_models)})
    assert result.success
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    assert meta["version"].value == 1 and meta["llm_backend"].value == "python" and meta["channel"].value == "cpu"
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {"schema_valid": True, "semantics_valid": True, "server_load_test": True}
    repo = layout.triton_root("cosyvoice2")
    manifest = publish.read_manifest(repo, 1)
    load = manifest["server_load_test"]
    # the tiny reference model dir has flow.pt/hift.pt/cosyvoice2.yaml: token2wav loads the real runtime
    assert load["passed"] and sorted(load["loaded"]) == ["audio_tokenizer", "cosyvoice2", "speaker_embedding",
                                                         "tensorrt_llm", "token2wav"]
    assert load["not_tested"] == {}
    assert publish.latest(repo, "cpu") == 1
    assert publish.latest(repo) is None  # the CPU fallback is not the GPU LATEST
    assert os.path.exists(os.path.join(repo, "1", "cosyvoice2_model", "spk2info.pt"))


def test_the_load_test_loads_token2wav_exactly_when_its_runtime_has_what_it_needs(tmp_path, hf_dir, model_dir,
                                                                                  monkeypatch):
    from cosyvoice.triton import server

    loaded = []

    class Server:  # records what the load test asks a tritonserver to load
        def __init__(self, repo, **kw):
            self.repo = repo

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def load(self, *models):
            loaded.append(sorted(models))

        def ready(self):
            return True

    monkeypatch.setattr(server, "TritonServer", Server)
    bare = str(tmp_path / "bare_model")
    shutil.copytree(model_dir, bare, ignore=shutil.ignore_patterns("flow.pt", "hift.pt"))
    everything = ["audio_tokenizer", "cosyvoice2", "speaker_embedding", "tensorrt_llm", "token2wav"]
    cases = [(model_dir, None, {}),
             (bare, None, {"token2wav": "model_dir lacks the acoustic model files ['flow.pt', 'hift.pt']"}),
             (bare, os.path.join(os.path.dirname(__file__), "helpers.py") + ":EchoToken2Wav", {}),
             (model_dir, "no_such_package.acoustic:Runtime", {"token2wav": "acoustic runtime "
                                                              "'no_such_package.acoustic:Runtime' not importable: "
                                                              "No module named 'no_such_package'"})]
    for n, (folder, spec, not_tested) in enumerate(cases):
        overrides = {"token2wav_runtime": spec} if spec else None
        bundle = publish.build_bundle(str(tmp_path / f"bundle{n}"), engine_dir=hf_dir, hf_dir=hf_dir, model_dir=folder,
                                      bls_instances=1, llm_backend="python", overrides=overrides)
        result = publish.server_load_test(bundle, str(tmp_path / f"work{n}"))
        assert result["not_tested"] == not_tested, n
        assert result["loaded"] == loaded[-1] == [m for m in everything if m not in not_tested], n


# --- channels: what a version serves, and who may deploy it ------------------------------------------

def test_a_cpu_fallback_version_is_published_on_its_own_channel_never_as_the_gpu_latest(
        tmp_path, engine_dir, hf_dir, model_dir, capsys):
    root = str(tmp_path / "root")
    assert _publish(root, engine_dir, hf_dir, model_dir).channel == "gpu"
    cpu = _publish(root, engine_dir, hf_dir, model_dir, llm_backend="python")
    assert (cpu.version, cpu.channel, cpu.previous, cpu.promoted) == (2, "cpu", None, True)
    assert publish.latest(root) == 1 and publish.latest(root, "cpu") == 2
    assert storage.read_text(os.path.join(root, "LATEST-cpu")) == "2\n"
    manifest = publish.read_manifest(root, 2)
    assert (manifest["llm_backend"], manifest["channel"], manifest["engine_present"]) == ("python", "cpu", False)
    assert not any(rel.startswith("trt_engines/") for rel in manifest["files"])

    dest = str(tmp_path / "served")
    assert publish.pull(root, dest) == 1  # a GPU deployment keeps the GPU version
    assert publish.pull(root, dest, channel="cpu") == 2
    with pytest.raises(publish.PublishError, match="version 2 belongs to channel 'cpu'.*--channel cpu"):
        publish.pull(root, dest, version=2)
    with pytest.raises(publish.PublishError, match="version 1 belongs to channel 'gpu'"):
        publish.pull(root, dest, version=1, channel="cpu")
    assert main(["triton-pull", "--root", root, "--dest", dest, "--version", "2"]) == 2
    assert "belongs to channel 'cpu'" in capsys.readouterr().err

    assert _publish(root, engine_dir, hf_dir, model_dir).version == 3 and publish.latest(root) == 3
    assert publish.rollback(root) == (3, 1)  # skips the CPU version 2
    with pytest.raises(publish.PublishError, match="belongs to channel 'cpu'"):
        publish.rollback(root, to=2)
    with pytest.raises(publish.PublishError, match="no complete deployable cpu version older than 2"):
        publish.rollback(root, channel="cpu")
    assert publish.latest(root) == 1 and publish.latest(root, "cpu") == 2


def test_nothing_on_the_gpu_channel_says_so_and_names_the_cpu_one(tmp_path, engine_dir, hf_dir, model_dir):
    root = str(tmp_path / "root")
    _publish(root, engine_dir, hf_dir, model_dir, llm_backend="python")
    with pytest.raises(publish.PublishError, match=r"nothing published on channel gpu yet \(no LATEST\); "
                                                   r"channel cpu has version 1"):
        publish.pull(root, str(tmp_path / "dest"))
    assert not os.path.exists(tmp_path / "dest")


def _no_server_env():
    raise RuntimeError("no tritonserver wheel for this platform")


def test_a_version_whose_load_test_did_not_run_is_uploaded_but_never_promoted(
        tmp_path, engine_dir, hf_dir, model_dir, monkeypatch, capsys):
    root = str(tmp_path / "root")
    _publish(root, engine_dir, hf_dir, model_dir)
    monkeypatch.setattr(publish, "_server_env", _no_server_env)
    report = publish.publish_triton_repo(root, engine_dir=engine_dir, hf_dir=hf_dir, model_dir=model_dir,
                                         load_test="auto", bls_instances=2)
    assert (report.version, report.promoted, report.previous) == (2, False, 1)
    assert publish.latest(root) == 1 and "NOT promoted" in report.summary()
    manifest = publish.read_manifest(root, 2)
    assert manifest["deployable"] is False and manifest["server_load_test"]["status"] == "not_run"
    assert "no tritonserver wheel" in manifest["server_load_test"]["reason"]
    assert publish.verify_version(root, 2) == []  # complete and verified, just not deployable
    dest = str(tmp_path / "dest")
    with pytest.raises(publish.PublishError, match="version 2 is not deployable .*load test did not run"):
        publish.pull(root, dest, version=2)
    assert publish.pull(root, dest, version=2, allow_undeployable=True) == 2  # for inspection only
    with pytest.raises(publish.PublishError, match="version 2 is not deployable"):
        publish.rollback(root, to=2)
    assert _publish(root, engine_dir, hf_dir, model_dir).version == 3
    assert publish.rollback(root) == (3, 1)  # skips the untested version 2

    args = ["triton-publish", "--root", root, "--engine_dir", engine_dir, "--hf_dir", hf_dir, "--model_dir", model_dir,
            "--bls_instances", "2"]
    assert main(args) == 1 and "NOT promoted" in capsys.readouterr().out and publish.latest(root) == 1
    with pytest.raises(publish.PublishError, match="load_test=require but no tritonserver environment"):
        publish.publish_triton_repo(root, engine_dir=engine_dir, hf_dir=hf_dir, model_dir=model_dir,
                                    load_test="require", bls_instances=2)
    assert max(publish.versions(root)) == 4  # require uploaded nothing


def _asset_run(tmp_path, data_dir, hf_dir, tiny_models, **config):
    import dagster as dg

    from assets.serving import triton_model_repo
    from pipelines.resources import DataStore, ModelStore

    layout = DataLayout(str(tmp_path / "data"))
    if not os.path.exists(layout.root):
        shutil.copytree(data_dir, layout.manifest_dir("dev-clean"))
        shutil.copytree(hf_dir, layout.export_dir("hf"))  # no engine: llm_backend auto -> python
    result = dg.materialize([triton_model_repo], resources={"store": DataStore(root=layout.root),
                                                            "models": ModelStore(root=tiny_models)},
                            run_config={"ops": {"triton_model_repo": {"config": {"bls_instances": 1, **config}}}},
                            raise_on_error=False)
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    return layout.triton_root("cosyvoice2"), result, checks


def test_the_asset_fails_its_blocking_check_when_the_load_test_did_not_run_unless_skip_is_configured(
        tmp_path, data_dir, hf_dir, tiny_models, monkeypatch):
    monkeypatch.setattr(publish, "_server_env", _no_server_env)
    root, result, checks = _asset_run(tmp_path, data_dir, hf_dir, tiny_models)  # load_test: auto
    load = checks["server_load_test"]
    assert not load.passed and "load test not_run" in load.description
    assert checks["schema_valid"].passed and checks["semantics_valid"].passed
    assert publish.latest(root) is None and publish.latest(root, "cpu") is None  # uploaded, not promoted
    assert publish.read_manifest(root, 1)["deployable"] is False

    root, result, checks = _asset_run(tmp_path, data_dir, hf_dir, tiny_models, load_test="skip")
    assert result.success and checks["server_load_test"].passed
    assert "skipped" in checks["server_load_test"].description
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    assert (meta["channel"].value, meta["promoted"].value, meta["engine_present"].value) == ("cpu", True, False)
    assert meta["pull"].value.endswith("--channel cpu")
    assert publish.latest(root, "cpu") == 2 and publish.latest(root) is None


# --- pull never writes outside its destination -----------------------------------------------------

BAD_PATHS = ["../escape.txt", "model_repo/../../escape.txt", "ABSOLUTE/escape.txt", "C:/escape.txt",
             "model_repo\\..\\..\\escape.txt", "model_repo//x", "./model_repo/x", ""]


def _crafted_root(root: str, bad: str) -> None:
    """A version whose manifest names ``bad`` (as a hostile or corrupted store could hold)."""
    body = b"payload"
    storage.write_bytes(f"{root}/1/model_repo/ok.txt", body)
    try:  # the bytes where the hostile entry points, so that following it would succeed
        storage.write_bytes(f"{root}/1/{bad}", body)
    except (OSError, ValueError):
        pass
    files = {"model_repo/ok.txt": {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()},
             bad: {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}}
    storage.write_text(f"{root}/1/manifest.json", json.dumps({"version": 1, "files": files, "channel": "gpu",
                                                               "deployable": True}))
    storage.write_text(f"{root}/LATEST", "1\n")


@pytest.mark.parametrize("bad", BAD_PATHS)
def test_pull_refuses_a_manifest_path_that_leaves_the_destination(tmp_path, bad):
    root = str(tmp_path / "store" / "root")
    bad = bad.replace("ABSOLUTE", str(tmp_path))
    _crafted_root(root, bad)
    work = tmp_path / "deploy"
    (work / "models").mkdir(parents=True)
    dest = work / "models" / "cosyvoice2"
    with pytest.raises(publish.PublishError, match="unsafe or malformed file entries"):
        publish.pull(root, str(dest))
    with pytest.raises(publish.PublishError, match="unsafe"):
        publish.verify_version(root, 1)
    assert sorted(os.listdir(work)) == ["models"] and os.listdir(work / "models") == []
    assert sorted(os.listdir(tmp_path)) == ["deploy", "store"]


def test_pull_from_s3_refuses_a_traversing_manifest(s3_bucket, tmp_path):
    root = f"s3://{s3_bucket}/triton/cosyvoice2"
    _crafted_root(root, "../../escape.txt")
    dest = tmp_path / "a" / "b" / "dest"
    with pytest.raises(publish.PublishError, match=r"'\.\./\.\./escape\.txt' \('\.', '\.\.'"):
        publish.pull(root, str(dest))
    assert os.listdir(tmp_path) == []


def test_an_engine_is_a_folder_with_config_json_and_a_rank_engine_on_any_storage(tmp_path, s3_bucket):
    folder = tmp_path / "engine"
    assert not publish.has_engine(str(folder))  # missing folder: no engine
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert not publish.has_engine(str(folder))
    (folder / "rank0.engine").write_bytes(b"\0")
    assert publish.has_engine(str(folder))
    url = f"s3://{s3_bucket}/export/engine/bfloat16_none"
    assert not publish.has_engine(url)
    storage.upload_dir(str(folder), url)
    assert publish.has_engine(url)
