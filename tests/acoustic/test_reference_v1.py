"""The CosyVoice1 (CosyVoice-300M) reference model dir: seeded files in the released layout that the real
loaders of the released files take strictly, sized by the cosyvoice.yaml the dir carries."""

import os

import pytest
import torch

from cosyvoice.acoustic.flow_v1 import FlowV1Config, load_flow_v1
from cosyvoice.acoustic.hift import HiFTConfig, load_hift
from cosyvoice.acoustic.recipe import acoustic_configs_v1
from cosyvoice.acoustic.reference import REFERENCE_SPEAKER, write_v1_model_files
from cosyvoice.config import load_recipe, training_overrides
from cosyvoice.features.reference_models import make_reference_models
from cosyvoice.model_family import COSYVOICE1, recipe_family

TORCH_PARTS = ("llm", "flow", "hift", "spk2info")


@pytest.fixture(scope="module")
def v1_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("v1-reference"))
    report = make_reference_models(out, seed=0, size="tiny", family="cosyvoice1", models=TORCH_PARTS)
    assert {r["status"] for r in report.values()} == {"built"}
    return out


def test_the_v1_dir_has_the_released_files_and_they_load_strictly_under_its_cosyvoice_yaml(v1_dir):
    assert sorted(os.listdir(v1_dir)) == ["cosyvoice.yaml", "flow.pt", "hift.pt", "llm.pt", "reference_models.json",
                                          "spk2info.pt"]
    recipe = os.path.join(v1_dir, "cosyvoice.yaml")
    assert recipe_family(recipe) is COSYVOICE1
    flow_config, hift_config = acoustic_configs_v1(recipe)
    assert hift_config.sampling_rate == 22050
    load_flow_v1(os.path.join(v1_dir, "flow.pt"), flow_config)
    load_hift(os.path.join(v1_dir, "hift.pt"), hift_config)
    llm = load_recipe(recipe, training_overrides("llm"))["llm"]
    state = torch.load(os.path.join(v1_dir, "llm.pt"), weights_only=True)
    llm.load_state_dict(state, strict=True)
    assert type(llm).__name__ == "TransformerLM" and state["llm_decoder.weight"].shape[0] == 4097
    spk2info = torch.load(os.path.join(v1_dir, "spk2info.pt"), weights_only=True)
    assert list(spk2info) == [REFERENCE_SPEAKER] and spk2info[REFERENCE_SPEAKER]["embedding"].shape == (1, 192)


def test_same_seed_same_bytes_a_rerun_rebuilds_nothing_and_another_seed_other_weights(v1_dir, tmp_path):
    again = make_reference_models(v1_dir, seed=0, size="tiny", family="cosyvoice1", models=TORCH_PARTS)
    assert {r["status"] for r in again.values()} == {"up to date"}
    other = write_v1_model_files(str(tmp_path), seed=1, size="tiny", parts=["flow", "config"])
    same_config = open(os.path.join(v1_dir, "cosyvoice.yaml"), "rb").read() == open(tmp_path / "cosyvoice.yaml", "rb").read()
    assert same_config and other["flow"]["sha256"] != again["flow.pt"]["sha256"]
    with pytest.raises(ValueError, match="unknown CosyVoice1 reference model"):
        make_reference_models(str(tmp_path), family="cosyvoice1", models=["speech_tokenizer_v2"])
    with pytest.raises(ValueError, match="family must be one of"):
        make_reference_models(str(tmp_path), family="cosyvoice9")


def test_the_full_v1_dir_is_sized_as_the_released_cosyvoice_300m():
    """The full recipe's acoustic sections are the released sizes (their key tables: test_flow_v1, test_hift_v1)."""
    from cosyvoice.acoustic.reference import v1_config_text

    flow, hift = acoustic_configs_v1(v1_config_text("full"))
    assert flow == FlowV1Config.full() and hift == HiFTConfig.v1()
