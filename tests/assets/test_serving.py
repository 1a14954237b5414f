"""The ``triton_model_repo`` asset shows what it published: a spoken sample of the acoustic models
(waveform + spectrogram PNG) in its metadata, or why there is none, and which acoustic files it
served: the pipeline's ``flow_averaged`` / ``hift_averaged`` or the released model dir's."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil

import dagster as dg
import pytest
import torch

from cosyvoice.layout import DataLayout
from tests.train.conftest import TINY_RECIPE
from tests.triton.conftest import data_dir, hf_dir  # noqa: F401  (the manifest and the tiny HF export)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _materialize(tmp_path, data_dir, hf_dir, model_root, instance=None, raise_on_error=True,  # noqa: F811
                 **config):
    import dagster as dg

    from assets.serving import triton_model_repo
    from pipelines.resources import DataStore, ModelStore

    layout = DataLayout(str(tmp_path / "data"))
    if not os.path.isdir(layout.manifest_dir("dev-clean")):
        shutil.copytree(data_dir, layout.manifest_dir("dev-clean"))
        shutil.copytree(hf_dir, layout.export_dir("hf"))  # no engine: the python backend, CPU channel
    result = dg.materialize([triton_model_repo], resources={"store": DataStore(root=layout.root),
                                                            "models": ModelStore(root=model_root)},
                            run_config={"ops": {"triton_model_repo": {"config": {"bls_instances": 1,
                                                                                  "load_test": "skip", **config}}}},
                            instance=instance, raise_on_error=raise_on_error)
    if not raise_on_error:
        return result
    assert result.success
    return result.get_asset_materialization_events()[0].materialization.metadata


def test_the_published_repository_carries_a_spoken_sample_of_its_acoustic_models(
        tmp_path, data_dir, hf_dir, tiny_models):  # noqa: F811
    meta = _materialize(tmp_path, data_dir, hf_dir, tiny_models)
    assert meta["sample_status"].value == "rendered"
    assert meta["sample_speaker"].value == "001" and meta["sample_utterance"].value == meta["spk2info_speakers"].value["001"]
    assert 0 < meta["sample_seconds"].value <= 2.0
    assert meta["sample_seconds"].value == pytest.approx(meta["sample_tokens"].value * 0.04)
    markdown = meta["sample"].value
    assert markdown.startswith("![sample: ") and "](data:image/png;base64," in markdown
    assert base64.b64decode(markdown.split("base64,", 1)[1].rstrip(")")).startswith(b"\x89PNG\r\n\x1a\n")


def test_a_model_dir_without_acoustic_models_publishes_and_says_there_is_no_sample(
        tmp_path, data_dir, hf_dir, tiny_models):  # noqa: F811
    onnx_only = tmp_path / "models"
    onnx_only.mkdir()
    for name in ("campplus.onnx", "speech_tokenizer_v2.onnx"):
        os.symlink(os.path.join(tiny_models, name), onnx_only / name)
    meta = _materialize(tmp_path, data_dir, hf_dir, str(onnx_only))
    assert meta["promoted"].value is True and meta["sample_status"].value == "skipped"
    assert "has no flow.pt, hift.pt" in meta["sample_reason"].value
    assert meta["sample"].value.startswith("no sample (skipped): ")


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def averaged(instance, layout: DataLayout, name: str, seed: int, recipe: str = TINY_RECIPE) -> str:
    """``<data root>/<name>/<name>.pt`` with seeded tiny weights, recorded as a materialization of
    ``<name>_averaged`` (what the averaging asset writes and reports)."""
    from cosyvoice.acoustic.reference import flow_state, hift_state

    path = layout.model_file(name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(flow_state(seed, "tiny") if name == "flow" else hift_state(seed, "tiny"), path)
    instance.report_runless_asset_event(dg.AssetMaterialization(f"{name}_averaged", metadata={
        "path": path, "sha256": sha256(path), "recipe": recipe}))
    return path


def served_file(layout: DataLayout, meta, name: str) -> str:
    return os.path.join(layout.triton_root("cosyvoice2"), str(meta["version"].value), "cosyvoice2_model", name)


def test_the_repository_serves_the_pipelines_acoustic_models_once_materialized_and_says_which_files(
        tmp_path, data_dir, hf_dir, tiny_models):  # noqa: F811
    """auto before any averaged acoustic model: the released files; after flow_averaged and
    hift_averaged: theirs, with the training recipe as cosyvoice2.yaml, bit for bit in the published
    version; acoustic_source released goes back to the released files."""
    layout = DataLayout(str(tmp_path / "data"))
    with dg.DagsterInstance.ephemeral() as instance:
        before = _materialize(tmp_path, data_dir, hf_dir, tiny_models, instance)
        assert before["acoustic_source"].value == {"flow.pt": "released", "hift.pt": "released",
                                                   "cosyvoice2.yaml": "released"}
        flow, hift = averaged(instance, layout, "flow", seed=5), averaged(instance, layout, "hift", seed=6)
        meta = _materialize(tmp_path, data_dir, hf_dir, tiny_models, instance)
        files = meta["acoustic_files"].value
        assert meta["acoustic_source"].value == {"flow.pt": "pipeline", "hift.pt": "pipeline",
                                                 "cosyvoice2.yaml": "pipeline"}
        assert files["flow.pt"]["path"] == flow and files["hift.pt"]["path"] == hift
        assert files["cosyvoice2.yaml"]["path"] == TINY_RECIPE and files["cosyvoice2.yaml"]["sha256"] == sha256(TINY_RECIPE)
        for name, path in (("flow.pt", flow), ("hift.pt", hift)):
            assert files[name]["sha256"] == sha256(path) == sha256(served_file(layout, meta, name))
        assert sha256(served_file(layout, meta, "campplus.onnx")) == sha256(os.path.join(tiny_models, "campplus.onnx"))
        assert meta["sample_status"].value == "rendered"
        released = _materialize(tmp_path, data_dir, hf_dir, tiny_models, instance, acoustic_source="released")
        assert released["acoustic_source"].value["flow.pt"] == "released"
        assert sha256(served_file(layout, released, "flow.pt")) == sha256(os.path.join(tiny_models, "flow.pt"))


def test_acoustic_files_the_asset_cannot_vouch_for_are_not_published(
        tmp_path, data_dir, hf_dir, tiny_models):  # noqa: F811
    """pipeline without hift_averaged; a flow.pt changed after its materialization; a trained flow
    whose recipe sizes do not fit it: each fails naming the problem, and nothing is published."""
    layout = DataLayout(str(tmp_path / "data"))

    def failure(**config) -> str:
        result = _materialize(tmp_path, data_dir, hf_dir, tiny_models, instance, raise_on_error=False, **config)
        assert not result.success
        return result.get_step_failure_events()[0].step_failure_data.user_failure_data.description

    with dg.DagsterInstance.ephemeral() as instance:
        flow = averaged(instance, layout, "flow", seed=5)
        assert "hift_averaged never materialized" in failure(acoustic_source="pipeline")
        with open(flow, "ab") as f:
            f.write(b"\0")
        assert f"{flow} changed since its materialization" in failure()
        averaged(instance, layout, "flow", seed=5, recipe=os.path.join(os.path.dirname(TINY_RECIPE), "cosyvoice2.yaml"))
        message = failure()
        assert "do not fit together: flow.pt from" in message and "(pipeline) does not load under cosyvoice2.yaml" in message
    assert not os.path.exists(layout.triton_root("cosyvoice2"))
