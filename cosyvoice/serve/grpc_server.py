"""The gateway's gRPC frontend: upstream CosyVoice's ``cosyvoice.proto`` served by ``grpc.aio`` over the
same :class:`~cosyvoice.serve.service.Synthesizer` as the FastAPI app, plus the standard gRPC
health-checking service (``grpc.health.v1.Health``).

Clients built from upstream's generated stubs work unchanged (same package, service, method and
messages). Unlike upstream's server, which answers once per synthesised sentence, every audio chunk the
decoupled Triton model streams is written to the client as soon as it arrives; bad input ends the call
with ``INVALID_ARGUMENT`` and a message instead of a server-side traceback; a backend failure after some
audio was sent ends the stream with an error status, never a silently short stream; and a client that
cancels cancels the synthesis (and with it the Triton request).

Audio on the wire: ``prompt_audio`` is 16 kHz mono little-endian int16 PCM (upstream divides it by
2**15); each ``Response.tts_audio`` is one chunk of mono int16 PCM at the model's sample rate, which is
announced in the initial metadata (``x-sample-rate``) because the messages have no field for it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import inspect
import logging
import math
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cosyvoice.serve import metrics
from cosyvoice.serve.ratelimit import rate_limiter
from cosyvoice.serve.service import (
    BadRequest,
    Mode,
    SynthesisRequest,
    Synthesizer,
    build_synthesizer,
    close_synthesizer,
    pcm16,
)
from cosyvoice.serve.settings import GatewaySettings

log = logging.getLogger(__name__)

#: the proto, as a path relative to the directory holding the ``cosyvoice`` package
PROTO_PATH = "cosyvoice/serve/cosyvoice.proto"
SERVICE_NAME = "cosyvoice.CosyVoice"
INFERENCE_METHOD = f"/{SERVICE_NAME}/Inference"
#: the ``endpoint`` label of this frontend's metrics
ENDPOINT = "grpc.Inference"
SAMPLE_RATE_METADATA = "x-sample-rate"
REQUEST_ID_METADATA = "x-request-id"
#: calls beyond the synthesis limit that grpc itself still accepts (health checks and watches)
HEALTH_HEADROOM_RPCS = 16

#: the service's HTTP-style status of a refused request -> the gRPC status code
STATUS_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def _generated_modules() -> tuple[Any, Any]:
    """The protoc-generated message and service modules, built in memory by grpcio-tools (nothing
    generated is committed). grpc resolves the proto path against ``sys.path``: the directory holding
    the ``cosyvoice`` package is on it after a normal install, but not under a strict editable install
    or when running from another directory, so it is appended when missing."""
    package_parent = str(Path(__file__).resolve().parents[2])
    if package_parent not in sys.path:
        sys.path.append(package_parent)
    return grpc.protos_and_services(PROTO_PATH)


cosyvoice_pb2, cosyvoice_pb2_grpc = _generated_modules()


def grpc_status(http_status: int) -> grpc.StatusCode:
    """The gRPC code of a refused request; anything unmapped is a server fault (``INTERNAL``)."""
    return STATUS_CODES.get(http_status, grpc.StatusCode.INTERNAL)


def prompt_wav_16k(data: bytes, *, field: str = "prompt_audio") -> np.ndarray:
    """Upstream's prompt encoding (16 kHz mono int16 PCM, no header) -> float32 samples in [-1, 1).

    Raises :class:`BadRequest` with a message that says what was expected, since a wrong encoding
    would otherwise be synthesised from as noise. The length bounds are the speaker registry's."""
    # imported here: it pulls in torch, which the server has loaded (registry) long before a request
    from cosyvoice.triton.runtime import SAMPLE_RATE as PROMPT_SAMPLE_RATE
    from cosyvoice.triton.spk2info import MAX_PROMPT_SECONDS, MIN_PROMPT_SECONDS

    expected = "16 kHz mono 16-bit little-endian PCM samples without a header"
    if not data:
        raise BadRequest(400, f"{field} is empty: send {expected}", reason="bad_audio")
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        raise BadRequest(400, f"{field} is a WAV file: send only its {expected}", reason="bad_audio")
    if len(data) % 2:
        raise BadRequest(400, f"{field} has an odd number of bytes ({len(data)}): expected {expected}",
                         reason="bad_audio")
    seconds = len(data) / 2 / PROMPT_SAMPLE_RATE
    if seconds < MIN_PROMPT_SECONDS:
        raise BadRequest(400, f"{field} is {seconds:.2f} s long: at least {MIN_PROMPT_SECONDS:g} s of {expected} "
                              "is needed", reason="bad_audio")
    if seconds > MAX_PROMPT_SECONDS:
        raise BadRequest(413, f"{field} is {seconds:.1f} s long: at most {MAX_PROMPT_SECONDS:g} s is accepted",
                         reason="bad_audio")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def synthesis_request(request: Any) -> SynthesisRequest:
    """A ``cosyvoice.Request`` -> the service's request (what each upstream request kind means)."""
    kind = request.WhichOneof("RequestPayload")
    if kind == "sft_request":
        r = request.sft_request
        return SynthesisRequest(mode=Mode.sft, text=r.tts_text, speaker_id=r.spk_id)
    if kind == "zero_shot_request":
        r = request.zero_shot_request
        return SynthesisRequest(mode=Mode.zero_shot, text=r.tts_text, prompt_text=r.prompt_text,
                                prompt_wav_16k=prompt_wav_16k(r.prompt_audio, field="zero_shot_request.prompt_audio"))
    if kind == "cross_lingual_request":
        r = request.cross_lingual_request
        return SynthesisRequest(mode=Mode.cross_lingual, text=r.tts_text,
                                prompt_wav_16k=prompt_wav_16k(r.prompt_audio,
                                                              field="cross_lingual_request.prompt_audio"))
    if kind == "instruct_request":
        r = request.instruct_request
        return SynthesisRequest(mode=Mode.instruct, text=r.tts_text, speaker_id=r.spk_id,
                                instruct_text=r.instruct_text)
    raise BadRequest(400, "the request has no payload: set one of sft_request, zero_shot_request, "
                          "cross_lingual_request, instruct_request", reason="missing_field")


