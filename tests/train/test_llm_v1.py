"""CosyVoice1's TransformerLM through the trainer (``--model llm`` with configs/cosyvoice-tiny.yaml) on CPU.

The shards carry v1 speech tokens (the tiny ``speech_tokenizer_v1.onnx``: 50 Hz, codes < 4096) and the
training fixture's embeddings. The checkpoints must hold the released CosyVoice-300M ``llm.pt`` layout
(``tests/llm/data/transformer_lm_keys.tsv``, recorded from upstream's module), load strictly, average
and resume as the Qwen2 LLM's do; what only the Qwen2 body implements is refused by flag.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from cosyvoice import cli
from cosyvoice.config import load_recipe, training_overrides
from cosyvoice.dataset.pipeline import PipelineConfig, TrainingDataset
from cosyvoice.llm import TransformerLM
from cosyvoice.train.checkpoint import average_checkpoints, load_model_weights
from cosyvoice.train.models import LLM
from cosyvoice.train.trainer import TrainOptions, train

from .conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V1_TINY = os.path.join(ROOT, "configs", "cosyvoice-tiny.yaml")
V1_FULL = os.path.join(ROOT, "configs", "cosyvoice.yaml")
UPSTREAM_V1 = os.path.join(ROOT, "tests", "llm", "data", "upstream_cosyvoice.yaml")
KEY_TABLE = os.path.join(ROOT, "tests", "llm", "data", "transformer_lm_keys.tsv")


_V1_LISTS: dict[str, str] = {}


def v1_data_list(training_list: str, tiny_models: str, tmp_path_factory) -> str:
    """The training fixture's shards with v1 speech tokens (the tiny ``speech_tokenizer_v1.onnx`` run over
    the same audio) in their ``speech_token`` column; every other column is kept. Built once per session
    (the v1 LLM tests here and the v1 flow/HiFT tests in tests/acoustic/test_v1_training.py share it)."""
    if training_list in _V1_LISTS:
        return _V1_LISTS[training_list]
    import pyarrow as pa

    from cosyvoice.features.feature_files import read_parquet, write_parquet
    from cosyvoice.features.stages import extract_speech_token

    data = os.path.join(os.path.dirname(os.path.dirname(training_list)), "data")
    root = tmp_path_factory.mktemp("v1")
    src = root / "data"
    src.mkdir()
    for name in ("wav.scp", "text", "utt2spk", "spk2utt"):
        os.symlink(os.path.join(data, name), src / name)
    tokens = extract_speech_token(str(src), os.path.join(tiny_models, "speech_tokenizer_v1.onnx"), num_workers=1).results
    assert max(max(t) for t in tokens.values()) < 4096
    shards = []
    for url in open(training_list).read().split():
        table = read_parquet(url)
        column = table.schema.get_field_index("speech_token")
        v1 = pa.array([tokens[u] for u in table.column("utt").to_pylist()], type=table.schema.field(column).type)
        shards.append(str(root / os.path.basename(url)))
        write_parquet(shards[-1], table.set_column(column, "speech_token", v1))
    (root / "data.list").write_text("\n".join(shards) + "\n")
    _V1_LISTS[training_list] = str(root / "data.list")
    return _V1_LISTS[training_list]


@pytest.fixture(scope="module")
def v1_list(training_list, tiny_models, tmp_path_factory) -> str:
    return v1_data_list(training_list, tiny_models, tmp_path_factory)


def options(v1_list: str, model_dir, **kw) -> TrainOptions:
    base = dict(config=V1_TINY, train_data=v1_list, cv_data=v1_list, model_dir=str(model_dir),
                tensorboard_dir=None, dist_backend="gloo", log_interval=1)
    return TrainOptions(**{**base, **kw})


def released_keys(num_text_blocks: int, num_llm_blocks: int) -> list[str]:
    """The released llm.pt's key names (upstream's order) for a model with these block counts."""
    with open(KEY_TABLE) as f:
        keys = [line.split("\t")[0] for line in f]
    limit = {"text_encoder": num_text_blocks, "llm": num_llm_blocks}
    kept = []
    for key in keys:
        m = re.match(r"(text_encoder|llm)\.encoders\.(\d+)\.", key)
        if m is None or int(m.group(2)) < limit[m.group(1)]:
            kept.append(key)
    return kept


def tiny_lm() -> TransformerLM:
    return load_recipe(V1_TINY, training_overrides("llm"))["llm"]


@pytest.fixture(scope="module")
def v1_run(v1_list, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("v1_run")
    return model_dir, train(options(v1_list, model_dir, max_epoch=2))


def test_the_tiny_v1_llm_trains_and_writes_the_released_llm_pt_layout(v1_run, tmp_path):
    model_dir, report = v1_run
    assert report.steps >= 2 and report.unit == "tokens" and report.throughput > 0
    assert all(loss == loss and loss > 0 for loss in report.train_losses) and report.cv_loss is not None
    records = [json.loads(line) for line in open(os.path.join(model_dir, "train_log.jsonl"))]
    train_records = [r for r in records if r["tag"] == "TRAIN"]
    assert train_records and all(r["tokens_per_s"] > 0 and 0 <= r["padded_fraction"] < 1 for r in train_records)
    assert report.data_stats == [{"epoch": 0}, {"epoch": 1}]  # no utterance dropped or filtered

    avg = average_checkpoints(str(model_dir), str(tmp_path / "llm.pt"), num=2, val_best=True)
    assert len(avg.sources) == 2
    state = torch.load(tmp_path / "llm.pt", weights_only=True)
    assert "epoch" not in state and "step" not in state
    lm = tiny_lm()
    assert list(state) == released_keys(len(lm.text_encoder.encoders), len(lm.llm.encoders))
    lm.load_state_dict(state, strict=True)
    trained, _, _ = load_model_weights(report.final_checkpoint)
    assert not torch.equal(trained["llm_decoder.weight"], load_model_weights(
        os.path.join(model_dir, "init.pt"))[0]["llm_decoder.weight"])  # the weights moved


def test_a_resumed_v1_run_continues_with_the_same_losses(v1_run, v1_list, tmp_path):
    model_dir, report = v1_run
    resumed = train(options(v1_list, tmp_path, max_epoch=2, checkpoint=os.path.join(model_dir, "epoch_0_whole.pt")))
    assert resumed.steps == report.steps
    done = report.steps - len(resumed.train_losses)
    assert done > 0 and resumed.train_losses == report.train_losses[done:]


def test_the_full_v1_recipe_is_cosyvoice_300m_and_counts_6n_over_its_non_embedding_weights():
    with torch.device("meta"):
        task = LLM(TrainOptions(config=V1_FULL, train_data="-", cv_data="-", model_dir="-"))
    lm = task.module
    assert type(lm) is TransformerLM and task.qwen is None
    assert [f"{k}\t{','.join(map(str, v.shape))}" for k, v in lm.state_dict().items()] == \
        open(KEY_TABLE).read().splitlines()
    tables = lm.text_embedding.weight.numel() + lm.speech_embedding.weight.numel() + lm.llm_embedding.weight.numel()
    assert task.flops_per_unit == 6 * (sum(p.numel() for p in lm.parameters()) - tables)
    assert all(p.requires_grad for p in lm.parameters())  # nothing frozen (no unused lm_head)


@pytest.mark.parametrize("recipe", [V1_FULL, UPSTREAM_V1])
def test_the_v1_recipes_data_settings_reach_the_pipeline(recipe):
    configs = load_recipe(recipe, {k: None for k in ("llm", "flow", "hift", "hifigan")})
    p = PipelineConfig.from_recipe(configs)
    assert (p.text_tokenizer, p.resample_rate, p.whisper_feat, p.samples_per_token) == ("whisper", 22050, False, 0)
    assert (p.mel.n_fft, p.mel.hop, p.mel.win, p.mel.fmax, p.mel.sample_rate) == (1024, 256, 1024, 8000, 22050)
    assert (p.max_length, p.min_length, p.token_max_length, p.max_frames_in_batch) == (40960, 0, 200, 2000)
    assert (p.use_spk_embedding, p.truncate_length, p.f0_hop) == (False, 24576, 256)
    assert configs["train_conf"]["scheduler"] == "warmuplr" and configs["train_conf"]["optim_conf"]["lr"] == 0.001


def test_use_spk_embedding_feeds_the_speakers_mean_embedding(v1_list, tmp_path):
    """SFT (``padding: use_spk_embedding: True``): ``embedding`` is the speaker's vector, not the utterance's."""
    sft = tmp_path / "sft.yaml"
    sft.write_text(open(V1_TINY).read().replace("use_spk_embedding: False", "use_spk_embedding: True"))
    for path, want in ((V1_TINY, "utt_embedding"), (str(sft), "spk_embedding")):
        config = PipelineConfig.from_recipe(load_recipe(path, {k: None for k in ("llm", "flow", "hift", "hifigan")}))
        batch = next(iter(TrainingDataset(v1_list, config, train=False)))
        assert torch.equal(batch["embedding"], batch[want])
        assert not torch.equal(batch["utt_embedding"], batch["spk_embedding"])


@pytest.mark.parametrize("flags,named", [
    (["--pack"], "--pack"),
    (["--batch_type", "token", "--pack"], "--pack"),
    (["--attn_implementation", "sdpa"], "--attn_implementation"),
    (["--compile"], "--compile"),
    (["--onnx_path", "/models"], "--onnx_path"),
    (["--dpo"], "no DPO forward"),
    (["--ref_model", "ref.pt"], "no DPO forward"),
])
def test_options_only_the_qwen2_llm_has_are_refused_before_any_data_is_read(flags, named, tmp_path, capsys):
    code = cli.main(["train", "--model", "llm", "--config", V1_TINY, "--train_data", str(tmp_path / "missing.list"),
                     "--cv_data", str(tmp_path / "missing.list"), "--model_dir", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and named in err and "TransformerLM" in err
    assert not os.path.exists(tmp_path / "out")


def test_upstreams_v1_recipe_loads_whole_and_unchanged_and_ours_describes_the_same_models():
    """No section overridden: the LLM is built (meta device), the acoustic sections become records, the
    processors ours; configs/cosyvoice.yaml gives the same LLM layout, acoustic settings and train confs."""
    from cosyvoice.acoustic.recipe import FlowV1Record, HiFiGanRecord, HiFTRecord, acoustic_configs_v1

    with torch.device("meta"):
        upstream, ours = load_recipe(UPSTREAM_V1), load_recipe(V1_FULL)
    for configs in (upstream, ours):
        assert type(configs["llm"]) is TransformerLM and type(configs["flow"]) is FlowV1Record
        assert type(configs["hift"]) is HiFTRecord and type(configs["hifigan"]) is HiFiGanRecord
    shapes = [{k: tuple(v.shape) for k, v in c["llm"].state_dict().items()} for c in (upstream, ours)]
    assert list(shapes[0].items()) == list(shapes[1].items())
    assert acoustic_configs_v1(V1_FULL) == acoustic_configs_v1(UPSTREAM_V1)
    for key in ("train_conf", "train_conf_gan", "sample_rate", "allowed_special"):
        assert ours[key] == upstream[key], key


@pytest.mark.parametrize("old,new", [
    ("cosyvoice.flow.length_regulator.InterpolateRegulator", "cosyvoice.flow.length_regulator.OtherRegulator"),
    ("!name:whisper.tokenizer.get_tokenizer", "!name:whisper.tokenizer.get_encoding"),
])
def test_other_classes_in_upstreams_v1_recipe_are_still_refused(tmp_path, old, new):
    from cosyvoice.config import UnsafeConfigError

    text = open(UPSTREAM_V1).read()
    assert old in text
    (tmp_path / "cosyvoice.yaml").write_text(text.replace(old, new))
    with pytest.raises(UnsafeConfigError, match=new.split(":")[-1]):
        load_recipe(str(tmp_path / "cosyvoice.yaml"))
