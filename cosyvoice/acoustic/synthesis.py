"""``synthesize``: speech tokens (or text, through the HF export of the LLM) -> a WAV file at the model dir's rate.

The quick-listen face of the served model: the same acoustic runtime the Triton ``token2wav`` model
serves, picked by the model dir (:func:`cosyvoice.acoustic.runtimes.load_token2wav`: ``Token2Wav``,
24 kHz, for CosyVoice2; ``Token2WavV1``, 22.05 kHz and 50 Hz tokens, for a dir with ``cosyvoice.yaml``),
the same prompt computations as the BLS (CosyVoice2: ``cosyvoice.triton.runtime``, S3 tokens, CAM++
embedding and flow-prompt mel of 16 kHz reference audio; CosyVoice1: the v1 BLS's
``runtime_v1.ReferenceFrontend``) and, for text (CosyVoice2 only), the same
LLM prompt (``<|sos|>`` + reference text + text + ``<|task_id|>`` + prompt speech ids), sampling
settings and stop id (``<|eos1|>``) as the BLS sends to ``tensorrt_llm``, run by the HF stand-in's
sampler on the CPU/GPU with transformers.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from cosyvoice import storage
from cosyvoice.acoustic import MODEL_FILES

#: CosyVoice2 speech tokens are ids 0..6560 (CosyVoice1's 0..4095: its runtime checks them)
SPEECH_TOKEN_COUNT = 6561
#: what a model dir needs for token2wav (``Token2Wav`` loads them; the yaml is optional there)
ACOUSTIC_FILES = MODEL_FILES
PROMPT_FILES = ("speech_tokenizer_v2.onnx", "campplus.onnx")
V1_PROMPT_FILES = ("speech_tokenizer_v1.onnx", "campplus.onnx")


@dataclass
class Prompt:
    """A zero-shot prompt: speech tokens (P,), their flow mel (2 P, 80) and the CAM++ embedding (192,)."""

    tokens: np.ndarray
    feat: np.ndarray
    embedding: np.ndarray
    text: str = ""


@dataclass
class ChunkTiming:
    """One streamed chunk: its samples and when it was ready (seconds after synthesis started)."""

    index: int
    samples: int
    ready_s: float


@dataclass
class SynthesisReport:
    out: str
    sample_rate: int
    samples: int
    tokens: int
    prompt_tokens: int
    stream: bool
    load_seconds: float
    synth_seconds: float
    llm_seconds: float | None = None
    chunks: list[ChunkTiming] = field(default_factory=list)
    bytes: int = 0

    @property
    def audio_seconds(self) -> float:
        return self.samples / self.sample_rate

    @property
    def rtf(self) -> float:
        """Token2wav seconds per second of audio (model loading and the LLM not counted)."""
        return self.synth_seconds / self.audio_seconds if self.samples else float("nan")

    @property
    def first_chunk_s(self) -> float | None:
        return self.chunks[0].ready_s if self.chunks else None

    def summary(self) -> str:
        text = (f"wrote {self.out}: {self.audio_seconds:.2f} s at {self.sample_rate} Hz from {self.tokens} speech "
                f"tokens" + (f" (prompt: {self.prompt_tokens} tokens)" if self.prompt_tokens else "") +
                f"; token2wav {self.synth_seconds:.2f} s (RTF {self.rtf:.3f}), loaded in {self.load_seconds:.1f} s")
        if self.llm_seconds is not None:
            text += f", LLM {self.llm_seconds:.2f} s"
        if self.stream:
            text += f"; {len(self.chunks)} chunks, first after {self.first_chunk_s:.3f} s"
        return text

    def as_metadata(self) -> dict:
        return {"out": self.out, "sample_rate": self.sample_rate, "samples": self.samples,
                "audio_seconds": round(self.audio_seconds, 3), "tokens": self.tokens,
                "prompt_tokens": self.prompt_tokens, "stream": self.stream, "rtf": round(self.rtf, 4),
                "first_chunk_s": self.first_chunk_s, "llm_seconds": self.llm_seconds, "bytes": self.bytes}


# -- inputs ---------------------------------------------------------------------------------------

def check_token_ids(tokens: np.ndarray, where: str) -> np.ndarray:
    """int64 (N,) speech-token ids; ``ValueError`` naming ``where`` when empty or out of 0..6560."""
    tokens = np.asarray(tokens).reshape(-1)
    if tokens.size == 0:
        raise ValueError(f"{where}: no speech tokens")
    if not np.issubdtype(tokens.dtype, np.integer):
        if not np.all(np.isfinite(tokens)) or not np.all(np.mod(tokens, 1) == 0):
            raise ValueError(f"{where}: speech tokens must be integers, got {tokens.dtype}")
    tokens = tokens.astype(np.int64)
    bad = np.flatnonzero((tokens < 0) | (tokens >= SPEECH_TOKEN_COUNT))
    if bad.size:
        raise ValueError(f"{where}: {bad.size} of {tokens.size} ids outside the speech tokens 0.."
                         f"{SPEECH_TOKEN_COUNT - 1}; first: {int(tokens[bad[0]])} at position {int(bad[0])}")
    return tokens


def _pick(table: dict, utt: str | None, where: str):
    if utt is not None:
        if utt not in table:
            raise ValueError(f"{where}: no utterance {utt!r} (it holds {len(table)}, e.g. {sorted(table)[:3]})")
        return table[utt]
    if len(table) != 1:
        raise ValueError(f"{where}: holds {len(table)} utterances; choose one with utt "
                         f"(--utt), e.g. {sorted(table)[:3]}")
    return next(iter(table.values()))


def read_speech_tokens(url: str, utt: str | None = None) -> np.ndarray:
    """Speech-token ids from a file: whitespace/comma separated integers (text), a ``.npy`` array,
    an upstream ``utt2speech_token.pt`` dict or a ``speech_tokens`` parquet shard (``utt`` names
    the utterance; optional when the file holds one). Checked: not empty, every id in 0..6560."""
    if not storage.exists(url):
        raise FileNotFoundError(f"{url}: token file not found")
    name = url.lower()
    if name.endswith(".pt"):
        from cosyvoice.features.pt import load_pt  # plain containers only, else torch.load(weights_only=True)

        table = load_pt(url)
        if isinstance(table, dict):
            tokens = _pick(table, utt, url)
            where = f"{url} [{utt or next(iter(table))}]"
        else:
            tokens, where = table, url
        return check_token_ids(np.asarray(tokens), where)
    if name.endswith(".parquet"):
        from cosyvoice.features.feature_files import read_parquet

        table = read_parquet(url)
        if "speech_token" not in table.column_names or "utt" not in table.column_names:
            raise ValueError(f"{url}: not a speech_tokens shard (columns {table.column_names})")
        rows = dict(zip(table.column("utt").to_pylist(), table.column("speech_token").to_pylist()))
        tokens = _pick(rows, utt, url)
        return check_token_ids(np.asarray(tokens if tokens is not None else []), f"{url} [{utt or next(iter(rows))}]")
    if utt is not None:
        raise ValueError(f"{url}: utt is only for .pt dicts and parquet shards; this file holds one sequence")
    if name.endswith(".npy"):
        try:
            array = np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False)
        except ValueError as exc:
            raise ValueError(f"{url}: not a plain .npy array ({exc})") from None
        return check_token_ids(array, url)
    try:
        text = storage.read_text(url)
    except UnicodeDecodeError:
        raise ValueError(f"{url}: not a text file of token ids (nor .npy/.pt/.parquet by its suffix)") from None
    ids = []
    for word in text.replace(",", " ").split():
        try:
            ids.append(int(word))
        except ValueError:
            raise ValueError(f"{url}: expected integer speech-token ids separated by spaces, commas or newlines; "
                             f"found {word[:40]!r}") from None
    return check_token_ids(np.array(ids, dtype=np.int64), url)


def missing_files(model_dir: str, names: Iterable[str]) -> list[str]:
    return [n for n in names if not os.path.isfile(os.path.join(model_dir, n))]


def is_v1_dir(model_dir: str) -> bool:
    """Whether ``model_dir`` is a CosyVoice1 dir (``cosyvoice.yaml``; ``ValueError`` when it holds both recipes)."""
    from cosyvoice.acoustic.runtimes import V1, acoustic_generation

    return acoustic_generation(model_dir) == V1


def token_rate(model_dir: str) -> int:
    """Speech tokens per second of ``model_dir``'s acoustic models: 50 for CosyVoice1, 25 for CosyVoice2."""
    from cosyvoice.model_family import COSYVOICE1, COSYVOICE2

    return (COSYVOICE1 if is_v1_dir(model_dir) else COSYVOICE2).tokens_per_second


