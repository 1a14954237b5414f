"""Speakers and prompt features: the registry behind ``sft`` / the OpenAI ``voice``, and the prompt cache.

A zero-shot request's prompt audio costs two Triton calls (``audio_tokenizer``, ``speaker_embedding``)
plus a mel on the gateway's CPU. Clients repeat the same prompt, so ``PromptCache`` keeps the results
keyed by the SHA-256 of the 16 kHz float32 samples (the prompt text is not part of the key: the same
voice with another transcript is the same features). The cache is an in-process LRU of ``capacity``
prompts; with ``redis_url`` the gateway workers also share a Redis layer behind it. Redis values are
``np.savez`` archives read back with ``allow_pickle=False`` (never pickle: a Redis writer must not be
able to run code in the gateway), under ``cosyvoice:prompt:<sha256>``. Redis is not capped by
``capacity``: give ``ttl_s`` and/or run the server with ``maxmemory`` + ``maxmemory-policy allkeys-lru``
(a 10 s prompt is about 170 kB). A Redis outage degrades to the memory layer (logged), never fails a request.

``SpeakerRegistry`` persists registered speakers as an ``spk2info.pt`` (the format of
``cosyvoice.triton.spk2info``: the cosyvoice2 BLS and ``build_spk2info`` files load into it and back),
read with ``torch.load(..., weights_only=True)``. Writes are atomic (``storage.write_bytes``: temp file +
rename locally, one PUT on object stores) and serialized: a lock in the process and, for local files, an
``flock`` so several gateway workers on one host merge their registrations instead of losing one. Every
write re-reads the file first; readers of a local file pick up other workers' changes on the next lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from cosyvoice import storage
from cosyvoice.serve.metrics import PROMPT_CACHE
from cosyvoice.triton import runtime
from cosyvoice.triton.spk2info import MAX_PROMPT_SECONDS, MIN_PROMPT_SECONDS

log = logging.getLogger(__name__)

EMBEDDING_DIM = 192
MEL_BINS = 80
SPEAKER_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
REDIS_PREFIX = "cosyvoice:prompt:"
_SPK2INFO_KEYS = ("prompt_text", "speech_token", "speech_feat", "embedding")
#: how often a registry on an object store re-reads its file when asked for a speaker it does not know
REMOTE_REFRESH_S = 5.0


class InferencePool(Protocol):
    """What the registry needs of ``backend.TritonPool``: one unary inference."""

    async def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]: ...


def _frozen(values: Any, dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A private read-only copy: cached prompts are shared between requests."""
    if hasattr(values, "detach"):  # a torch tensor from spk2info.pt
        values = values.detach().cpu().numpy()
    array = np.array(values, dtype=dtype).reshape(shape)
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class Prompt:
    """A voice prompt as token2wav and the LLM need it: transcript, 0-based S3 tokens ``[T]``, flow-prompt
    mel ``[2T, 80]`` (24 kHz recipe mel) and CAM++ embedding ``[192]``; arrays are read-only. A speaker of
    an upstream CosyVoice1 SFT model (``spk2info.pt`` entry with only its ``embedding``) is an
    :attr:`embedding_only` prompt: no transcript, tokens or mel (good for sft and instruct only)."""

    text: str
    speech_token: np.ndarray
    speech_feat: np.ndarray
    embedding: np.ndarray

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "speech_token", _frozen(self.speech_token, np.int32, (-1,)))
        set_(self, "speech_feat", _frozen(self.speech_feat, np.float32, (-1, MEL_BINS)))
        set_(self, "embedding", _frozen(self.embedding, np.float32, (-1,)))
        if self.embedding.size != EMBEDDING_DIM:
            raise ValueError(f"prompt embedding has {self.embedding.size} values, expected {EMBEDDING_DIM}")
        if len(self.speech_token) == 0 and (len(self.speech_feat) or self.text):
            raise ValueError("prompt has no speech tokens")
        if not isinstance(self.text, str):
            raise ValueError(f"prompt text must be a str, got {type(self.text).__name__}")

    def bls_inputs(self) -> dict[str, np.ndarray]:
        """The cosyvoice2 BLS's cached-prompt inputs (instead of ``reference_wav``), batch dim 1."""
        return {
            "prompt_speech_tokens": self.speech_token.astype(np.int32)[None],
            "prompt_speech_feat": self.speech_feat.astype(np.float16)[None],
            "prompt_spk_embedding": self.embedding.astype(np.float16)[None],
            "reference_text": np.array([[self.text]], dtype=object),
        }

    @property
    def embedding_only(self) -> bool:
        return len(self.speech_token) == 0

    def to_spk2info(self) -> dict:
        """One ``spk2info.pt`` entry, dtypes and shapes as ``build_spk2info`` writes them (an
        embedding-only prompt: upstream's SFT entry, ``{"embedding": [1, 192]}``)."""
        import torch

        if self.embedding_only:
            return {"embedding": torch.tensor(self.embedding, dtype=torch.float32)[None]}
        return {
            "prompt_text": self.text,
            "speech_token": torch.tensor(self.speech_token, dtype=torch.int32)[None],
            "speech_feat": torch.tensor(self.speech_feat, dtype=torch.float32)[None],
            "embedding": torch.tensor(self.embedding, dtype=torch.float32)[None],
        }

    @classmethod
    def from_spk2info(cls, entry: dict) -> Prompt:
        if set(entry) == {"embedding"}:  # an upstream CosyVoice1 SFT speaker
            return cls(text="", speech_token=np.zeros(0), speech_feat=np.zeros((0, MEL_BINS)), embedding=entry["embedding"])
        missing = [k for k in _SPK2INFO_KEYS if k not in entry]
        if missing:
            raise ValueError(f"spk2info entry lacks {missing}")
        return cls(text=str(entry["prompt_text"]), speech_token=entry["speech_token"],
                   speech_feat=entry["speech_feat"], embedding=entry["embedding"])

    def to_bytes(self) -> bytes:
        """An ``.npz`` archive (no pickled objects) for Redis."""
        buffer = io.BytesIO()
        np.savez(buffer, format=np.int32(1), text=np.array(self.text), speech_token=self.speech_token,
                 speech_feat=self.speech_feat, embedding=self.embedding)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Prompt:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            if int(archive["format"]) != 1:
                raise ValueError(f"prompt archive format {int(archive['format'])} is not 1")
            return cls(text=str(archive["text"]), speech_token=archive["speech_token"],
                       speech_feat=archive["speech_feat"], embedding=archive["embedding"])


