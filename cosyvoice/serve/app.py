"""The HTTP gateway: upstream's FastAPI endpoints, an OpenAI-compatible ``/v1/audio/speech``, the speaker
registry, health/readiness, Prometheus metrics and a web page, over the Triton pool.

``create_app`` is a factory (``uvicorn --factory cosyvoice.serve.app:create_app --workers N``): each
worker builds its own pool, registry and synthesizer from ``COSYVOICE_GATEWAY_*`` (see settings.py).

Differences from upstream's ``runtime/python/fastapi/server.py`` on purpose: audio streams chunk by
chunk as the decoupled Triton BLS produces it (not per sentence); the sample rate is the model's
(``X-Sample-Rate``, ``Content-Type: audio/L16; rate=...``), never an assumed 22050; GET takes query
parameters, or the multipart body upstream's ``client.py`` sends with GET; bad input is a 4xx JSON ``{"detail": ...}`` before
any audio; a failure after audio was sent aborts the response (an incomplete chunked body the client
sees as an error, never a shorter "success"); a client that goes away cancels its Triton request.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import importlib
import io
import json
import logging
import math
import os
import struct
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import anyio
import numpy as np
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from cosyvoice.serve import metrics
from cosyvoice.serve.ratelimit import rate_limiter
from cosyvoice.serve.service import (
    BadRequest,
    Mode,
    SynthesisRequest,
    Synthesizer,
    build_synthesizer,
    close_synthesizer,
    first_and_rest,
    pcm16,
)
from cosyvoice.serve.settings import GatewaySettings

log = logging.getLogger(__name__)

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
#: paths behind the bearer token and the rate limit (the page, health and metrics stay open)
PROTECTED_PREFIXES = ("/inference_", "/v1/", "/speakers")
#: sample rates an MP3 stream can carry (MPEG-1/2/2.5)
MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
OPENAI_FORMATS = ("wav", "pcm", "mp3")


# --- errors ------------------------------------------------------------------------------------------
def _error(status: int, message: str, path: str = "", headers: dict | None = None) -> JSONResponse:
    """``{"detail": message}``; under ``/v1/`` also OpenAI's ``{"error": {...}}`` (its clients read that)."""
    body: dict[str, Any] = {"detail": message}
    if path.startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        body["error"] = {"message": message, "type": kind, "param": None, "code": status}
    return JSONResponse(body, status_code=status, headers=headers)


