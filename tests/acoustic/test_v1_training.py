"""CosyVoice1's acoustic models trained by recipe: the v1 flow (MaskedDiffWithXvec) and the 22.05 kHz HiFT.

The recipe's sections are read into FlowV1Config / HiFTConfig (upstream's own v1 yaml gives the modules
of the released CosyVoice-300M files, key for key), unsupported settings are refused by name, and the
trainer's ``--model flow`` / ``--model hifigan`` train the tiny v1 recipe on shards of 50 Hz v1 tokens
and write files that load strictly into the v1 modules with the released key layouts.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from cosyvoice.acoustic.flow import FlowConfig
from cosyvoice.acoustic.flow_v1 import FlowV1Config, FlowV1Model, load_flow_v1
from cosyvoice.acoustic.hift import HiFTConfig, load_hift
from cosyvoice.acoustic.recipe import acoustic_configs, acoustic_configs_v1, flow_generation
from cosyvoice.config import UnsafeConfigError
from cosyvoice.train.checkpoint import load_model_weights
from cosyvoice.train.models import trained_model
from cosyvoice.train.options import TrainOptions
from cosyvoice.train.trainer import train
from tests.support.v1_recipes import small_gan_recipe

HERE = os.path.dirname(__file__)
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
UPSTREAM_V1 = os.path.join(ROOT, "tests", "llm", "data", "upstream_cosyvoice.yaml")  # upstream's, unchanged
UPSTREAM_V2 = os.path.join(HERE, "data", "upstream_cosyvoice2.yaml")
TINY_V1 = os.path.join(ROOT, "configs", "cosyvoice-tiny.yaml")
FULL_V1 = os.path.join(ROOT, "configs", "cosyvoice.yaml")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _table(name: str) -> dict[str, tuple[int, ...]]:
    with open(os.path.join(HERE, "data", name)) as f:
        rows = [line.split("\t") for line in f.read().splitlines() if line]
    return {key: tuple(int(n) for n in shape.split(",") if n) for key, shape in rows}


def _edited(old: str, new: str, path: str = UPSTREAM_V1) -> str:
    with open(path) as f:
        text = f.read()
    assert text.count(old) == 1, old
    return text.replace(old, new)


# -- reading the recipe ------------------------------------------------------------------------------
def test_upstreams_v1_recipe_reads_into_the_released_modules():
    """Upstream's v1 yaml gives the released CosyVoice-300M flow.pt / hift.pt layouts, key for key (the layouts
    of FlowV1Config.full() and HiFTConfig.v1() are checked against the tables in test_flow_v1 / test_hift_v1)."""
    flow, hift = acoustic_configs_v1(UPSTREAM_V1)
    assert flow == FlowV1Config.full() and hift == HiFTConfig.v1()
    assert (flow.encoder_attention_dropout, flow.sigma_min, flow.training_cfg_rate, flow.cfg_rate) == (0.1, 1e-6, 0.2, 0.7)
    assert flow_generation(UPSTREAM_V1) == 1 and flow_generation(UPSTREAM_V2) == 2


def test_our_v1_configs_read_as_the_full_and_tiny_models():
    assert acoustic_configs_v1(FULL_V1) == (FlowV1Config.full(), HiFTConfig.v1())
    assert acoustic_configs_v1(TINY_V1) == (FlowV1Config.tiny(), HiFTConfig.tiny_v1())


def test_each_reader_names_the_other_for_the_other_generation():
    with pytest.raises(ValueError, match=r"CosyVoice 1 .*read this recipe with acoustic_configs_v1"):
        acoustic_configs(UPSTREAM_V1)
    with pytest.raises(ValueError, match=r"CosyVoice 2 .*read this recipe with acoustic_configs\)"):
        acoustic_configs_v1(UPSTREAM_V2)
    assert isinstance(acoustic_configs(UPSTREAM_V2)[0], FlowConfig)


@pytest.mark.parametrize("old,new,named", [
    ("use_cnn_module: False\n        macaron_style: False\n    length",
     "use_cnn_module: True\n        macaron_style: False\n    length", "flow.encoder.use_cnn_module = True"),
    ("        macaron_style: False\n    length", "    length", "flow.encoder.macaron_style = True"),  # upstream default
    ("        input_size: 512\n        use_cnn", "        input_size: 256\n        use_cnn", "flow.encoder.input_size = 256"),
    ("        macaron_style: False\n    length", "        macaron_style: False\n        static_chunk_size: 25\n    length",
     "flow.encoder.static_chunk_size = 25"),
    ("        channels: 80\n", "        channels: 96\n", "flow.length_regulator.channels = 96"),
    ("sampling_ratios: [1, 1, 1, 1]", "sampling_ratios: [1, 1, 1, 1]\n        mode: nearest",
     "unknown setting(s) ['mode']"),
    ("solver: 'euler'", "solver: 'midpoint'", "flow.decoder.cfm_params.solver"),
    ("act_fn: 'gelu'", "act_fn: 'snake'", "flow.decoder.estimator.act_fn"),
    ("in_channels: 320", "in_channels: 240", "flow.decoder.estimator.in_channels = 240"),
    ("only_mask_loss: True", "only_mask_loss: False", "flow.only_mask_loss"),
    ("decoder: !new:cosyvoice.flow.flow_matching.ConditionalCFM",
     "decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM", "flow.decoder must be `!new:cosyvoice.flow."
     "flow_matching.ConditionalCFM`"),
    ("upsample_rates: [8, 8]", "upsample_rates: [8, 4]", "22050 Hz, hop 256"),
])
def test_v1_settings_the_modules_do_not_honour_are_refused_by_path(old, new, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        acoustic_configs_v1(_edited(old, new))


def test_a_foreign_encoder_class_is_refused_before_it_is_imported():
    """Only upstream's ConformerEncoder node is retagged to its record; any other tag meets the safety check."""
    text = _edited("    encoder: !new:cosyvoice.transformer.encoder.ConformerEncoder", "    encoder: !new:subprocess.Popen")
    with pytest.raises(UnsafeConfigError, match="subprocess.Popen"):
        acoustic_configs_v1(text)


