"""What the python-backend models compute, importable (and unit-testable) without Triton.

The model.py files under ``templates/`` are thin Triton adapters over these functions, so the
numerics are the offline stages' own: ``speaker_embedding`` = ``frontend.campplus_input`` + CAM++,
``audio_tokenizer`` = ``frontend.whisper_input`` + S3 tokenizer (+ 151663), exactly what
``extract_embedding`` / ``extract_speech_token`` compute for the same 16 kHz samples.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import threading
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import numpy as np
import torch

#: ``len(tokenizer)`` of CosyVoice-BlankEN + CosyVoice2 special tokens: id of ``<|s_0|>``
ORIGINAL_VOCAB_SIZE = 151663
SAMPLE_RATE = 16000
PROMPT_MEL_RATE = 24000
TOKEN_FRAME_RATE = 25
TOKEN_HOP_LEN = 15
PRE_LOOKAHEAD_LEN = 3
MAX_NEW_TOKENS = 750
#: sampling settings the upstream BLS sends to tensorrt_llm
SAMPLING = {"top_p": 0.95, "top_k": 50, "temperature": 0.8, "repetition_penalty": 1.1, "seed": 42}
PROMPT_TEMPLATE = "<|sos|>{}<|task_id|>"


def parameters(model_config: dict) -> dict[str, str]:
    """``{key: string_value}`` of a model config as Triton passes it to ``initialize``."""
    return {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}


def onnx_session(path: str):
    from cosyvoice.features.onnx import make_session

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: model file not found (model_dir must be a CosyVoice2 model dir)")
    return make_session(path, device="cuda" if torch.cuda.is_available() else "cpu", threads=1)


def speaker_embedding(session, wav_16k: np.ndarray) -> np.ndarray:
    """192 float32 values: CAM++ on the kaldi fbank (+ CMN) of 16 kHz float samples."""
    from cosyvoice.features.frontend import campplus_input

    feat = campplus_input(torch.from_numpy(np.ascontiguousarray(wav_16k, dtype=np.float32))[None], SAMPLE_RATE)
    return session.run(None, {session.get_inputs()[0].name: feat})[0].reshape(-1).astype(np.float32)


def speech_tokens(session, wav_16k: np.ndarray) -> np.ndarray:
    """int32 S3 tokens of 16 kHz float samples (at most 30 s, as the tokenizer allows)."""
    from cosyvoice.features.frontend import MAX_TOKENIZER_SAMPLES, whisper_input

    if len(wav_16k) > MAX_TOKENIZER_SAMPLES:
        raise ValueError(f"reference audio is {len(wav_16k) / SAMPLE_RATE:.1f} s; the speech tokenizer takes at most 30 s")
    mel = whisper_input(torch.from_numpy(np.ascontiguousarray(wav_16k, dtype=np.float32))[None])
    names = [i.name for i in session.get_inputs()]
    out = session.run(None, {names[0]: mel, names[1]: np.array([mel.shape[2]], dtype=np.int32)})[0]
    return out.reshape(-1).astype(np.int32)


def prompt_speech_feat(wav_16k: np.ndarray) -> np.ndarray:
    """``(frames, 80)`` float32 flow-prompt mel: 16 kHz -> 24 kHz, CosyVoice2 recipe mel (50 fps)."""
    from cosyvoice.dataset.mel import mel_spectrogram
    from cosyvoice.features.frontend import resampler

    wav = torch.from_numpy(np.ascontiguousarray(wav_16k, dtype=np.float32))[None]
    wav_24k = resampler(SAMPLE_RATE, PROMPT_MEL_RATE)(wav)
    return mel_spectrogram(wav_24k)[0].transpose(0, 1).contiguous().numpy()


def align_prompt(tokens: np.ndarray, feat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Trim prompt tokens and mel to exactly 1 token : 2 frames (what token2wav expects)."""
    n = min(feat.shape[0] // 2, len(tokens))
    return tokens[:n], feat[: 2 * n]


def load_spk2info(path: str) -> dict:
    """A ``spk2info.pt`` speaker-prompt cache, loaded with ``weights_only=True``."""
    info = torch.load(path, map_location="cpu", weights_only=True)
    if "001" not in info:
        raise ValueError(f"{path}: no speaker '001' (the default speaker the BLS uses without reference audio)")
    for key, entry in info.items():
        missing = {"prompt_text", "speech_token", "speech_feat", "embedding"} - set(entry)
        if missing:
            raise ValueError(f"{path}: speaker {key!r} lacks {sorted(missing)}")
    return info


def prompt_ids(tokenizer, reference_text: str, target_text: str, prompt_tokens: np.ndarray) -> np.ndarray:
    """int32 ``[1, L]``: ``<|sos|>`` + reference + target text + ``<|task_id|>``, then the prompt
    speech tokens as LLM ids (already offset by ``ORIGINAL_VOCAB_SIZE``)."""
    text_ids = tokenizer.encode(PROMPT_TEMPLATE.format(reference_text + target_text))
    return np.concatenate([np.asarray(text_ids, dtype=np.int32), np.asarray(prompt_tokens, dtype=np.int32)])[None]


#: what the cosyvoice2 BLS lets the LLM see (upstream frontend_zero_shot / _cross_lingual / _instruct2);
#: token2wav always gets the whole prompt (the voice), whatever the mode
MODES = ("zero_shot", "cross_lingual", "instruct2")
DEFAULT_MODE = "zero_shot"
#: ends the instruction of an instruct2 request (a CosyVoice2 text special token)
END_OF_PROMPT = "<|endofprompt|>"
#: a prompt computed before (the gateway's registry, spk2info.pt): sent instead of reference_wav, all three together
CACHED_PROMPT_INPUTS = ("prompt_speech_tokens", "prompt_speech_feat", "prompt_spk_embedding")
SPEAKER_EMBEDDING_DIM = 192
MEL_BINS = 80


def parse_mode(raw: str | bytes | None) -> str:
    """The request's ``mode`` input (absent or empty: zero_shot); anything else is a ``ValueError``."""
    if raw is None:
        return DEFAULT_MODE
    mode = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
    if mode == "":
        return DEFAULT_MODE
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    return mode


def parse_speed(raw) -> float:
    """The request's ``speed`` input (absent: 1.0), within token2wav's range (a ``ValueError`` otherwise)."""
    if raw is None:
        return 1.0
    values = np.asarray(raw, dtype=np.float32).reshape(-1)
    if values.size != 1:
        raise ValueError(f"speed: one value expected, got {values.size}")
    from cosyvoice.acoustic.token2wav import check_speed

    return check_speed(float(values[0]))


def prompt_source(given: set[str], mode: str) -> str:
    """Where a request's prompt (the voice) comes from, given the names of the inputs it carries:
    ``"reference_wav"`` (computed by audio_tokenizer/speaker_embedding), ``"cached"`` (the three
    ``CACHED_PROMPT_INPUTS``) or ``"default"`` (speaker "001" of spk2info.pt). A ``ValueError``
    says what is contradictory or missing, before any model runs."""
    parse_mode(mode)
    cached = [name for name in CACHED_PROMPT_INPUTS if name in given]
    wants_text = mode != "cross_lingual"  # zero_shot: the prompt's transcript; instruct2: the instruction
    if "reference_wav" in given:
        if cached:
            raise ValueError(f"give either reference_wav or a cached prompt ({', '.join(CACHED_PROMPT_INPUTS)}), "
                             f"not both (got reference_wav and {', '.join(cached)})")
        needed = ["reference_wav_len"] + (["reference_text"] if wants_text else [])
        if any(name not in given for name in needed):
            raise ValueError(f"reference_wav needs {' and '.join(needed)}")
        return "reference_wav"
    if cached:
        missing = [name for name in CACHED_PROMPT_INPUTS if name not in given]
        if missing:
            raise ValueError(f"incomplete cached prompt: {', '.join(cached)} given but {', '.join(missing)} "
                             f"missing ({', '.join(CACHED_PROMPT_INPUTS)} go together)")
        if mode == "zero_shot" and "reference_text" not in given:
            raise ValueError("a cached prompt needs reference_text (the transcript of the prompt audio) in zero_shot mode")
    if mode == "instruct2" and "reference_text" not in given:
        raise ValueError("mode instruct2 needs the instruction in reference_text")
    return "cached" if cached else "default"


def cached_prompt(tokens, feat, embedding) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A cached prompt (0-based S3 tokens ``[T]``, mel ``[F, 80]``, embedding ``[192]``, each with
    or without a leading batch dim of 1) as the BLS uses it: tokens as LLM ids (int32, +
    ``ORIGINAL_VOCAB_SIZE``), float32 mel, float32 embedding; tokens and mel aligned 1 : 2 as
    ``align_prompt`` does for reference audio. Bad shapes or token values are a ``ValueError``."""
    tokens, feat, embedding = np.asarray(tokens), np.asarray(feat), np.asarray(embedding)
    if not np.issubdtype(tokens.dtype, np.integer) or tokens.size == 0 or int(np.prod(tokens.shape[:-1])) != 1:
        raise ValueError(f"prompt_speech_tokens: expected integer S3 tokens [1, T], got {tokens.dtype} {list(tokens.shape)}")
    tokens = tokens.reshape(-1).astype(np.int64)
    bad = np.flatnonzero((tokens < 0) | (tokens >= SPEECH_TOKEN_COUNT))
    if bad.size:
        raise ValueError(f"prompt_speech_tokens: {bad.size} of {tokens.size} are not 0-based speech tokens "
                         f"(0..{SPEECH_TOKEN_COUNT - 1}); first: {int(tokens[bad[0]])} at position {int(bad[0])}")
    if feat.ndim < 2 or feat.shape[-1] != MEL_BINS or int(np.prod(feat.shape[:-2])) != 1 or feat.shape[-2] < 2:
        raise ValueError(f"prompt_speech_feat: expected mel frames [1, F, {MEL_BINS}] (F >= 2), got {list(feat.shape)}")
    if embedding.size != SPEAKER_EMBEDDING_DIM or int(np.prod(embedding.shape[:-1])) != 1:
        raise ValueError(f"prompt_spk_embedding: expected [1, {SPEAKER_EMBEDDING_DIM}], got {list(embedding.shape)}")
    tokens, mel = align_prompt(tokens, feat.reshape(-1, MEL_BINS).astype(np.float32))
    return (tokens + ORIGINAL_VOCAB_SIZE).astype(np.int32), mel, embedding.reshape(-1).astype(np.float32)


def llm_prompt_text(mode: str, source: str, reference_text: str | None, speaker_text: str = "") -> str:
    """The text before the target text: the default speaker's own transcript in zero_shot (the
    voice is its audio), otherwise ``reference_text`` (transcript, or instruction in instruct2)."""
    if source == "default" and mode != "instruct2":
        return speaker_text
    return reference_text or ""


def llm_input_ids(tokenizer, mode: str, target_text: str, *, prompt_text: str = "",
                  prompt_tokens: np.ndarray | None = None) -> np.ndarray:
    """int32 ``[1, L]`` the LLM continues, per mode (upstream frontend semantics):
    zero_shot = ``prompt_ids`` (``<|sos|>`` + prompt text + target + ``<|task_id|>`` + prompt LLM ids);
    cross_lingual = ``<|sos|>`` + target + ``<|task_id|>`` (the prompt only colours the voice, so
    its language does not leak into the speech); instruct2 = ``<|sos|>`` + instruction (``prompt_text``,
    ``<|endofprompt|>`` appended when absent) + target + ``<|task_id|>``, no prompt speech tokens."""
    mode = parse_mode(mode)
    if mode == "zero_shot":
        if prompt_tokens is None:
            raise ValueError("zero_shot needs the prompt speech tokens")
        return prompt_ids(tokenizer, prompt_text, target_text, prompt_tokens)
    if mode == "cross_lingual":
        return prompt_ids(tokenizer, "", target_text, np.zeros(0, dtype=np.int32))
    if not prompt_text.strip():
        raise ValueError("mode instruct2 needs an instruction in reference_text (it is empty)")
    end_id = tokenizer.convert_tokens_to_ids(END_OF_PROMPT)
    if end_id is None or end_id == tokenizer.unk_token_id:
        raise ValueError(f"the LLM tokenizer has no {END_OF_PROMPT} token: it cannot take instruct2 requests")
    instruction = prompt_text if END_OF_PROMPT in prompt_text else prompt_text + END_OF_PROMPT
    return prompt_ids(tokenizer, instruction, target_text, np.zeros(0, dtype=np.int32))


@dataclass
class ChunkSchedule:
    """When the streaming BLS hands tokens to token2wav (upstream strategy).

    The first chunk goes out once ``hop + lookahead`` = 15 + 3 tokens are pending. Then
    ``exponential`` hops are 25, 50, 100, ... tokens (25 * 2^k); ``time_based`` hops stay at 15
    unless synthesis runs ahead of real time, in which case they grow to what is already pending
    (rounded to multiples of 15).
    """

    strategy: str = "exponential"
    hop: int = TOKEN_HOP_LEN
    lookahead: int = PRE_LOOKAHEAD_LEN
    chunk_index: int = 0
    offset: int = 0
    started: float = 0.0

    def __post_init__(self):
        if self.strategy not in ("exponential", "time_based"):
            raise ValueError(f"dynamic_chunk_strategy must be exponential or time_based, got {self.strategy!r}")
        self.started = time.monotonic()

    def ready(self, available: int) -> bool:
        return available - self.offset >= self.hop + self.lookahead

    def advance(self, available: int) -> None:
        """Record that a chunk of ``hop`` tokens went out; pick the next hop."""
        self.offset += self.hop
        if self.strategy == "exponential":
            self.hop = TOKEN_FRAME_RATE * 2 ** self.chunk_index
        else:
            elapsed = time.monotonic() - self.started
            if self.chunk_index > 0 and elapsed > 0:
                per_chunk = elapsed / (self.chunk_index + 1)
                ahead = (self.offset / TOKEN_FRAME_RATE - elapsed) / per_chunk
                pending = available - self.offset
                if ahead > 4:
                    hop = (pending // TOKEN_HOP_LEN + 1) * TOKEN_HOP_LEN
                elif ahead > 2:
                    hop = (pending // TOKEN_HOP_LEN) * TOKEN_HOP_LEN
                else:
                    hop = TOKEN_HOP_LEN
                self.hop = max(TOKEN_HOP_LEN, hop)
        self.chunk_index += 1


def load_embedding_bias(folder: str) -> np.ndarray | None:
    """The export's ``embedding_bias.safetensors`` (decoder bias on speech rows, -inf on every other
    id) as float32, or None when the folder has none (an upstream-style export)."""
    path = os.path.join(folder, "embedding_bias.safetensors")
    if not os.path.exists(path):
        return None
    from safetensors.numpy import load_file

    return load_file(path)["embedding_bias"].astype(np.float32)


def stop_words_list(eos_id: int) -> np.ndarray:
    """TensorRT-LLM's ``stop_words_list`` (int32 ``[1, 2, n]``: token ids, then end offsets) for the two
    stop rows after ``<|eos1|>``: upstream's LLM stops on any of its three stop tokens (``stop_token_ids``),
    the engine's ``end_id`` covers only the first."""
    return np.array([[[eos_id + 1, eos_id + 2], [1, 2]]], dtype=np.int32)