def _status_of(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and message of an exception raised before any audio was sent."""
    from cosyvoice.serve.backend import BackendError, NoHealthyReplica
    from cosyvoice.serve.registry import UnknownSpeaker

    if isinstance(exc, BadRequest):
        return exc.status, exc.message
    if isinstance(exc, UnknownSpeaker):
        return 404, str(exc)
    if isinstance(exc, NoHealthyReplica):
        return 503, f"no Triton replica is available: {exc}"
    if isinstance(exc, BackendError):
        return 502, f"the Triton backend failed: {exc}"
    return 500, f"internal error ({type(exc).__name__}); see the gateway log"


# --- prompt audio ------------------------------------------------------------------------------------
def decode_prompt_audio(data: bytes) -> np.ndarray:
    """An uploaded audio file -> mono float32 16 kHz samples (BadRequest for anything unusable)."""
    import soundfile as sf

    # the models' prompt: 16 kHz, 1-30 s (the registry's and build_spk2info's bounds; torch is loaded by then)
    from cosyvoice.triton.runtime import SAMPLE_RATE as PROMPT_RATE
    from cosyvoice.triton.spk2info import MAX_PROMPT_SECONDS, MIN_PROMPT_SECONDS

    try:
        audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception:
        raise BadRequest(400, "prompt_wav is not a readable audio file (send WAV, FLAC or OGG)",
                         reason="bad_audio") from None
    if rate < PROMPT_RATE:
        raise BadRequest(400, f"prompt_wav has an unsupported sample rate of {rate} Hz: it needs at least "
                         f"{PROMPT_RATE} Hz", reason="bad_sample_rate")
    seconds = audio.shape[0] / rate
    if not MIN_PROMPT_SECONDS <= seconds <= MAX_PROMPT_SECONDS:
        raise BadRequest(400, f"prompt_wav is {seconds:.2f} s long; it must be {MIN_PROMPT_SECONDS:g}-"
                         f"{MAX_PROMPT_SECONDS:g} s", reason="bad_audio")
    if not np.isfinite(audio).all():
        raise BadRequest(400, "prompt_wav has NaN or infinite samples", reason="bad_audio")
    import torch

    from cosyvoice.features.frontend import mono_16k

    return mono_16k(torch.from_numpy(np.ascontiguousarray(audio.T)), rate)[0].numpy().astype(np.float32)


async def read_prompt(upload: UploadFile | None, max_bytes: int) -> np.ndarray | None:
    """The upload's samples, reading at most ``max_bytes + 1`` bytes (413 beyond ``max_bytes``)."""
    if upload is None:
        return None
    data = await upload.read(max_bytes + 1)
    if not data and not upload.filename:
        return None  # an empty file field (a form without a file chosen)
    if len(data) > max_bytes:
        raise BadRequest(413, f"prompt_wav is larger than the limit of {max_bytes} bytes", reason="upload_too_large")
    if not data:
        raise BadRequest(400, "prompt_wav is empty", reason="bad_audio")
    return await asyncio.to_thread(decode_prompt_audio, data)


async def get_fields(request: Request, max_bytes: int) -> tuple[dict[str, str], np.ndarray | None]:
    """A GET's fields: query parameters, or the multipart/urlencoded body that upstream's ``client.py``
    sends with GET (its ``requests.request("GET", url, data=..., files=...)``), prompt audio included."""
    fields = {k: v for k, v in request.query_params.items()}
    wav = None
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form()
        for key, value in form.items():
            if isinstance(value, str):
                fields.setdefault(key, value)
            elif key == "prompt_wav":
                wav = await read_prompt(value, max_bytes)
    return fields, wav


def _required(fields: dict[str, str], *names: str) -> list[str]:
    missing = [name for name in names if not fields.get(name)]
    if missing:
        raise BadRequest(422, f"missing field(s): {', '.join(missing)} (query parameters or form fields)",
                         reason="missing_field")
    return [fields[name] for name in names]


def _speed(fields: dict[str, str]) -> float:
    try:
        return float(fields.get("speed", 1.0))
    except ValueError:
        raise BadRequest(422, f"speed must be a number, got {fields['speed']!r}", reason="bad_speed") from None


# --- encoders: float32 chunks -> bytes ---------------------------------------------------------------
def wav_header(sample_rate: int) -> bytes:
    """A 16-bit mono WAV header for a stream of unknown length (RIFF and data sizes 0xFFFFFFFF)."""
    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVE" + b"fmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16) + b"data" + struct.pack("<I", unknown))


async def encode_pcm(chunks: AsyncIterator[np.ndarray], sample_rate: int) -> AsyncIterator[bytes]:
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            yield pcm16(chunk)


async def encode_wav(chunks: AsyncIterator[np.ndarray], sample_rate: int) -> AsyncIterator[bytes]:
    yield wav_header(sample_rate)
    async with contextlib.aclosing(encode_pcm(chunks, sample_rate)) as pcm:
        async for data in pcm:
            yield data


async def encode_mp3(chunks: AsyncIterator[np.ndarray], sample_rate: int) -> AsyncIterator[bytes]:
    """MP3 frames as LAME completes them (it holds back up to a frame of samples until the end)."""
    import lameenc

    encoder = lameenc.Encoder()
    encoder.set_bit_rate(64)
    encoder.set_in_sample_rate(sample_rate)
    encoder.set_channels(1)
    encoder.set_quality(2)
    async with contextlib.aclosing(encode_pcm(chunks, sample_rate)) as pcm:
        async for data in pcm:
            frames = bytes(encoder.encode(data))
            if frames:
                yield frames
    tail = bytes(encoder.flush())
    if tail:
        yield tail


ENCODERS: dict[str, tuple[Callable, Callable[[int], str]]] = {
    "pcm": (encode_pcm, lambda sr: f"audio/L16; rate={sr}; channels=1"),
    "wav": (encode_wav, lambda sr: "audio/wav"),
    "mp3": (encode_mp3, lambda sr: "audio/mpeg"),
}