# -- training by recipe ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def v1_lists(training_list, tiny_models, tmp_path_factory) -> tuple[str, str]:
    """(train, cv) data lists of the synthetic corpus with 50 Hz speech_tokenizer_v1 tokens (< 4096): the
    session's v1 shards (tests/train/test_llm_v1.py), the first shard as CV."""
    from tests.train.test_llm_v1 import v1_data_list

    train_list = v1_data_list(training_list, tiny_models, tmp_path_factory)
    cv_list = tmp_path_factory.mktemp("v1_cv") / "cv.data.list"
    cv_list.write_text(open(train_list).read().split()[0] + "\n")
    return train_list, str(cv_list)


def _options(lists, model_dir, **kw) -> TrainOptions:
    base = dict(config=TINY_V1, train_data=lists[0], cv_data=lists[1], model_dir=str(model_dir),
                tensorboard_dir=str(model_dir / "tb"), dist_backend="gloo", log_interval=1)
    return TrainOptions(**{**base, **kw})


def test_the_v1_flow_trains_on_whole_utterances_and_writes_the_released_flow_file(v1_lists, tmp_path):
    opts = _options(v1_lists, tmp_path, model="flow", max_epoch=1)
    task = trained_model(opts)
    assert isinstance(task.module, FlowV1Model) and task.module.config == FlowV1Config.tiny()
    # upstream's v1 pipeline: every token and the mel of the unpadded utterance (no frames-per-token cut)
    changes = task.pipeline_changes()
    assert (changes["token_mel_ratio"], changes["token_rate"]) == (0, 50) and "qwen_pretrain_path" not in changes
    report = train(opts)
    assert report.steps >= 2 and report.unit == "frames"
    assert "token_rate_mismatch" not in report.data_stats[0]  # v1 tokens span their utterance's mel
    assert all(torch.isfinite(torch.tensor(loss)) for loss in report.train_losses)
    weights, _, step = load_model_weights(str(tmp_path / "epoch_0_whole.pt"))
    assert step == report.steps
    assert set(weights) <= set(_table("flow_v1_keys.tsv"))  # released names, no wrapper prefix
    loaded = load_flow_v1(weights, FlowV1Config.tiny())  # strictly
    initial = torch.load(tmp_path / "init.pt", weights_only=True)
    assert not torch.equal(loaded.input_embedding.weight, initial["input_embedding.weight"])


