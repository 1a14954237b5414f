"""CosyVoice2/3 LLM (``llm.pt``) <-> HF ``Qwen2ForCausalLM`` folder (contract 8.1 / 12.10).

Layout of the HF model (V0 = length of the text tokenizer with the recipe's special tokens,
151663 for CosyVoice2): ids ``[0, V0)`` text, ``V0 + k`` = ``<|s_k|>`` for every speech row of
``speech_embedding`` / ``llm_decoder``; CosyVoice2 adds ``<|eos1|> <|eos2|> <|eos3|>`` as speech rows
6561-6563 and ``<|sos|> <|task_id|>`` (rows of ``llm_embedding``) after them; CosyVoice3 keeps its
specials inside the speech rows (6561-6564 renamed ``<|sos|> <|eos1|> <|task_id|> <|fill|>``).
The vocabulary is padded to a multiple of 128 (158336 for CosyVoice2), ``lm_head`` is untied
(rows of ``llm_decoder``, zeros elsewhere).

What we do better than the upstream script:

* **Non-speech ids are impossible.** HF and TensorRT-LLM Qwen2 have no ``lm_head`` bias, so the
  upstream export drops ``llm_decoder.bias`` and its -inf mask: every text/pad row has logit 0 and can
  be sampled, and speech logits lose their bias. No bias-free linear head can carry a constant
  offset (the final RMSNorm output has no constant component), so we emit the bias for the stages
  that apply it: ``embedding_bias.safetensors`` is the full-vocabulary float32 vector (decoder bias on
  the speech rows, -inf elsewhere) for TensorRT-LLM's per-request ``embedding_bias`` input (the
  Triton BLS sends it), and ``speech_logits_processor(folder)`` applies it in HF ``generate``.
  (``suppress_tokens``/``bad_words_ids`` in ``generation_config.json`` would do the masking too, but
  with ~152k ids they cost ~0.5 s per generated token in transformers' processors.)
* **The round trip is exact.** The export keeps the source dtype by default and stores what the HF
  layout overwrites or cannot hold (the decoder bias, the Qwen embedding rows ``[V0, 151936)`` that
  speech rows replace, an untied Qwen ``lm_head``) in ``cosyvoice_extras.safetensors``. Without that
  file (an upstream export) ``import_hf`` falls back to the upstream reverse script's choices.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from cosyvoice import storage
from cosyvoice.export.recipe import qwen2_body_config
from cosyvoice.export.tokenizer import text_tokenizer
from cosyvoice.storage import local_dir, upload_dir

SPEECH_TOKEN_SIZE = 6561
EXTRAS_FILE = "cosyvoice_extras.safetensors"
EXPORT_INFO_FILE = "cosyvoice_export.json"
BIAS_FILE = "embedding_bias.safetensors"
_BODY = "llm.model.model."
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CHAT_TEMPLATE = ("{%- for message in messages %}{%- if message['role'] == 'user' %}"
                 "{{- '<|sos|>' + message['content'] + '<|task_id|>' }}{%- elif message['role'] == 'assistant' %}"
                 "{{- message['content'] }}{%- endif %}{%- endfor %}")


@dataclass(frozen=True)
class SpeechVocab:
    """Where the speech rows sit in the HF vocabulary."""

    variant: str  # "cosyvoice2" | "cosyvoice3"
    text_vocab_size: int  # V0
    speech_rows: int  # rows of speech_embedding / llm_decoder: 6564 (v2), 6761 (v3)
    speech_token_size: int = SPEECH_TOKEN_SIZE

    @property
    def input_only_rows(self) -> int:
        return 2 if self.variant == "cosyvoice2" else 0  # llm_embedding: sos, task_id

    @property
    def vocab_size(self) -> int:
        return self.text_vocab_size + self.speech_rows + self.input_only_rows

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // 128) * 128

    def speech_id(self, k: int) -> int:
        return self.text_vocab_size + k

    @property
    def sos_id(self) -> int:
        return self.speech_id(self.speech_rows) if self.variant == "cosyvoice2" else self.speech_id(self.speech_token_size)

    @property
    def task_id(self) -> int:
        return self.sos_id + 1 if self.variant == "cosyvoice2" else self.speech_id(self.speech_token_size + 2)

    @property
    def stop_ids(self) -> list[int]:
        return [self.speech_id(k) for k in range(self.speech_token_size, self.speech_rows)]

    @property
    def output_ids(self) -> range:
        """The ids the LM head may produce (the rows of ``llm_decoder``)."""
        return range(self.text_vocab_size, self.text_vocab_size + self.speech_rows)

    def token_names(self) -> list[str]:
        names = [f"<|s_{k}|>" for k in range(self.speech_rows)]
        if self.variant == "cosyvoice2":
            names[SPEECH_TOKEN_SIZE:SPEECH_TOKEN_SIZE + 3] = ["<|eos1|>", "<|eos2|>", "<|eos3|>"]
            names += ["<|sos|>", "<|task_id|>"]
        else:
            names[SPEECH_TOKEN_SIZE:SPEECH_TOKEN_SIZE + 4] = ["<|sos|>", "<|eos1|>", "<|task_id|>", "<|fill|>"]
        return names

    def logits_bias(self, decoder_bias: torch.Tensor | None) -> torch.Tensor:
        """Full-vocabulary float32 bias: the decoder bias on speech rows, -inf everywhere else."""
        bias = torch.full((self.padded_vocab_size,), float("-inf"), dtype=torch.float32)
        rows = slice(self.text_vocab_size, self.text_vocab_size + self.speech_rows)
        bias[rows] = 0.0 if decoder_bias is None else decoder_bias.float()
        return bias

    def prompt_ids(self, text_ids: list[int], prompt_speech: list[int] = ()) -> list[int]:
        """``[sos] text [task_id] prompt-speech`` in HF ids (the Triton BLS prompt layout)."""
        return [self.sos_id, *text_ids, self.task_id, *(self.speech_id(int(t)) for t in prompt_speech)]


@dataclass
class HfExportReport:
    out: str
    variant: str
    dtype: str
    text_vocab_size: int
    vocab_size: int
    padded_vocab_size: int
    parameters: int
    bytes: int
    seconds: float

    def as_metadata(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.variant} -> Qwen2ForCausalLM at {self.out}: vocab {self.vocab_size} padded to "
                f"{self.padded_vocab_size} (speech ids from {self.text_vocab_size}), {self.parameters / 1e6:.1f} M "
                f"parameters, {self.dtype}, {self.bytes / 1e6:.1f} MB in {self.seconds:.1f} s")


@dataclass
class HfImportReport:
    out: str
    variant: str
    tensors: int
    exact: bool  # False when the HF folder had no extras (upstream export): upstream fallbacks used
    bytes: int

    def summary(self) -> str:
        how = "exact (extras present)" if self.exact else "upstream fallbacks (no extras: decoder bias zero, Qwen lm_head tied)"
        return f"{self.variant} llm.pt with {self.tensors} tensors at {self.out}, {how}"


def load_state_dict(url: str) -> dict[str, torch.Tensor]:
    """A flat ``llm.pt`` state dict (``epoch``/``step`` and other non-tensors dropped)."""
    if not storage.exists(url):
        raise FileNotFoundError(f"{url}: no such llm.pt")
    state = torch.load(io.BytesIO(storage.read_bytes(url)), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{url}: expected a state dict, got {type(state).__name__}")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def detect_variant(sd: dict[str, torch.Tensor]) -> str:
    missing = [k for k in ("speech_embedding.weight", "llm_decoder.weight", f"{_BODY}embed_tokens.weight") if k not in sd]
    if missing:
        raise KeyError(f"not a CosyVoice2/3 LLM state dict: missing {missing} (keys start with {sorted(sd)[:3]})")
    return "cosyvoice2" if "llm_embedding.weight" in sd else "cosyvoice3"


def export_hf(llm_pt: str, out: str, *, tokenizer_dir: str, config=None, variant: str | None = None,
              dtype: str = "auto") -> HfExportReport:
    """``llm.pt`` -> HF ``Qwen2ForCausalLM`` folder at ``out`` (see the module docstring)."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, Qwen2Config

    t0 = time.perf_counter()
    sd = load_state_dict(llm_pt)
    variant = variant or detect_variant(sd)
    if variant != detect_variant(sd):
        raise ValueError(f"{llm_pt}: the state dict is a {detect_variant(sd)} LLM, not {variant}")
    body_cfg = qwen2_body_config(config, sd)
    src_dtype = sd[f"{_BODY}embed_tokens.weight"].dtype
    target = src_dtype if dtype == "auto" else _DTYPES[dtype]

    tokenizer = text_tokenizer(tokenizer_dir, variant)
    speech_rows = sd["speech_embedding.weight"].shape[0]
    vocab = SpeechVocab(variant, len(tokenizer), speech_rows)
    if sd["llm_decoder.weight"].shape[0] != speech_rows:
        raise ValueError(f"{llm_pt}: llm_decoder has {sd['llm_decoder.weight'].shape[0]} rows, speech_embedding {speech_rows}")
    expected_rows = SPEECH_TOKEN_SIZE + (3 if variant == "cosyvoice2" else 200)
    if speech_rows != expected_rows:
        raise ValueError(f"{llm_pt}: {variant} needs {expected_rows} speech rows, found {speech_rows}")
    embed = sd[f"{_BODY}embed_tokens.weight"]
    qwen_vocab, hidden = embed.shape
    if vocab.text_vocab_size > qwen_vocab:
        raise ValueError(f"{tokenizer_dir}: the text tokenizer has {vocab.text_vocab_size} ids but the Qwen body only "
                         f"{qwen_vocab} embedding rows (wrong tokenizer folder?)")
    added = tokenizer.add_tokens(vocab.token_names())
    if len(tokenizer) != vocab.vocab_size or added != len(vocab.token_names()):
        raise ValueError(f"{tokenizer_dir}: adding the speech tokens gave {len(tokenizer)} ids, expected {vocab.vocab_size} "
                         "(some <|s_k|> tokens already exist in this tokenizer)")
    tokenizer.chat_template = CHAT_TEMPLATE

    padded = vocab.padded_vocab_size
    new_embed = torch.zeros(padded, hidden, dtype=embed.dtype)
    new_embed[:qwen_vocab] = embed
    v0 = vocab.text_vocab_size
    new_embed[v0:v0 + speech_rows] = sd["speech_embedding.weight"]
    if variant == "cosyvoice2":
        new_embed[v0 + speech_rows:v0 + speech_rows + 2] = sd["llm_embedding.weight"]
    lm_head = torch.zeros(padded, hidden, dtype=sd["llm_decoder.weight"].dtype)
    lm_head[v0:v0 + speech_rows] = sd["llm_decoder.weight"]

    tensors = {"model.embed_tokens.weight": new_embed}
    for key, value in sd.items():
        if key.startswith(_BODY) and key != f"{_BODY}embed_tokens.weight":
            tensors["model." + key[len(_BODY):]] = value
    tensors["lm_head.weight"] = lm_head
    tensors = {k: v.to(target).contiguous() for k, v in tensors.items()}

    extras = {"text_embedding_tail": embed[v0:min(qwen_vocab, vocab.vocab_size)].clone()}
    decoder_bias = sd.get("llm_decoder.bias")
    if decoder_bias is not None:
        extras["llm_decoder.bias"] = decoder_bias.clone()
    qwen_head = sd.get("llm.model.lm_head.weight")
    tied = qwen_head is not None and torch.equal(qwen_head, embed)
    if qwen_head is not None and not tied:
        extras["qwen_lm_head.weight"] = qwen_head.clone()

    hf_cfg = {k: v for k, v in body_cfg.items() if k not in ("architectures", "torch_dtype", "dtype", "transformers_version")}
    hf_cfg.update(vocab_size=padded, tie_word_embeddings=False, bos_token_id=None, eos_token_id=vocab.stop_ids[0],
                  pad_token_id=vocab.stop_ids[0])
    qcfg = Qwen2Config(**hf_cfg)
    qcfg.architectures = ["Qwen2ForCausalLM"]
    cfg_dict = qcfg.to_dict()
    dtype_name = str(target).removeprefix("torch.")
    cfg_dict["dtype"] = cfg_dict["torch_dtype"] = dtype_name  # older readers (TRT-LLM's transformers) read torch_dtype
    if "rope_theta" not in cfg_dict:  # transformers 5 writes rope_parameters only; TRT-LLM reads rope_theta
        cfg_dict["rope_theta"] = float((cfg_dict.get("rope_parameters") or {}).get("rope_theta", body_cfg.get("rope_theta", 10000.0)))

    bias = vocab.logits_bias(decoder_bias)
    generation = GenerationConfig(eos_token_id=vocab.stop_ids, pad_token_id=vocab.stop_ids[0], do_sample=True,
                                  temperature=1.0, top_p=0.8, top_k=25)
    info = {**asdict(vocab), "vocab_size": vocab.vocab_size, "padded_vocab_size": padded, "qwen_vocab_size": qwen_vocab,
            "sos_id": vocab.sos_id, "task_id": vocab.task_id, "stop_ids": vocab.stop_ids, "source_dtype":
            str(src_dtype).removeprefix("torch."), "qwen_lm_head_tied": tied, "decoder_has_bias": decoder_bias is not None,
            "body_config": {k: v for k, v in body_cfg.items() if isinstance(v, (int, float, str, bool, type(None)))}}

    with tempfile.TemporaryDirectory(prefix="hf-export-") as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg_dict, f, indent=2, sort_keys=True)
        generation.save_pretrained(tmp)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        save_file(extras, os.path.join(tmp, EXTRAS_FILE), metadata={"format": "pt"})
        save_file({"embedding_bias": bias}, os.path.join(tmp, BIAS_FILE), metadata={"format": "pt"})
        with open(os.path.join(tmp, EXPORT_INFO_FILE), "w") as f:
            json.dump(info, f, indent=2)
        tokenizer.save_pretrained(tmp)
        sizes = upload_dir(tmp, out)
    return HfExportReport(out=out, variant=variant, dtype=dtype_name, text_vocab_size=v0, vocab_size=vocab.vocab_size,
                          padded_vocab_size=padded, parameters=sum(t.numel() for t in tensors.values()),
                          bytes=sum(sizes.values()), seconds=time.perf_counter() - t0)