async def encode_sse(encoded: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """OpenAI's speech SSE: one ``speech.audio.delta`` event (base64 audio) per piece, then ``speech.audio.done``."""
    async with contextlib.aclosing(encoded):
        async for data in encoded:
            event = {"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")}
            yield f"data: {json.dumps(event)}\n\n".encode()
    yield f"data: {json.dumps({'type': 'speech.audio.done'})}\n\n".encode()


class AudioStreamingResponse(StreamingResponse):
    """A StreamingResponse that (1) watches for the client leaving while it waits for audio, and then
    cancels the stream (so the Triton request is cancelled at once, not at the next chunk), (2) always
    closes its body iterator, and (3) lets a failure after the first byte escape, so the server aborts
    the connection instead of ending the chunked body normally."""

    def __init__(self, content: AsyncIterator[bytes], *, endpoint: str, request_id: str, **kwargs):
        super().__init__(content, **kwargs)
        self.endpoint = endpoint
        self.request_id = request_id

    async def __call__(self, scope, receive, send) -> None:
        error: BaseException | None = None
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    nonlocal error
                    try:
                        await self.stream_response(send)
                    except Exception as exc:
                        error = exc
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
        if error is not None:
            if isinstance(error, OSError):  # the client went away while we were sending
                log.info("%s %s: client disconnected", self.endpoint, self.request_id)
                return
            log.error("%s %s: aborting the audio stream after it started: %s: %s", self.endpoint,
                      self.request_id, type(error).__name__, error)
            raise error


async def _synthesize(request: Request, req: SynthesisRequest, endpoint: str, *, audio_format: str = "pcm",
                      sse: bool = False) -> Response:
    """Run one synthesis; JSON error until the first chunk arrived, then the stream."""
    synthesizer: Synthesizer = request.app.state.synthesizer
    request_id = uuid.uuid4().hex
    try:
        first, chunks = await first_and_rest(synthesizer.stream(req, endpoint=endpoint, request_id=request_id))
    except Exception as exc:
        status, message = _status_of(exc)
        if status >= 500:
            log.warning("%s %s failed before any audio: %s: %s", endpoint, request_id, type(exc).__name__, exc)
        return _error(status, message, endpoint)
    if first is None:
        return _error(502, "the model returned no audio for this text", endpoint)
    sample_rate = synthesizer.sample_rate
    encode, media_type = ENCODERS[audio_format]
    body = encode(chunks, sample_rate)
    media = media_type(sample_rate)
    if sse:
        body, media = encode_sse(body), "text/event-stream"
    headers = {"X-Sample-Rate": str(sample_rate), "X-Request-Id": request_id, "Cache-Control": "no-store"}
    return AudioStreamingResponse(body, endpoint=endpoint, request_id=request_id, media_type=media, headers=headers)


# --- the guard: token, rate limit, request size (before the body is read) ----------------------------
class Guard:
    """ASGI middleware for the protected paths: bearer token (401), per-client rate limit (429 +
    Retry-After) and the declared request size (413), all before FastAPI reads the body."""

    def __init__(self, app, settings: GatewaySettings):
        self.app = app
        self.token = settings.api_token
        self.limiter = rate_limiter(settings.rate_limit, settings.redis_url)
        # the prompt file plus the text fields (4 bytes a character at most) and multipart framing
        self.max_body = settings.max_upload_bytes + 3 * 4 * settings.max_text_chars + 64 * 1024

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not path.startswith(PROTECTED_PREFIXES):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = await self._refusal(path, headers, scope)
        if refusal is not None:
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)

    async def _refusal(self, path: str, headers: dict[str, str], scope) -> Response | None:
        if self.token is not None:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not given:
                metrics.REJECTED.labels(endpoint=path, reason="unauthorized").inc()
                return _error(401, "this gateway needs 'Authorization: Bearer <token>'", path,
                              {"WWW-Authenticate": 'Bearer realm="cosyvoice"'})
            if not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                metrics.REJECTED.labels(endpoint=path, reason="unauthorized").inc()
                return _error(401, "the bearer token is not valid", path,
                              {"WWW-Authenticate": 'Bearer realm="cosyvoice", error="invalid_token"'})
        if self.limiter is not None:
            client = (scope.get("client") or ("unknown", 0))[0]
            wait = await self.limiter.acquire(client)
            if wait > 0:
                metrics.REJECTED.labels(endpoint=path, reason="rate_limited").inc()
                return _error(429, f"rate limit: at most {self.limiter.capacity:g} requests a minute per client; "
                              f"retry in {math.ceil(wait)} s", path, {"Retry-After": str(math.ceil(wait))})
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            metrics.REJECTED.labels(endpoint=path, reason="upload_too_large").inc()
            return _error(413, f"the request body is {int(length)} bytes; the limit is {self.max_body} "
                          "(prompt_wav at most COSYVOICE_GATEWAY_MAX_UPLOAD_BYTES)", path)
        return None