def _failure(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """A Triton outage is UNAVAILABLE (worth retrying) and says what failed; a model error is INTERNAL
    with Triton's message; anything else is a gateway bug: INTERNAL, details only in the log."""
    from cosyvoice.serve.backend import BackendError, NoHealthyReplica

    if isinstance(exc, NoHealthyReplica):
        return grpc.StatusCode.UNAVAILABLE, f"no Triton replica is available: {exc}"
    if isinstance(exc, BackendError):
        code = grpc.StatusCode.UNAVAILABLE if getattr(exc, "retryable", False) else grpc.StatusCode.INTERNAL
        return code, f"the Triton backend failed: {exc}"
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the gateway log"


def _client_address(peer: str) -> str:
    """``ipv4:10.0.0.7:53422`` / ``ipv6:[::1]:53422`` -> the address without the port (rate-limit key)."""
    kind, _, rest = peer.partition(":")
    return rest.rsplit(":", 1)[0].strip("[]") if kind in ("ipv4", "ipv6") else peer


class CosyVoiceServicer(cosyvoice_pb2_grpc.CosyVoiceServicer):
    """``cosyvoice.CosyVoice/Inference`` over a Synthesizer: one ``Response`` per streamed chunk.

    ``max_concurrent``: syntheses in progress at once; more are refused with RESOURCE_EXHAUSTED (counted
    here rather than by grpc's server-wide limit, so health checks still answer on a busy server).
    ``rate_limit``: requests a minute per client address (0: none), the FastAPI app's token bucket."""

    def __init__(self, synthesizer: Any, *, api_token: str | None = None, max_concurrent: int = 16,
                 rate_limit: float = 0.0, redis_url: str | None = None) -> None:
        self._synthesizer = synthesizer
        self._api_token = api_token or None
        self._max_concurrent = max_concurrent
        self._in_progress = 0
        self._limiter = rate_limiter(rate_limit, redis_url)  # the same bucket as HTTP clients get

    async def _admit(self, context: grpc.aio.ServicerContext) -> None:
        """Token, rate limit and load, in the FastAPI guard's order; BadRequest when refused."""
        if self._api_token is not None:
            metadata = {key.lower(): value for key, value in (context.invocation_metadata() or ())}
            scheme, _, token = str(metadata.get("authorization", "")).partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                     self._api_token.encode()):
                raise BadRequest(401, "missing or wrong bearer token: send the metadata "
                                      "'authorization: Bearer <token>'", reason="unauthorized")
        if self._limiter is not None:
            wait = await self._limiter.acquire(_client_address(context.peer() or "unknown"))
            if wait > 0:
                raise BadRequest(429, f"rate limit: at most {self._limiter.capacity:g} requests a minute per "
                                      f"client; retry in {math.ceil(wait)} s", reason="rate_limited")
        if self._in_progress >= self._max_concurrent:
            raise BadRequest(429, f"the gateway is synthesizing its limit of {self._max_concurrent} requests; "
                                  "retry shortly", reason="overloaded")

    async def Inference(self, request: Any, context: grpc.aio.ServicerContext) -> None:  # noqa: N802 (proto name)
        try:
            await self._admit(context)
            synthesis = synthesis_request(request)
        except BadRequest as exc:  # refused before synthesis: counted as the FastAPI app counts its own
            metrics.REJECTED.labels(endpoint=ENDPOINT, reason=exc.reason).inc()
            await context.abort(grpc_status(exc.status), exc.message)
            return
        self._in_progress += 1
        request_id = uuid.uuid4().hex
        chunks = self._synthesizer.stream(synthesis, endpoint=ENDPOINT, request_id=request_id)
        sent = 0
        try:
            async for chunk in chunks:
                if sent == 0:
                    await self._send_initial_metadata(context, request_id)
                audio = pcm16(np.asarray(chunk, dtype=np.float32).reshape(-1))
                await context.write(cosyvoice_pb2.Response(tts_audio=audio))
                sent += 1
            if sent == 0:
                await self._send_initial_metadata(context, request_id)
        except BadRequest as exc:
            await context.abort(grpc_status(exc.status), exc.message)
        except Exception as exc:  # a backend or server fault: the client must see that the stream failed
            code, message = _failure(exc)
            log.warning("%s %s failed after %d chunk(s): %s: %s", ENDPOINT, request_id, sent, type(exc).__name__, exc,
                        exc_info=code is grpc.StatusCode.INTERNAL)
            await context.abort(code, f"synthesis failed after {sent} audio chunk(s): {message}")
        finally:
            self._in_progress -= 1
            # also on a client cancel (CancelledError at an await above): stops the Triton request now,
            # not whenever the generator is garbage-collected
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _send_initial_metadata(self, context: grpc.aio.ServicerContext, request_id: str) -> None:
        rate = self._synthesizer.sample_rate  # known once the Synthesizer produced (or finished) a stream
        metadata = ((SAMPLE_RATE_METADATA, str(int(rate))),) if rate else ()
        await context.send_initial_metadata((*metadata, (REQUEST_ID_METADATA, request_id)))