def parse_stop_words(stop_words: np.ndarray | None) -> set[int]:
    """The single-token stop words of a ``stop_words_list`` input (ids row, offsets row, -1 padding);
    multi-token words are refused (the CPU stand-in does not match sequences)."""
    if stop_words is None:
        return set()
    array = np.asarray(stop_words, dtype=np.int64).reshape(2, -1)
    ids, offsets = array[0], [int(o) for o in array[1] if o >= 0]
    words, start = [], 0
    for end in offsets:
        words.append(ids[start:end].tolist())
        start = end
    if any(len(word) != 1 for word in words):
        raise ValueError(f"stop_words_list: only single-token stop words are supported here, got {words}")
    return {word[0] for word in words}


def end_of_speech(ids: list[int], eos_id: int) -> int | None:
    """Index of the first stop token (``<|eos1|>`` or a stop row after it) in LLM output ids, or None."""
    return next((i for i, token in enumerate(ids) if token >= eos_id), None)


def sample_stream(model, input_ids: torch.Tensor, *, max_new_tokens: int, end_id: int, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                  seed: int | None = None, embedding_bias: torch.Tensor | None = None,
                  stop_ids: Collection[int] = ()) -> Iterator[int]:
    """Sampled continuation of ``input_ids`` ``[1, L]`` with a HF causal LM, one token at a time
    (KV cache), stopping before ``end_id`` or any of ``stop_ids``: the CPU stand-in for the TensorRT-LLM engine.

    ``embedding_bias`` (the export's speech-only bias) is added to the logits first, as TensorRT-LLM's
    per-request ``embedding_bias`` input is. Sampling order as in TensorRT-LLM/HF: repetition penalty (over prompt and output), temperature,
    top-k, then top-p on the survivors (at least one kept), one multinomial draw from a generator
    seeded with ``seed``. Top-p works on the k survivors only, not a sort of the whole vocabulary.
    """
    from transformers import DynamicCache

    generator = torch.Generator().manual_seed(int(seed) if seed is not None else 0)
    seen = input_ids.reshape(-1).long()
    cache = DynamicCache()
    step_input = seen[None]
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out = model(input_ids=step_input, past_key_values=cache, use_cache=True, logits_to_keep=1)
            scores = out.logits[0, -1].float()
            if embedding_bias is not None:  # TensorRT-LLM adds it to the logits before sampling
                scores = scores + embedding_bias[: scores.numel()]
            if repetition_penalty and repetition_penalty != 1.0:
                picked = scores[seen]
                scores[seen] = torch.where(picked < 0, picked * repetition_penalty, picked / repetition_penalty)
            if temperature and temperature > 0 and temperature != 1.0:
                scores = scores / temperature
            if top_k and 0 < top_k < scores.numel():
                values, indices = torch.topk(scores, top_k)
            else:
                values, indices = torch.sort(scores, descending=True)
            probs = torch.softmax(values, dim=-1)
            if top_p and top_p < 1.0:
                before = torch.cumsum(probs, dim=-1) - probs  # mass of the better candidates
                probs = torch.where(before < top_p, probs, torch.zeros_like(probs))
            token = int(indices[torch.multinomial(probs, 1, generator=generator)[0]])
            if token == end_id or token in stop_ids:
                return
            yield token
            step_input = torch.tensor([[token]], dtype=torch.long)
            seen = torch.cat([seen, step_input[0]])


