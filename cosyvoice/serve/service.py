"""One synthesis, independent of the wire protocol: the FastAPI, OpenAI and gRPC frontends all call
:class:`Synthesizer` so that validation, prompt resolution, streaming and metrics are the same everywhere.

A request is checked (text, mode, speed) and its voice resolved to a cached :class:`Prompt`
(registered speaker, or prompt audio through the registry's content-hash cache) BEFORE anything is
streamed, so that bad input surfaces as :class:`BadRequest` with a status and a message. The text is
then split into LLM-sized segments (upstream's frontend) and each segment is one decoupled request to
the Triton BLS; its waveform chunks are yielded as they arrive, segments in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from cosyvoice.serve import metrics
from cosyvoice.serve.settings import GatewaySettings

log = logging.getLogger(__name__)

#: the Triton BLS model every segment is sent to: the model family's name (``GatewaySettings.model``), i.e.
#: ``cosyvoice2`` for a CosyVoice2/3 repository, ``cosyvoice`` for a CosyVoice1 (CosyVoice-300M) one
BLS_MODEL = "cosyvoice2"
#: OpenAI's accepted speed range
MIN_SPEED, MAX_SPEED = 0.25, 4.0


class Mode(str, Enum):
    """Upstream's inference modes (``/inference_<mode>``)."""

    sft = "sft"
    zero_shot = "zero_shot"
    cross_lingual = "cross_lingual"
    instruct = "instruct"
    instruct2 = "instruct2"


#: what the BLS ``mode`` input gets for each request mode (sft = zero-shot with the speaker's stored prompt,
#: upstream's ``add_zero_shot_spk`` semantics)
BLS_MODES = {Mode.sft: "zero_shot", Mode.zero_shot: "zero_shot", Mode.cross_lingual: "cross_lingual",
             Mode.instruct: "instruct", Mode.instruct2: "instruct2"}
#: the CosyVoice1 BLS (``cosyvoice``) has upstream v1's own sft (the LLM and the flow see the speaker
#: embedding only) and instruct (CosyVoice-300M-Instruct), and no instruct2 (a CosyVoice2 mode)
V1_BLS_MODES = {Mode.sft: "sft", Mode.zero_shot: "zero_shot", Mode.cross_lingual: "cross_lingual",
                Mode.instruct: "instruct"}


@dataclass
class SynthesisRequest:
    """One request, as every frontend sees it. ``prompt_wav_16k``: mono float32 samples at 16 kHz
    (decoded by the frontend); ``speaker_id`` names a registered speaker (for sft/instruct, or instead of
    prompt audio for zero_shot/cross_lingual/instruct2)."""

    mode: Mode
    text: str
    speaker_id: str | None = None
    prompt_text: str = ""
    prompt_wav_16k: np.ndarray | None = None
    instruct_text: str = ""
    speed: float = 1.0


