"""HF ``Qwen2ForCausalLM`` folder -> TensorRT-LLM checkpoint (``config.json`` + ``rank{r}.safetensors``).

Our writer for what ``convert_checkpoint.py`` + ``QWenForCausalLM.save_checkpoint`` produce
(formats reference section 1): the exact ``config.json`` schema (key order as TRT-LLM 0.17-0.20 emits
it), TRT-LLM tensor names, ``[Q; K; V]`` fused on dim 0, the gate/up quirk (``mlp.fc`` = HF
``gate_proj``, the SiLU branch; ``mlp.gate`` = HF ``up_proj``), tensor/pipeline-parallel splits.

Quantization modes (flags as upstream):

* ``--use_weight_only --weight_only_precision int8|int4``: float weights + ``quant_algo`` W8A16 /
  W4A16. ``trtllm-build`` quantizes them on the build GPU (``preprocess_weights``); the quantized
  bytes are interleaved per GPU architecture, so writing them here would be wrong for some targets.
* ``--smoothquant ALPHA [--per_channel] [--per_token]``: SmoothQuant W8A8 (int8 weights, scales,
  smoothers) calibrated on our own data (``cosyvoice.export.quantize``).
* ``--int8_kv_cache``: ``kv_cache_scaling_factor`` per layer from the same calibration.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

from cosyvoice.storage import local_dir, upload_dir

_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WEIGHT_ONLY_ALGOS = {"int8": "W8A16", "int4": "W4A16"}
SQ_ALGOS = {  # (per_channel, per_token) -> QuantAlgo member name
    (False, False): "W8A8_SQ_PER_TENSOR_PLUGIN",
    (True, False): "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
    (False, True): "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN",
    (True, True): "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
}
CONTAINER_IMAGE = "nvcr.io/nvidia/tritonserver:25.06-trtllm-python-py3"


@dataclass
class ConvertOptions:
    """The ``convert_checkpoint.py`` flags we implement (same names)."""

    dtype: str = "auto"
    tp_size: int = 1
    pp_size: int = 1
    use_weight_only: bool = False
    weight_only_precision: str = "int8"
    smoothquant: float | None = None
    per_channel: bool = False
    per_token: bool = False
    int8_kv_cache: bool = False
    calib_data: str | None = None
    calib_size: int = 64
    calib_max_len: int = 512

    def quant_algo(self) -> str | None:
        if self.use_weight_only and self.smoothquant is not None:
            raise ValueError("--use_weight_only and --smoothquant are exclusive: choose one weight quantization")
        if self.use_weight_only:
            if self.weight_only_precision not in WEIGHT_ONLY_ALGOS:
                raise ValueError(f"--weight_only_precision {self.weight_only_precision!r}: supported are int8, int4 "
                                 "(int4_gptq needs a GPTQ-quantized HF model, which this pipeline does not produce)")
            return WEIGHT_ONLY_ALGOS[self.weight_only_precision]
        if self.smoothquant is not None:
            if not 0.0 <= self.smoothquant <= 1.0:
                raise ValueError(f"--smoothquant {self.smoothquant}: alpha must lie in [0, 1]")
            return SQ_ALGOS[(self.per_channel, self.per_token)]
        if self.per_channel or self.per_token:
            raise ValueError("--per_channel/--per_token only apply with --smoothquant")
        return None

    @property
    def needs_calibration(self) -> bool:
        return self.smoothquant is not None or self.int8_kv_cache

    def mode_name(self) -> str:
        algo = self.quant_algo()
        name = algo or "none"
        return name + ("+INT8_KV" if self.int8_kv_cache else "")


@dataclass
class ConvertReport:
    output_dir: str
    dtype: str
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    tp_size: int
    pp_size: int
    tensors_per_rank: list[int]
    bytes: int
    seconds: float
    calibration: dict = field(default_factory=dict)

    def as_metadata(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        calib = (f", calibrated on {self.calibration['sequences']} sequences / {self.calibration['tokens']} tokens"
                 if self.calibration else "")
        return (f"TRT-LLM checkpoint at {self.output_dir}: {self.dtype}, quant_algo {self.quant_algo}, kv "
                f"{self.kv_cache_quant_algo}, tp {self.tp_size} x pp {self.pp_size}, tensors per rank "
                f"{self.tensors_per_rank}, {self.bytes / 1e6:.1f} MB in {self.seconds:.1f} s{calib}")


def _rope_theta(hf: dict) -> float:
    if "rope_theta" in hf:
        return float(hf["rope_theta"])
    return float((hf.get("rope_parameters") or {}).get("rope_theta", 100000.0))  # QWenConfig's default


def resolve_dtype(dtype: str, hf: dict) -> str:
    """``auto``: the HF model's dtype, float32 -> float16 (as upstream)."""
    if dtype != "auto":
        if dtype not in _TORCH:
            raise ValueError(f"--dtype {dtype!r}: choose auto, float16, bfloat16 or float32")
        return dtype
    src = hf.get("torch_dtype") or hf.get("dtype") or "float16"
    return "float16" if src == "float32" else src


