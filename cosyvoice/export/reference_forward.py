"""A pure-torch forward pass of a written TensorRT-LLM Qwen2 checkpoint (float32 compute).

It reads ``config.json`` + ``rank{r}.safetensors`` (reassembling tp/pp shards) and computes logits
from the checkpoint tensors alone, with the numerics each mode has in TensorRT-LLM:

* float checkpoints: the stored (bf16/fp16/fp32) weights, upcast;
* W8A16 / W4A16: the weights ``trtllm-build`` will quantize, quantized and dequantized the same way
  (per output channel, scale max|w|/128 resp. /8, round, clip);
* SmoothQuant: int8 activations (static per-tensor scale, or dynamic per-token abs-max), int8
  weights, exact integer accumulation, the stored per-channel/per-tensor scales, smoothers;
* int8 KV cache: keys (after RoPE) and values rounded to int8 with ``kv_cache_scaling_factor``
  for every position (the decode-phase numerics; prefill attention in TRT-LLM uses the float K/V).

Since nothing else is used, a wrong name, layout, split, gate/up order or scale shows up as a
logit mismatch against the HF model.
"""

from __future__ import annotations

import torch

from cosyvoice.export.quantize import weight_only_dequantized
from cosyvoice.export.trtllm import load_checkpoint, merge_ranks

_LINEARS = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")


class ReferenceModel:
    def __init__(self, ckpt_dir: str):
        self.cfg, ranks = load_checkpoint(ckpt_dir)
        self.t = merge_ranks(self.cfg, ranks)
        q = self.cfg["quantization"]
        self.algo = q["quant_algo"] or ""
        self.sq = self.algo.startswith("W8A8_SQ")
        self.per_token = "PER_TOKEN" in self.algo
        self.kv_int8 = q["kv_cache_quant_algo"] == "INT8"
        self.bits = {"W8A16": 8, "W4A16": 4}.get(self.algo)
        self.w: dict[str, torch.Tensor] = {}
        for name, t in self.t.items():
            base = name.rsplit(".", 1)[0]
            if name.endswith(".weight") and base.split("layers.")[-1].split(".", 1)[-1] in _LINEARS:
                if self.sq:
                    self.w[name] = t.double()
                elif self.bits:
                    self.w[name] = weight_only_dequantized(t, self.bits)
                else:
                    self.w[name] = t.float()
            elif t.is_floating_point():
                self.w[name] = t.float()
        head = self.cfg["head_size"]
        inv = 1.0 / (self.cfg["rotary_base"] ** (torch.arange(0, head, 2, dtype=torch.float64) / head))
        self.inv_freq = inv

    def _norm(self, x: torch.Tensor, weight: str) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.cfg["norm_epsilon"]) * self.w[weight]

    def _linear(self, x: torch.Tensor, prefix: str, input_scale: str | None = None) -> torch.Tensor:
        w = self.w[prefix + "weight"]
        bias = self.w.get(prefix + "bias")
        if not self.sq:
            y = x @ w.T
            return y + bias if bias is not None else y
        if prefix + "smoother" in self.w:
            x = x / self.w[prefix + "smoother"]
        if self.per_token:
            if input_scale is not None and input_scale in self.w:
                x = x * self.w[input_scale]
            tok = (x.abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=1e-8)
            xq = (x / tok).round().clamp(-128, 127)
            y = (xq.double() @ w.T) * tok.double() * self.w[prefix + "per_channel_scale"].double()
        else:
            xq = (x * self.w[input_scale]).round().clamp(-128, 127)
            y = (xq.double() @ w.T) * self.w[prefix + "per_channel_scale"].double() * self.w[prefix + "act_scale"].double()
        y = y.float()
        return y + bias if bias is not None else y

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        freqs = positions[:, None].double() * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().float(), emb.sin().float()
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos[:, None, :] + rotated * sin[:, None, :]

    @torch.no_grad()
    def hidden(self, input_ids: list[int] | torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
        n = ids.numel()
        heads, kv, head = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_size"]
        x = self.w["transformer.vocab_embedding.weight"][ids]
        positions = torch.arange(n)
        mask = torch.full((n, n), float("-inf")).triu(1)
        for i in range(cfg["num_hidden_layers"]):
            p = f"transformer.layers.{i}."
            h = self._norm(x, p + "input_layernorm.weight")
            qkv = self._linear(h, p + "attention.qkv.", p + "input_layernorm.scale_to_int")
            q, k, v = torch.split(qkv, [heads * head, kv * head, kv * head], dim=-1)
            q = self._rope(q.reshape(n, heads, head), positions)
            k = self._rope(k.reshape(n, kv, head), positions)
            v = v.reshape(n, kv, head)
            if self.kv_int8:
                s = self.w[p + "attention.kv_cache_scaling_factor"]
                k = (k / s).round().clamp(-128, 127) * s
                v = (v / s).round().clamp(-128, 127) * s
            k = k.repeat_interleave(heads // kv, dim=1)
            v = v.repeat_interleave(heads // kv, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q, k) / head ** 0.5 + mask
            ctx = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, heads * head)
            x = x + self._linear(ctx, p + "attention.dense.", p + "attention.quantization_scaling_factor")
            h = self._norm(x, p + "post_layernorm.weight")
            fc = self._linear(h, p + "mlp.fc.", p + "post_layernorm.scale_to_int")
            gate = self._linear(h, p + "mlp.gate.", p + "post_layernorm.scale_to_int")
            x = x + self._linear(torch.nn.functional.silu(fc) * gate, p + "mlp.proj.", p + "mlp.quantization_scaling_factor")
        return self._norm(x, "transformer.ln_f.weight")

    def logits(self, input_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """``[T, vocab]`` float32 logits (no bias: add ``embedding_bias`` as the serving side does)."""
        return self.hidden(input_ids) @ self.w["lm_head.weight"].T

    def next_logits(self, input_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """``[1, vocab]``: the logits of the last position only (greedy decoding)."""
        return self.hidden(input_ids)[-1:] @ self.w["lm_head.weight"].T