class BadRequest(ValueError):
    """The request cannot be served as given: ``status`` (4xx) and a message for the client;
    ``reason`` is the ``REJECTED`` metric's label."""

    def __init__(self, status: int, message: str, *, reason: str = "bad_request"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason


@dataclass(frozen=True)
class _Plan:
    """A validated request: the voice's BLS inputs, the LLM text fields and the segments."""

    voice: dict[str, np.ndarray]
    reference_text: str
    bls_mode: str
    segments: list[str]
    speed: float


class Synthesizer:
    """Turns :class:`SynthesisRequest` into float32 audio chunks at :attr:`sample_rate`.

    ``pool``: a ``backend.TritonPool`` (``stream``, ``model_parameter``, ``ready``); ``registry``: a
    ``registry.SpeakerRegistry``; ``frontend``: a ``text.TextFrontend`` (``segments``); ``settings``:
    the limits and the model family."""

    def __init__(self, pool, registry, frontend, settings: GatewaySettings):
        self.pool = pool
        self.registry = registry
        self.frontend = frontend
        self.settings = settings
        #: the model's output rate, from Triton token2wav's ``sample_rate`` parameter (None until Triton answered)
        self.sample_rate: int | None = None
        self._speed_input: bool | None = None
        self._frontend_lock = threading.Lock()  # text normalization runs in threads; one at a time per process
        #: the Triton BLS this gateway's family is served by (``cosyvoice2`` or the CosyVoice1 ``cosyvoice``)
        self.bls_model = settings.model

    # --- readiness -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Learn the sample rate now if Triton answers (a gateway may start before Triton: then later)."""
        with contextlib.suppress(Exception):
            await self.ensure_sample_rate()

    async def ensure_sample_rate(self) -> int:
        """The model's sample rate, asked of Triton once (``token2wav``'s ``sample_rate`` parameter)."""
        if self.sample_rate is None:
            value = await self.pool.model_parameter("token2wav", "sample_rate")
            if value is None or not str(value).strip().isdigit() or int(value) <= 0:
                raise RuntimeError(f"Triton's token2wav config has no usable sample_rate parameter ({value!r})")
            self.sample_rate = int(value)
        return self.sample_rate

    async def ready(self) -> bool:
        """A Triton replica is healthy and the sample rate is known."""
        if not self.pool.ready():
            return False
        try:
            await asyncio.wait_for(self.ensure_sample_rate(), timeout=5.0)
        except Exception as exc:
            log.info("not ready: sample rate unknown (%s: %s)", type(exc).__name__, exc)
            return False
        return True

    async def speed_supported(self) -> bool:
        """Whether the BLS declares the optional ``speed`` input (ours does; an older repository may not). Asked of the pool's
        ``model_inputs`` when it offers one; without it, speed is unsupported."""
        if self._speed_input is None:
            inputs = getattr(self.pool, "model_inputs", None)
            self._speed_input = callable(inputs) and "speed" in set(await inputs(self.bls_model))
        return self._speed_input

    # --- one request -----------------------------------------------------------------------------
    async def stream(self, req: SynthesisRequest, *, endpoint: str,
                     request_id: str | None = None) -> AsyncIterator[np.ndarray]:
        """float32 1-D chunks at :attr:`sample_rate`, as Triton sends them, segment after segment.

        Raises :class:`BadRequest` before the first chunk for bad input; a backend failure propagates
        as the pool raised it (before or after chunks were yielded: never a silently shorter stream).
        Closing the generator (client gone) closes the Triton stream, which cancels the Triton request."""
        request_id = request_id or uuid.uuid4().hex
        start = time.perf_counter()
        samples = 0
        status = "error"
        metrics.IN_FLIGHT.labels(endpoint=endpoint).inc()
        try:
            plan = await self._plan(req)
            sample_rate = await self.ensure_sample_rate()
            first = True
            for index, segment in enumerate(plan.segments):
                inputs = self._inputs(plan, segment)
                async with contextlib.aclosing(self.pool.stream(inputs, request_id=f"{request_id}-{index}",
                                                                model=self.bls_model)) as chunks:
                    async for chunk in chunks:
                        chunk = np.asarray(chunk, dtype=np.float32).reshape(-1)
                        if not chunk.size:
                            continue
                        if first:
                            metrics.FIRST_CHUNK_SECONDS.labels(endpoint=endpoint).observe(time.perf_counter() - start)
                            first = False
                        samples += chunk.size
                        metrics.AUDIO_SECONDS.labels(endpoint=endpoint).inc(chunk.size / sample_rate)
                        yield chunk
            status = "ok"
            wall = time.perf_counter() - start
            metrics.REQUEST_SECONDS.labels(endpoint=endpoint).observe(wall)
            if samples:
                metrics.REAL_TIME_FACTOR.labels(endpoint=endpoint).observe(wall / (samples / sample_rate))
        except BadRequest as exc:
            status = "rejected"
            metrics.REJECTED.labels(endpoint=endpoint, reason=exc.reason).inc()
            raise
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        except Exception as exc:
            log.warning("%s %s failed after %d samples: %s: %s", endpoint, request_id, samples,
                        type(exc).__name__, exc)
            raise
        finally:
            metrics.IN_FLIGHT.labels(endpoint=endpoint).dec()
            metrics.REQUESTS.labels(endpoint=endpoint, status=status).inc()

    def _inputs(self, plan: _Plan, segment: str) -> dict[str, np.ndarray]:
        inputs = dict(plan.voice)
        inputs["reference_text"] = np.array([[plan.reference_text]], dtype=object)
        inputs["target_text"] = np.array([[segment]], dtype=object)
        inputs["mode"] = np.array([[plan.bls_mode]], dtype=object)
        if plan.speed != 1.0:
            inputs["speed"] = np.array([[plan.speed]], dtype=np.float32)
        return inputs

    async def _plan(self, req: SynthesisRequest) -> _Plan:
        mode = _mode(req.mode)
        limit = self.settings.max_text_chars
        text = (req.text or "").strip()
        if not text:
            raise BadRequest(400, "tts_text is empty: give the text to speak", reason="empty_text")
        for name, value in (("tts_text", text), ("prompt_text", req.prompt_text or ""),
                            ("instruct_text", req.instruct_text or "")):
            if len(value) > limit:
                raise BadRequest(413, f"{name} has {len(value)} characters; the limit is {limit}",
                                 reason="text_too_long")
        speed = await self._speed(req.speed)
        if mode is Mode.instruct and self.settings.model != "cosyvoice":
            raise BadRequest(400, "/inference_instruct needs a CosyVoice1 model (speaker + instruction); this "
                             f"gateway serves {self.settings.model}: use /inference_instruct2 (instruct_text + "
                             "prompt_wav or spk_id)", reason="unsupported_mode")
        if mode is Mode.instruct2 and self.settings.model == "cosyvoice":
            raise BadRequest(400, "/inference_instruct2 needs a CosyVoice2/3 model; this gateway serves a CosyVoice1 model: "
                             "use /inference_instruct (spk_id + instruct_text)", reason="unsupported_mode")
        if mode in (Mode.instruct, Mode.instruct2) and not (req.instruct_text or "").strip():
            raise BadRequest(400, f"{mode.value} needs instruct_text (the instruction)", reason="missing_field")
        prompt = await self._prompt(mode, req)
        if getattr(prompt, "embedding_only", False) and (mode not in (Mode.sft, Mode.instruct) or self.settings.model != "cosyvoice"):
            raise BadRequest(400, f"speaker {req.speaker_id!r} has only a speaker embedding (a CosyVoice1 SFT speaker): "
                             f"it serves /inference_sft and /inference_instruct of a CosyVoice1 model, not {mode.value} "
                             f"on {self.settings.model}", reason="bad_field")
        reference_text = {Mode.sft: prompt.text, Mode.zero_shot: prompt.text, Mode.cross_lingual: "",
                          Mode.instruct: req.instruct_text.strip(), Mode.instruct2: req.instruct_text.strip()}[mode]
        segments = await asyncio.to_thread(self._segments, text)
        if not segments:
            raise BadRequest(400, "tts_text has nothing to speak (only punctuation or spaces)", reason="empty_text")
        bls_modes = V1_BLS_MODES if self.settings.model == "cosyvoice" else BLS_MODES
        return _Plan(voice=prompt.bls_inputs(), reference_text=reference_text, bls_mode=bls_modes[mode],
                     segments=segments, speed=speed)

    def _segments(self, text: str) -> list[str]:
        with self._frontend_lock:
            return [s for s in self.frontend.segments(text) if s.strip()]

    async def _speed(self, speed: Any) -> float:
        try:
            speed = float(speed)
        except (TypeError, ValueError):
            raise BadRequest(400, f"speed must be a number, got {speed!r}", reason="bad_speed") from None
        if not MIN_SPEED <= speed <= MAX_SPEED:
            raise BadRequest(400, f"speed {speed:g} is outside {MIN_SPEED}-{MAX_SPEED}", reason="bad_speed")
        if speed != 1.0 and not await self.speed_supported():
            raise BadRequest(400, "speed is not supported by this model repository (its cosyvoice2 model has no "
                             "'speed' input); send speed=1.0", reason="bad_speed")
        return speed

    async def _prompt(self, mode: Mode, req: SynthesisRequest):
        """The voice: a registered speaker (sft/instruct, or ``speaker_id`` instead of audio) or the
        features of the prompt audio (content-hash cache, else Triton audio_tokenizer/speaker_embedding)."""
        from cosyvoice.serve.registry import UnknownSpeaker

        has_audio = req.prompt_wav_16k is not None
        if mode in (Mode.sft, Mode.instruct):
            if has_audio:
                raise BadRequest(400, f"{mode.value} takes a registered spk_id, not prompt audio", reason="bad_field")
            if not req.speaker_id:
                raise BadRequest(400, f"{mode.value} needs spk_id (a registered speaker; GET /speakers lists them)",
                                 reason="missing_field")
        elif has_audio and req.speaker_id:
            raise BadRequest(400, "give prompt_wav or spk_id, not both", reason="bad_field")
        elif not has_audio and not req.speaker_id:
            raise BadRequest(400, f"{mode.value} needs prompt_wav (prompt audio) or spk_id (a registered speaker)",
                             reason="missing_field")
        if req.speaker_id:
            try:
                return await asyncio.to_thread(self.registry.get, req.speaker_id)
            except UnknownSpeaker as exc:
                raise BadRequest(404, str(exc), reason="unknown_speaker") from None
        prompt_text = (req.prompt_text or "").strip()
        if mode is Mode.zero_shot and not prompt_text:
            raise BadRequest(400, "zero_shot needs prompt_text (the transcript of prompt_wav); without one use "
                             "/inference_cross_lingual", reason="missing_field")
        if self.settings.model == "cosyvoice":  # the v1 BLS makes its prompt from the audio itself
            return ReferenceAudio.of(req.prompt_wav_16k, prompt_text)
        try:
            return await self.registry.prompt_from_audio(req.prompt_wav_16k, prompt_text)
        except ValueError as exc:
            raise BadRequest(400, f"prompt_wav: {exc}", reason="bad_audio") from None


#: the CosyVoice1 BLS turns at most 30 s of prompt audio into speech tokens (the v1 tokenizer's limit)
MAX_REFERENCE_SECONDS = 30.0


@dataclass(frozen=True)
class ReferenceAudio:
    """Prompt audio sent as it is (``reference_wav``): the CosyVoice1 BLS computes its prompt (v1 tokens,
    22.05 kHz mel, embedding) itself, so a v1 gateway neither asks Triton for v2 features nor caches them."""

    text: str
    wav_16k: np.ndarray
    embedding_only = False

    @classmethod
    def of(cls, wav_16k: np.ndarray, text: str) -> ReferenceAudio:
        wav = np.ascontiguousarray(np.asarray(wav_16k, dtype=np.float32).reshape(-1))
        if not wav.size:
            raise BadRequest(400, "prompt_wav: no samples", reason="bad_audio")
        if wav.size > MAX_REFERENCE_SECONDS * 16000:
            raise BadRequest(400, f"prompt_wav: {wav.size / 16000:.1f} s; at most {MAX_REFERENCE_SECONDS:g} s",
                             reason="bad_audio")
        return cls(text, wav)

    def bls_inputs(self) -> dict[str, np.ndarray]:
        return {"reference_wav": self.wav_16k[None], "reference_wav_len": np.array([[self.wav_16k.size]], dtype=np.int32),
                "reference_text": np.array([[self.text]], dtype=object)}


def _mode(mode: Mode | str) -> Mode:
    try:
        return Mode(mode)
    except ValueError:
        raise BadRequest(400, f"unknown mode {mode!r}; one of {', '.join(m.value for m in Mode)}",
                         reason="bad_field") from None


async def first_and_rest(chunks: AsyncIterator[np.ndarray]) -> tuple[np.ndarray | None, AsyncIterator[np.ndarray]]:
    """Wait for the first chunk (errors before any audio surface here, as a status the frontend can
    still answer with), then hand back an iterator over every chunk including the first."""
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        return None, _empty()
    except BaseException:
        await chunks.aclose()
        raise

    async def rest() -> AsyncIterator[np.ndarray]:
        async with contextlib.aclosing(chunks):
            yield first
            async for chunk in chunks:
                yield chunk

    return first, rest()


async def _empty() -> AsyncIterator[np.ndarray]:
    return
    yield  # an async generator that yields nothing


def pcm16(chunk: np.ndarray) -> bytes:
    """float32 [-1, 1] -> little-endian int16 bytes (clipped, scaled by 32767)."""
    return (np.clip(chunk, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def build_synthesizer(settings: GatewaySettings, *, pool=None, registry=None, frontend=None) -> Synthesizer:
    """Pool, speaker registry + prompt cache, text frontend and Synthesizer from the settings; both
    frontends (FastAPI, gRPC) of a deployment build theirs here, so they share the spk2info file and
    the Redis cache. Tests pass their own ``pool``/``registry``/``frontend``."""
    if pool is None:
        from cosyvoice.serve.backend import Replica, TritonPool

        pool = TritonPool([Replica.parse(spec) for spec in settings.triton], model=settings.model)
    if registry is None:
        from cosyvoice.serve.registry import PromptCache, SpeakerRegistry

        registry = SpeakerRegistry(settings.spk2info, pool=pool,
                                   cache=PromptCache(settings.prompt_cache_size, redis_url=settings.redis_url))
    if frontend is None:
        from cosyvoice.serve.text import TextFrontend

        tokenize = None
        if settings.tokenizer_dir:
            from transformers import AutoTokenizer

            tokenize = AutoTokenizer.from_pretrained(settings.tokenizer_dir).encode
        elif settings.model == "cosyvoice":  # CosyVoice1 counts segment lengths in whisper ids, as its LLM reads them
            from cosyvoice.dataset.text import get_whisper_tokenizer

            tokenize = get_whisper_tokenizer().encode
        frontend = TextFrontend(tokenize)
    return Synthesizer(pool, registry, frontend, settings)


async def close_synthesizer(synthesizer: Synthesizer) -> None:
    """Close the pool and the prompt cache (its Redis connection), whatever happens."""
    try:
        await synthesizer.pool.close()
    finally:
        close = getattr(getattr(synthesizer.registry, "cache", None), "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()
