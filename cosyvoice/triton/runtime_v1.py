"""What the CosyVoice1 (CosyVoice-300M) python-backend models compute, importable without Triton.

The v1 LLM is upstream's ``TransformerLM`` (a Conformer text encoder + a 14-block transformer), not a
Qwen2 model, so there is no TensorRT-LLM engine for it: the ``transformer_llm`` model serves it on the
python backend, and the ``cosyvoice`` BLS drives it with the tensorrt_llm model's core tensors
(``input_ids``, ``input_lengths``, ``request_output_len``, ``streaming``, ``random_seed`` ->
``output_ids``, ``sequence_length``) plus the three inputs only v1 has: ``prompt_text_len`` (how many
of ``input_ids`` are prompt text: not counted in the min/max length), ``prompt_speech_tokens`` and
``speaker_embedding`` (the x-vector row of the LLM input).

What each mode lets the LLM and token2wav see is upstream's ``CosyVoiceFrontEnd`` for v1:

==============  ================================  ======================  ==================================
mode            LLM text (prompt part + target)   LLM speaker / speech    token2wav prompt
==============  ================================  ======================  ==================================
sft             target                            embedding / -           embedding only
zero_shot       transcript + target               embedding / prompt      tokens, mel, embedding
cross_lingual   target                            embedding / -           tokens, mel, embedding
instruct        instruction<|endofprompt|> + tgt  - / -                   embedding only
==============  ================================  ======================  ==================================

(instruct: upstream drops the speaker row "due to information leakage"; the CosyVoice-300M-Instruct
instructions end with ``<|endofprompt|>``, appended here when the request's instruction lacks it).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from cosyvoice.model_family import COSYVOICE1, COSYVOICE2, model_dir_family

#: the v1 recipe file in a CosyVoice-300M model dir, and the LLM weights next to it
RECIPE_FILE = COSYVOICE1.config_file
LLM_FILE = "llm.pt"
#: v1 speech tokens (speech_tokenizer_v1, 50 Hz): codes 0..4095; eos is 4096 inside the LLM only
SPEECH_TOKEN_COUNT = COSYVOICE1.codebook_size
SPEAKER_EMBEDDING_DIM = 192
MODES = ("sft", "zero_shot", "cross_lingual", "instruct")
DEFAULT_MODE = "zero_shot"
END_OF_PROMPT = "<|endofprompt|>"
#: upstream TransformerLM.inference's length bounds, in speech tokens per target text token
MIN_TOKEN_TEXT_RATIO, MAX_TOKEN_TEXT_RATIO = 2, 20
#: upstream CosyVoiceModel streaming (v1, 50 Hz tokens): a chunk every 100 tokens, 20 more as lookahead
TOKEN_HOP_LEN, TOKEN_OVERLAP_LEN = 100, 20
#: the seed the BLS sends with every LLM request (as the v2 BLS does), so a text always sounds the same
SEED = 42
#: reference audio -> prompt: the v1 front-end ONNX models in the model dir, and the flow's prompt mel
#: (the recipe's ``feat_extractor``: 22.05 kHz, n_fft 1024, hop 256, 80 bins, fmax 8000)
CAMPPLUS_FILE, SPEECH_TOKENIZER_FILE = "campplus.onnx", COSYVOICE1.speech_tokenizer
PROMPT_MEL_RATE = COSYVOICE1.sample_rate


def model_family(model_dir: str) -> str:
    """``"cosyvoice"`` when ``model_dir`` (a path or URL) is a CosyVoice1 dir (its ``cosyvoice.yaml``, read by
    ``cosyvoice.model_family.model_dir_family``), else ``"cosyvoice2"``: the name of the BLS that serves it."""
    return (model_dir_family(model_dir) or COSYVOICE2).served_by


def load_recipe_v1(model_dir: str, *, keep: str) -> dict:
    """The dir's ``cosyvoice.yaml`` through the safe loader with every model section but ``keep`` skipped."""
    from cosyvoice.config import load_recipe, training_overrides

    path = os.path.join(model_dir, RECIPE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found (a CosyVoice1 model dir holds cosyvoice.yaml)")
    return load_recipe(path, training_overrides(keep))


def load_transformer_lm(model_dir: str, device: str = "cpu"):
    """The dir's ``TransformerLM`` (recipe sizes and sampling from ``cosyvoice.yaml``), ``llm.pt`` loaded
    strictly (a mismatch names the keys), in eval mode on ``device``."""
    from cosyvoice.acoustic.checkpoint import load_released
    from cosyvoice.llm.transformer_lm import TransformerLM

    lm = load_recipe_v1(model_dir, keep="llm")["llm"]
    if not isinstance(lm, TransformerLM):
        raise ValueError(f"{os.path.join(model_dir, RECIPE_FILE)}: llm is {type(lm).__name__}, not TransformerLM "
                         "(CosyVoice2/3 LLMs are served through tensorrt_llm)")
    return load_released(lm, os.path.join(model_dir, LLM_FILE), LLM_FILE).to(device)


def text_tokenizer(model_dir: str):
    """The recipe's text tokenizer (``get_tokenizer``: whisper's multilingual tiktoken for v1)."""
    return load_recipe_v1(model_dir, keep="none")["get_tokenizer"]()


def parse_mode(raw: str | bytes | None) -> str:
    """The request's ``mode`` (absent or empty: zero_shot); anything else is a ``ValueError``."""
    mode = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else ("" if raw is None else str(raw))
    if mode == "":
        return DEFAULT_MODE
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: a CosyVoice1 model takes one of {', '.join(MODES)}")
    return mode


def check_speech_tokens(tokens, name: str) -> np.ndarray:
    """int64 v1 speech tokens; ``ValueError`` naming the tensor and the first token outside 0..4095
    (e.g. CosyVoice2 tokens sent to a v1 model)."""
    tokens = np.asarray(tokens).reshape(-1)
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{name}: integer speech tokens expected, got {tokens.dtype}")
    tokens = tokens.astype(np.int64)
    bad = np.flatnonzero((tokens < 0) | (tokens >= SPEECH_TOKEN_COUNT))
    if bad.size:
        raise ValueError(f"{name}: {bad.size} of {tokens.size} are not CosyVoice1 speech tokens (0..{SPEECH_TOKEN_COUNT - 1}); "
                         f"first: {int(tokens[bad[0]])} at position {int(bad[0])}")
    return tokens


@dataclass(frozen=True)
class LlmRequest:
    """One v1 LLM request: ``text_ids`` = prompt text ids then target text ids (whisper BPE), of which
    the first ``prompt_text_len`` are the prompt text; prompt speech tokens (0-based, may be empty);
    the speaker embedding (192 floats) or None for no speaker row."""

    text_ids: np.ndarray
    prompt_text_len: int
    prompt_speech_tokens: np.ndarray
    embedding: np.ndarray | None

    def tensors(self) -> dict[str, np.ndarray]:
        """The ``transformer_llm`` inputs (batch dim 1), without the sampling/streaming controls."""
        out = {"input_ids": self.text_ids.astype(np.int32)[None],
               "input_lengths": np.array([[len(self.text_ids)]], dtype=np.int32),
               "prompt_text_len": np.array([[self.prompt_text_len]], dtype=np.int32)}
        if len(self.prompt_speech_tokens):
            out["prompt_speech_tokens"] = self.prompt_speech_tokens.astype(np.int32)[None]
        if self.embedding is not None:
            out["speaker_embedding"] = self.embedding.astype(np.float32).reshape(1, -1)
        return out


def llm_request(tokenizer, mode: str, target_text: str, *, prompt_text: str = "",
                prompt_speech_tokens: np.ndarray | None = None, embedding: np.ndarray | None = None) -> LlmRequest:
    """What the LLM sees in ``mode`` (the module docstring's table); ``prompt_text`` is the prompt's
    transcript in zero_shot and the instruction in instruct. A ``ValueError`` says what is missing."""
    mode = parse_mode(mode)
    if not (target_text or "").strip():
        raise ValueError("target_text is empty")
    if mode != "instruct" and embedding is None:
        raise ValueError(f"mode {mode} needs the speaker embedding")
    speech = np.zeros(0, dtype=np.int64)
    if mode == "zero_shot":
        if prompt_speech_tokens is None or not len(prompt_speech_tokens):
            raise ValueError("zero_shot needs the prompt speech tokens")
        speech = check_speech_tokens(prompt_speech_tokens, "prompt_speech_tokens")
    elif mode == "instruct":
        if not (prompt_text or "").strip():
            raise ValueError("mode instruct needs an instruction in reference_text (it is empty)")
        prompt_text = prompt_text if END_OF_PROMPT in prompt_text else prompt_text + END_OF_PROMPT
        embedding = None
    if mode in ("sft", "cross_lingual"):
        prompt_text = ""
    prompt_ids = list(tokenizer.encode(prompt_text)) if prompt_text else []
    ids = np.asarray(prompt_ids + list(tokenizer.encode(target_text)), dtype=np.int64)
    if embedding is not None:
        embedding = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if embedding.size != SPEAKER_EMBEDDING_DIM:
            raise ValueError(f"speaker embedding: expected {SPEAKER_EMBEDDING_DIM} values, got {embedding.size}")
    return LlmRequest(ids, len(prompt_ids), speech, embedding)


def token2wav_prompt(mode: str, tokens: np.ndarray, feat: np.ndarray, embedding: np.ndarray) -> tuple:
    """(prompt tokens or None, prompt mel or None, embedding) token2wav gets in ``mode``: sft and instruct
    condition the flow on the speaker embedding only (upstream frontend_sft), the others on the whole prompt."""
    if parse_mode(mode) in ("sft", "instruct"):
        return None, None, embedding
    return tokens, feat, embedding


def prompt_speech_feat(wav_16k: np.ndarray) -> np.ndarray:
    """``(frames, 80)`` float32 flow-prompt mel of 16 kHz samples: resampled to 22.05 kHz, the v1 recipe's mel
    (upstream's v1 frontend; its HEAD loads the prompt at 24 kHz for every family, which does not match the
    22.05 kHz mel the v1 flow was trained on)."""
    from cosyvoice.dataset.mel import MelConfig, mel_spectrogram
    from cosyvoice.features.frontend import resampler

    wav = torch.from_numpy(np.ascontiguousarray(wav_16k, dtype=np.float32))[None]
    config = MelConfig(sample_rate=PROMPT_MEL_RATE, n_fft=1024, hop=256, win=1024, n_mels=80, fmin=0.0, fmax=8000.0)
    return mel_spectrogram(resampler(16000, PROMPT_MEL_RATE)(wav), config)[0].transpose(0, 1).contiguous().numpy()


class ReferenceFrontend:
    """A voice prompt from 16 kHz reference audio, as upstream's v1 ``frontend_zero_shot`` makes it: 50 Hz
    ``speech_tokenizer_v1`` tokens, the CAM++ embedding and the 22.05 kHz prompt mel (no 1 : 2 trimming:
    that is CosyVoice2's)."""

    def __init__(self, tokenizer_session, campplus_session):
        self.tokenizer, self.campplus = tokenizer_session, campplus_session

    @classmethod
    def from_model_dir(cls, model_dir: str) -> ReferenceFrontend | None:
        """The dir's sessions, or None when it lacks either ONNX model (no reference audio then)."""
        from cosyvoice.triton.runtime import onnx_session

        paths = [os.path.join(model_dir, name) for name in (SPEECH_TOKENIZER_FILE, CAMPPLUS_FILE)]
        if not all(os.path.isfile(path) for path in paths):
            return None
        return cls(*(onnx_session(path) for path in paths))

    def prompt(self, wav_16k: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens int64 [T], mel float32 [F, 80], embedding float32 [192]) of the audio (at most 30 s)."""
        from cosyvoice.triton.runtime import speaker_embedding, speech_tokens

        wav = np.ascontiguousarray(wav_16k, dtype=np.float32).reshape(-1)
        tokens = check_speech_tokens(speech_tokens(self.tokenizer, wav), SPEECH_TOKENIZER_FILE)
        return tokens, prompt_speech_feat(wav), speaker_embedding(self.campplus, wav)


class ServedLM:
    """A loaded ``TransformerLM`` that generates one request at a time (the generation seeds torch's
    global generator, as upstream's sampling draws from it; a lock keeps two requests' draws apart)."""

    def __init__(self, lm, device: str = "cpu"):
        self.lm = lm
        self.device = device
        self.lock = threading.Lock()

    @classmethod
    def from_model_dir(cls, model_dir: str, device: str | None = None) -> ServedLM:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(load_transformer_lm(model_dir, device), device)

    def generate(self, text_ids, *, prompt_text_len: int = 0, prompt_speech_tokens=None, embedding=None,
                 seed: int = 0, max_new_tokens: int | None = None) -> Iterator[int]:
        """0-based speech tokens as upstream ``TransformerLM.inference`` yields them for the text
        ``text_ids`` (prompt text first), after ``torch.manual_seed(seed)``; at most ``max_new_tokens``
        when given (upstream's own bound is 20 per target text token). Holds the lock while it runs."""
        text_ids = np.asarray(text_ids).reshape(-1).astype(np.int64)
        if not 0 <= prompt_text_len < len(text_ids):
            raise ValueError(f"prompt_text_len {prompt_text_len} leaves no target text in {len(text_ids)} text ids")
        speech = check_speech_tokens(np.zeros(0) if prompt_speech_tokens is None else prompt_speech_tokens,
                                     "prompt_speech_tokens")
        vocab = self.lm.text_token_size
        if text_ids.min() < 0 or text_ids.max() >= vocab:
            raise ValueError(f"input_ids: text ids must be in 0..{vocab - 1} (the recipe's text_token_size); "
                             f"got {int(text_ids.min())}..{int(text_ids.max())}")
        if embedding is not None:
            embedding = np.asarray(embedding, dtype=np.float32).reshape(-1)
            if embedding.size != self.lm.spk_embed_affine_layer.in_features:
                raise ValueError(f"speaker_embedding: expected {self.lm.spk_embed_affine_layer.in_features} values, "
                                 f"got {embedding.size}")
        dev = self.device

        def tensor(array, dtype=torch.int64):
            return torch.as_tensor(np.ascontiguousarray(array)).to(dev, dtype)[None]

        with self.lock:
            torch.manual_seed(int(seed) % 2**63)
            tokens = self.lm.inference(
                text=tensor(text_ids[prompt_text_len:]), text_len=torch.tensor([len(text_ids) - prompt_text_len]),
                prompt_text=tensor(text_ids[:prompt_text_len]), prompt_text_len=torch.tensor([prompt_text_len]),
                prompt_speech_token=tensor(speech), prompt_speech_token_len=torch.tensor([len(speech)]),
                embedding=(torch.zeros(0, self.lm.spk_embed_affine_layer.in_features, device=dev) if embedding is None
                           else tensor(embedding, torch.float32)),
                max_token_text_ratio=MAX_TOKEN_TEXT_RATIO, min_token_text_ratio=MIN_TOKEN_TEXT_RATIO)
            for count, token in enumerate(tokens):
                if max_new_tokens is not None and count >= max_new_tokens:
                    return
                yield int(token)


class ChunkSchedule:
    """When the v1 BLS hands tokens to token2wav (upstream CosyVoiceModel.tts): once ``hop + overlap``
    = 100 + 20 tokens are pending past the offset, a chunk of ``tokens[:offset + 120]`` goes out and the
    offset moves on by 100; the rest goes out with ``finalize``."""

    def __init__(self, hop: int = TOKEN_HOP_LEN, overlap: int = TOKEN_OVERLAP_LEN):
        self.hop, self.overlap, self.offset = hop, overlap, 0

    def ready(self, available: int) -> bool:
        return available - self.offset >= self.hop + self.overlap

    def chunk_end(self) -> int:
        return self.offset + self.hop + self.overlap

    def advance(self) -> None:
        self.offset += self.hop
