"""Recipes load safely: ours, the upstream recipe layout unchanged, and hostile yaml refused."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

from cosyvoice.config import UnsafeConfigError, load_recipe, sanitize, training_overrides
from cosyvoice.dataset import processors
from cosyvoice.dataset.pipeline import PipelineConfig
from cosyvoice.llm import CosyVoice3LM, Qwen2LM

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")

# The shape of upstream's examples/libritts/cosyvoice2/conf/cosyvoice2.yaml: upstream class paths,
# flow/hift/hifigan sections with modules we do not have, gan-only processors, the seed calls.
UPSTREAM_SHAPED = textwrap.dedent("""
    __set_seed1: !apply:random.seed [1986]
    __set_seed2: !apply:numpy.random.seed [1986]
    __set_seed3: !apply:torch.manual_seed [1986]
    __set_seed4: !apply:torch.cuda.manual_seed_all [1986]
    sample_rate: 24000
    llm_input_size: 32
    llm_output_size: 32
    qwen_pretrain_path: ''
    token_mel_ratio: 2
    llm: !new:cosyvoice.llm.llm.Qwen2LM
        llm_input_size: !ref <llm_input_size>
        llm_output_size: !ref <llm_output_size>
        speech_token_size: 6561
        length_normalized_loss: True
        lsm_weight: 0
        mix_ratio: [5, 15]
        llm: !new:cosyvoice.llm.llm.Qwen2Encoder
            pretrain_path: !ref <qwen_pretrain_path>
        sampling: !name:cosyvoice.utils.common.ras_sampling
            top_p: 0.8
            top_k: 25
            win_size: 10
            tau_r: 0.1
    flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec
        input_size: 512
        encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
            output_size: 512
        decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
            cfm_params: !new:omegaconf.DictConfig
                content: {sigma_min: 1e-06}
    hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
        in_channels: 80
    hifigan: !new:cosyvoice.hifigan.hifigan.HiFiGan
        generator: !ref <hift>
        mel_spec_transform: [!name:matcha.utils.audio.mel_spectrogram {n_fft: 1920}]
    parquet_opener: !name:cosyvoice.dataset.processor.parquet_opener
    get_tokenizer: !name:cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer
        token_path: !ref <qwen_pretrain_path>
        skip_special_tokens: True
    tokenize: !name:cosyvoice.dataset.processor.tokenize
        get_tokenizer: !ref <get_tokenizer>
        allowed_special: 'all'
    filter: !name:cosyvoice.dataset.processor.filter
        max_length: 6000
        min_length: 100
        token_max_length: 200
        token_min_length: 1
    resample: !name:cosyvoice.dataset.processor.resample
        resample_rate: !ref <sample_rate>
    truncate: !name:cosyvoice.dataset.processor.truncate
        truncate_length: 24480
    feat_extractor: !name:matcha.utils.audio.mel_spectrogram
        n_fft: 1920
        num_mels: 80
        sampling_rate: !ref <sample_rate>
        hop_size: 480
        win_size: 1920
        fmin: 0
        fmax: 8000
        center: False
    compute_fbank: !name:cosyvoice.dataset.processor.compute_fbank
        feat_extractor: !ref <feat_extractor>
        num_frames: 960
    compute_whisper_fbank: !name:cosyvoice.dataset.processor.compute_whisper_fbank
        num_frames: 960
    compute_f0: !name:cosyvoice.dataset.processor.compute_f0
        sample_rate: !ref <sample_rate>
        hop_size: 480
    parse_embedding: !name:cosyvoice.dataset.processor.parse_embedding
        normalize: True
    shuffle: !name:cosyvoice.dataset.processor.shuffle
        shuffle_size: 1000
    sort: !name:cosyvoice.dataset.processor.sort
        sort_size: 500
    batch: !name:cosyvoice.dataset.processor.batch
        batch_type: 'dynamic'
        max_frames_in_batch: 2000
    padding: !name:cosyvoice.dataset.processor.padding
        use_spk_embedding: False
    data_pipeline: [!ref <parquet_opener>, !ref <tokenize>, !ref <filter>, !ref <resample>, !ref <compute_fbank>,
                    !ref <parse_embedding>, !ref <compute_whisper_fbank>, !ref <shuffle>, !ref <sort>, !ref <batch>,
                    !ref <padding>]
    data_pipeline_gan: [!ref <parquet_opener>, !ref <tokenize>, !ref <truncate>, !ref <compute_f0>]
    train_conf:
        optim: adam
        optim_conf:
            lr: 1e-5
        scheduler: constantlr
        scheduler_conf:
            warmup_steps: 2500
        max_epoch: 200
        grad_clip: 5
        accum_grad: 2
        log_interval: 100
        save_per_step: -1