def prompt_from_wav(model_dir: str, wav_url: str, text: str = "") -> Prompt:
    """The BLS's prompt of reference audio: S3 tokens (``speech_tokenizer_v2.onnx``), CAM++ embedding
    (``campplus.onnx``) and the flow-prompt mel, trimmed to 2 frames per token; for a CosyVoice1 dir
    the v1 BLS's (50 Hz ``speech_tokenizer_v1.onnx`` tokens, 22.05 kHz mel, no trimming)."""
    from cosyvoice.features import frontend
    from cosyvoice.triton import runtime

    v1 = is_v1_dir(model_dir)
    needed = (V1_PROMPT_FILES if v1 else PROMPT_FILES)
    absent = missing_files(model_dir, needed)
    if absent:
        raise FileNotFoundError(f"{model_dir}: a prompt needs {absent} (the {'CosyVoice1' if v1 else 'CosyVoice2'} "
                                "model dir's ONNX models)")
    if not storage.exists(wav_url):
        raise FileNotFoundError(f"{wav_url}: prompt audio not found")
    try:
        audio, rate = frontend.load_audio(wav_url)
    except frontend.AudioDecodeError as exc:
        raise ValueError(f"{wav_url}: cannot decode the prompt audio ({exc})") from None
    wav = frontend.mono_16k(audio, rate)[0].numpy()
    if v1:
        from cosyvoice.triton.runtime_v1 import ReferenceFrontend

        tokens, feat, embedding = ReferenceFrontend.from_model_dir(model_dir).prompt(wav)
        if len(tokens) == 0:
            raise ValueError(f"{wav_url}: {len(wav) / 16000:.2f} s of audio give no prompt speech tokens")
        return Prompt(tokens.astype(np.int64), feat.astype(np.float32), embedding.astype(np.float32), text)
    tokens = runtime.speech_tokens(runtime.onnx_session(os.path.join(model_dir, PROMPT_FILES[0])), wav)
    tokens, feat = runtime.align_prompt(tokens, runtime.prompt_speech_feat(wav))
    if len(tokens) == 0:
        raise ValueError(f"{wav_url}: {len(wav) / runtime.SAMPLE_RATE:.2f} s of audio give no prompt speech tokens")
    embedding = runtime.speaker_embedding(runtime.onnx_session(os.path.join(model_dir, PROMPT_FILES[1])), wav)
    return Prompt(tokens.astype(np.int64), feat.astype(np.float32), embedding.astype(np.float32), text)


