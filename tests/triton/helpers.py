"""Test inputs for the Triton tests: a tiny CosyVoice2-shaped HF LLM + tokenizer, an echo acoustic runtime.

The HF directory has what the export issue produces (``Qwen2ForCausalLM``, speech token k = id
151663 + k, ``<|eos1|>`` 158224, ``<|sos|>`` 158227, ``<|task_id|>`` 158228, vocab padded to
158336, untied lm_head) with 2 tiny random layers. Non-speech lm_head rows are zero (as in the
real export, whose -inf bias is dropped on load) and speech rows are scaled up, so sampling with
top-k 50 picks speech tokens.
"""

from __future__ import annotations

import json
import os

ORIGINAL_VOCAB_SIZE = 151663
SPEECH_TOKENS = 6561
EOS1, SOS, TASK_ID = 158224, 158227, 158228
PADDED_VOCAB = 158336


def make_tokenizer_dir(out: str) -> str:
    """CosyVoice-BlankEN-like Qwen2 BPE (151643 + 3 specials) + CosyVoice2 specials + speech tokens."""
    from transformers import Qwen2Tokenizer

    from cosyvoice.dataset.text import COSYVOICE2_SPECIAL_TOKENS, bundled_qwen_tokenizer_dir

    src = bundled_qwen_tokenizer_dir()
    with open(os.path.join(src, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(src, "merges.txt"), encoding="utf-8") as f:
        merges = [tuple(line.split(" ")) for line in f.read().splitlines()[1:] if line]
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                         unk_token=None, bos_token=None)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.add_special_tokens(COSYVOICE2_SPECIAL_TOKENS)
    assert len(tok) == ORIGINAL_VOCAB_SIZE, len(tok)
    tok.add_tokens([f"<|s_{k}|>" for k in range(SPEECH_TOKENS)] + ["<|eos1|>", "<|eos2|>", "<|eos3|>", "<|sos|>", "<|task_id|>"])
    assert tok.convert_tokens_to_ids(["<|eos1|>", "<|sos|>", "<|task_id|>"]) == [EOS1, SOS, TASK_ID]
    tok.save_pretrained(out)
    return out


def make_hf_dir(out: str, seed: int = 0) -> str:
    """Tiny random ``Qwen2ForCausalLM`` with the CosyVoice2 vocabulary layout + the tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=PADDED_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         tie_word_embeddings=False, eos_token_id=EOS1, architectures=["Qwen2ForCausalLM"])
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        head = model.lm_head.weight
        speech = head[ORIGINAL_VOCAB_SIZE:ORIGINAL_VOCAB_SIZE + SPEECH_TOKENS].clone() * 40
        head.zero_()
        head[ORIGINAL_VOCAB_SIZE:ORIGINAL_VOCAB_SIZE + SPEECH_TOKENS] = speech
    model.save_pretrained(out)
    make_tokenizer_dir(out)
    return out


class EchoToken2Wav:
    """An acoustic runtime for tests: the "waveform" of a chunk is its speech token ids as floats.

    Follows the token2wav streaming contract: a non-final call covers tokens
    ``[token_offset, len - pre_lookahead)``, the final one ``[token_offset, len)``; it checks
    that chunks of one request id arrive contiguously and that the prompt is consistent.
    """

    PRE_LOOKAHEAD = 3

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.next_offset: dict[str, int] = {}

    def synthesize(self, tokens, prompt_tokens, prompt_feat, embedding, *, token_offset, finalize, request_id):
        import numpy as np

        if prompt_tokens is not None and prompt_feat is not None and len(prompt_feat) != 2 * len(prompt_tokens):
            raise ValueError(f"prompt mel {len(prompt_feat)} frames for {len(prompt_tokens)} tokens")
        if embedding is not None and len(embedding) != 192:
            raise ValueError(f"embedding of {len(embedding)} values")
        if token_offset is None:
            return np.asarray(tokens, dtype=np.float32)
        expected = self.next_offset.get(request_id, 0)
        if token_offset != expected:
            raise ValueError(f"request {request_id}: chunk at offset {token_offset}, expected {expected}")
        end = len(tokens) if finalize else len(tokens) - self.PRE_LOOKAHEAD
        self.next_offset[request_id] = end
        return np.asarray(tokens[token_offset:end], dtype=np.float32)

    def release(self, request_id):
        self.next_offset.pop(request_id, None)