class UnknownSpeaker(KeyError):
    """A speaker id the registry does not hold (the frontends answer 404/400)."""

    def __init__(self, speaker_id: str, known: list[str]):
        shown = ", ".join(known[:20]) + (f" and {len(known) - 20} more" if len(known) > 20 else "")
        self.speaker_id = speaker_id
        self.message = f"unknown speaker {speaker_id!r}; registered: {shown or 'none'}"
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


def check_speaker_id(speaker_id: str) -> str:
    if not isinstance(speaker_id, str) or not SPEAKER_ID.fullmatch(speaker_id):
        raise ValueError(f"speaker id {speaker_id!r}: use 1-64 characters of A-Z a-z 0-9 _ . -")
    return speaker_id


def check_prompt_audio(wav_16k: np.ndarray) -> np.ndarray:
    """1-D float32 16 kHz samples of a usable prompt length (as ``build_spk2info`` accepts)."""
    wav = np.asarray(wav_16k)
    if wav.ndim == 2 and wav.shape[0] == 1:
        wav = wav[0]
    if wav.ndim != 1:
        raise ValueError(f"prompt audio must be mono samples, got shape {tuple(wav.shape)}")
    if not np.issubdtype(wav.dtype, np.floating):
        raise ValueError(f"prompt audio must be float samples in [-1, 1], got {wav.dtype}")
    seconds = len(wav) / runtime.SAMPLE_RATE
    if not MIN_PROMPT_SECONDS <= seconds <= MAX_PROMPT_SECONDS:
        raise ValueError(f"prompt audio is {seconds:.2f} s; it must be {MIN_PROMPT_SECONDS:g}-{MAX_PROMPT_SECONDS:g} s "
                         f"at {runtime.SAMPLE_RATE} Hz")
    wav = np.ascontiguousarray(wav, dtype=np.float32)
    if not np.isfinite(wav).all():
        raise ValueError("prompt audio has NaN or infinite samples")
    return wav


