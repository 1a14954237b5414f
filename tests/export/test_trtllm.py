"""TensorRT-LLM checkpoint writer: schema, names, splits, quantization tensors, verified numerically
by the pure-torch reference forward that reads only the written checkpoint."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from cosyvoice.export.quantize import calibrate, calibration_sequences
from cosyvoice.export.reference_forward import ReferenceModel
from cosyvoice.export.trtllm import (
    ConvertOptions,
    check_parallelism,
    checkpoint_config,
    convert_checkpoint,
    load_checkpoint,
    merge_ranks,
)
from cosyvoice.export.verify import baseline_model, verify_checkpoint

# formats reference 1.1: what TRT-LLM emits for CosyVoice2-0.5B (bf16, tp 1), key order included
REFERENCE_CONFIG = json.loads("""{
  "mlp_bias": false, "attn_bias": true, "rotary_base": 1000000.0, "rotary_scaling": null,
  "disable_weight_only_quant_plugin": false, "num_labels": 1, "use_logn_attn": false,
  "moe": {"num_experts": 0, "shared_expert_intermediate_size": 0, "top_k": 0,
          "normalization_mode": 0, "sparse_mixer_epsilon": 0.01, "tp_mode": 0,
          "device_limited_n_group": 0, "device_limited_topk_group": 0,
          "device_limited_routed_scaling_factor": 1.0},
  "architecture": "Qwen2ForCausalLM", "dtype": "bfloat16", "vocab_size": 158336,
  "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "hidden_act": "silu",
  "logits_dtype": "float32", "norm_epsilon": 1e-06, "runtime_defaults": null,
  "position_embedding_type": "rope_gpt_neox", "num_key_value_heads": 2,
  "intermediate_size": 4864, "max_position_embeddings": 32768,
  "mapping": {"world_size": 1, "gpus_per_node": 8, "cp_size": 1, "tp_size": 1, "pp_size": 1,
              "moe_tp_size": 1, "moe_ep_size": 1, "auto_parallel": false},
  "quantization": {"quant_algo": null, "kv_cache_quant_algo": null, "group_size": 128,
                   "smoothquant_val": 0.5, "clamp_val": null, "use_meta_recipe": false,
                   "has_zero_point": false, "pre_quant_scale": false, "exclude_modules": null},
  "use_parallel_embedding": false, "embedding_sharding_dim": 0, "head_size": 64,
  "qk_layernorm": false, "rotary_embedding_dim": 64, "seq_length": 8192, "qwen_type": "qwen2",
  "moe_intermediate_size": 0, "moe_shared_expert_intermediate_size": 0,
  "tie_word_embeddings": false
}""")

HF_0_5B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24,
           "num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 158336,
           "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "hidden_act": "silu", "torch_dtype": "bfloat16",
           "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}}


def test_config_json_of_the_full_size_model_is_the_reference_json_key_for_key():
    cfg = checkpoint_config(HF_0_5B, ConvertOptions(dtype="auto"))
    assert cfg == REFERENCE_CONFIG
    assert list(cfg) == list(REFERENCE_CONFIG)
    assert list(cfg["mapping"]) == list(REFERENCE_CONFIG["mapping"])
    assert list(cfg["quantization"]) == list(REFERENCE_CONFIG["quantization"])


@pytest.mark.parametrize("opts, algo, kv", [
    (ConvertOptions(use_weight_only=True), "W8A16", None),
    (ConvertOptions(use_weight_only=True, weight_only_precision="int4"), "W4A16", None),
    (ConvertOptions(smoothquant=0.5), "W8A8_SQ_PER_TENSOR_PLUGIN", None),
    (ConvertOptions(smoothquant=0.8, per_channel=True, per_token=True), "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", None),
    (ConvertOptions(smoothquant=0.5, per_channel=True), "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN", None),
    (ConvertOptions(smoothquant=0.5, per_token=True), "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", None),
    (ConvertOptions(int8_kv_cache=True), None, "INT8"),
])
def test_quantization_flags_map_to_the_upstream_quant_algo_names(opts, algo, kv):
    q = checkpoint_config(HF_0_5B, opts)["quantization"]
    assert (q["quant_algo"], q["kv_cache_quant_algo"]) == (algo, kv)
    assert q["smoothquant_val"] == (opts.smoothquant if opts.smoothquant is not None else 0.5)


def test_conflicting_or_unsupported_quantization_flags_are_rejected():
    with pytest.raises(ValueError, match="exclusive"):
        ConvertOptions(use_weight_only=True, smoothquant=0.5).quant_algo()
    with pytest.raises(ValueError, match="int4_gptq"):
        ConvertOptions(use_weight_only=True, weight_only_precision="int4_gptq").quant_algo()
    with pytest.raises(ValueError, match="only apply with --smoothquant"):
        ConvertOptions(per_token=True).quant_algo()


def test_tp_sizes_that_do_not_divide_the_heads_are_rejected_with_the_valid_sizes():
    check_parallelism(checkpoint_config(HF_0_5B, ConvertOptions(tp_size=2)))
    for tp in (3, 4, 7):
        with pytest.raises(ValueError, match=r"valid tp sizes: \[1, 2\]"):
            check_parallelism(checkpoint_config(HF_0_5B, ConvertOptions(tp_size=tp)))
    with pytest.raises(ValueError, match="does not divide the 24 layers"):
        check_parallelism(checkpoint_config(HF_0_5B, ConvertOptions(pp_size=5)))


@pytest.fixture(scope="module")
def held_out(tiny_hf, calib_data_list) -> list[list[int]]:
    return calibration_sequences(tiny_hf, calib_data_list.replace("shard0", "shard1"), size=3, max_len=64)


@pytest.fixture(scope="module")
def calibration(tiny_hf, calib_data_list):
    return calibrate(tiny_hf, calib_data_list, size=8, max_len=96)


@pytest.fixture(scope="module")
def bf16_ckpt(tiny_hf, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("bf16_ckpt"))
    report = convert_checkpoint(tiny_hf, out, ConvertOptions(dtype="bfloat16"))
    assert report.tensors_per_rank == [8 * 2 + 3]
    return out


@pytest.fixture(scope="module")
def bf16_baseline(tiny_hf):
    return baseline_model(tiny_hf, "bfloat16")


def _weights(path: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "rank0.safetensors"))


def test_bf16_checkpoint_has_trtllm_names_fused_qkv_and_the_gate_up_swap(tiny_hf, bf16_ckpt):
    hf = load_file(os.path.join(tiny_hf, "model.safetensors"))
    t = _weights(bf16_ckpt)
    assert len(t) == 19
    assert sorted(os.listdir(bf16_ckpt)) == ["config.json", "embedding_bias.safetensors", "rank0.safetensors"]
    p, h = "transformer.layers.1.", "model.layers.1."
    bf = {k: v.to(torch.bfloat16) for k, v in hf.items()}
    assert t[p + "attention.qkv.weight"].shape == (64 + 32 + 32, 64) and t[p + "attention.qkv.weight"].dtype == torch.bfloat16
    assert torch.equal(t[p + "attention.qkv.weight"], torch.cat([bf[f"{h}self_attn.{x}_proj.weight"] for x in "qkv"]))
    assert torch.equal(t[p + "attention.qkv.bias"], torch.cat([bf[f"{h}self_attn.{x}_proj.bias"] for x in "qkv"]))
    assert torch.equal(t[p + "mlp.fc.weight"], bf[h + "mlp.gate_proj.weight"])  # SiLU branch
    assert torch.equal(t[p + "mlp.gate.weight"], bf[h + "mlp.up_proj.weight"])
    assert torch.equal(t[p + "post_layernorm.weight"], bf[h + "post_attention_layernorm.weight"])
    assert torch.equal(t["lm_head.weight"], bf["lm_head.weight"]) and t["lm_head.weight"].shape == (158336, 64)
    with open(os.path.join(bf16_ckpt, "config.json")) as f:
        cfg = json.load(f)
    assert (cfg["vocab_size"], cfg["dtype"], cfg["qwen_type"], cfg["rotary_base"]) == (158336, "bfloat16", "qwen2", 1e6)


def test_float32_checkpoint_reproduces_the_hf_logits_through_the_reference_forward(tiny_hf, held_out, tmp_path):
    convert_checkpoint(tiny_hf, str(tmp_path), ConvertOptions(dtype="float32"))
    report = verify_checkpoint(tiny_hf, str(tmp_path), held_out)
    assert report.passed and report.relative_error < 1e-5 and report.argmax_agreement == 1.0, report.summary()


def test_bf16_checkpoint_matches_within_bf16_rounding_and_a_swapped_gate_up_does_not(tiny_hf, bf16_ckpt, bf16_baseline,
                                                                                    held_out, tmp_path):
    good = verify_checkpoint(tiny_hf, bf16_ckpt, held_out, baseline=bf16_baseline)
    assert good.passed and good.relative_error < 1e-4, good.summary()
    import shutil

    from safetensors.torch import save_file

    shutil.copy(os.path.join(bf16_ckpt, "config.json"), tmp_path / "config.json")
    t = _weights(bf16_ckpt)
    t["transformer.layers.0.mlp.fc.weight"], t["transformer.layers.0.mlp.gate.weight"] = (
        t["transformer.layers.0.mlp.gate.weight"], t["transformer.layers.0.mlp.fc.weight"])
    save_file(t, str(tmp_path / "rank0.safetensors"))
    bad = verify_checkpoint(tiny_hf, str(tmp_path), held_out, baseline=bf16_baseline)
    assert not bad.passed and bad.relative_error > 100 * good.relative_error


def test_tp2_shards_reassemble_to_the_tp1_tensors_exactly(tiny_hf, calibration, tmp_path):
    for name, opts in (("float", ConvertOptions(dtype="bfloat16")),
                       ("sq", ConvertOptions(dtype="bfloat16", smoothquant=0.5, per_channel=True, per_token=True,
                                             int8_kv_cache=True))):
        one, two = tmp_path / f"{name}1", tmp_path / f"{name}2"
        convert_checkpoint(tiny_hf, str(one), opts, calibration=calibration)
        opts.tp_size = 2
        report = convert_checkpoint(tiny_hf, str(two), opts, calibration=calibration)
        cfg2, ranks = load_checkpoint(str(two))
        assert cfg2["mapping"]["world_size"] == 2 and len(report.tensors_per_rank) == 2
        qkv = ranks[0]["transformer.layers.0.attention.qkv.weight"]
        assert qkv.shape == (32 + 16 + 16, 64)  # this rank's Q heads, then its K head, then its V head
        assert ranks[1]["transformer.layers.0.attention.dense.weight"].shape == (64, 32)
        assert ranks[0]["lm_head.weight"].shape == (158336 // 2, 64)
        merged = merge_ranks(cfg2, ranks)
        single = _weights(str(one))
        assert set(merged) == set(single)
        for key, value in single.items():
            assert torch.equal(merged[key], value), key


def test_pp2_splits_layers_and_renumbers_them(tiny_hf, bf16_ckpt, tmp_path):
    convert_checkpoint(tiny_hf, str(tmp_path), ConvertOptions(dtype="bfloat16", pp_size=2))
    cfg, ranks = load_checkpoint(str(tmp_path))
    assert "transformer.vocab_embedding.weight" in ranks[0] and "lm_head.weight" not in ranks[0]
    assert "lm_head.weight" in ranks[1] and "transformer.ln_f.weight" in ranks[1]
    assert {k.split(".")[2] for r in ranks for k in r if k.startswith("transformer.layers.")} == {"0"}
    merged = merge_ranks(cfg, ranks)
    assert all(torch.equal(merged[k], v) for k, v in _weights(bf16_ckpt).items())


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_weight_only_writes_float_weights_with_quant_algo_and_stays_within_its_bound(tiny_hf, bf16_ckpt, bf16_baseline,
                                                                                     held_out, tmp_path, precision):
    convert_checkpoint(tiny_hf, str(tmp_path), ConvertOptions(dtype="bfloat16", use_weight_only=True,
                                                              weight_only_precision=precision))
    plain, wo = _weights(bf16_ckpt), _weights(str(tmp_path))
    assert set(plain) == set(wo) and all(torch.equal(plain[k], wo[k]) for k in plain)  # trtllm-build quantizes
    report = verify_checkpoint(tiny_hf, str(tmp_path), held_out, baseline=bf16_baseline)
    assert report.mode == {"int8": "W8A16", "int4": "W4A16"}[precision]
    assert report.passed, report.summary()
    assert report.relative_error > 1e-3  # the reference really simulates the quantization


SQ_VARIANTS = [(False, False), (True, False), (False, True), (True, True)]


@pytest.mark.parametrize("per_channel, per_token", SQ_VARIANTS)
def test_smoothquant_writes_the_reference_tensors_and_stays_within_its_bound(tiny_hf, held_out, calibration, bf16_baseline,
                                                                            tmp_path, per_channel, per_token):
    opts = ConvertOptions(dtype="bfloat16", smoothquant=0.5, per_channel=per_channel, per_token=per_token)
    convert_checkpoint(tiny_hf, str(tmp_path), opts, calibration=calibration)
    t = _weights(str(tmp_path))
    p = "transformer.layers.0."
    for linear in ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj"):
        assert t[f"{p}{linear}.weight"].dtype == torch.int8
        assert (f"{p}{linear}.act_scale" in t) == (not per_token)
    assert t[p + "attention.qkv.per_channel_scale"].shape == (1, 128)  # Q, K, V scales even per tensor
    assert t[p + "mlp.fc.per_channel_scale"].shape == ((1, 128) if per_channel else (1, 1))
    assert t[p + "attention.dense.smoother"].shape == (1, 64) and t[p + "mlp.proj.smoother"].shape == (1, 128)
    assert t[p + "attention.dense.smoother"].dtype == torch.float32
    assert t[p + "input_layernorm.scale_to_int"].shape == (1,) and t[p + "post_layernorm.scale_to_int"].shape == (1,)
    assert (p + "attention.quantization_scaling_factor" in t) == (not per_token)
    if per_token:
        assert float(t[p + "input_layernorm.scale_to_int"]) == 1.0
    report = verify_checkpoint(tiny_hf, str(tmp_path), held_out, baseline=bf16_baseline)
    assert report.mode == "SQ" and report.passed, report.summary()


def test_int8_kv_cache_scale_comes_from_the_calibrated_qkv_outputs(tiny_hf, held_out, calibration, bf16_baseline, tmp_path):
    convert_checkpoint(tiny_hf, str(tmp_path), ConvertOptions(dtype="bfloat16", int8_kv_cache=True), calibration=calibration)
    t = _weights(str(tmp_path))
    ranges, info = calibration
    for i in range(2):
        scale = t[f"transformer.layers.{i}.attention.kv_cache_scaling_factor"]
        y = torch.cat([ranges[f"model.layers.{i}.self_attn.{x}_proj"]["y"] for x in "qkv"])
        assert scale.shape == (1,) and scale.dtype == torch.float32 and torch.allclose(scale, y.max() / 127)
    assert ReferenceModel(str(tmp_path)).kv_int8
    report = verify_checkpoint(tiny_hf, str(tmp_path), held_out, baseline=bf16_baseline)
    assert report.mode == "INT8_KV" and report.passed and report.relative_error > 1e-4, report.summary()


def test_calibration_uses_our_shards_text_and_speech_tokens(tiny_hf, calib_data_list):
    import pyarrow.parquet as pq

    from cosyvoice.export.hf import speech_vocab_of

    sequences = calibration_sequences(tiny_hf, calib_data_list, size=100, max_len=10_000)
    shard = open(calib_data_list).read().split()[0]
    table = pq.read_table(shard)
    assert len(sequences) == table.num_rows
    vocab = speech_vocab_of(tiny_hf)
    first = sequences[0]
    speech = table.column("speech_token").to_pylist()[0]
    assert first[0] == vocab.sos_id and first[-len(speech) - 1] == vocab.task_id
    assert first[-len(speech):] == [151663 + s for s in speech]


def test_quantized_conversion_without_calibration_data_is_an_actionable_error(tiny_hf, tmp_path):
    with pytest.raises(ValueError, match="--calib_data"):
        convert_checkpoint(tiny_hf, str(tmp_path), ConvertOptions(smoothquant=0.5))
