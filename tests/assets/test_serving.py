"""The ``triton_model_repo`` asset shows what it published: a spoken sample of the acoustic models
(waveform + spectrogram PNG) in its metadata, or why there is none."""

from __future__ import annotations

import base64
import os
import shutil

import pytest

from cosyvoice.layout import DataLayout
from tests.triton.conftest import data_dir, hf_dir  # noqa: F401  (the manifest and the tiny HF export)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _materialize(tmp_path, data_dir, hf_dir, model_root):  # noqa: F811
    import dagster as dg

    from assets.serving import triton_model_repo
    from pipelines.resources import DataStore, ModelStore

    layout = DataLayout(str(tmp_path / "data"))
    shutil.copytree(data_dir, layout.manifest_dir("dev-clean"))
    shutil.copytree(hf_dir, layout.export_dir("hf"))  # no engine: the python backend, CPU channel
    result = dg.materialize([triton_model_repo], resources={"store": DataStore(root=layout.root),
                                                            "models": ModelStore(root=model_root)},
                            run_config={"ops": {"triton_model_repo": {"config": {"bls_instances": 1,
                                                                                  "load_test": "skip"}}}})
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