class SpeechLogitsBias:
    """HF logits processor adding the exported ``embedding_bias`` (decoder bias on speech rows,
    -inf elsewhere): with it ``generate`` samples exactly our model's speech-token distribution."""

    def __init__(self, bias: torch.Tensor):
        self.bias = bias.float()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores + self.bias[: scores.shape[-1]].to(scores.device, scores.dtype)


def speech_logits_processor(hf_dir: str):
    """``LogitsProcessorList`` for ``model.generate(..., logits_processor=...)`` on an export."""
    from safetensors.torch import load_file
    from transformers import LogitsProcessorList

    with local_dir(hf_dir) as folder:
        bias = load_file(os.path.join(folder, BIAS_FILE))["embedding_bias"]
    return LogitsProcessorList([SpeechLogitsBias(bias)])


def read_hf_weights(folder: str) -> dict[str, torch.Tensor]:
    """All tensors of a local HF folder (``model.safetensors`` or its sharded index)."""
    from safetensors.torch import load_file

    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return load_file(single)
    index = os.path.join(folder, "model.safetensors.index.json")
    if not os.path.exists(index):
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    out: dict[str, torch.Tensor] = {}
    for name in files:
        out.update(load_file(os.path.join(folder, name)))
    return out


def load_hf_model(folder: str, round_to: torch.dtype | None = None):
    """The float32 ``Qwen2ForCausalLM`` of a local export for numerics, its weights first rounded to
    ``round_to`` when given (rotary buffers stay float32), without parsing the large
    ``generation_config.json`` (only ``generate`` needs that)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config.from_pretrained(folder))
    weights = read_hf_weights(folder)
    if round_to is not None:
        weights = {k: v.to(round_to) for k, v in weights.items()}
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    return model.eval()


def speech_vocab_of(folder: str) -> SpeechVocab:
    """The speech layout of a local HF export: from our ``cosyvoice_export.json``, else from the
    tokenizer of an upstream export."""
    info_path = os.path.join(folder, EXPORT_INFO_FILE)
    if os.path.exists(info_path):
        with open(info_path) as f:
            info = json.load(f)
        return SpeechVocab(info["variant"], info["text_vocab_size"], info["speech_rows"], info["speech_token_size"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    v0 = tok.convert_tokens_to_ids("<|s_0|>")
    if v0 is None or v0 == tok.unk_token_id:
        raise ValueError(f"{folder}: no <|s_0|> token: not a CosyVoice HF export")
    if tok.convert_tokens_to_ids("<|fill|>") not in (None, tok.unk_token_id):
        last = max(i for t, i in tok.get_vocab().items() if t.startswith("<|s_"))
        return SpeechVocab("cosyvoice3", v0, last + 1 - v0)
    return SpeechVocab("cosyvoice2", v0, SPEECH_TOKEN_SIZE + 3)


def import_hf(hf_dir: str, out: str, *, qwen_vocab_size: int = 151936) -> HfImportReport:
    """HF folder -> ``llm.pt`` at ``out`` (exact for our exports; upstream fallbacks otherwise)."""
    from safetensors.torch import load_file

    with local_dir(hf_dir) as folder:
        weights = read_hf_weights(folder)
        vocab = speech_vocab_of(folder)
        extras_path = os.path.join(folder, EXTRAS_FILE)
        extras = load_file(extras_path) if os.path.exists(extras_path) else None
        info = {}
        if os.path.exists(os.path.join(folder, EXPORT_INFO_FILE)):
            with open(os.path.join(folder, EXPORT_INFO_FILE)) as f:
                info = json.load(f)
    qwen_vocab = info.get("qwen_vocab_size", qwen_vocab_size)
    v0, rows = vocab.text_vocab_size, vocab.speech_rows
    embed = weights["model.embed_tokens.weight"]
    lm_head = weights.get("lm_head.weight")
    if lm_head is None:
        raise KeyError(f"{hf_dir}: no lm_head.weight (a tied export cannot hold the speech decoder)")
    sd: dict[str, torch.Tensor] = {}
    if vocab.variant == "cosyvoice2":
        sd["llm_embedding.weight"] = embed[v0 + rows:v0 + rows + 2].clone()
    body_embed = embed[:qwen_vocab].clone()
    if extras is not None:
        tail = extras["text_embedding_tail"]
        body_embed[v0:v0 + tail.shape[0]] = tail.to(body_embed.dtype)
    sd[f"{_BODY}embed_tokens.weight"] = body_embed
    for key, value in weights.items():
        if key.startswith("model.") and key != "model.embed_tokens.weight":
            sd[_BODY + key[len("model."):]] = value
    if extras is not None and "qwen_lm_head.weight" in extras:
        sd["llm.model.lm_head.weight"] = extras["qwen_lm_head.weight"]
    else:
        sd["llm.model.lm_head.weight"] = body_embed.clone()
    sd["llm_decoder.weight"] = lm_head[v0:v0 + rows].clone()
    if vocab.variant == "cosyvoice2":
        if extras is not None and "llm_decoder.bias" in extras:
            sd["llm_decoder.bias"] = extras["llm_decoder.bias"]
        else:
            sd["llm_decoder.bias"] = torch.zeros(rows, dtype=lm_head.dtype)
    sd["speech_embedding.weight"] = embed[v0:v0 + rows].clone()
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    result = storage.write_bytes(out, buffer.getvalue())
    return HfImportReport(out=out, variant=vocab.variant, tensors=len(sd), exact=extras is not None, bytes=result.bytes)