def test_the_v1_flow_drops_and_counts_rows_of_25hz_tokens(training_list, tmp_path):
    """Shards of 25 Hz v2 codes are not CosyVoice1 tokens: every row is dropped and counted by reason."""
    with pytest.raises(RuntimeError, match="the CV list produced no batch"):
        train(_options((training_list, training_list), tmp_path, model="flow", max_steps=1))
    with open(tmp_path / "train_log.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert not [r for r in records if r["tag"] == "TRAIN"]
    (data,) = [r for r in records if r["tag"] == "DATA"]
    assert data["token_rate_mismatch"] >= 12  # half the tokens each utterance's mel needs at 50 Hz


def test_released_v1_files_seed_a_fine_tune_and_a_v2_flow_file_is_refused_by_key(tmp_path):
    """``--checkpoint`` with a CosyVoice-300M ``flow.pt`` / ``hift.pt`` (here the seeded tiny reference files)."""
    from cosyvoice.acoustic.reference import flow_state, flow_v1_state, hift_v1_state

    flow = trained_model(_options(("unused", "unused"), tmp_path, model="flow"))
    released = flow_v1_state(0, "tiny")
    flow.load_weights(released, "flow.pt")
    assert all(torch.equal(flow.module.state_dict()[k], v) for k, v in released.items())
    with pytest.raises(ValueError, match=r"flow.pt does not match the model: missing keys \d+: decoder.estimator"):
        flow.load_weights(flow_state(0, "tiny"), "flow.pt")
    gan = trained_model(_options(("unused", "unused"), tmp_path, model="hifigan"))
    hift = hift_v1_state(0, "tiny")
    gan.load_weights(hift, "hift.pt")
    assert gan.module.generator.training and all(torch.equal(gan.weights()[k], v) for k, v in hift.items())


def test_rows_whose_tokens_do_not_span_their_mel_are_dropped_and_counted():
    from collections import Counter

    from cosyvoice.dataset.processors import check_token_rate

    fps = 22050 / 256
    rows = [{"utt": f"u{n}", "speech_token": [1] * n, "speech_feat": torch.zeros(int(fps * 4), 80)}
            for n in (200, 201, 197, 100, 190)]  # 4 s of mel: 200 tokens at 50 Hz
    stats: Counter = Counter()
    kept = list(check_token_rate(rows, tokens_per_second=50, frames_per_second=fps, stats=stats))
    assert [r["utt"] for r in kept] == ["u200", "u201", "u197"] and stats == {"token_rate_mismatch": 2}


@pytest.fixture(scope="module")
def gan_recipe(tmp_path_factory) -> str:
    return small_gan_recipe(tmp_path_factory.mktemp("v1_gan"), TINY_V1)


def test_the_22k_vocoder_trains_and_writes_the_released_hift_file(v1_lists, gan_recipe, tmp_path):
    report = train(_options(v1_lists, tmp_path, model="hifigan", config=gan_recipe, max_steps=2))
    assert report.steps == 2 and os.path.basename(report.final_checkpoint) == "epoch_0_step_2.pt"
    weights, _, _ = load_model_weights(report.final_checkpoint)
    assert set(weights) <= set(_table("hift_v1_keys.tsv"))
    assert any(k.endswith(".weight_g") for k in weights)
    generator = load_hift(weights, HiFTConfig.tiny_v1())  # strictly
    wav, _ = generator.inference(torch.zeros(1, 80, 10) - 5)
    assert wav.shape[-1] == 10 * 256  # 22.05 kHz: 256 samples per mel frame
    state = torch.load(tmp_path / "epoch_0_step_2.state.pt", weights_only=True)
    assert state["model"] == "hifigan" and state["extra"]["discriminator"]


_HOP = "    hop_size: 256\n    win_size: 1024\n    fmin: 0\n    fmax: 8000"


@pytest.mark.parametrize("model,old,new,named", [
    ("flow", _HOP, _HOP.replace("256", "480"), "feat_extractor (sampling_rate 22050, hop_size 480, num_mels 80)"),
    ("hifigan", _HOP, _HOP.replace("256", "480"), "feat_extractor (sampling_rate 22050, hop_size 480, num_mels 80)"),
    ("flow", "    resample_rate: !ref <sample_rate>", "    resample_rate: 24000", "the resample rate 24000"),
    ("hifigan", "truncate_length: 9216", "truncate_length: 9200", "not a whole number of 256-sample mel frames"),
])
def test_data_settings_the_model_cannot_train_on_are_refused_before_any_data(model, old, new, named, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(_edited(old, new, TINY_V1))
    with pytest.raises(ValueError, match=re.escape(named)):
        trained_model(_options(("unused", "unused"), tmp_path, model=model, config=str(path)))
