"""``triton_model_repo`` publishes a CosyVoice1 model: the v1 repository (cosyvoice + transformer_llm +
token2wav, the CPU channel) with a spk2info.pt of v1 prompts, load-tested in a real tritonserver; its llm.pt is
the pipeline's ``llm_averaged`` once materialized with a v1 recipe, never one of another generation."""

from __future__ import annotations

import hashlib
import os
import shutil

import dagster as dg
import numpy as np
import pytest
import torch

from cosyvoice.layout import DataLayout
from tests.triton.conftest import data_dir, triton_env  # noqa: F401  (the corpus manifest; tritonserver)

V1_TINY = "configs/cosyvoice-tiny.yaml"
V2_TINY = "configs/cosyvoice2-tiny.yaml"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def v1_released(tiny_models, tmp_path_factory) -> str:
    """The tiny CosyVoice1 reference dir (llm.pt, flow.pt, hift.pt, cosyvoice.yaml, campplus.onnx,
    speech_tokenizer_v1.onnx, an SFT-style spk2info.pt); its two ONNX models are the session's tiny ones
    (the same seed and size: exporting them again would cost ~15 s)."""
    from cosyvoice.features.reference_models import V1_ONNX_MODELS, V1_TORCH_MODELS, make_reference_models

    out = str(tmp_path_factory.mktemp("v1-released") / "CosyVoice-300M-tiny")
    os.makedirs(out)
    for name in V1_ONNX_MODELS:
        shutil.copy(os.path.join(tiny_models, f"{name}.onnx"), out)
    make_reference_models(out, seed=0, size="tiny", family="cosyvoice1", models=V1_TORCH_MODELS)
    return out


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def materialize(tmp_path, manifest: str, released: str, instance=None, raise_on_error=True, **config):
    from assets.serving import triton_model_repo
    from pipelines.resources import DataStore, ModelStore

    layout = DataLayout(str(tmp_path / "data"))
    if not os.path.isdir(layout.manifest_dir("dev-clean")):
        shutil.copytree(manifest, layout.manifest_dir("dev-clean"))
    return dg.materialize([triton_model_repo], resources={"store": DataStore(root=layout.root),
                                                          "models": ModelStore(root=released)},
                          run_config={"ops": {"triton_model_repo": {"config": {"bls_instances": 1, **config}}}},
                          instance=instance, raise_on_error=raise_on_error)


def test_a_cosyvoice1_model_is_published_as_the_load_tested_v1_repository_with_v1_prompts(
        tmp_path, data_dir, v1_released, triton_env):  # noqa: F811
    from cosyvoice.triton import publish
    from cosyvoice.triton.render import V1_MODELS
    from cosyvoice.triton.runtime_v1 import ReferenceFrontend
    from cosyvoice.triton.spk2info import _prompt_audio
    from cosyvoice.triton.validate import validate_repo

    result = materialize(tmp_path, data_dir, v1_released, load_test="require")
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {"schema_valid": True, "semantics_valid": True, "server_load_test": True}
    assert meta["model_family"].value == "cosyvoice1" and meta["llm_backend"].value == "python"
    assert meta["channel"].value == "cpu" and meta["promoted"].value is True
    assert meta["acoustic_source"].value == dict.fromkeys(("flow.pt", "hift.pt", "llm.pt", "cosyvoice.yaml"),
                                                          "released")
    root = DataLayout(str(tmp_path / "data")).triton_root("cosyvoice")  # the v1 family's own root
    assert meta["root"].value == root and publish.latest(root, "cpu") == 1 and publish.latest(root) is None
    load = publish.read_manifest(root, 1)["server_load_test"]
    assert load["status"] == "passed" and sorted(load["loaded"]) == sorted(V1_MODELS) and load["not_tested"] == {}

    pulled = str(tmp_path / "pulled")
    publish.pull(root, pulled, channel="cpu")
    report = validate_repo(os.path.join(pulled, "model_repo"), path_map={"/models/cosyvoice2": pulled},
                           require_reference_models=False)
    assert report.ok, report.summary()
    assert sorted(report.models) == sorted(V1_MODELS)
    model_dir = os.path.join(pulled, "cosyvoice2_model")
    for name in ("llm.pt", "flow.pt", "hift.pt", "cosyvoice.yaml", "campplus.onnx", "speech_tokenizer_v1.onnx"):
        assert sha256(os.path.join(model_dir, name)) == sha256(os.path.join(v1_released, name)), name

    # speaker 001 is the corpus speaker's prompt as the v1 BLS makes it from that audio: 50 Hz v1 tokens,
    # the 22.05 kHz mel (hop 256), the CAM++ embedding; not the released SFT-style entry
    info = torch.load(os.path.join(model_dir, "spk2info.pt"), map_location="cpu", weights_only=True)
    utt = meta["spk2info_speakers"].value["001"]
    wav_path = dict(line.split(maxsplit=1) for line in open(os.path.join(data_dir, "wav.scp")).read().splitlines())[utt]
    wav = _prompt_audio(wav_path)
    tokens, mel, embedding = ReferenceFrontend.from_model_dir(v1_released).prompt(wav)
    entry = info["001"]
    assert entry["speech_token"].dtype == torch.int32 and int(entry["speech_token"].max()) < 4096
    assert entry["speech_token"][0].tolist() == tokens.tolist()
    assert abs(len(tokens) - len(wav) / 16000 * 50) <= 2
    assert entry["speech_feat"].shape == (1, mel.shape[0], 80)
    assert abs(mel.shape[0] - len(wav) / 16000 * 22050 / 256) <= 2
    np.testing.assert_array_equal(entry["speech_feat"][0].numpy(), mel)
    np.testing.assert_array_equal(entry["embedding"][0].numpy(), embedding)