# --- request bodies ----------------------------------------------------------------------------------
class SpeechRequest(BaseModel):
    """OpenAI's ``POST /v1/audio/speech`` body; ``voice`` is a registered speaker id (or ``{"id": ...}``)."""

    model: str = Field(description="any name; the gateway serves the model of its Triton repository")
    input: str = Field(description="the text to speak")
    voice: str | dict[str, str] = Field(description="a registered speaker id (GET /speakers)")
    instructions: str | None = Field(None, description="an instruction (instruct2 with the voice's prompt)")
    response_format: str = Field("mp3", description="wav | pcm | mp3")
    speed: float = 1.0
    stream_format: str = Field("audio", description="audio (the bytes) | sse (speech.audio.delta events)")


def _voice_id(voice: str | dict[str, str]) -> str:
    if isinstance(voice, dict):
        if not isinstance(voice.get("id"), str):
            raise BadRequest(400, "voice must be a registered speaker id or {\"id\": \"<speaker id>\"}")
        return voice["id"]
    return voice


# --- the app -----------------------------------------------------------------------------------------
def create_app(settings: GatewaySettings | None = None, *, pool=None, registry=None, frontend=None) -> FastAPI:
    """The gateway app. Without arguments (``uvicorn --factory``) everything comes from the environment;
    tests pass a ``pool`` (the ``backend.TritonPool`` interface), a ``registry`` and a text ``frontend``.
    The app's lifespan starts and closes the pool."""
    settings = settings or GatewaySettings.from_env()
    synthesizer = build_synthesizer(settings, pool=pool, registry=registry, frontend=frontend)
    pool, registry = synthesizer.pool, synthesizer.registry

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await pool.start()
        await synthesizer.start()
        # the prompt decoder's resampler (torch, whisper) takes seconds to import: not on the first upload
        await asyncio.to_thread(importlib.import_module, "cosyvoice.features.frontend")
        try:
            yield
        finally:
            await close_synthesizer(synthesizer)

    app = FastAPI(title="CosyVoice gateway", version="1", lifespan=lifespan,
                  description="Streaming CosyVoice2 synthesis over Triton: upstream's endpoints, an OpenAI-compatible "
                              "speech endpoint and a speaker registry. Audio endpoints stream little-endian int16 mono "
                              "PCM at the rate in X-Sample-Rate unless a format says otherwise.")
    app.state.settings = settings
    app.state.synthesizer = synthesizer
    app.state.registry = registry
    app.state.pool = pool
    app.add_middleware(Guard, settings=settings)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["X-Sample-Rate", "X-Request-Id"])

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        metrics.REJECTED.labels(endpoint=request.url.path, reason=exc.reason).inc()
        return _error(exc.status, exc.message, request.url.path)

    from cosyvoice.serve.backend import BackendError
    from cosyvoice.serve.registry import UnknownSpeaker

    async def known_error(request: Request, exc: Exception):
        status, message = _status_of(exc)
        if status >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, message)
        return _error(status, message, request.url.path)

    app.add_exception_handler(UnknownSpeaker, known_error)
    app.add_exception_handler(BackendError, known_error)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        status, message = _status_of(exc)
        log.exception("%s %s: %s", request.method, request.url.path, message)
        return _error(status, message, request.url.path)

    _add_upstream_routes(app, settings)
    _add_openai_route(app)
    _add_speaker_routes(app, settings)
    _add_operational_routes(app)
    return app