class PromptCache:
    """LRU of ``Prompt``s by content hash: in memory (``capacity`` entries), shared through Redis when
    ``redis_url`` is given (entries expire after ``ttl_s`` when set). Use it from one event loop."""

    def __init__(self, capacity: int = 256, *, redis_url: str | None = None, ttl_s: int | None = None):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.capacity = capacity
        self.redis_url = redis_url
        self.ttl_s = ttl_s
        self.hits = 0
        self.misses = 0
        self._memory: OrderedDict[str, Prompt] = OrderedDict()
        self._redis = None

    @staticmethod
    def key(wav_16k: np.ndarray) -> str:
        """SHA-256 (hex) of the samples as little-endian float32."""
        samples = np.ascontiguousarray(np.asarray(wav_16k).reshape(-1), dtype="<f4")
        return hashlib.sha256(samples.tobytes()).hexdigest()

    def __len__(self) -> int:
        return len(self._memory)

    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0

    async def get(self, key: str) -> Prompt | None:
        prompt = self._memory.get(key)
        if prompt is not None:
            self._memory.move_to_end(key)
        elif self.redis_url:
            prompt = await self._redis_get(key)
            if prompt is not None:
                self._remember(key, prompt)
        self._count(prompt is not None)
        return prompt

    async def put(self, key: str, prompt: Prompt) -> None:
        self._remember(key, prompt)
        if self.redis_url:
            try:
                await self._client().set(REDIS_PREFIX + key, prompt.to_bytes(), ex=self.ttl_s)
            except Exception as exc:  # the cache is an optimisation: Redis down must not fail synthesis
                log.warning("prompt cache: Redis SET failed (%s: %s); keeping the prompt in memory only",
                            type(exc).__name__, exc)

    async def close(self) -> None:
        if self._redis is not None:
            client, self._redis = self._redis, None
            await client.aclose()

    def _count(self, hit: bool) -> None:
        if hit:
            self.hits += 1
        else:
            self.misses += 1
        PROMPT_CACHE.labels(result="hit" if hit else "miss").inc()

    def _remember(self, key: str, prompt: Prompt) -> None:
        if self.capacity == 0:
            return
        self._memory[key] = prompt
        self._memory.move_to_end(key)
        while len(self._memory) > self.capacity:
            self._memory.popitem(last=False)

    def _client(self):
        if self._redis is None:
            import redis.asyncio as aioredis

            self._redis = aioredis.from_url(self.redis_url, socket_connect_timeout=2.0, socket_timeout=5.0)
        return self._redis

    async def _redis_get(self, key: str) -> Prompt | None:
        try:
            data = await self._client().get(REDIS_PREFIX + key)
        except Exception as exc:
            log.warning("prompt cache: Redis GET failed (%s: %s); treating it as a miss", type(exc).__name__, exc)
            return None
        if data is None:
            return None
        try:
            return Prompt.from_bytes(data)
        except Exception as exc:  # a foreign or corrupt value under our key: recompute (and overwrite) it
            log.warning("prompt cache: unreadable value under %s%s (%s); treating it as a miss", REDIS_PREFIX, key, exc)
            return None


