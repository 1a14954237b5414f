"""Versioned publishing: LATEST switches only after a verified upload; rollback; pull; local and S3 (moto)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from cosyvoice import storage
from cosyvoice.cli import main
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
    assert manifest["validation"]["valid"] and manifest["server_load_test"]["skipped"] == "load_test=skip"
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
    with pytest.raises(publish.PublishError, match="no complete version older than 1"):
        publish.rollback(root)
    assert main(["triton-publish", "--root", root, "--rollback", "--to", "2"]) == 0 and publish.latest(root) == 2
    assert main(["triton-pull", "--root", root, "--dest", dest, "--version", "1"]) == 0
    assert "dynamic_chunk_strategy\" value" not in open(os.path.join(dest, "model_repo", "cosyvoice2", "config.pbtxt")).read()


def test_an_interrupted_or_corrupted_version_is_never_pointed_at(tmp_path, engine_dir, hf_dir, model_dir, monkeypatch):
    root = str(tmp_path / "root")
    _publish(root, engine_dir, hf_dir, model_dir)
    real_upload, calls = publish._upload, []

    def flaky(local, url):
        calls.append(url)
        if len(calls) == 5:
            raise ConnectionError("network dropped")
        real_upload(local, url)

    monkeypatch.setattr(publish, "_upload", flaky)
    with pytest.raises(ConnectionError):
        _publish(root, engine_dir, hf_dir, model_dir)
    monkeypatch.setattr(publish, "_upload", real_upload)
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
def test_triton_model_repo_asset_load_tests_and_publishes(tmp_path, data_dir, hf_dir, tiny_models):
    """The asset: spk2info from the manifest, HF export served by the python backend (no engine),
    a real tritonserver load test as a blocking check, then version 1 published."""
    import dagster as dg

    from assets.serving import triton_model_repo
    from pipelines.resources import DataStore, ModelStore

    root = tmp_path / "data"
    shutil.copytree(data_dir, root / "manifest" / "dev-clean")
    shutil.copytree(hf_dir, root / "export" / "hf")  # where hf_checkpoint writes; no engine (CPU)
    result = dg.materialize([triton_model_repo], resources={"store": DataStore(root=str(root)),
                                                            "models": ModelStore(root=tiny_models)})
    assert result.success
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    assert meta["version"].value == 1 and meta["llm_backend"].value == "python"
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {"schema_valid": True, "semantics_valid": True, "server_load_test": True}
    manifest = publish.read_manifest(str(root / "triton" / "cosyvoice2"), 1)
    load = manifest["server_load_test"]
    assert load["passed"] and sorted(load["loaded"]) == ["audio_tokenizer", "cosyvoice2", "speaker_embedding",
                                                         "tensorrt_llm"]
    assert "token2wav" in load["not_tested"]
    assert publish.latest(str(root / "triton" / "cosyvoice2")) == 1
    assert os.path.exists(root / "triton" / "cosyvoice2" / "1" / "cosyvoice2_model" / "spk2info.pt")