def _add_upstream_routes(app: FastAPI, settings: GatewaySettings) -> None:
    """Upstream's five endpoints, POST (multipart/form fields) and GET (query parameters or a form body)."""
    limit = settings.max_upload_bytes
    speed_help = "speaking speed 0.25-4.0 (only when the model repository supports it)"
    spk_help = "a registered speaker id instead of prompt_wav (GET /speakers)"
    audio = {"description": "raw little-endian int16 mono PCM at X-Sample-Rate, streamed as synthesized",
             "content": {"audio/L16": {}}}
    responses = {200: audio}

    def run(request: Request, endpoint: str, **fields) -> Any:
        return _synthesize(request, SynthesisRequest(**fields), endpoint)

    @app.post("/inference_sft", responses=responses, summary="a registered speaker")
    async def sft_post(request: Request, tts_text: str = Form(), spk_id: str = Form(),
                       speed: float = Form(1.0, description=speed_help)):
        return await run(request, "/inference_sft", mode=Mode.sft, text=tts_text, speaker_id=spk_id, speed=speed)

    @app.get("/inference_sft", responses=responses, summary="a registered speaker")
    async def sft_get(request: Request, tts_text: str | None = None, spk_id: str | None = None,
                      speed: float = Query(1.0, description=speed_help)):
        fields, _ = await get_fields(request, limit)
        text, speaker = _required(fields, "tts_text", "spk_id")
        return await run(request, "/inference_sft", mode=Mode.sft, text=text, speaker_id=speaker, speed=_speed(fields))

    @app.post("/inference_zero_shot", responses=responses, summary="prompt audio + its transcript")
    async def zero_shot_post(request: Request, tts_text: str = Form(), prompt_text: str = Form(""),
                             prompt_wav: Annotated[UploadFile | None, File()] = None, spk_id: str | None = Form(None, description=spk_help),
                             speed: float = Form(1.0, description=speed_help)):
        wav = await read_prompt(prompt_wav, limit)
        return await run(request, "/inference_zero_shot", mode=Mode.zero_shot, text=tts_text, prompt_text=prompt_text,
                         prompt_wav_16k=wav, speaker_id=spk_id, speed=speed)

    @app.get("/inference_zero_shot", responses=responses,
             summary="a registered speaker's prompt, or upstream client.py's GET with a multipart body")
    async def zero_shot_get(request: Request, tts_text: str | None = None,
                            spk_id: str | None = Query(None, description=spk_help),
                            speed: float = Query(1.0, description=speed_help)):
        fields, wav = await get_fields(request, limit)
        (text,) = _required(fields, "tts_text")
        return await run(request, "/inference_zero_shot", mode=Mode.zero_shot, text=text,
                         prompt_text=fields.get("prompt_text", ""), prompt_wav_16k=wav, speaker_id=fields.get("spk_id"),
                         speed=_speed(fields))

    @app.post("/inference_cross_lingual", responses=responses, summary="prompt audio, no transcript")
    async def cross_lingual_post(request: Request, tts_text: str = Form(), prompt_wav: Annotated[UploadFile | None, File()] = None,
                                 spk_id: str | None = Form(None, description=spk_help),
                                 speed: float = Form(1.0, description=speed_help)):
        wav = await read_prompt(prompt_wav, limit)
        return await run(request, "/inference_cross_lingual", mode=Mode.cross_lingual, text=tts_text,
                         prompt_wav_16k=wav, speaker_id=spk_id, speed=speed)

    @app.get("/inference_cross_lingual", responses=responses,
             summary="a registered speaker's voice, or upstream client.py's GET with a multipart body")
    async def cross_lingual_get(request: Request, tts_text: str | None = None,
                                spk_id: str | None = Query(None, description=spk_help),
                                speed: float = Query(1.0, description=speed_help)):
        fields, wav = await get_fields(request, limit)
        (text,) = _required(fields, "tts_text")
        return await run(request, "/inference_cross_lingual", mode=Mode.cross_lingual, text=text,
                         prompt_wav_16k=wav, speaker_id=fields.get("spk_id"), speed=_speed(fields))

    @app.post("/inference_instruct", responses=responses, summary="CosyVoice1 models only (else 400)")
    async def instruct_post(request: Request, tts_text: str = Form(), spk_id: str = Form(), instruct_text: str = Form(),
                            speed: float = Form(1.0, description=speed_help)):
        return await run(request, "/inference_instruct", mode=Mode.instruct, text=tts_text, speaker_id=spk_id,
                         instruct_text=instruct_text, speed=speed)

    @app.get("/inference_instruct", responses=responses, summary="CosyVoice1 models only (else 400)")
    async def instruct_get(request: Request, tts_text: str | None = None, spk_id: str | None = None,
                           instruct_text: str | None = None, speed: float = Query(1.0, description=speed_help)):
        fields, _ = await get_fields(request, limit)
        text, speaker, instruct = _required(fields, "tts_text", "spk_id", "instruct_text")
        return await run(request, "/inference_instruct", mode=Mode.instruct, text=text, speaker_id=speaker,
                         instruct_text=instruct, speed=_speed(fields))

    @app.post("/inference_instruct2", responses=responses, summary="an instruction + prompt audio")
    async def instruct2_post(request: Request, tts_text: str = Form(), instruct_text: str = Form(),
                             prompt_wav: Annotated[UploadFile | None, File()] = None,
                             spk_id: str | None = Form(None, description=spk_help),
                             speed: float = Form(1.0, description=speed_help)):
        wav = await read_prompt(prompt_wav, limit)
        return await run(request, "/inference_instruct2", mode=Mode.instruct2, text=tts_text,
                         instruct_text=instruct_text, prompt_wav_16k=wav, speaker_id=spk_id, speed=speed)

    @app.get("/inference_instruct2", responses=responses,
             summary="an instruction + a registered speaker's voice, or upstream client.py's GET with a multipart body")
    async def instruct2_get(request: Request, tts_text: str | None = None, instruct_text: str | None = None,
                            spk_id: str | None = Query(None, description=spk_help),
                            speed: float = Query(1.0, description=speed_help)):
        fields, wav = await get_fields(request, limit)
        text, instruct = _required(fields, "tts_text", "instruct_text")
        return await run(request, "/inference_instruct2", mode=Mode.instruct2, text=text, instruct_text=instruct,
                         prompt_wav_16k=wav, speaker_id=fields.get("spk_id"), speed=_speed(fields))

