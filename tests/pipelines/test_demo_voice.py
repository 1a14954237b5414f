"""``make demo-voice`` end to end (``pipelines.demo_voice``) on the synthetic corpus fixtures, in a
fresh ``DAGSTER_HOME``: the real trainer trains the tiny LLM, flow and HiFT a couple of steps each
(Pipes subprocesses), the averages, the HF export and the published repository follow, and the
pulled repository speaks. The models resource holds only the front-end ONNX models, so every other
weight file of the published repository can only come from the pipeline."""

from __future__ import annotations

import hashlib
import os
import shutil

import dagster as dg
import numpy as np
import pytest
import soundfile as sf

from cosyvoice.layout import DataLayout
from tests.train.conftest import qwen_dir  # noqa: F401  (CosyVoice-BlankEN-equivalent tokenizer)
from tests.triton.conftest import data_dir  # noqa: F401  (the manifest of the clean corpus)

FRONT_ENDS = ("campplus.onnx", "speech_tokenizer_v2.onnx")


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def demo_env(training_list, data_dir, tiny_models, qwen_dir, tmp_path, monkeypatch):  # noqa: F811
    """A data root with the training lists (one shard of 4 utterances each: a couple of steps in
    seconds) and the dev-clean manifest (what ``make demo`` leaves), a models root with the
    front-end ONNX models only, an empty Dagster home."""
    layout = DataLayout(str(tmp_path / "data"))
    os.makedirs(layout.root)
    shards = open(training_list).read().split()
    with open(layout.train_list(), "w") as f:
        f.write(f"{shards[0]}\n")
    with open(layout.cv_list(), "w") as f:
        f.write(f"{shards[1]}\n")
    shutil.copytree(data_dir, layout.manifest_dir("dev-clean"))
    models = tmp_path / "models"
    models.mkdir()
    for name in FRONT_ENDS:
        os.symlink(os.path.join(tiny_models, name), models / name)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    for name in ("COSYVOICE_TRAIN_MODEL_DIR", "COSYVOICE_TRAIN_FLOW_MODEL_DIR", "COSYVOICE_TRAIN_HIFT_MODEL_DIR",
                 "COSYVOICE_TRAIN_RECIPE", "COSYVOICE_CORPUS_ROOT", "COSYVOICE_DEPLOYMENT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("COSYVOICE_DATA_ROOT", layout.root)
    monkeypatch.setenv("COSYVOICE_MODEL_ROOT", str(models))
    monkeypatch.setenv("COSYVOICE_QWEN_PRETRAIN_PATH", qwen_dir)
    return layout


def test_the_voice_demo_publishes_only_pipeline_weights_and_speaks_a_sentence(demo_env, tmp_path, capsys):
    from pipelines.demo_voice import VOICE_ASSETS, main

    layout = demo_env
    report = main(["--out", str(tmp_path / "demo"), "--load-test", "skip", "--steps", "2"])

    assert {f["source"] for f in report.acoustic_files.values()} == {"pipeline"}
    model_dir, llm_dir = os.path.join(report.served, "cosyvoice2_model"), os.path.join(report.served, "cosyvoice2_llm")
    produced = {os.path.join(model_dir, "flow.pt"): layout.model_file("flow"),
                os.path.join(model_dir, "hift.pt"): layout.model_file("hift")}
    for name in os.listdir(layout.export_dir("hf")):
        if name.endswith(".safetensors"):
            produced[os.path.join(llm_dir, name)] = os.path.join(layout.export_dir("hf"), name)
    weights = {os.path.join(folder, n) for folder, _, names in os.walk(report.served) for n in names
               if n.endswith((".pt", ".safetensors", ".onnx", ".engine", ".bin"))}
    spk2info = os.path.join(model_dir, "spk2info.pt")
    assert weights == set(produced) | {spk2info} | {os.path.join(model_dir, n) for n in FRONT_ENDS}
    for served, made in produced.items():
        assert sha256(served) == sha256(made), served
    assert sha256(spk2info) == sha256(layout.spk2info("cosyvoice2"))

    samples, rate = sf.read(report.synthesis.out, dtype="float32")
    assert rate == 24000 and 0 < len(samples) <= 3 * 24000 and np.isfinite(samples).all()
    assert report.synthesis.tokens > 0 and report.synthesis.prompt_tokens > 0
    printed = capsys.readouterr().out
    assert "cosyvoice-pipeline synthesize --model_dir" in printed and "from pipeline" in printed
    assert report.load_test == "skipped" and "server load test skipped" in printed

    with dg.DagsterInstance.get() as instance:
        for asset in VOICE_ASSETS:
            assert instance.get_latest_materialization_event(asset.key) is not None, asset.key
        run_id = instance.get_latest_materialization_event(dg.AssetKey("flow_checkpoint")).run_id
    for model in ("llm", "flow", "hift"):
        assert os.listdir(os.path.join(layout.root, "train", model)) == [run_id]