def checkpoint_config(hf: dict, opts: ConvertOptions) -> dict:
    """``config.json`` of the checkpoint, keys in the order TRT-LLM writes them (formats ref 1.1)."""
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_size = hf.get("head_dim") or hidden // heads
    algo = opts.quant_algo()
    return {
        "mlp_bias": False, "attn_bias": True, "rotary_base": _rope_theta(hf), "rotary_scaling": None,
        "disable_weight_only_quant_plugin": False, "num_labels": 1, "use_logn_attn": False,
        "moe": {"num_experts": 0, "shared_expert_intermediate_size": 0, "top_k": 0, "normalization_mode": 0,
                "sparse_mixer_epsilon": 0.01, "tp_mode": 0, "device_limited_n_group": 0,
                "device_limited_topk_group": 0, "device_limited_routed_scaling_factor": 1.0},
        "architecture": "Qwen2ForCausalLM", "dtype": resolve_dtype(opts.dtype, hf), "vocab_size": hf["vocab_size"],
        "hidden_size": hidden, "num_hidden_layers": hf["num_hidden_layers"], "num_attention_heads": heads,
        "hidden_act": hf.get("hidden_act", "silu"), "logits_dtype": "float32", "norm_epsilon": hf["rms_norm_eps"],
        "runtime_defaults": None, "position_embedding_type": "rope_gpt_neox",
        "num_key_value_heads": hf.get("num_key_value_heads", heads), "intermediate_size": hf["intermediate_size"],
        "max_position_embeddings": hf["max_position_embeddings"],
        "mapping": {"world_size": opts.tp_size * opts.pp_size, "gpus_per_node": 8, "cp_size": 1, "tp_size": opts.tp_size,
                    "pp_size": opts.pp_size, "moe_tp_size": opts.tp_size, "moe_ep_size": 1, "auto_parallel": False},
        "quantization": {"quant_algo": algo, "kv_cache_quant_algo": "INT8" if opts.int8_kv_cache else None,
                         "group_size": 128, "smoothquant_val": opts.smoothquant if opts.smoothquant is not None else 0.5,
                         "clamp_val": None, "use_meta_recipe": False, "has_zero_point": False, "pre_quant_scale": False,
                         "exclude_modules": None},
        "use_parallel_embedding": False, "embedding_sharding_dim": 0, "head_size": head_size, "qk_layernorm": False,
        "rotary_embedding_dim": head_size, "seq_length": 8192, "qwen_type": hf.get("model_type", "qwen2"),
        "moe_intermediate_size": 0, "moe_shared_expert_intermediate_size": 0, "tie_word_embeddings": False,
    }


def check_parallelism(cfg: dict) -> None:
    """Raise with the valid sizes when tp/pp do not divide the model (formats ref 1.4)."""
    tp, pp = cfg["mapping"]["tp_size"], cfg["mapping"]["pp_size"]
    heads, kv, layers = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]
    if tp < 1 or pp < 1:
        raise ValueError(f"--tp_size {tp} / --pp_size {pp}: sizes must be >= 1")
    valid = [t for t in range(1, heads + 1) if heads % t == 0 and (kv % t == 0 or t % kv == 0)
             and cfg["intermediate_size"] % t == 0]
    if tp not in valid:
        raise ValueError(f"--tp_size {tp} does not divide this model ({heads} attention heads, {kv} KV heads, "
                         f"intermediate {cfg['intermediate_size']}); valid tp sizes: {valid}")
    if layers % pp:
        raise ValueError(f"--pp_size {pp} does not divide the {layers} layers; valid pp sizes: "
                         f"{[p for p in range(1, layers + 1) if layers % p == 0]}")


