"""Reference acoustic models: the released flow.pt key/shape table, strict and safe loading, and the
seeded random-weight model dir written by make-reference-models."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch

from cosyvoice.acoustic.flow import FlowConfig, FlowModel, load_flow
from cosyvoice.acoustic.hift import HiFTConfig, load_hift
from cosyvoice.acoustic.recipe import acoustic_configs
from cosyvoice.acoustic.reference import write_acoustic_models
from cosyvoice.cli import main as cli_main
from cosyvoice.features.reference_models import make_reference_models

FLOW_KEYS = Path(__file__).parent / "data" / "flow_keys.tsv"


def key_table(path: Path) -> dict[str, tuple[int, ...]]:
    table = {}
    for line in path.read_text().splitlines():
        key, shape = line.split("\t")
        table[key] = tuple(int(n) for n in shape.split(",") if n)
    return table


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("acoustic"))
    write_acoustic_models(out, seed=0, size="tiny")
    return out


def test_the_full_flow_has_upstreams_keys_and_shapes():
    """The table was generated once from upstream's CausalMaskedDiffWithXvec built with the recipe's settings."""
    table = key_table(FLOW_KEYS)
    assert len(table) == 1121 and table["input_embedding.weight"] == (6561, 512)
    with torch.device("meta"):
        model = FlowModel(FlowConfig.full())
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert sorted(set(ours) ^ set(table)) == []
    assert {k: v for k, v in ours.items() if table[k] != v} == {}


@pytest.fixture()
def tiny_flow(tiny_dir) -> dict:
    return torch.load(os.path.join(tiny_dir, "flow.pt"), weights_only=True)


def test_load_flow_names_the_missing_and_the_unexpected_key(tmp_path, tiny_flow):
    state = tiny_flow
    del state["encoder_proj.bias"]
    state["encoder.extra_layer.weight"] = torch.zeros(3)
    path = tmp_path / "flow.pt"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        load_flow(str(path), FlowConfig.tiny())
    message = str(info.value)
    assert "missing keys 1: encoder_proj.bias" in message and "unexpected keys 1: encoder.extra_layer.weight" in message
    assert str(path) in message


def test_load_flow_names_a_shape_mismatch(tmp_path, tiny_flow):
    state = dict(tiny_flow)
    state["spk_embed_affine_layer.weight"] = torch.zeros(80, 191)
    path = tmp_path / "flow.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"spk_embed_affine_layer\.weight: file \(80, 191\), model \(80, 192\)"):
        load_flow(str(path), FlowConfig.tiny())
    # the config must match the file: another feed-forward width is named too
    wider = FlowConfig(**{**FlowConfig.tiny().to_dict(), "encoder_hidden": 512})
    with pytest.raises(ValueError, match=r"encoders\.0\.feed_forward\.w_1\.weight: file \(256, 512\), model \(512, 512\)"):
        load_flow(tiny_flow, wider)


class _TouchOnLoad:
    """Unpickling this runs Path.touch: what weights_only=True must refuse to do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.mark.parametrize("loader", ["flow", "hift"])
def test_a_pickled_object_in_a_checkpoint_is_refused_without_running(tmp_path, loader):
    marker = tmp_path / "pwned"
    path = tmp_path / f"{loader}.pt"
    torch.save({"payload": _TouchOnLoad(marker)}, path)
    load = (lambda p: load_flow(p, FlowConfig.tiny())) if loader == "flow" else (lambda p: load_hift(p, HiFTConfig.tiny()))
    with pytest.raises(Exception, match="weights_only"):
        load(str(path))
    assert not marker.exists()