def load_object(spec: str):
    """``"package.module:attr"`` or ``"/path/to/file.py:attr"`` -> the attribute."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ValueError(f"{spec!r}: expected 'module:attribute' or '/path/file.py:attribute'")
    if module_name.endswith(".py"):
        name = "_token2wav_runtime_" + os.path.splitext(os.path.basename(module_name))[0]
        loader_spec = importlib.util.spec_from_file_location(name, module_name)
        if loader_spec is None or loader_spec.loader is None:
            raise ImportError(f"{module_name}: cannot load")
        module = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    return getattr(module, attr)


#: CosyVoice2 speech tokens: ids 0..6560 (LLM ids ``ORIGINAL_VOCAB_SIZE`` + 0..6560)
SPEECH_TOKEN_COUNT = 6561
#: token2wav's defaults for its ``idle_timeout_s`` / ``max_live_requests`` parameters
IDLE_TIMEOUT_S = 60.0
MAX_LIVE_REQUESTS = 64


def speech_tokens_from_llm_ids(llm_ids, name: str) -> np.ndarray:
    """LLM ids (``ORIGINAL_VOCAB_SIZE`` + k) -> int64 speech tokens k; ``ValueError`` naming the
    tensor, how many ids are outside ``<|s_0|>..<|s_6560|>`` and the first of them."""
    ids = np.asarray(llm_ids).reshape(-1)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name}: integer ids expected, got {ids.dtype}")
    tokens = ids.astype(np.int64) - ORIGINAL_VOCAB_SIZE
    bad = np.flatnonzero((tokens < 0) | (tokens >= SPEECH_TOKEN_COUNT))
    if bad.size:
        raise ValueError(f"{name}: {bad.size} of {ids.size} ids are not speech tokens (ids {ORIGINAL_VOCAB_SIZE}.."
                         f"{ORIGINAL_VOCAB_SIZE + SPEECH_TOKEN_COUNT - 1}); first: {int(ids[bad[0]])} at position {int(bad[0])}")
    return tokens


def positive_parameter(params: dict[str, str], key: str, default: float, cast=float):
    """A positive number from a model's ``parameters``; unset (missing, empty or an unfilled
    ``${...}``) gives ``default``; anything else that is not a positive number is an error."""
    raw = (params.get(key) or "").strip()
    if not raw or raw.startswith("${"):
        return default
    try:
        value = cast(raw)
    except ValueError:
        value = None
    if value is None or not value > 0:
        raise ValueError(f"parameter {key}={raw!r}: expected a positive {cast.__name__}")
    return value


#: the acoustic runtime the ``token2wav`` model serves when its ``token2wav_runtime`` parameter is not set
DEFAULT_TOKEN2WAV_RUNTIME = "cosyvoice.acoustic.token2wav:Token2Wav"
#: token2wav's output rate (its ``sample_rate`` parameter); the model refuses a runtime producing another
TOKEN2WAV_SAMPLE_RATE = 24000
#: the estimator precisions ``Token2Wav`` offers (its ``estimator_dtype``)
ESTIMATOR_DTYPES = ("fp32", "bf16", "fp16")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def _given(params: dict[str, str], key: str) -> str | None:
    """A parameter's text, or None when unset (missing, empty or an unfilled ``${...}``)."""
    raw = (params.get(key) or "").strip()
    return None if not raw or raw.startswith("${") else raw