def _add_openai_route(app: FastAPI) -> None:
    @app.post("/v1/audio/speech", summary="OpenAI-compatible speech (streamed)",
              responses={200: {"description": "audio in response_format (or SSE events), streamed as synthesized"}})
    async def openai_speech(request: Request, body: SpeechRequest):
        endpoint = "/v1/audio/speech"
        fmt = body.response_format.lower()
        if fmt not in OPENAI_FORMATS:
            raise BadRequest(400, f"response_format {body.response_format!r} is not supported; use one of "
                             f"{', '.join(OPENAI_FORMATS)}", reason="bad_format")
        if body.stream_format not in ("audio", "sse"):
            raise BadRequest(400, f"stream_format {body.stream_format!r} is not supported; use audio or sse",
                             reason="bad_format")
        synthesizer: Synthesizer = request.app.state.synthesizer
        if fmt == "mp3":
            rate = await synthesizer.ensure_sample_rate()
            if rate not in MP3_RATES:
                raise BadRequest(400, f"mp3 cannot carry the model's {rate} Hz; use wav or pcm", reason="bad_format")
        voice = _voice_id(body.voice)
        instructions = (body.instructions or "").strip()
        req = SynthesisRequest(mode=Mode.instruct2 if instructions else Mode.sft, text=body.input,
                               speaker_id=voice, instruct_text=instructions, speed=body.speed)
        return await _synthesize(request, req, endpoint, audio_format=fmt, sse=body.stream_format == "sse")


