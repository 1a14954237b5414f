"""The acoustic sections of a recipe are read safely into FlowConfig / HiFTConfig, or refused by name."""

from __future__ import annotations

import os
import random
import re

import numpy as np
import pytest
import torch

from cosyvoice.acoustic.flow import FlowConfig
from cosyvoice.acoustic.hift import HiFTConfig
from cosyvoice.acoustic.recipe import RECORDS, acoustic_configs
from cosyvoice.config import ALIASES, UnsafeConfigError

HERE = os.path.dirname(__file__)
CONFIGS = os.path.join(HERE, "..", "..", "configs")
UPSTREAM = os.path.join(HERE, "data", "upstream_cosyvoice2.yaml")


def upstream_text() -> str:
    with open(UPSTREAM) as f:
        return f.read()


def edited(old: str, new: str) -> str:
    text = upstream_text()
    assert text.count(old) == 1, old
    return text.replace(old, new)


def test_upstreams_recipe_gives_the_full_configs_and_runs_nothing_else(tmp_path):
    """The file seeds torch/numpy/random at load time and names llm/hifigan classes we lack: none of it runs."""
    torch_state, np_state, py_state = torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    flow, hift = acoustic_configs(UPSTREAM)
    assert flow == FlowConfig.full() and hift == HiFTConfig.full()
    assert flow.n_timesteps == 10 and flow.cfg_rate == 0.7 and flow.frame_chunk == 50
    assert hift.samples_per_frame == 480 and hift.sampling_rate == 24000
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state) and random.getstate() == py_state
    # the text itself works as well as a path
    assert acoustic_configs(upstream_text()) == (flow, hift)


@pytest.mark.parametrize("name,flow,hift", [("cosyvoice2.yaml", FlowConfig.full(), HiFTConfig.full()),
                                            ("cosyvoice2-tiny.yaml", FlowConfig.tiny(), HiFTConfig.tiny())])
def test_our_configs_give_the_matching_configs(name, flow, hift):
    assert acoustic_configs(os.path.join(CONFIGS, name)) == (flow, hift)


def test_every_record_is_reachable_through_the_safe_loaders_aliases():
    assert set(RECORDS) <= set(ALIASES)
    for upstream, cls in RECORDS.items():
        assert ALIASES[upstream] == f"cosyvoice.acoustic.recipe.{cls.__name__}"


@pytest.mark.parametrize("old,new,named", [
    ("use_cnn_module: False", "use_cnn_module: True", "flow.encoder.use_cnn_module"),
    ("        macaron_style: False\n", "", "flow.encoder.macaron_style = True"),  # upstream's default applies
    ("input_layer: 'linear'", "input_layer: 'conv2d'", "flow.encoder.input_layer"),
    ("pos_enc_layer_type: 'rel_pos_espnet'", "pos_enc_layer_type: 'rel_pos'", "pos_enc_layer_type"),
    ("solver: 'euler'", "solver: 'midpoint'", "cfm_params.solver"),
    ("t_scheduler: 'cosine'", "t_scheduler: 'linear'", "cfm_params.t_scheduler"),
    ("channels: [256]", "channels: [256, 256]", "estimator.channels"),
    ("act_fn: 'gelu'", "act_fn: 'snake'", "estimator.act_fn"),
    ("static_chunk_size: !ref <chunk_size> * <token_mel_ratio>", "static_chunk_size: 40", "estimator.static_chunk_size"),
    ("pre_lookahead_len: 3", "pre_lookahead_len: 5", "flow.pre_lookahead_len"),
    ("                reg_loss_type: 'l1'\n", "                reg_loss_type: 'l1'\n                n_timesteps: 20\n",
     "unknown setting(s) ['n_timesteps']"),
    ("    pre_lookahead_len: 3\n", "    pre_lookahead_len: 3\n    n_timesteps: 20\n", "unknown setting(s) ['n_timesteps']"),
    ("flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec", "flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec",
     "CosyVoice 1"),
    ("flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec", "flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithDiT",
     "CosyVoice 3"),
    ("hift: !new:cosyvoice.hifigan.generator.HiFTGenerator", "hift: !new:cosyvoice.hifigan.generator.CausalHiFTGenerator",
     "CosyVoice 3"),
    ("    sampling_rate: !ref <sample_rate>\n    nsf_alpha", "    sampling_rate: 22050\n    nsf_alpha", "22.05 kHz"),
    ("        cond_channels: 512\n", "        cond_channels: 512\n        num_layers: 3\n", "unknown setting(s) ['num_layers']"),
    ("num_class: 1", "num_class: 2", "hift.f0_predictor.num_class"),
])
def test_settings_our_implementation_does_not_honour_are_refused_by_name(old, new, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        acoustic_configs(edited(old, new))


def test_several_unsupported_settings_are_listed_in_one_error():
    text = edited("use_cnn_module: False", "use_cnn_module: True").replace("solver: 'euler'", "solver: 'rk4'")
    with pytest.raises(ValueError) as info:
        acoustic_configs(text)
    assert "use_cnn_module" in str(info.value) and "solver" in str(info.value)


def test_a_class_outside_the_supported_set_is_refused_before_it_is_imported():
    text = edited("encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder",
                  "encoder: !new:cosyvoice.flow.DiT.dit.DiT")
    with pytest.raises(UnsafeConfigError, match="DiT"):
        acoustic_configs(text)


def test_cosyvoice1s_encoder_in_a_cosyvoice2_flow_is_named_not_dumped():
    text = edited("encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder",
                  "encoder: !new:cosyvoice.transformer.encoder.ConformerEncoder")
    with pytest.raises(ValueError, match=r"flow.encoder must be `!new:cosyvoice.transformer.upsample_encoder.Upsample"
                                         r"ConformerEncoder`, got an instance of cosyvoice.llm.transformer.ConformerEncoder"):
        acoustic_configs(text)


@pytest.mark.parametrize("payload", ["!apply:os.system ['touch {marker}']",
                                     "!new:subprocess.Popen {{args: [touch, '{marker}']}}",
                                     "!!python/object/apply:os.system ['touch {marker}']"])
def test_a_hostile_tag_inside_flow_is_refused_before_anything_runs(tmp_path, payload):
    marker = tmp_path / "pwned"
    text = edited("    pre_lookahead_len: 3\n", "    pre_lookahead_len: 3\n    extra: " + payload.format(marker=marker) + "\n")
    with pytest.raises(UnsafeConfigError):
        acoustic_configs(text)
    assert not marker.exists()


def test_a_hostile_tag_in_a_key_the_sections_reference_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    text = edited("chunk_size: 25\n", f"chunk_size: !apply:os.system ['touch {marker}']\n")
    with pytest.raises(UnsafeConfigError):
        acoustic_configs(text)
    assert not marker.exists()


def test_a_recipe_without_acoustic_sections_is_refused_clearly():
    with pytest.raises(ValueError, match="no `flow` section"):
        acoustic_configs(os.path.join(CONFIGS, "cosyvoice3-tiny.yaml"))
    with pytest.raises(ValueError, match="no `hift` section"):
        acoustic_configs(upstream_text().split("\nhift:")[0] + "\n")