def text_to_tokens(llm_dir: str, text: str, *, prompt: Prompt | None = None, seed: int = 0,
                   max_new_tokens: int | None = None) -> np.ndarray:
    """Speech tokens the LLM (an HF export: ``Qwen2ForCausalLM`` + tokenizer [+ embedding_bias])
    samples for ``text``, as the BLS asks ``tensorrt_llm`` for them (its prompt, its sampling
    settings with ``seed``, stop at ``<|eos1|>``). Runs on the CPU: it is the Triton HF stand-in's
    sampler (``runtime.sample_stream``), which decodes there."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cosyvoice.triton import runtime

    if not text.strip():
        raise ValueError("text: nothing to say")
    if not os.path.isfile(os.path.join(llm_dir, "config.json")):
        raise FileNotFoundError(f"{llm_dir}: not an HF export of the LLM (no config.json); "
                                "export one with `cosyvoice-pipeline export-hf`")
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    eos = tokenizer.convert_tokens_to_ids("<|eos1|>")
    if eos is None or eos == tokenizer.unk_token_id:
        raise ValueError(f"{llm_dir}: no <|eos1|> token (not a CosyVoice2 HF export)")
    prompt_ids = np.zeros(0, dtype=np.int64) if prompt is None else prompt.tokens + runtime.ORIGINAL_VOCAB_SIZE
    input_ids = runtime.prompt_ids(tokenizer, prompt.text if prompt else "", text, prompt_ids)
    model = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).eval()
    bias = runtime.load_embedding_bias(llm_dir)
    sampling = runtime.SAMPLING
    ids = list(runtime.sample_stream(
        model, torch.from_numpy(input_ids.astype(np.int64)), end_id=eos,
        max_new_tokens=max_new_tokens or runtime.MAX_NEW_TOKENS, temperature=sampling["temperature"],
        top_k=sampling["top_k"], top_p=sampling["top_p"], repetition_penalty=sampling["repetition_penalty"],
        seed=seed, embedding_bias=None if bias is None else torch.from_numpy(bias)))
    if not ids:
        raise ValueError(f"{llm_dir}: the LLM generated no speech tokens for {text[:60]!r}")
    return runtime.speech_tokens_from_llm_ids(ids, "LLM output")


#: libsndfile's SFC_SET_ADD_PEAK_CHUNK (sndfile.h): its PEAK chunk of float WAVs carries a timestamp
_SET_ADD_PEAK_CHUNK = 0x1050


def wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """A float32 mono WAV file (soundfile), the same bytes for the same samples: libsndfile's PEAK
    chunk (which holds the time of writing) is turned off through its command interface."""
    import soundfile as sf

    buffer = io.BytesIO()
    with sf.SoundFile(buffer, "w", sample_rate, 1, "FLOAT", format="WAV") as f:
        command, handle = getattr(getattr(sf, "_snd", None), "sf_command", None), getattr(f, "_file", None)
        if command is not None and handle is not None:
            command(handle, _SET_ADD_PEAK_CHUNK, sf._ffi.NULL, 0)
        f.write(np.asarray(samples, dtype=np.float32))
    return buffer.getvalue()


# -- the stage-like tool ---------------------------------------------------------------------------

def synthesize(model_dir: str, out: str, *, tokens: str | None = None, utt: str | None = None,
               text: str | None = None, llm_dir: str | None = None, prompt_wav: str | None = None,
               prompt_text: str | None = None, stream: bool = False, seed: int = 0,
               chunk_causal_final: bool = False, max_new_tokens: int | None = None, device: str | None = None,
               progress: Callable[[Iterable], Iterable] | None = None) -> SynthesisReport:
    """Write ``out`` (path or URL, atomically): a float WAV at the model dir's rate (24 kHz CosyVoice2,
    22.05 kHz CosyVoice1) of ``tokens`` (a token file, see :func:`read_speech_tokens`) or of ``text``
    (sampled by the CosyVoice2 LLM in ``llm_dir``), spoken with the flow + HiFT of ``model_dir``,
    optionally in the voice of ``prompt_wav`` (its transcript ``prompt_text`` is needed with ``text``).
    ``stream`` runs the runtime's ``stream`` (upstream's chunk schedule) and records when each chunk was
    ready; ``seed`` fixes the LLM's sampling and the vocoder's noise, so a re-run writes the same bytes.
    ``chunk_causal_final`` is a CosyVoice2 option (a CosyVoice1 dir refuses it).
    """
    from cosyvoice.acoustic.runtimes import load_token2wav

    if (tokens is None) == (text is None):
        raise ValueError("give exactly one of tokens (a token file) or text")
    if text is not None and not llm_dir:
        raise ValueError("text needs llm_dir (--llm_dir): the HF export of the CosyVoice2 LLM "
                         "(`cosyvoice-pipeline export-hf`) that turns text into speech tokens")
    if text is None and llm_dir:
        raise ValueError("llm_dir is only used with text; a token file needs no LLM")
    if prompt_text is not None and prompt_wav is None:
        raise ValueError("prompt_text needs prompt_wav (the reference audio it transcribes)")
    if prompt_wav is not None and text is not None and not (prompt_text or "").strip():
        raise ValueError("prompt_wav with text needs prompt_text (the transcript of the reference audio)")
    if prompt_text is not None and text is None:
        raise ValueError("prompt_text is only used with text (the LLM's prompt); token files need none")
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{model_dir}: model dir not found")
    if text is not None and is_v1_dir(model_dir):
        raise ValueError(f"{model_dir} is a CosyVoice1 model dir: text goes through the HF export of a CosyVoice2 "
                         "(Qwen2) LLM, which a TransformerLM has none of; give speech tokens (--tokens), or serve "
                         "the dir (triton-publish) for text")
    absent = missing_files(model_dir, ACOUSTIC_FILES)
    if absent:
        raise FileNotFoundError(f"{model_dir}: lacks the acoustic models {absent} (the released CosyVoice2 files, "
                                "or `cosyvoice-pipeline make-reference-models --out DIR` for random ones)")
    speech = read_speech_tokens(tokens, utt) if tokens is not None else None
    prompt = prompt_from_wav(model_dir, prompt_wav, prompt_text or "") if prompt_wav is not None else None
    llm_seconds = None
    if text is not None:
        llm_started = time.perf_counter()
        speech = text_to_tokens(llm_dir, text, prompt=prompt, seed=seed, max_new_tokens=max_new_tokens)
        llm_seconds = time.perf_counter() - llm_started
    load_started = time.perf_counter()
    options = {"chunk_causal_final": True} if chunk_causal_final else {}  # CosyVoice1's runtime refuses the option
    model = load_token2wav(model_dir, device=device, seed=seed, **options)
    load_seconds = time.perf_counter() - load_started
    args = (speech, *((prompt.tokens, prompt.feat, prompt.embedding) if prompt else (None, None, None)))
    chunks: list[ChunkTiming] = []
    synth_started = time.perf_counter()
    if stream:
        parts = []
        for index, part in enumerate((progress or iter)(model.stream(*args, request_id="synthesize"))):
            parts.append(part)
            chunks.append(ChunkTiming(index, len(part), time.perf_counter() - synth_started))
        samples = np.concatenate(parts)
    else:
        samples = model.synthesize(*args)
    synth_seconds = time.perf_counter() - synth_started
    if not np.isfinite(samples).all():
        raise RuntimeError(f"{model_dir}: token2wav produced non-finite samples (damaged flow.pt/hift.pt?)")
    written = storage.write_bytes(out, wav_bytes(samples, model.sample_rate))
    return SynthesisReport(out=out, sample_rate=model.sample_rate, samples=len(samples), tokens=len(speech),
                           prompt_tokens=0 if prompt is None else len(prompt.tokens), stream=stream,
                           load_seconds=load_seconds, synth_seconds=synth_seconds, llm_seconds=llm_seconds,
                           chunks=chunks, bytes=written.bytes)