def test_the_written_model_dir_loads_strictly_with_the_configs_it_carries(tiny_dir):
    assert sorted(os.listdir(tiny_dir)) == ["cosyvoice2.yaml", "flow.pt", "hift.pt"]
    flow_config, hift_config = acoustic_configs(os.path.join(tiny_dir, "cosyvoice2.yaml"))
    assert (flow_config, hift_config) == (FlowConfig.tiny(), HiFTConfig.tiny())
    flow = load_flow(os.path.join(tiny_dir, "flow.pt"), flow_config)
    hift = load_hift(os.path.join(tiny_dir, "hift.pt"), hift_config)
    raw = torch.load(os.path.join(tiny_dir, "hift.pt"), weights_only=True)
    assert type(raw) is dict and "conv_pre.weight_g" in raw and "conv_pre.weight_v" in raw
    assert type(torch.load(os.path.join(tiny_dir, "flow.pt"), weights_only=True)) is dict
    # no tensor is trivially constant (norm gains/biases, position biases and Snake alphas are perturbed)
    for model in (flow, hift):
        flat = {k: v.reshape(-1) for k, v in model.state_dict().items() if v.numel() > 1}
        assert [k for k, v in flat.items() if bool((v == v[0]).all())] == []


def test_the_reference_weights_speak(tiny_dir):
    """Finite, non-silent audio of the expected length from the runtime on the written dir."""
    from cosyvoice.acoustic.token2wav import Token2Wav

    runtime = Token2Wav(tiny_dir, device="cpu")
    tokens = np.random.default_rng(0).integers(0, 6561, size=40)
    wav = np.asarray(runtime.synthesize(tokens, generator=torch.Generator().manual_seed(0)))
    assert wav.shape == (40 * 2 * 480,) and np.isfinite(wav).all()
    rms = float(np.sqrt(np.mean(wav.astype(np.float64) ** 2)))
    assert 1e-3 < rms < 0.5, rms


def test_same_seed_same_bytes_other_seed_other_weights_and_the_global_rng_untouched(tmp_path, tiny_dir):
    state = torch.random.get_rng_state()
    again = write_acoustic_models(str(tmp_path / "again"), seed=0, size="tiny")
    other = write_acoustic_models(str(tmp_path / "other"), seed=1, size="tiny")
    assert torch.equal(torch.random.get_rng_state(), state)
    for part in ("flow", "hift", "config"):
        name = again[part]["file"]
        assert again[part]["sha256"] == sha(os.path.join(tiny_dir, name)) == sha(tmp_path / "again" / name)
    assert other["flow"]["sha256"] != again["flow"]["sha256"] and other["hift"]["sha256"] != again["hift"]["sha256"]
    assert other["config"]["sha256"] == again["config"]["sha256"]
    # rewriting identical bytes leaves the files alone
    assert not any(v["changed"] for v in write_acoustic_models(str(tmp_path / "again"), seed=0, size="tiny").values())
    with pytest.raises(ValueError, match="size must be one of"):
        write_acoustic_models(str(tmp_path / "x"), size="small")


def test_make_reference_models_writes_the_acoustic_model_dir_and_is_idempotent(tmp_path, tiny_dir, capsys):
    out = str(tmp_path / "models")
    first = make_reference_models(out, seed=0, size="tiny", models=["flow", "hift"])
    assert {k: v["status"] for k, v in first.items()} == {"flow": "built", "hift": "built", "cosyvoice2.yaml": "built"}
    for name, file in (("flow", "flow.pt"), ("hift", "hift.pt"), ("cosyvoice2.yaml", "cosyvoice2.yaml")):
        assert first[name]["sha256"] == sha(os.path.join(out, file)) == sha(os.path.join(tiny_dir, file))
    spec = json.loads(Path(out, "reference_models.json").read_text())
    assert spec["flow"]["seed"] == 0 and spec["flow"]["size"] == "tiny" and spec["cosyvoice2.yaml"]["size"] == "tiny"

    assert cli_main(["make-reference-models", "--out", out, "--size", "tiny", "--models", "flow,hift"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("up to date") == 3, printed

    reseeded = make_reference_models(out, seed=1, size="tiny", models=["flow", "hift"])
    assert {k: v["status"] for k, v in reseeded.items()} == {"flow": "built", "hift": "built",
                                                            "cosyvoice2.yaml": "up to date"}
    Path(out, "hift.pt").write_bytes(b"tampered")
    assert make_reference_models(out, seed=1, size="tiny", models=["hift"])["hift"]["status"] == "built"
    load_hift(os.path.join(out, "hift.pt"), HiFTConfig.tiny())