def _qkv_sections(cfg: dict) -> tuple[int, int]:
    head = cfg["head_size"]
    return cfg["num_attention_heads"] * head, cfg["num_key_value_heads"] * head


def _split_qkv(t: torch.Tensor, cfg: dict, tp: int, rank: int, dim: int) -> torch.Tensor:
    """Per rank: its Q chunk, K chunk, V chunk (K/V heads repeated first when fewer than tp)."""
    q_dim, kv_dim = _qkv_sections(cfg)
    q, k, v = torch.split(t, [q_dim, kv_dim, kv_dim], dim=dim)
    kv_heads = cfg["num_key_value_heads"]
    if kv_heads < tp:
        reps = tp // kv_heads
        shape = list(k.shape)
        shape[dim:dim + 1] = [kv_heads, cfg["head_size"]]
        k = k.reshape(shape).repeat_interleave(reps, dim=dim).flatten(dim, dim + 1)
        v = v.reshape(shape).repeat_interleave(reps, dim=dim).flatten(dim, dim + 1)
    return torch.cat([x.chunk(tp, dim=dim)[rank] for x in (q, k, v)], dim=dim).contiguous()


def shard_tensor(name: str, t: torch.Tensor, cfg: dict, tp: int, rank: int) -> torch.Tensor:
    """The rank-``rank`` piece of a full (tp=1) checkpoint tensor."""
    if tp == 1:
        return t
    if name.endswith(("layernorm.weight", "ln_f.weight", "vocab_embedding.weight")) or t.numel() == 1:
        return t
    if ".attention.qkv." in name:
        return _split_qkv(t, cfg, tp, rank, dim=0 if name.endswith((".weight", ".bias")) else -1)
    if ".attention.dense." in name or ".mlp.proj." in name:  # row-parallel: the input dim is split
        if name.endswith(".weight"):
            return t.chunk(tp, dim=1)[rank].contiguous()
        if name.endswith(".smoother"):
            return t.chunk(tp, dim=-1)[rank].contiguous()
        return t  # per-output-channel scales of a row-parallel layer are whole
    if ".mlp.fc." in name or ".mlp.gate." in name or name == "lm_head.weight":
        if name == "lm_head.weight" and t.shape[0] % tp:
            t = torch.cat([t, t.new_zeros(tp - t.shape[0] % tp, t.shape[1])])
        return t.chunk(tp, dim=0 if name.endswith(".weight") else -1)[rank].contiguous()
    raise KeyError(f"no tensor-parallel rule for {name}")


