"""Fakes for the gateway's unit tests: a Triton pool that streams chosen chunks and records what it was
sent and whether each stream was closed, a text frontend that splits on '|', and a real uvicorn server
on 127.0.0.1 (for clients that need a socket: the openai client, aborted and cancelled streams)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
import time

import numpy as np
import soundfile as sf
import uvicorn

from cosyvoice.triton import runtime

SAMPLE_RATE = 24000


def chunk(n: int, value: float) -> np.ndarray:
    return np.full(n, value, dtype=np.float32)


class FakePool:
    """The ``backend.TritonPool`` interface. Every ``stream`` yields ``chunks`` (waiting ``delay`` s
    before each, or ``delay[i]`` before chunk i, the last value for the rest); ``fail_at``: raise ``error`` instead of that chunk. ``infer`` answers the
    audio_tokenizer (25 tokens/s, LLM ids) and speaker_embedding models like Triton would."""

    def __init__(self, chunks=None, *, sample_rate: int | None = SAMPLE_RATE, delay: float | list[float] = 0.0,
                 fail_at: int | None = None, error: Exception | None = None, ready: bool = True, inputs=None):
        self.chunks = [chunk(4800, 0.25), chunk(2400, -0.5), chunk(1200, 2.0)] if chunks is None else chunks
        self.sample_rate = sample_rate
        self.delay = delay
        self.fail_at = fail_at
        self.error = error
        self.is_ready = ready
        self.inputs = inputs  # BLS input names (None: no model_inputs method behaviour -> speed unsupported)
        self.sent: list[tuple[dict, str]] = []
        self.finished: list[str] = []  # request ids whose stream ended (completed, failed, closed or cancelled)
        self.infers: list[str] = []
        self.started = self.closed = False

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    def ready(self) -> bool:
        return self.is_ready

    def states(self) -> list[dict]:
        return [{"replica": "fake:8001", "healthy": self.is_ready, "outstanding": 0, "failures": 0}]

    async def model_parameter(self, model: str, key: str) -> str | None:
        if (model, key) == ("token2wav", "sample_rate") and self.sample_rate is not None:
            return str(self.sample_rate)
        return None

    async def model_inputs(self, model: str) -> list[str]:
        return list(self.inputs or ["reference_wav", "reference_text", "target_text", "mode"])

    async def stream(self, inputs, *, request_id: str, model=None, parameters=None):
        self.sent.append((inputs, request_id))
        try:
            for index, piece in enumerate(self.chunks):
                wait = self.delay[min(index, len(self.delay) - 1)] if isinstance(self.delay, list) else self.delay
                if wait:
                    await asyncio.sleep(wait)
                if index == self.fail_at:
                    raise self.error
                yield piece
        finally:
            self.finished.append(request_id)

    async def infer(self, model: str, inputs: dict, outputs: list[str]) -> dict:
        self.infers.append(model)
        wav = inputs["reference_wav"][0]
        if model == "audio_tokenizer":
            count = len(wav) * 25 // runtime.SAMPLE_RATE
            return {"prompt_speech_tokens": (np.arange(count, dtype=np.int32) % 6561 + runtime.ORIGINAL_VOCAB_SIZE)[None]}
        if model == "speaker_embedding":
            return {"prompt_spk_embedding": np.full((1, 192), 0.1, dtype=np.float16)}
        raise AssertionError(f"unexpected model {model}")


class SplitFrontend:
    """Segments = the text split on '|' (the real TextFrontend is tested in test_text.py)."""

    def __init__(self):
        self.calls: list[str] = []

    def segments(self, text: str, *, normalize: bool = True) -> list[str]:
        self.calls.append(text)
        return [part.strip() for part in text.split("|") if part.strip(" .,!?")]


def wav_bytes(seconds: float = 2.0, rate: int = 24000, channels: int = 1, fmt: str = "WAV") -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    mono = 0.3 * np.sin(2 * np.pi * 220 * t).astype(np.float32)
    audio = np.stack([mono] * channels, axis=1) if channels > 1 else mono
    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, format=fmt, subtype="PCM_16")
    return buffer.getvalue()


@contextlib.contextmanager
def running(app):
    """``app`` under a real uvicorn on 127.0.0.1 (an ephemeral port), in a thread; yields the base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
