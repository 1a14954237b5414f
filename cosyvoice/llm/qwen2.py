"""The Qwen2 body of the CosyVoice2/3 LLM: HF ``Qwen2ForCausalLM`` driven by input embeddings.

Attribute path ``model`` (the ``Qwen2ForCausalLM``) keeps the upstream state-dict keys
``llm.model.model.*`` / ``llm.model.lm_head.weight``. The HF ``lm_head`` is never used by the
speech LLM; it is kept so checkpoints load strictly both ways.
"""

from __future__ import annotations

import os

import torch

#: Qwen2-0.5B, the body of CosyVoice2-0.5B / Fun-CosyVoice3-0.5B (used for random init and benches)
QWEN2_0_5B = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True, hidden_act="silu",
)

def _cache_argument() -> str:
    """transformers >= 5.24 renamed ``past_key_values`` to ``cache``; the GPU image has 5.17."""
    import inspect

    from transformers import Qwen2Model

    return "cache" if "cache" in inspect.signature(Qwen2Model.forward).parameters else "past_key_values"


_CACHE_ARG = _cache_argument()

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def has_weights(path: str) -> bool:
    return bool(path) and any(os.path.exists(os.path.join(path, f)) for f in _WEIGHT_FILES)


def expected_weight_files() -> str:
    return ", ".join(_WEIGHT_FILES)


class Qwen2Encoder(torch.nn.Module):
    """``pretrain_path`` with weights -> ``from_pretrained`` (upstream behaviour); otherwise a random
    init from ``config`` (a dict of ``Qwen2Config`` fields) or from ``pretrain_path/config.json``.

    ``pretrained`` says which one happened; the trainer refuses to start from a random body unless
    asked to (``--allow_random_init`` / recipe key ``allow_random_init: true``) or given a checkpoint."""

    def __init__(self, pretrain_path: str = "", config: dict | None = None, attn_implementation: str = "sdpa"):
        super().__init__()
        from transformers import Qwen2Config, Qwen2ForCausalLM

        self.pretrain_path = pretrain_path
        self.pretrained = has_weights(pretrain_path)
        if self.pretrained:
            self.model = Qwen2ForCausalLM.from_pretrained(pretrain_path, dtype=torch.float32,
                                                          attn_implementation=attn_implementation)
        else:
            if config is not None:
                cfg = Qwen2Config(**config)
            elif pretrain_path and os.path.exists(os.path.join(pretrain_path, "config.json")):
                cfg = Qwen2Config.from_pretrained(pretrain_path)
            else:
                raise ValueError(
                    f"Qwen2Encoder: {pretrain_path or 'qwen_pretrain_path'!r} has no weights and no config was given; "
                    "pass --qwen_pretrain_path <CosyVoice-BlankEN dir> or set `config:` in the yaml")
            cfg._attn_implementation = attn_implementation
            self.model = Qwen2ForCausalLM(cfg)

    @property
    def embed_tokens(self) -> torch.nn.Embedding:
        return self.model.model.embed_tokens

    def forward(self, xs: torch.Tensor, xs_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded batch ``(B, T, H)`` -> last hidden states ``(B, T, H)`` and mask ``(B, 1, T)``."""
        mask = torch.arange(xs.size(1), device=xs.device)[None, :] < xs_lens[:, None].to(xs.device)
        out = self.model.model(inputs_embeds=xs, attention_mask=mask.long(), use_cache=False)
        return out.last_hidden_state, mask.unsqueeze(1)

    def forward_packed(self, xs: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Several sequences concatenated in one row ``(1, N, H)``; ``position_ids`` restart at 0 at
        each sequence start, which makes attention block-diagonal (varlen flash attention on GPU,
        a packed mask with SDPA) and the rotary positions per sequence."""
        return self.model.model(inputs_embeds=xs, position_ids=position_ids, use_cache=False).last_hidden_state

    def forward_one_step(self, xs: torch.Tensor, cache=None) -> tuple[torch.Tensor, object]:
        """Incremental decoding with HF's KV cache: ``xs`` holds the new positions only."""
        if _CACHE_ARG == "cache":
            out = self.model.model(inputs_embeds=xs, cache=cache, use_cache=True)
            return out.last_hidden_state, out.cache
        out = self.model.model(inputs_embeds=xs, past_key_values=cache, use_cache=True)
        return out.last_hidden_state, out.past_key_values
