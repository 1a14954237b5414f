"""``compose_model_dir``: the served model dir from a released dir and the pipeline's acoustic files."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from cosyvoice import storage
from cosyvoice.triton.model_dir import compose_model_dir
from tests.train.conftest import TINY_RECIPE

FULL_RECIPE = os.path.join(os.path.dirname(TINY_RECIPE), "cosyvoice2.yaml")


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def trained_flow(tmp_path) -> str:
    from cosyvoice.acoustic.reference import flow_state

    path = str(tmp_path / "pipeline" / "flow.pt")
    os.makedirs(os.path.dirname(path))
    torch.save(flow_state(3, "tiny"), path)
    return path


def test_a_local_released_dir_is_linked_and_the_pipelines_files_copied_in(tmp_path, tiny_models, trained_flow):
    dest = str(tmp_path / "served")
    report = compose_model_dir(dest, tiny_models, {"flow.pt": trained_flow, "cosyvoice2.yaml": TINY_RECIPE})
    assert os.path.realpath(os.path.join(dest, "campplus.onnx")) == os.path.realpath(
        os.path.join(tiny_models, "campplus.onnx"))
    assert os.path.islink(os.path.join(dest, "hift.pt")) and not os.path.islink(os.path.join(dest, "flow.pt"))
    assert sha256(os.path.join(dest, "flow.pt")) == sha256(trained_flow)
    assert sorted(os.listdir(dest)) == sorted(os.listdir(tiny_models))
    meta = report.as_metadata()
    assert meta["acoustic_source"] == {"flow.pt": "pipeline", "hift.pt": "released", "cosyvoice2.yaml": "pipeline"}
    assert meta["acoustic_files"]["hift.pt"] == {"source": "released", "path": os.path.join(tiny_models, "hift.pt"),
                                                 "sha256": sha256(os.path.join(tiny_models, "hift.pt")),
                                                 "bytes": os.path.getsize(os.path.join(tiny_models, "hift.pt"))}
    assert meta["acoustic_files"]["flow.pt"]["path"] == trained_flow


def test_a_released_dir_in_an_object_store_is_downloaded(s3_bucket, tmp_path, tiny_models, trained_flow):
    released = f"s3://{s3_bucket}/released"
    storage.upload_dir(tiny_models, released)
    report = compose_model_dir(str(tmp_path / "served"), released, {"flow.pt": trained_flow})
    assert report.files["hift.pt"].url == f"{released}/hift.pt" and report.files["hift.pt"].source == "released"
    assert report.files["hift.pt"].sha256 == sha256(os.path.join(tiny_models, "hift.pt"))
    assert report.files["flow.pt"].sha256 == sha256(trained_flow)
    assert not os.path.islink(os.path.join(report.path, "campplus.onnx"))


def test_acoustic_files_that_do_not_load_together_are_refused_naming_them(tmp_path, tiny_models, trained_flow):
    with pytest.raises(ValueError, match=r"flow.pt from .*pipeline/flow.pt \(pipeline\) does not load under "
                                         r"cosyvoice2.yaml from .*configs/cosyvoice2.yaml \(pipeline\)"):
        compose_model_dir(str(tmp_path / "a"), tiny_models, {"flow.pt": trained_flow, "cosyvoice2.yaml": FULL_RECIPE})
    with pytest.raises(ValueError, match="replaces only flow.pt, hift.pt, cosyvoice2.yaml"):
        compose_model_dir(str(tmp_path / "b"), tiny_models, {"campplus.onnx": trained_flow})
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "old.txt").write_text("x")
    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        compose_model_dir(str(tmp_path / "c"), tiny_models)
    with pytest.raises(FileNotFoundError, match="the released model dir does not exist"):
        compose_model_dir(str(tmp_path / "d"), str(tmp_path / "nowhere"))
