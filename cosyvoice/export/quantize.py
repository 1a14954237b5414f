"""Calibration on our own data and the SmoothQuant / weight-only numerics.

Calibration sequences are what the served LLM sees: ``[sos] text [task_id] speech`` built from the
``text`` and ``speech_token`` columns of our parquet training shards (a ``data.list``), run through
the exported model itself. Per linear layer we record the per-channel abs-max of its input and
output; SmoothQuant then migrates activation outliers into the weights
(``s_j = max|x_j|^a / max|W_:,j|^(1-a)``, folded into the preceding RMSNorm for qkv and fc/gate, kept
as an explicit ``smoother`` for dense and proj) and quantizes weights to int8 per output channel or
per tensor (Q, K and V each get their own per-tensor scale). Tensor names/shapes follow TRT-LLM's
``convert_hf_qwen`` (formats reference 1.6/1.7).
"""

from __future__ import annotations

import functools
import io

import pyarrow.parquet as pq
import torch

from cosyvoice import storage


def calibration_sequences(model_dir: str, data_list: str, *, size: int, max_len: int) -> list[list[int]]:
    """Up to ``size`` HF-id sequences from the shards listed in ``data_list`` (in list order)."""
    from transformers import AutoTokenizer

    from cosyvoice.export.hf import speech_vocab_of

    vocab = speech_vocab_of(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    shards = [line.strip() for line in storage.read_text(data_list).splitlines() if line.strip()]
    if not shards:
        raise ValueError(f"{data_list}: empty data list")
    sequences: list[list[int]] = []
    for url in shards:
        table = pq.read_table(io.BytesIO(storage.read_bytes(url)), columns=None)
        if "speech_token" not in table.column_names:
            raise ValueError(f"{url}: no speech_token column - calibration needs shards with speech tokens")
        for text, speech in zip(table.column("text").to_pylist(), table.column("speech_token").to_pylist()):
            if not speech:
                continue
            ids = vocab.prompt_ids(tokenizer([text])["input_ids"][0], speech)
            sequences.append(ids[:max_len])
            if len(sequences) >= size:
                return sequences
    if not sequences:
        raise ValueError(f"{data_list}: no rows with speech tokens to calibrate on")
    return sequences


@torch.no_grad()
def activation_ranges(model, sequences: list[list[int]]) -> dict[str, dict[str, torch.Tensor]]:
    """``{linear name: {"x": per-input-channel abs max, "y": per-output-channel abs max}}``."""
    ranges: dict[str, dict[str, torch.Tensor]] = {}

    def hook(module, inputs, output, name):
        x = inputs[0].detach().flatten(0, -2).abs().amax(dim=0).float()
        y = output.detach().flatten(0, -2).abs().amax(dim=0).float()
        if name in ranges:
            ranges[name]["x"] = torch.maximum(ranges[name]["x"], x)
            ranges[name]["y"] = torch.maximum(ranges[name]["y"], y)
        else:
            ranges[name] = {"x": x, "y": y}

    handles = [m.register_forward_hook(functools.partial(hook, name=n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n]
    try:
        for ids in sequences:
            model.model(input_ids=torch.tensor([ids]), use_cache=False)  # the LM head is not calibrated
    finally:
        for h in handles:
            h.remove()
    return ranges


def calibrate(model_dir: str, data_list: str | None, *, size: int = 64, max_len: int = 512) -> tuple[dict, dict]:
    """Activation ranges of the (local) HF model folder on ``size`` sequences of ``data_list``."""
    from cosyvoice.export.hf import load_hf_model

    if not data_list:
        raise ValueError("--smoothquant / --int8_kv_cache need --calib_data (a data.list of our parquet shards)")

    sequences = calibration_sequences(model_dir, data_list, size=size, max_len=max_len)
    model = load_hf_model(model_dir)
    ranges = activation_ranges(model, sequences)
    return ranges, {"sequences": len(sequences), "tokens": sum(map(len, sequences)), "data_list": data_list}


def _smoothing(x_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    w_max = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0).double().clamp(min=1e-5)
    return (x_max.double().pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


def _int8_linear(prefix: str, w: torch.Tensor, x_max: torch.Tensor, y_max: torch.Tensor, *, per_channel: bool,
                 per_token: bool, input_scale_name: str | None, sections: list[int] | None = None,
                 smoother: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """int8 weight [out, in] + scales of one linear; ``sections``: per-tensor scale per Q/K/V part."""
    w = w.double()
    row_max = w.abs().amax(dim=1).clamp(min=1e-8)
    if sections:
        tensor_max = torch.cat([part.amax().expand(len(part)) for part in torch.split(row_max, sections)])
    else:
        tensor_max = row_max.amax().expand(len(row_max))
    w_scale = row_max if per_channel else tensor_max  # quant -> orig: w = q * w_scale / 127
    q = (w * (127.0 / w_scale)[:, None]).round().clamp(-127, 127).to(torch.int8)
    out = {prefix + "weight": q}
    col = per_channel or bool(sections)
    sx = 127.0 / float(x_max.max())
    sy = 127.0 / float(y_max.max())
    if per_token:
        scale = (w_scale / 127.0).float()
        if input_scale_name is not None and smoother is None:
            out[input_scale_name] = torch.ones(1, dtype=torch.float32)
    else:
        scale = (sy / (sx * (127.0 / w_scale))).float()
        if input_scale_name is not None:
            out[input_scale_name] = torch.tensor([sx], dtype=torch.float32)
        out[prefix + "act_scale"] = torch.tensor([[1.0 / sy]], dtype=torch.float32)
    out[prefix + "per_channel_scale"] = scale.reshape(1, -1) if col else scale[:1].reshape(1, 1)
    if smoother is not None:
        out[prefix + "smoother"] = smoother.float().reshape(1, -1)
    return out


def quantize_smoothquant(hf_weights: dict[str, torch.Tensor], ranges: dict, cfg: dict, *, alpha: float,
                         per_channel: bool, per_token: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """tp=1 SmoothQuant tensors (they replace the float linears and norms of ``full_tensors``)."""
    out: dict[str, torch.Tensor] = {}
    head = cfg["head_size"]
    sections = [cfg["num_attention_heads"] * head, cfg["num_key_value_heads"] * head, cfg["num_key_value_heads"] * head]
    for i in range(cfg["num_hidden_layers"]):
        hp, tp_ = f"model.layers.{i}.", f"transformer.layers.{i}."
        att = hp + "self_attn."
        r = {k[len(hp):]: v for k, v in ranges.items() if k.startswith(hp)}
        qkv = torch.cat([hf_weights[f"{att}{p}_proj.weight"] for p in "qkv"]).double()
        s = _smoothing(r["self_attn.q_proj"]["x"], [qkv], alpha)
        out[tp_ + "input_layernorm.weight"] = (hf_weights[hp + "input_layernorm.weight"].double() / s).to(dtype)
        qkv_y = torch.cat([r[f"self_attn.{p}_proj"]["y"] for p in "qkv"])
        out.update(_int8_linear(tp_ + "attention.qkv.", qkv * s, r["self_attn.q_proj"]["x"] / s, qkv_y,
                                per_channel=per_channel, per_token=per_token, sections=sections,
                                input_scale_name=tp_ + "input_layernorm.scale_to_int"))
        out[tp_ + "attention.qkv.bias"] = torch.cat([hf_weights[f"{att}{p}_proj.bias"] for p in "qkv"]).to(dtype)

        dense = hf_weights[att + "o_proj.weight"].double()
        s = _smoothing(r["self_attn.o_proj"]["x"], [dense], alpha)
        out.update(_int8_linear(tp_ + "attention.dense.", dense * s, r["self_attn.o_proj"]["x"] / s,
                                r["self_attn.o_proj"]["y"], per_channel=per_channel, per_token=per_token, smoother=s,
                                input_scale_name=tp_ + "attention.quantization_scaling_factor"))

        fc, gate = hf_weights[hp + "mlp.gate_proj.weight"].double(), hf_weights[hp + "mlp.up_proj.weight"].double()
        s = _smoothing(r["mlp.gate_proj"]["x"], [fc, gate], alpha)
        out[tp_ + "post_layernorm.weight"] = (hf_weights[hp + "post_attention_layernorm.weight"].double() / s).to(dtype)
        for name, w, key in (("mlp.fc.", fc, "mlp.gate_proj"), ("mlp.gate.", gate, "mlp.up_proj")):
            out.update(_int8_linear(tp_ + name, w * s, r[key]["x"] / s, r[key]["y"], per_channel=per_channel,
                                    per_token=per_token, input_scale_name=tp_ + "post_layernorm.scale_to_int"))

        proj = hf_weights[hp + "mlp.down_proj.weight"].double()
        s = _smoothing(r["mlp.down_proj"]["x"], [proj], alpha)
        out.update(_int8_linear(tp_ + "mlp.proj.", proj * s, r["mlp.down_proj"]["x"] / s, r["mlp.down_proj"]["y"],
                                per_channel=per_channel, per_token=per_token, smoother=s,
                                input_scale_name=tp_ + "mlp.quantization_scaling_factor"))
    return out


def weight_only_dequantized(w: torch.Tensor, bits: int) -> torch.Tensor:
    """What ``trtllm-build``'s weight-only path computes with: per output channel symmetric
    quantization (scale = max|w| / 128 for int8, / 8 for int4; round; clip to the signed range),
    the scale stored in the checkpoint dtype. ``w`` is ``[out, in]``; returns float32."""
    levels = {8: 128.0, 4: 8.0}[bits]
    wf = w.float()
    scale = (wf.abs().amax(dim=1) / levels).clamp(min=torch.finfo(torch.float32).tiny)
    q = (wf / scale[:, None]).round().clamp(-levels, levels - 1)
    return q * scale.to(w.dtype).float()[:, None]