class PoolHealth(health_pb2_grpc.HealthServicer):
    """``grpc.health.v1.Health`` for the gateway: ``""`` (the whole server) and ``cosyvoice.CosyVoice``
    are SERVING only while ``ready()`` says the Synthesizer can take requests (a Triton replica is
    healthy and the sample rate known), NOT_SERVING otherwise and after :meth:`shutdown`.

    ``ready`` may be sync or async (``Synthesizer.ready`` asks Triton for the sample rate until it
    knows it). Its answer is kept for ``interval_s``: ``Check`` re-asks when that is stale (one probe at a
    time, at most ``probe_timeout_s``; a probe that fails or times out means NOT_SERVING) and ``Watch``
    re-asks on that timer and sends every change."""

    SERVICES = ("", SERVICE_NAME)

    def __init__(self, ready: Callable[[], bool | Awaitable[bool]], *, interval_s: float = 1.0,
                 probe_timeout_s: float = 3.0) -> None:
        self._ready = ready
        self._interval_s = interval_s
        self._probe_timeout_s = probe_timeout_s
        self._serving = False
        self._checked_at = -math.inf
        self._probe: asyncio.Future | None = None
        self._shutting_down = False

    async def _probe_once(self) -> bool:
        try:
            answer = self._ready()
            if inspect.isawaitable(answer):
                answer = await asyncio.wait_for(answer, self._probe_timeout_s)
            return bool(answer)
        except Exception as exc:  # a broken probe is "not serving", never a failed health RPC
            log.info("gRPC health: readiness probe failed: %s: %s", type(exc).__name__, exc)
            return False

    async def serving(self) -> bool:
        """The readiness answer, re-asked when older than ``interval_s`` (concurrent callers share a probe)."""
        if self._shutting_down:
            return False
        loop = asyncio.get_running_loop()
        if loop.time() - self._checked_at >= self._interval_s:
            if self._probe is None or self._probe.done():
                self._probe = asyncio.ensure_future(self._probe_once())
            probe = self._probe
            self._serving = await asyncio.shield(probe)
            self._checked_at = loop.time()
        return self._serving and not self._shutting_down

    async def status(self, service: str) -> int | None:
        """The serving status of ``service``; None for a service this server does not have."""
        if service not in self.SERVICES:
            return None
        serving = await self.serving()
        return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING

    def shutdown(self) -> None:
        """From now on everything is NOT_SERVING (load balancers drain before the server stops)."""
        self._shutting_down = True

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        status = await self.status(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> None:  # noqa: N802
        last = None
        while True:
            status = await self.status(request.service)
            status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN if status is None else status
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            await asyncio.sleep(max(self._interval_s, 0.05))


def _default_ready(synthesizer: Any) -> Callable[[], bool | Awaitable[bool]]:
    """``Synthesizer.ready`` (pool ready and sample rate known), else the pool's own ``ready``."""
    if callable(getattr(synthesizer, "ready", None)):
        return synthesizer.ready
    pool = getattr(synthesizer, "pool", None)
    if pool is None or not callable(getattr(pool, "ready", None)):
        raise TypeError("the synthesizer has no ready() and no pool with ready(): pass ready= to create_server")
    return pool.ready


def create_server(synthesizer: Any, *, port: int, max_concurrent_rpcs: int = 16, host: str = "127.0.0.1",
                  api_token: str | None = None, rate_limit: float = 0.0, redis_url: str | None = None,
                  ready: Callable[[], bool | Awaitable[bool]] | None = None,
                  health_interval_s: float = 1.0) -> tuple[grpc.aio.Server, int]:
    """A ``grpc.aio`` server with the CosyVoice and health services, bound (``port=0``: a free port)
    but not started: ``server, port = create_server(...); await server.start()``.

    Call it inside the event loop that will run the server. ``max_concurrent_rpcs`` bounds the
    syntheses in progress (upstream's ``--max_conc``); more are refused with RESOURCE_EXHAUSTED while
    health checks keep answering. ``api_token``: Inference calls need the metadata ``authorization:
    Bearer <token>`` (health checks never do). ``rate_limit``: Inference calls a minute per client
    address (shared with every worker through Redis at ``redis_url``). ``ready``: when the server is healthy (sync or async); by default ``synthesizer.ready``.
    ``server.health`` is the :class:`PoolHealth` (``shutdown()`` before stopping drains load balancers).
    """
    server = grpc.aio.server(maximum_concurrent_rpcs=max_concurrent_rpcs + HEALTH_HEADROOM_RPCS)
    servicer = CosyVoiceServicer(synthesizer, api_token=api_token, max_concurrent=max_concurrent_rpcs,
                                 rate_limit=rate_limit, redis_url=redis_url)
    cosyvoice_pb2_grpc.add_CosyVoiceServicer_to_server(servicer, server)
    health = PoolHealth(ready or _default_ready(synthesizer), interval_s=health_interval_s)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise OSError(f"cannot bind the gRPC server to {host}:{port}")
    server.health = health
    return server, bound


async def serve_async(settings: GatewaySettings, *, port: int = 50000, max_concurrent_rpcs: int = 16,
                      host: str = "127.0.0.1", grace_s: float = 5.0, stop: asyncio.Event | None = None,
                      synthesizer: Synthesizer | None = None, metrics_port: int | None = None) -> None:
    """Run the gRPC frontend until ``stop`` is set (or SIGINT/SIGTERM): starts the Triton pool, serves,
    then drains (health NOT_SERVING, ``grace_s`` for calls in progress) and closes the pool and cache.
    ``metrics_port``: Prometheus metrics over HTTP (``/metrics``) on ``host:metrics_port``."""
    synthesizer = synthesizer or build_synthesizer(settings)
    exporter = None
    if metrics_port is not None:
        from prometheus_client import start_http_server

        exporter, _ = start_http_server(metrics_port, addr=host, registry=metrics.REGISTRY)
    stop = stop or asyncio.Event()
    await synthesizer.pool.start()
    try:
        await synthesizer.start()
        server, bound = create_server(synthesizer, port=port, max_concurrent_rpcs=max_concurrent_rpcs, host=host,
                                      api_token=settings.api_token, rate_limit=settings.rate_limit,
                                      redis_url=settings.redis_url)
        await server.start()
        log.info("gRPC gateway listening on %s:%d (Triton: %s)", host, bound, ", ".join(settings.triton))
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            server.health.shutdown()
            await server.stop(grace_s)
    finally:
        await close_synthesizer(synthesizer)
        if exporter is not None:
            exporter.shutdown()
            exporter.server_close()


def serve(settings: GatewaySettings | None = None, *, port: int = 50000, max_concurrent_rpcs: int = 16,
          host: str = "127.0.0.1", metrics_port: int | None = None, **overrides) -> None:
    """Blocking: the gRPC frontend on ``host:port`` until SIGINT/SIGTERM. Without ``settings`` they come
    from ``COSYVOICE_GATEWAY_*`` with ``overrides`` (field -> value, None = not given) on top."""
    settings = settings or GatewaySettings.from_env(**overrides)
    asyncio.run(serve_async(settings, port=port, max_concurrent_rpcs=max_concurrent_rpcs, host=host,
                            metrics_port=metrics_port))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m cosyvoice.serve.grpc_server``: upstream's ``--port``/``--max_conc`` flags; everything
    else from the ``COSYVOICE_GATEWAY_*`` environment."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, default=50000)
    parser.add_argument("--max_conc", type=int, default=16, help="most calls in progress at once")
    parser.add_argument("--metrics_port", type=int, default=None, help="Prometheus /metrics over HTTP on this port")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    serve(GatewaySettings.from_env(), port=args.port, max_concurrent_rpcs=args.max_conc, host=args.host,
          metrics_port=args.metrics_port)


if __name__ == "__main__":
    main()
