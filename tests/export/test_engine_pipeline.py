"""Engine build launcher, the k8s Job, the CLI faces and the Dagster assets of the export stage."""

from __future__ import annotations

import json
import os
import stat
import time

import dagster as dg
import pytest
import yaml

from cosyvoice.cli import main as cli_main
from cosyvoice.export.engine import EngineBuildUnavailable, build_engine
from cosyvoice.export.transfer import get, put
from cosyvoice.export.trtllm import CONTAINER_IMAGE

from .conftest import TINY_QWEN2

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
FAKE_TRTLLM_BUILD = """#!/usr/bin/env python3
import json, os, sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
cfg = json.load(open(os.path.join(args["--checkpoint_dir"], "config.json")))
out = args["--output_dir"]
json.dump({"version": "fake", "pretrained_config": cfg, "build_config": {k[2:]: v for k, v in args.items()}},
          open(os.path.join(out, "config.json"), "w"))
for r in range(cfg["mapping"]["world_size"]):
    open(os.path.join(out, f"rank{r}.engine"), "wb").write(b"engine")
"""


@pytest.fixture()
def fake_trtllm_build(tmp_path, monkeypatch) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "trtllm-build"
    exe.write_text(FAKE_TRTLLM_BUILD)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return str(exe)


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_hf, tmp_path_factory) -> str:
    from cosyvoice.export.trtllm import ConvertOptions, convert_checkpoint

    out = str(tmp_path_factory.mktemp("ckpt"))
    convert_checkpoint(tiny_hf, out, ConvertOptions(dtype="bfloat16", tp_size=2))
    return out


def test_build_engine_without_trtllm_build_fails_fast_naming_the_container_image(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(EngineBuildUnavailable, match=CONTAINER_IMAGE.replace(".", r"\.")):
        build_engine(tiny_ckpt, str(tmp_path / "engine"))
    assert time.perf_counter() - start < 1.0
    assert cli_main(["build-engine", "--checkpoint_dir", tiny_ckpt, "--output_dir", str(tmp_path / "e")]) == 2


def test_build_engine_runs_trtllm_build_with_the_run_sh_flags_and_publishes(tiny_ckpt, tmp_path, fake_trtllm_build):
    report = build_engine(tiny_ckpt, str(tmp_path / "engine"))
    assert report.engines == 2 and sorted(os.listdir(tmp_path / "engine")) == ["config.json", "rank0.engine", "rank1.engine"]
    build = json.load(open(tmp_path / "engine" / "config.json"))["build_config"]
    assert build == {"checkpoint_dir": build["checkpoint_dir"], "output_dir": build["output_dir"],
                     "max_batch_size": "16", "max_num_tokens": "32768", "gemm_plugin": "bfloat16"}


def test_engine_transfer_refuses_an_incomplete_engine_and_round_trips_a_complete_one(tiny_ckpt, tmp_path, fake_trtllm_build):
    build_engine(tiny_ckpt, str(tmp_path / "engine"))
    os.unlink(tmp_path / "engine" / "rank1.engine")
    with pytest.raises(FileNotFoundError, match="rank1.engine"):
        put(str(tmp_path / "engine"), str(tmp_path / "published"))
    assert get(tiny_ckpt, str(tmp_path / "fetched")) > 0
    assert sorted(os.listdir(tmp_path / "fetched")) == sorted(os.listdir(tiny_ckpt))


def _job() -> dict:
    with open(os.path.join(ROOT, "k8s", "trtllm-engine-job.yaml")) as f:
        return yaml.safe_load(f)


def test_k8s_engine_job_validates_and_builds_in_the_trtllm_image_on_a_gpu():
    import kubernetes_validate

    job = _job()
    for version in ("1.25.0", "1.33.0", "1.37.0"):
        kubernetes_validate.validate(job, version, strict=True)
    pod = job["spec"]["template"]["spec"]
    fetch, build = pod["initContainers"]
    assert build["image"] == CONTAINER_IMAGE and build["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert build["command"][:1] == ["trtllm-build"] and " ".join(build["command"]).endswith(
        "--max_batch_size 16 --max_num_tokens 32768 --gemm_plugin bfloat16")
    assert fetch["command"][-2:] == ["$(CHECKPOINT_URL)", "/work/checkpoint"]
    broken = _job()
    broken["spec"]["template"]["spec"]["initContainers"][1]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.33.0", strict=True)


def test_the_pipes_pod_spec_is_the_job_template_with_this_runs_checkpoint():
    import kubernetes_validate

    from pipelines.launchers import K8sEngineBuilder

    spec = K8sEngineBuilder().pod_spec("s3://b/export/trtllm/bfloat16_none", max_batch_size=64, max_num_tokens=32768,
                                       gemm_plugin="bfloat16")
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
           "spec": {**spec, "containers": [{**spec["containers"][0], "image": "cosyvoice-pipeline:latest"}]}}
    kubernetes_validate.validate(pod, "1.33.0", strict=True)
    assert spec["initContainers"][0]["env"][0] == {"name": "CHECKPOINT_URL", "value": "s3://b/export/trtllm/bfloat16_none"}
    assert "64" in spec["initContainers"][1]["command"] and spec["containers"][0]["name"] == "dagster-pipes-execution"