class SpeakerRegistry:
    """Registered speakers (``path``: an ``spk2info.pt`` URL, or None for memory only) and prompt features
    of request audio, computed through the Triton ``pool`` and cached in ``cache``."""

    def __init__(self, path: str | None, *, pool: InferencePool, cache: PromptCache):
        self.path = path
        self.pool = pool
        self.cache = cache
        self._speakers: dict[str, Prompt] = {}
        self._signature: tuple | None = None
        self._checked_remote = 0.0
        self._write_lock = threading.Lock()
        self._inflight: dict[str, asyncio.Future] = {}
        if path is not None:
            self._speakers, self._signature = self._load()

    # --- lookups ---------------------------------------------------------------------------------
    def speakers(self) -> list[str]:
        self._refresh()
        return sorted(self._speakers)

    def get(self, speaker_id: str) -> Prompt:
        self._refresh()
        prompt = self._speakers.get(speaker_id)
        if prompt is None and self._refresh(remote_miss=True):
            prompt = self._speakers.get(speaker_id)
        if prompt is None:
            raise UnknownSpeaker(speaker_id, sorted(self._speakers))
        return prompt

    # --- prompt features -------------------------------------------------------------------------
    async def prompt_from_audio(self, wav_16k: np.ndarray, prompt_text: str) -> Prompt:
        """Features of 16 kHz prompt audio (1-30 s, else ``ValueError``), from the cache or Triton."""
        wav = check_prompt_audio(wav_16k)
        key = PromptCache.key(wav)
        prompt = await self.cache.get(key)
        if prompt is None:
            task = self._inflight.get(key)
            if task is None:  # one computation per audio even when a burst of requests brings it
                task = asyncio.ensure_future(self._compute(key, wav))
                self._inflight[key] = task
                task.add_done_callback(lambda _t, k=key: self._inflight.pop(k, None))
            prompt = await asyncio.shield(task)
        return dataclasses.replace(prompt, text=prompt_text)

    async def _compute(self, key: str, wav: np.ndarray) -> Prompt:
        tokens_out, embedding_out, feat = await asyncio.gather(
            self.pool.infer("audio_tokenizer", {"reference_wav": wav[None],
                                                "reference_wav_len": np.array([[len(wav)]], dtype=np.int32)},
                            ["prompt_speech_tokens"]),
            self.pool.infer("speaker_embedding", {"reference_wav": wav[None]}, ["prompt_spk_embedding"]),
            asyncio.to_thread(runtime.prompt_speech_feat, wav),
        )
        tokens = runtime.speech_tokens_from_llm_ids(tokens_out["prompt_speech_tokens"], "prompt_speech_tokens")
        tokens, feat = runtime.align_prompt(tokens.astype(np.int32), feat)
        if len(tokens) == 0:
            raise ValueError("the speech tokenizer returned no tokens for the prompt audio")
        prompt = Prompt(text="", speech_token=tokens, speech_feat=feat,
                        embedding=np.asarray(embedding_out["prompt_spk_embedding"], dtype=np.float32))
        await self.cache.put(key, prompt)
        return prompt

    # --- registration ----------------------------------------------------------------------------
    async def register(self, speaker_id: str, wav_16k: np.ndarray, prompt_text: str, *,
                       overwrite: bool = False) -> Prompt:
        """Compute and persist a speaker; ``ValueError`` for a bad id/audio/text or an existing id
        without ``overwrite``."""
        check_speaker_id(speaker_id)
        if not isinstance(prompt_text, str) or not prompt_text.strip():
            raise ValueError(f"speaker {speaker_id!r}: the prompt text (transcript of the prompt audio) is empty")
        wav = check_prompt_audio(wav_16k)
        self._refresh()
        if not overwrite and speaker_id in self._speakers:
            raise ValueError(_exists(speaker_id))  # before spending Triton time
        prompt = await self.prompt_from_audio(wav, prompt_text.strip())
        await asyncio.to_thread(self._commit, speaker_id, prompt, overwrite)
        return prompt

    def delete(self, speaker_id: str) -> None:
        """Remove a speaker (``UnknownSpeaker`` when absent) and persist."""
        self._commit(speaker_id, None, True)

    def _commit(self, speaker_id: str, prompt: Prompt | None, overwrite: bool) -> None:
        """Re-read the file, apply one change, write it back: under the in-process lock and the file lock."""
        with self._write_lock, self._file_lock():
            if self.path is None:
                table = {k: v.to_spk2info() for k, v in self._speakers.items()}
            else:
                table = self._read_table() if storage.exists(self.path) else {}
            if prompt is None:
                if speaker_id not in table:
                    raise UnknownSpeaker(speaker_id, sorted(table))
                del table[speaker_id]
            else:
                if speaker_id in table and not overwrite:
                    raise ValueError(_exists(speaker_id))
                table[speaker_id] = prompt.to_spk2info()
            speakers = {k: Prompt.from_spk2info(v) for k, v in table.items()}
            if self.path is not None:
                import torch

                buffer = io.BytesIO()
                torch.save(table, buffer)
                storage.write_bytes(self.path, buffer.getvalue())
                self._signature = self._stat()
            self._speakers = speakers

    # --- the file ----------------------------------------------------------------------------------
    def _read_table(self) -> dict:
        import torch

        table = torch.load(io.BytesIO(storage.read_bytes(self.path)), map_location="cpu", weights_only=True)
        if not isinstance(table, dict):
            raise ValueError(f"{self.path}: not an spk2info dict")
        return table

    def _load(self) -> tuple[dict[str, Prompt], tuple | None]:
        """The speakers in the file (none when it does not exist yet); no ``"001"`` needed here."""
        signature = self._stat()
        missing = signature is None if self._is_local() else not storage.exists(self.path)
        if missing:
            return {}, None
        speakers = {}
        for key, entry in self._read_table().items():
            try:
                speakers[str(key)] = Prompt.from_spk2info(entry)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{self.path}: speaker {key!r}: {exc}") from exc
        return speakers, signature

    def _refresh(self, *, remote_miss: bool = False) -> bool:
        """Pick up other processes' writes: a local file when its mtime/size changed, an object-store
        file on a lookup miss (at most every ``REMOTE_REFRESH_S``). True when it re-read the file."""
        if self.path is None:
            return False
        if self._is_local():
            if remote_miss or self._stat() == self._signature:
                return False
        elif not remote_miss or time.monotonic() - self._checked_remote < REMOTE_REFRESH_S:
            return False
        self._checked_remote = time.monotonic()
        try:
            self._speakers, self._signature = self._load()
        except Exception as exc:  # keep serving what we have; the next write or lookup tries again
            log.warning("speaker registry: re-reading %s failed (%s); keeping %d speakers", self.path, exc,
                        len(self._speakers))
            return False
        return True

    def _is_local(self) -> bool:
        return self.path is not None and storage.is_local(self.path)

    def _stat(self) -> tuple | None:
        if not self._is_local():
            return None
        try:
            st = os.stat(storage.strip_protocol(self.path))
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    @contextlib.contextmanager
    def _file_lock(self):
        """An exclusive ``flock`` beside a local file (gateway workers on one host); nothing for object stores."""
        if not self._is_local():
            yield
            return
        path = os.path.abspath(storage.strip_protocol(self.path))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock


def _exists(speaker_id: str) -> str:
    return f"speaker {speaker_id!r} is already registered; pass overwrite=True to replace it"