""")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A CosyVoice-BlankEN-like dir: the Qwen2 BPE files + a small Qwen2 config.json (no weights)."""
    import shutil

    from transformers import Qwen2Config

    from cosyvoice.dataset.text import bundled_qwen_tokenizer_dir

    d = tmp_path_factory.mktemp("blanken")
    for name in os.listdir(bundled_qwen_tokenizer_dir()):
        shutil.copy(os.path.join(bundled_qwen_tokenizer_dir(), name), d / name)
    Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(d)
    return str(d)


def test_upstream_recipe_yaml_loads_unchanged_into_our_classes(tmp_path, qwen_dir):
    path = tmp_path / "cosyvoice2.yaml"
    path.write_text(UPSTREAM_SHAPED)
    configs = load_recipe(str(path), training_overrides("llm", qwen_dir))
    assert type(configs["llm"]) is Qwen2LM
    assert configs["flow"] is None and configs["hift"] is None and configs["hifigan"] is None
    assert configs["llm"].llm.model.config.hidden_size == 32
    pipeline = PipelineConfig.from_recipe(configs)
    assert (pipeline.max_length, pipeline.min_length, pipeline.max_frames_in_batch, pipeline.shuffle_size,
            pipeline.sort_size, pipeline.resample_rate, pipeline.whisper_feat) == (6000, 100, 2000, 1000, 500, 24000, True)
    assert pipeline.qwen_pretrain_path == qwen_dir and pipeline.mel.n_fft == 1920 and pipeline.mel.fmax == 8000
    # the gan processors resolve to ours, with the recipe's keywords
    assert configs["truncate"].func is processors.truncate and configs["truncate"].keywords == {"truncate_length": 24480}
    assert (pipeline.truncate_length, pipeline.f0_hop) == (24480, 480) and configs["compute_f0"].func is processors.compute_f0


@pytest.mark.parametrize("name,cls,version", [("cosyvoice2-tiny.yaml", Qwen2LM, "cosyvoice2"),
                                              ("cosyvoice3-tiny.yaml", CosyVoice3LM, "cosyvoice3")])
def test_our_recipes_build_the_llm_and_the_pipeline_config(name, cls, version):
    from cosyvoice.dataset.text import bundled_qwen_tokenizer_dir

    configs = load_recipe(os.path.join(CONFIGS, name), training_overrides("llm", bundled_qwen_tokenizer_dir()))
    assert type(configs["llm"]) is cls
    pipeline = PipelineConfig.from_recipe(configs)
    assert pipeline.tokenizer_version == version
    assert pipeline.mel.fmax == (8000 if version == "cosyvoice2" else None)


def test_full_size_recipes_describe_qwen2_0_5b():
    for name in ("cosyvoice2.yaml", "cosyvoice3.yaml"):
        text = open(os.path.join(CONFIGS, name)).read()
        sanitize(text)  # every tag allowed
        assert "num_hidden_layers: 24" in text and "num_key_value_heads: 2" in text and "intermediate_size: 4864" in text


@pytest.mark.parametrize("payload", [
    "x: !apply:os.system ['touch {marker}']",
    "x: !new:subprocess.Popen {{args: [touch, '{marker}']}}",
    "x: !!python/object/apply:os.system ['touch {marker}']",
    "x: !name:cosyvoice.llm.lm.random.seed",
    "x: !new:cosyvoice.storage.remove {{url: '{marker}'}}",
    "x: !module:os",
    "x: !include:other.yaml",
    "x: !apply:builtins.exec ['open(\"{marker}\", \"w\")']",
])
def test_unsafe_yaml_is_refused_before_anything_runs(tmp_path, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text("a: 1\n" + payload.format(marker=marker) + "\n")
    with pytest.raises(UnsafeConfigError):
        load_recipe(str(path))
    assert not marker.exists()


def test_overridden_sections_are_not_checked_but_others_are(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("flow: !new:evil.Thing {}\nx: 1\n")
    assert load_recipe(str(path), {"flow": None})["flow"] is None
    with pytest.raises(UnsafeConfigError, match="evil.Thing"):
        load_recipe(str(path))


@pytest.mark.parametrize("tag", ["new", "name"])
def test_a_module_outside_the_allow_list_is_never_imported(tmp_path, monkeypatch, tag):
    """Importing runs a module's top-level code: the name is refused before any import happens."""
    marker = tmp_path / "imported"
    (tmp_path / "sideeffect_mod.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef thing():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "r.yaml"
    path.write_text(f"x: !{tag}:sideeffect_mod.thing\n")
    with pytest.raises(UnsafeConfigError, match="sideeffect_mod.thing"):
        load_recipe(str(path))
    assert not marker.exists()
    assert "sideeffect_mod" not in sys.modules


def test_an_unimplemented_upstream_name_is_refused_for_new_and_a_raising_partial_for_name(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("f: !name:cosyvoice.utils.common.fade_in_out\n")
    with pytest.raises(NotImplementedError):
        load_recipe(str(path))["f"]()
    path.write_text("f: !new:cosyvoice.storage.remove {url: x}\n")
    with pytest.raises(UnsafeConfigError, match="outside the allowed modules"):
        load_recipe(str(path))