def _flag(raw: str, key: str) -> bool:
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ValueError(f"parameter {key}={raw!r}: expected true or false")


def _whole(raw: str, key: str, low: int, what: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < low or value >= 2**64:
        raise ValueError(f"parameter {key}={raw!r}: expected {what}")
    return value


def _device(raw: str, key: str) -> str:
    if not _DEVICE.match(raw):
        raise ValueError(f"parameter {key}={raw!r}: expected cpu, cuda or cuda:<index>")
    return raw


def _dtype(raw: str, key: str) -> str:
    if raw not in ESTIMATOR_DTYPES:
        raise ValueError(f"parameter {key}={raw!r}: expected one of {', '.join(ESTIMATOR_DTYPES)}")
    return raw


#: token2wav's parameters that become keyword arguments of the acoustic runtime's factory, each with
#: the parser of its text (the keys are the keyword names; the template variables add ``token2wav_``)
TOKEN2WAV_OPTIONS = {
    "device": _device,
    "stream_cache": _flag,
    "chunk_causal_final": _flag,
    "estimator_dtype": _dtype,
    "seed": lambda raw, key: _whole(raw, key, 0, "an integer from 0 to 2**64 - 1"),
    "max_stream_cache_bytes": lambda raw, key: _whole(raw, key, 1, "a positive number of bytes"),
    "compile": _flag,
}


def token2wav_options(params: dict[str, str]) -> dict:
    """The runtime options a ``token2wav`` config sets, parsed: ``{keyword: value}`` with only the
    parameters that are set (an unset one is left to the runtime's own default, so a factory
    taking only ``model_dir`` still works when none is set). One ``ValueError`` names every bad
    value. Only the form is checked here; whether a CUDA device is there is ``check_device``'s
    business (a repository is validated on machines without the serving GPU)."""
    options, problems = {}, []
    for key, parse in TOKEN2WAV_OPTIONS.items():
        raw = _given(params, key)
        if raw is not None:
            try:
                options[key] = parse(raw, key)
            except ValueError as exc:
                problems.append(str(exc))
    if problems:
        raise ValueError("; ".join(problems))
    return options


def check_device(device: str) -> None:
    """``RuntimeError`` when ``device`` names a CUDA device this process cannot use."""
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise RuntimeError(f"token2wav: device {device!r} asked for, but no CUDA device is visible to this process")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise RuntimeError(f"token2wav: device {device!r} asked for, but only {torch.cuda.device_count()} CUDA "
                           "device(s) are visible")


class StreamRefused(Exception):
    """A streaming chunk token2wav does not accept (too many live streams, unknown stream)."""


class StreamCache:
    """The live streams of token2wav, bounding the acoustic runtime's per-request caches.

    A stream (request id) becomes live with its first chunk (``token_offset`` 0) and is released
    (``release(request_id)``, which frees the runtime's cache) on its final chunk, on an error or a
    cancellation (``finish``), after ``idle_timeout_s`` without a chunk (``sweep``), and when the
    model is unloaded (``close``). At most ``max_live`` streams are live: a new one beyond that, once
    idle streams are swept, is refused, as is a later chunk of a stream that is not live (expired
    or never started). So a client that never finalizes holds at most ``max_live`` caches, and
    those only for ``idle_timeout_s``. ``released`` counts releases by reason. Thread-safe.
    """

    def __init__(self, release, *, idle_timeout_s: float = IDLE_TIMEOUT_S, max_live: int = MAX_LIVE_REQUESTS,
                 clock=time.monotonic, log=None):
        if not idle_timeout_s > 0 or not max_live > 0:
            raise ValueError(f"idle_timeout_s and max_live must be positive, got {idle_timeout_s}, {max_live}")
        self._release = release
        self.idle_timeout_s = float(idle_timeout_s)
        self.max_live = int(max_live)
        self.clock = clock
        self._log = log or (lambda message: None)
        self._last: dict[str, float] = {}
        self._busy: dict[str, int] = {}
        self._lock = threading.RLock()
        self.released: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._last)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._last

    def begin(self, request_id: str, token_offset: int) -> None:
        """Admit one chunk of ``request_id`` (call ``finish`` when it is done)."""
        with self._lock:
            self.sweep()
            if request_id not in self._last:
                if token_offset > 0:
                    raise StreamRefused(f"request {request_id!r}: chunk at token_offset {token_offset} but the stream is not "
                                        f"live (never started, already finalized, or released after {self.idle_timeout_s:g} s "
                                        "idle); start it again from token_offset 0")
                if len(self._last) >= self.max_live:
                    raise StreamRefused(f"request {request_id!r} refused: {len(self._last)} streams are live "
                                        f"(max_live_requests {self.max_live}); retry after one finalizes or idles out "
                                        f"({self.idle_timeout_s:g} s)")
            self._last[request_id] = self.clock()
            self._busy[request_id] = self._busy.get(request_id, 0) + 1

    def finish(self, request_id: str, release: str | None = None) -> None:
        """The chunk is done; ``release`` ("finalize", "error", "cancelled") ends the stream."""
        with self._lock:
            if request_id not in self._last:
                return
            self._busy[request_id] -= 1
            self._last[request_id] = self.clock()
            if release:
                self._drop(request_id, release)

    def sweep(self) -> list[str]:
        """Release the streams idle for longer than ``idle_timeout_s`` (not those mid-chunk)."""
        with self._lock:
            now = self.clock()
            idle = [rid for rid, last in self._last.items()
                    if not self._busy.get(rid) and now - last > self.idle_timeout_s]
            for rid in idle:
                self._log(f"token2wav: stream {rid!r} released after {now - self._last[rid]:.0f} s idle (never finalized)")
                self._drop(rid, "idle", raise_errors=False)
            return idle

    def close(self) -> None:
        with self._lock:
            for rid in list(self._last):
                self._drop(rid, "shutdown", raise_errors=False)

    def _drop(self, request_id: str, reason: str, raise_errors: bool = True) -> None:
        del self._last[request_id]
        self._busy.pop(request_id, None)
        self.released[reason] = self.released.get(reason, 0) + 1
        try:
            self._release(request_id)
        except Exception as exc:
            if raise_errors:
                raise
            self._log(f"token2wav: releasing stream {request_id!r} ({reason}) failed: {exc}")