def test_the_v1_repository_serves_the_pipelines_llm_only_when_a_v1_recipe_trained_it(
        tmp_path, data_dir, v1_released):  # noqa: F811
    """llm_averaged of the v1 recipe: served as llm.pt with that recipe as cosyvoice.yaml; an averaged LLM of
    a CosyVoice2 recipe: auto serves the released llm.pt (and yaml); a TensorRT-LLM backend and an averaged llm.pt
that does not load under the recipe are refused before anything is published."""
    from cosyvoice.acoustic.reference import flow_v1_state, llm_v1_state

    layout = DataLayout(str(tmp_path / "data"))
    path = layout.model_file("llm")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(llm_v1_state(7, "tiny"), path)

    def averaged_llm(recipe: str) -> None:
        instance.report_runless_asset_event(dg.AssetMaterialization("llm_averaged", metadata={
            "path": path, "sha256": sha256(path), "recipe": recipe}))

    def failure(**config) -> str:
        result = materialize(tmp_path, data_dir, v1_released, instance, raise_on_error=False, **config)
        assert not result.success
        return result.get_step_failure_events()[0].step_failure_data.user_failure_data.description

    with dg.DagsterInstance.ephemeral() as instance:
        averaged_llm(V1_TINY)
        meta = materialize(tmp_path, data_dir, v1_released, instance, load_test="skip") \
            .get_asset_materialization_events()[0].materialization.metadata
        files = meta["acoustic_files"].value
        assert meta["acoustic_source"].value == {"llm.pt": "pipeline", "cosyvoice.yaml": "pipeline",
                                                 "flow.pt": "released", "hift.pt": "released"}
        served = os.path.join(meta["root"].value, str(meta["version"].value), "cosyvoice2_model")
        assert files["llm.pt"]["path"] == path and sha256(os.path.join(served, "llm.pt")) == sha256(path)
        assert sha256(os.path.join(served, "cosyvoice.yaml")) == sha256(V1_TINY)

        averaged_llm(V2_TINY)
        meta = materialize(tmp_path, data_dir, v1_released, instance, load_test="skip") \
            .get_asset_materialization_events()[0].materialization.metadata
        assert meta["acoustic_source"].value["llm.pt"] == "released"
        assert meta["acoustic_source"].value["cosyvoice.yaml"] == "released"
        message = failure(llm_backend="tensorrtllm", load_test="skip")
        assert "is a cosyvoice1 model" in message and "llm_backend: tensorrtllm" in message

        torch.save(flow_v1_state(7, "tiny"), path)  # an averaged "LLM" that is no TransformerLM of the recipe
        averaged_llm(V1_TINY)
        message = failure(load_test="skip")
        assert "do not fit together: llm.pt from" in message and "(pipeline) does not load under cosyvoice.yaml" in message
    assert not os.path.exists(os.path.join(meta["root"].value, "3"))  # two versions published, the refusals none


def test_a_cosyvoice1_dir_lacking_what_its_repository_serves_fails_naming_the_files(tmp_path, data_dir):  # noqa: F811
    released = tmp_path / "CosyVoice-300M"
    released.mkdir()
    shutil.copy(V1_TINY, released / "cosyvoice.yaml")
    result = materialize(tmp_path, data_dir, str(released), raise_on_error=False, load_test="skip")
    assert not result.success
    message = result.get_step_failure_events()[0].step_failure_data.user_failure_data.description
    assert "is a cosyvoice1 model dir (cosyvoice.yaml)" in message
    assert "lacks llm.pt, flow.pt, hift.pt, campplus.onnx, speech_tokenizer_v1.onnx" in message
    assert not os.path.exists(DataLayout(str(tmp_path / "data")).triton_root("cosyvoice"))