def full_tensors(hf_weights: dict[str, torch.Tensor], cfg: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """tp=1 TRT-LLM tensors (float) from HF weights."""
    out: dict[str, torch.Tensor] = {"transformer.vocab_embedding.weight": hf_weights["model.embed_tokens.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        hp, tp_ = f"model.layers.{i}.", f"transformer.layers.{i}."
        att = hp + "self_attn."
        out[tp_ + "input_layernorm.weight"] = hf_weights[hp + "input_layernorm.weight"]
        out[tp_ + "attention.qkv.weight"] = torch.cat([hf_weights[f"{att}{p}_proj.weight"] for p in "qkv"])
        out[tp_ + "attention.qkv.bias"] = torch.cat([hf_weights[f"{att}{p}_proj.bias"] for p in "qkv"])
        out[tp_ + "attention.dense.weight"] = hf_weights[att + "o_proj.weight"]
        out[tp_ + "post_layernorm.weight"] = hf_weights[hp + "post_attention_layernorm.weight"]
        out[tp_ + "mlp.fc.weight"] = hf_weights[hp + "mlp.gate_proj.weight"]  # the SiLU branch
        out[tp_ + "mlp.gate.weight"] = hf_weights[hp + "mlp.up_proj.weight"]  # the linear multiplier
        out[tp_ + "mlp.proj.weight"] = hf_weights[hp + "mlp.down_proj.weight"]
    out["transformer.ln_f.weight"] = hf_weights["model.norm.weight"]
    out["lm_head.weight"] = hf_weights["lm_head.weight"]
    return {k: v.to(dtype) for k, v in out.items()}


def rank_tensors(full: dict[str, torch.Tensor], cfg: dict, rank: int) -> dict[str, torch.Tensor]:
    """What ``rank{rank}.safetensors`` holds: the TP piece of this PP stage's tensors, layers renumbered."""
    tp, pp = cfg["mapping"]["tp_size"], cfg["mapping"]["pp_size"]
    tp_rank, pp_rank = rank % tp, rank // tp
    per_stage = cfg["num_hidden_layers"] // pp
    first, last = pp_rank * per_stage, (pp_rank + 1) * per_stage
    out = {}
    for name, t in full.items():
        if name.startswith("transformer.layers."):
            layer = int(name.split(".")[2])
            if not first <= layer < last:
                continue
            local = name.replace(f"transformer.layers.{layer}.", f"transformer.layers.{layer - first}.", 1)
            out[local] = shard_tensor(name, t, cfg, tp, tp_rank)
        elif name == "transformer.vocab_embedding.weight":
            if pp_rank == 0:
                out[name] = t
        elif pp_rank == pp - 1:  # ln_f, lm_head
            out[name] = shard_tensor(name, t, cfg, tp, tp_rank)
    return out


def convert_checkpoint(model_dir: str, output_dir: str, opts: ConvertOptions | None = None, *,
                       calibration: tuple[dict, dict] | None = None, **kwargs) -> ConvertReport:
    """Write the TRT-LLM checkpoint of the HF folder ``model_dir`` to ``output_dir``.

    ``calibration``: the ``(ranges, info)`` of an earlier ``quantize.calibrate`` of the same model, so
    several quantized variants share one calibration pass."""
    from safetensors.torch import save_file

    from cosyvoice.export.hf import BIAS_FILE, read_hf_weights

    opts = opts or ConvertOptions(**kwargs)
    t0 = time.perf_counter()
    with local_dir(model_dir) as folder:
        with open(os.path.join(folder, "config.json")) as f:
            hf = json.load(f)
        if "Qwen2ForCausalLM" not in (hf.get("architectures") or []):
            raise ValueError(f"{model_dir}: architectures {hf.get('architectures')} - only Qwen2ForCausalLM is supported")
        cfg = checkpoint_config(hf, opts)
        check_parallelism(cfg)
        dtype = _TORCH[cfg["dtype"]]
        weights = read_hf_weights(folder)
        if opts.needs_calibration:
            from cosyvoice.export.quantize import calibrate, quantize_smoothquant

            if calibration is None:
                calibration = calibrate(folder, opts.calib_data, size=opts.calib_size, max_len=opts.calib_max_len)
            ranges, calibration = calibration
            full = full_tensors(weights, cfg, dtype)
            if opts.smoothquant is not None:
                full.update(quantize_smoothquant(weights, ranges, cfg, alpha=opts.smoothquant, per_channel=opts.per_channel,
                                                 per_token=opts.per_token, dtype=dtype))
            if opts.int8_kv_cache:
                for i in range(cfg["num_hidden_layers"]):
                    y = torch.cat([ranges[f"model.layers.{i}.self_attn.{p}_proj"]["y"] for p in "qkv"])
                    full[f"transformer.layers.{i}.attention.kv_cache_scaling_factor"] = (y.max() / 127.0).float().reshape(1)
        else:
            calibration = None
            full = full_tensors(weights, cfg, dtype)
        bias_src = os.path.join(folder, BIAS_FILE)
        with tempfile.TemporaryDirectory(prefix="trtllm-ckpt-") as tmp:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(cfg, f, indent=4)
            counts = []
            for rank in range(cfg["mapping"]["world_size"]):
                tensors = rank_tensors(full, cfg, rank)
                counts.append(len(tensors))
                save_file(tensors, os.path.join(tmp, f"rank{rank}.safetensors"))
            if os.path.exists(bias_src):
                shutil.copy(bias_src, os.path.join(tmp, BIAS_FILE))
            sizes = upload_dir(tmp, output_dir)
    q = cfg["quantization"]
    return ConvertReport(output_dir=output_dir, dtype=cfg["dtype"], quant_algo=q["quant_algo"],
                         kv_cache_quant_algo=q["kv_cache_quant_algo"], tp_size=opts.tp_size, pp_size=opts.pp_size,
                         tensors_per_rank=counts, bytes=sum(sizes.values()), seconds=time.perf_counter() - t0,
                         calibration=calibration or {})


def load_checkpoint(ckpt_dir: str) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """``(config, [rank tensors])`` of a written checkpoint."""
    from safetensors.torch import load_file

    with local_dir(ckpt_dir) as folder:
        with open(os.path.join(folder, "config.json")) as f:
            cfg = json.load(f)
        ranks = [load_file(os.path.join(folder, f"rank{r}.safetensors")) for r in range(cfg["mapping"]["world_size"])]
    return cfg, ranks


def merge_ranks(cfg: dict, ranks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Reassemble tp/pp shards into the tp=1, pp=1 tensors (inverse of ``rank_tensors``)."""
    tp, pp = cfg["mapping"]["tp_size"], cfg["mapping"]["pp_size"]
    per_stage = cfg["num_hidden_layers"] // pp
    kv_heads = cfg["num_key_value_heads"]
    out: dict[str, torch.Tensor] = {}
    for pp_rank in range(pp):
        stage = ranks[pp_rank * tp:(pp_rank + 1) * tp]
        for name in stage[0]:
            parts = [r[name] for r in stage]
            full_name = name
            if name.startswith("transformer.layers."):
                layer = int(name.split(".")[2])
                full_name = name.replace(f"transformer.layers.{layer}.", f"transformer.layers.{layer + pp_rank * per_stage}.", 1)
            if tp == 1 or all(torch.equal(parts[0], p) for p in parts[1:]) and not _is_split(full_name, parts[0]):
                out[full_name] = parts[0]
            elif ".attention.qkv." in name:
                dim = 0 if name.endswith((".weight", ".bias")) else -1
                q_dim, kv_dim = _qkv_sections(cfg)
                pieces = [torch.split(p, [q_dim // tp, max(kv_dim // tp, cfg["head_size"]), max(kv_dim // tp, cfg["head_size"])],
                                      dim=dim) for p in parts]
                q = torch.cat([p[0] for p in pieces], dim=dim)
                if kv_heads < tp:  # repeated heads: take one copy of each
                    step = tp // kv_heads
                    k = torch.cat([pieces[r][1] for r in range(0, tp, step)], dim=dim)
                    v = torch.cat([pieces[r][2] for r in range(0, tp, step)], dim=dim)
                else:
                    k = torch.cat([p[1] for p in pieces], dim=dim)
                    v = torch.cat([p[2] for p in pieces], dim=dim)
                out[full_name] = torch.cat([q, k, v], dim=dim)
            elif (".attention.dense." in name or ".mlp.proj." in name) and name.endswith(".weight"):
                out[full_name] = torch.cat(parts, dim=1)
            elif name.endswith(".smoother"):
                out[full_name] = torch.cat(parts, dim=-1)
            elif name == "lm_head.weight":
                out[full_name] = torch.cat(parts, dim=0)[:cfg["vocab_size"]]
            else:
                out[full_name] = torch.cat(parts, dim=0 if name.endswith(".weight") else -1)
    return out


def _is_split(name: str, t: torch.Tensor) -> bool:
    """Whether a tp>1 tensor of this name is a shard (else it is replicated on every rank)."""
    if name.endswith(("layernorm.weight", "ln_f.weight", "vocab_embedding.weight")) or t.numel() == 1:
        return False
    if (".attention.dense." in name or ".mlp.proj." in name) and not name.endswith((".weight", ".smoother")):
        return False
    return not (name.endswith("per_channel_scale") and t.numel() == 1)