def test_cli_export_convert_and_verify(tiny_llm_pt, blank_tokenizer, calib_data_list, tmp_path):
    cfg = tmp_path / "qwen" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps(TINY_QWEN2))
    hf = str(tmp_path / "hf")
    assert cli_main(["export-hf", "--llm_pt", tiny_llm_pt, "--config", str(cfg), "--tokenizer_dir", blank_tokenizer,
                     "--out", hf, "--dtype", "bfloat16"]) == 0
    assert cli_main(["convert-checkpoint", "--model_dir", hf, "--output_dir", str(tmp_path / "ckpt"), "--use_weight_only",
                     "--verify_data", calib_data_list.replace("shard0", "shard1"), "--verify_size", "2"]) == 0
    config = json.load(open(tmp_path / "ckpt" / "config.json"))
    assert (config["dtype"], config["quantization"]["quant_algo"]) == ("bfloat16", "W8A16")
    assert cli_main(["import-hf", "--hf_dir", hf, "--out", str(tmp_path / "llm.pt")]) == 0
    assert cli_main(["convert-checkpoint", "--model_dir", hf, "--tp_size", "3", "--output_dir", str(tmp_path / "x")]) == 2


def test_export_assets_materialize_with_verified_variants(tiny_llm_pt, calib_data_list, tmp_path, monkeypatch):
    import shutil

    from assets.export import (
        ENGINE_EXCLUDED_REASON,
        default_selection,
        hf_checkpoint,
        trtllm_checkpoint,
        trtllm_engine,
    )
    from pipelines.launchers import LocalEngineBuilder
    from pipelines.resources import DataStore, TrainingResource

    root = tmp_path / "data"
    (root / "llm").mkdir(parents=True)
    shutil.copy(tiny_llm_pt, root / "llm" / "llm.pt")
    shutil.copy(calib_data_list, root / "train.data.list")
    shutil.copy(calib_data_list.replace("shard0", "shard1"), root / "cv.data.list")
    (tmp_path / "qwen.json").write_text(json.dumps(TINY_QWEN2))
    monkeypatch.setenv("PATH", str(tmp_path))  # no trtllm-build here
    run_config = dg.RunConfig(ops={
        "hf_checkpoint": {"config": {"recipe": str(tmp_path / "qwen.json")}},
        "trtllm_checkpoint": {"config": {"variants": ["none", "smoothquant_per_channel_per_token"],
                                         "calib_size": 8, "verify_size": 2}}})
    resources = {"store": DataStore(root=str(root)), "training": TrainingResource(model_dir=str(tmp_path / "models"))}
    result = dg.materialize([hf_checkpoint, trtllm_checkpoint], resources=resources, run_config=run_config)
    assert result.success
    checks = result.get_asset_check_evaluations()
    assert [(c.check_name, c.passed) for c in checks] == [("reference_forward_verified", True)]
    meta = result.asset_materializations_for_node("trtllm_checkpoint")[0].metadata
    variants = meta["variants"].value
    assert set(variants) == {"bfloat16_none", "bfloat16_smoothquant_per_channel_per_token"}
    assert variants["bfloat16_smoothquant_per_channel_per_token"]["quant_algo"] == "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"
    assert all(v["passed"] and v["bytes"] > 0 for v in variants.values())
    assert sorted(os.listdir(root / "export" / "trtllm")) == sorted(variants)

    engine = dg.materialize([trtllm_engine], resources={"store": DataStore(root=str(root)),
                                                        "engine_builder": LocalEngineBuilder()}, raise_on_error=False)
    assert not engine.success
    failure = engine.get_step_failure_events()[0].step_failure_data.error
    assert CONTAINER_IMAGE in str(failure)
    assert "trtllm_engine" not in str(default_selection("embedded")) and "trtllm_engine" in str(default_selection("distributed"))
    assert "TensorRT-LLM container" in ENGINE_EXCLUDED_REASON and ENGINE_EXCLUDED_REASON in trtllm_engine.descriptions_by_key[
        dg.AssetKey("trtllm_engine")]