def _add_speaker_routes(app: FastAPI, settings: GatewaySettings) -> None:
    @app.get("/speakers", summary="registered speaker ids")
    async def list_speakers(request: Request):
        return {"speakers": await asyncio.to_thread(request.app.state.registry.speakers)}

    @app.post("/speakers", status_code=201, summary="register a speaker from prompt audio + its transcript")
    async def register_speaker(request: Request, prompt_wav: Annotated[UploadFile, File()], speaker_id: str = Form(),
                               prompt_text: str = Form(), overwrite: bool = Form(False)):
        registry = request.app.state.registry
        if settings.model == "cosyvoice":  # the registry computes CosyVoice2 prompts (25 Hz tokens, 24 kHz mel)
            raise BadRequest(400, "registering speakers from audio needs a CosyVoice2/3 deployment; a CosyVoice1 one "
                             "serves spk2info.pt's speakers, and prompt_wav per request", reason="unsupported_mode")
        wav = await read_prompt(prompt_wav, settings.max_upload_bytes)
        if wav is None:
            raise BadRequest(400, "prompt_wav is required", reason="missing_field")
        if len(prompt_text) > settings.max_text_chars:
            raise BadRequest(413, f"prompt_text has {len(prompt_text)} characters; the limit is "
                             f"{settings.max_text_chars}", reason="text_too_long")

        def exists() -> bool:
            return speaker_id in registry.speakers()

        if not overwrite and await asyncio.to_thread(exists):
            raise BadRequest(409, f"speaker {speaker_id!r} is already registered (overwrite=true replaces it)",
                             reason="speaker_exists")
        try:
            prompt = await registry.register(speaker_id, wav, prompt_text, overwrite=overwrite)
        except ValueError as exc:
            if not overwrite and await asyncio.to_thread(exists):  # registered meanwhile by another request
                raise BadRequest(409, f"speaker {speaker_id!r} is already registered", reason="speaker_exists") from None
            raise BadRequest(400, str(exc), reason="bad_speaker") from None
        return {"speaker_id": speaker_id, "prompt_text": prompt.text, "speech_tokens": int(len(prompt.speech_token))}

    @app.delete("/speakers/{speaker_id}", status_code=204, summary="remove a registered speaker")
    async def delete_speaker(request: Request, speaker_id: str):
        await asyncio.to_thread(request.app.state.registry.delete, speaker_id)
        return Response(status_code=204)


def _add_operational_routes(app: FastAPI) -> None:
    @app.get("/healthz", summary="the process is alive")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="200 when a Triton replica is healthy and the model's sample rate is known")
    async def readyz(request: Request):
        synthesizer: Synthesizer = request.app.state.synthesizer
        ready = await synthesizer.ready()
        body = {"ready": ready, "sample_rate": synthesizer.sample_rate, "replicas": synthesizer.pool.states()}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus_metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        registry = metrics.REGISTRY
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # several uvicorn workers: add up every worker's files
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(os.path.join(STATIC_DIR, "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def run_gateway(*, host: str = "127.0.0.1", port: int = 8080, workers: int = 1, log_level: str = "info",
                **overrides) -> None:
    """Blocking: the gateway under uvicorn (``--factory``, ``workers`` processes) until SIGINT/SIGTERM.

    ``overrides`` (settings fields; None = not given) win over ``COSYVOICE_GATEWAY_*``; they are checked
    here, then handed to the workers through their environment. With several workers the Prometheus
    client runs in multiprocess mode (a fresh ``PROMETHEUS_MULTIPROC_DIR`` unless one is set), so that
    ``/metrics`` adds up every worker instead of showing whichever answered the scrape."""
    import tempfile

    import uvicorn

    settings = GatewaySettings.from_env(**overrides)
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    os.environ.update(settings.to_env())
    with contextlib.ExitStack() as stack:
        if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = stack.enter_context(tempfile.TemporaryDirectory(prefix="gateway-metrics-"))
        log.info("gateway on %s:%d (%d worker(s)) over Triton %s", host, port, workers, ", ".join(settings.triton))
        uvicorn.run("cosyvoice.serve.app:create_app", factory=True, host=host, port=port, workers=workers,
                    log_level=log_level, timeout_graceful_shutdown=10)


__all__ = ["create_app", "run_gateway", "decode_prompt_audio", "read_prompt", "wav_header", "AudioStreamingResponse"]
