"""Client-side load balancing over Triton replicas (gRPC, decoupled streaming).

The gateway talks to several ``tritonserver`` replicas directly rather than through a proxy, so it
can pick the least busy one per request, keep a streamed request on one replica, and decide itself
what is safe to retry: a request that failed before any audio reached the client is retried once
on another replica; once audio went out, a failure ends the stream with an error the client sees
(a retry would duplicate or cut the audio). Replicas are health-checked on ``/v2/health/ready`` and
one that fails ``max_failures`` requests in a row leaves the rotation until it is ready again.

Requests go through a plain ``grpc.aio`` channel and Triton's generated stub (``tritonclient.grpc``'s
protobufs): the aio client of tritonclient cannot ask for the empty final response that tells a
finished stream from a truncated one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import httpx
import numpy as np
from tritonclient.grpc import InferResult, service_pb2, service_pb2_grpc
from tritonclient.utils import np_to_triton_dtype, serialize_byte_tensor

from cosyvoice.serve.metrics import (
    BACKEND_ERRORS,
    BACKEND_HEALTHY,
    BACKEND_OUTSTANDING,
    BACKEND_REQUESTS,
    BACKEND_RETRIES,
    TRITON_INFERENCES,
    TRITON_QUEUE_SECONDS,
)

log = logging.getLogger(__name__)

#: how many times a request that failed before its first chunk is retried on another replica
BACKEND_RETRIES_MAX = 1

#: a restarted replica must be reachable again within a health interval, not after gRPC's default
#: reconnect back-off (up to 120 s)
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass(frozen=True)
class Replica:
    """One Triton server: its gRPC address (requests) and HTTP base URL (health)."""

    grpc: str  # "host:port"
    http: str  # "http://host:port"

    @classmethod
    def parse(cls, spec: str) -> Replica:
        """``"host:grpc_port|http://host:http_port"``; without ``|...`` the HTTP port is the gRPC port
        minus one (Triton's defaults: HTTP 8000, gRPC 8001)."""
        grpc_part, sep, http_part = spec.strip().partition("|")
        grpc_part = grpc_part.strip().removeprefix("grpc://")
        host, colon, port = grpc_part.rpartition(":")
        if not (host and colon and port.isdigit()):
            raise ValueError(f"replica {spec!r}: expected 'host:grpc_port' or 'host:grpc_port|http://host:http_port'")
        if sep:
            http = http_part.strip()
            if "://" not in http:
                http = "http://" + http
        else:
            http = f"http://{host}:{int(port) - 1}"
        return cls(grpc=grpc_part, http=http.rstrip("/"))


class BackendError(RuntimeError):
    """A Triton request failed. ``retryable``: the replica or the connection failed (the same request
    may succeed later); False when Triton answered with an error for the request itself (bad input)."""

    def __init__(self, message: str, *, replica: str | None = None, retryable: bool = True):
        super().__init__(message)
        self.replica = replica
        self.retryable = retryable


class NoHealthyReplica(BackendError):
    """No replica is in rotation (the gateway answers 503)."""


class _Transport(Exception):
    """Internal: the replica or the connection failed (not the request)."""

    def __init__(self, message: str, *, retry: bool = True):
        super().__init__(message)
        self.retry = retry


@dataclass(eq=False)
class _State:
    replica: Replica
    index: int
    healthy: bool = True
    outstanding: int = 0
    failures: int = 0
    channel: grpc.aio.Channel | None = None
    stub: service_pb2_grpc.GRPCInferenceServiceStub | None = None
    stats: dict[str, tuple[int, int]] | None = None  # model -> (queue ns, success count) at the last poll
    label: str = field(init=False)

    def __post_init__(self) -> None:
        self.label = self.replica.grpc


def _infer_request(model: str, inputs: dict[str, np.ndarray], *, request_id: str = "",
                   parameters: dict | None = None, outputs: Sequence[str] = ()) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    for name, value in inputs.items():
        array = np.asarray(value)
        if array.dtype.kind == "U":  # numpy unicode strings: Triton's BYTES are python objects
            array = array.astype(object)
        datatype = np_to_triton_dtype(array.dtype)
        if datatype is None:
            raise ValueError(f"input {name!r}: no Triton type for numpy dtype {array.dtype}")
        request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        if datatype == "BYTES":
            serialized = serialize_byte_tensor(array)  # a 0-d object array holding the bytes
            request.raw_input_contents.append(serialized.item() if serialized.size else b"")
        else:
            request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    for key, value in (parameters or {}).items():
        if key.startswith("triton_"):
            raise ValueError(f"request parameter {key!r} is reserved by Triton")
        if isinstance(value, bool):
            request.parameters[key].bool_param = value
        elif isinstance(value, int):
            request.parameters[key].int64_param = value
        elif isinstance(value, float):
            request.parameters[key].double_param = value
        elif isinstance(value, str):
            request.parameters[key].string_param = value
        else:
            raise ValueError(f"request parameter {key!r}: unsupported type {type(value).__name__}")
    return request


def _is_final(response: service_pb2.ModelInferResponse) -> bool:
    params = response.parameters
    return "triton_final_response" in params and params["triton_final_response"].bool_param


class TritonPool:
    """Requests balanced over Triton replicas: the healthy replica with the fewest requests in flight
    (ties: round robin). ``start()`` runs the health and inference-statistics loops; call it (and
    ``close()``) from the event loop that makes the requests (the gRPC channels belong to it)."""

    def __init__(self, replicas: Sequence[Replica | str], *, model: str = "cosyvoice2", health_interval_s: float = 2.0,
                 max_failures: int = 3, request_timeout_s: float = 300.0, stats_interval_s: float = 10.0):
        parsed = [r if isinstance(r, Replica) else Replica.parse(r) for r in replicas]
        if not parsed:
            raise ValueError("TritonPool needs at least one replica")
        self.model = model
        self.health_interval_s = health_interval_s
        self.max_failures = max(1, max_failures)
        self.request_timeout_s = request_timeout_s
        self.stats_interval_s = stats_interval_s
        self._states = [_State(r, i) for i, r in enumerate(parsed)]
        self._next = 0  # round-robin position among equally loaded replicas
        self._configs: dict[str, service_pb2.ModelConfig] = {}
        self._http: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task] = []
        for state in self._states:
            BACKEND_HEALTHY.labels(state.label).set(1)
            BACKEND_OUTSTANDING.labels(state.label).set(0)

    # --- life cycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Check every replica once (so ``ready()`` means something), take a statistics baseline, then
        keep checking in the background."""
        if self._tasks:
            return
        await self.check_health()
        await self._poll_statistics()
        self._tasks = [asyncio.create_task(self._every(self.health_interval_s, self.check_health), name="triton-health"),
                       asyncio.create_task(self._every(self.stats_interval_s, self._poll_statistics),
                                           name="triton-statistics")]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        for state in self._states:
            if state.channel is not None:
                await state.channel.close()
                state.channel = state.stub = None

    async def __aenter__(self) -> TritonPool:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _every(self, interval_s: float, job) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await job()
            except Exception:  # a background loop must outlive any one bad round
                log.exception("triton pool: %s failed", getattr(job, "__name__", job))

    # --- state -----------------------------------------------------------------------------------
    def ready(self) -> bool:
        """Some replica is in rotation."""
        return any(s.healthy for s in self._states)

    def states(self) -> list[dict]:
        return [{"replica": s.label, "healthy": s.healthy, "outstanding": s.outstanding, "failures": s.failures}
                for s in self._states]

    def _set_healthy(self, state: _State, healthy: bool, why: str) -> None:
        if healthy != state.healthy:
            log.warning("triton replica %s %s (%s)", state.label, "back in rotation" if healthy else "out of rotation",
                        why)
        state.healthy = healthy
        BACKEND_HEALTHY.labels(state.label).set(1 if healthy else 0)

    def _pick(self, exclude: set[_State]) -> _State | None:
        candidates = [s for s in self._states if s.healthy and s not in exclude]
        if not candidates:
            return None
        n = len(self._states)
        best = min(candidates, key=lambda s: (s.outstanding, (s.index - self._next) % n))
        self._next = (best.index + 1) % n
        return best

    def _stub(self, state: _State) -> service_pb2_grpc.GRPCInferenceServiceStub:
        if state.stub is None:
            state.channel = grpc.aio.insecure_channel(state.replica.grpc, options=_CHANNEL_OPTIONS)
            state.stub = service_pb2_grpc.GRPCInferenceServiceStub(state.channel)
        return state.stub

    def _begin(self, state: _State, model: str) -> None:
        state.outstanding += 1
        BACKEND_OUTSTANDING.labels(state.label).set(state.outstanding)
        BACKEND_REQUESTS.labels(state.label, model).inc()

    def _end(self, state: _State) -> None:
        state.outstanding -= 1
        BACKEND_OUTSTANDING.labels(state.label).set(state.outstanding)

    def _succeeded(self, state: _State) -> None:
        state.failures = 0

    def _failed(self, state: _State, model: str, why: str, *, counts: bool) -> None:
        """Record a failed request; ``counts``: a replica/connection failure (towards ``max_failures``)."""
        BACKEND_ERRORS.labels(state.label, model).inc()
        if not counts:
            return
        state.failures += 1
        log.warning("triton replica %s: request to %s failed (%d in a row): %s", state.label, model, state.failures, why)
        if state.failures >= self.max_failures:
            self._set_healthy(state, False, f"{state.failures} failed requests in a row")

    def _no_replica(self, last: BackendError | None) -> BackendError:
        if last is not None:
            return last
        return NoHealthyReplica(f"no healthy Triton replica (of {len(self._states)})")

    # --- health and statistics -------------------------------------------------------------------
    async def check_health(self) -> None:
        """One health round: GET ``/v2/health/ready`` on every replica; ready ones are (back) in
        rotation with their failure count reset, the others out. ``start()`` runs one, then the
        background loop one every ``health_interval_s``."""
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=max(0.5, min(5.0, self.health_interval_s)))
        results = await asyncio.gather(*(self._ready(s) for s in self._states))
        for state, (ok, why) in zip(self._states, results):
            if ok and not state.healthy:
                state.failures = 0
                if state.channel is not None:  # reconnect now rather than at the first request
                    state.channel.get_state(try_to_connect=True)
            self._set_healthy(state, ok, why)

    async def _ready(self, state: _State) -> tuple[bool, str]:
        try:
            response = await self._http.get(f"{state.replica.http}/v2/health/ready")
        except httpx.HTTPError as exc:
            return False, f"health check: {type(exc).__name__}: {exc}"
        return response.status_code == 200, f"health check: HTTP {response.status_code}"

    async def _poll_statistics(self) -> None:
        """Triton's cumulative inference statistics -> counters incremented by the change since the last
        poll. The first poll of a replica is the baseline; a counter that went down means the replica
        restarted, so its new value is all new."""
        await asyncio.gather(*(self._replica_statistics(s) for s in self._states))

    async def _replica_statistics(self, state: _State) -> None:
        try:
            response = await self._stub(state).ModelStatistics(service_pb2.ModelStatisticsRequest(name=""),
                                                               timeout=max(1.0, min(10.0, self.stats_interval_s)))
        except grpc.aio.AioRpcError as exc:
            log.debug("triton replica %s: no statistics: %s", state.label, exc.code())
            return
        now: dict[str, tuple[int, int]] = {}
        for stats in response.model_stats:
            queue_ns, count = now.get(stats.name, (0, 0))
            now[stats.name] = (queue_ns + stats.inference_stats.queue.ns, count + stats.inference_stats.success.count)
        if state.stats is not None:
            for model, (queue_ns, count) in now.items():
                before_ns, before_count = state.stats.get(model, (0, 0))
                reset = queue_ns < before_ns or count < before_count
                d_ns = queue_ns if reset else queue_ns - before_ns
                d_count = count if reset else count - before_count
                if d_ns:
                    TRITON_QUEUE_SECONDS.labels(state.label, model).inc(d_ns / 1e9)
                if d_count:
                    TRITON_INFERENCES.labels(state.label, model).inc(d_count)
        state.stats = now

    # --- requests --------------------------------------------------------------------------------
    async def stream(self, inputs: dict[str, np.ndarray], *, request_id: str, model: str | None = None,
                     parameters: dict | None = None) -> AsyncIterator[np.ndarray]:
        """Stream a decoupled model's ``waveform`` chunks (float32, 1-D) as they arrive.

        Failure before the first chunk: retried once on another replica. After it: ``BackendError``
        (the caller already forwarded audio). Triton's error for the request itself (bad input):
        ``BackendError(retryable=False)``, not retried. Closing the generator or cancelling its task
        cancels the Triton request."""
        model = model or self.model
        request = _infer_request(model, inputs, request_id=request_id, parameters=parameters)
        request.parameters["triton_enable_empty_final_response"].bool_param = True
        last: BackendError | None = None
        for state in self._attempts(model, request_id):
            chunks = 0
            try:
                # closed explicitly: ``async for`` alone would leave the attempt (and its Triton
                # request) open until garbage collection when our consumer stops early
                async with contextlib.aclosing(self._stream_from(state, model, request)) as attempt_chunks:
                    async for chunk in attempt_chunks:
                        chunks += 1
                        yield chunk
                return
            except _Transport as exc:
                last = BackendError(f"Triton replica {state.label} failed {model} request {request_id!r}"
                                    f"{f' after {chunks} chunks' if chunks else ''}: {exc}", replica=state.label)
                if chunks or not exc.retry:
                    raise last from exc
        raise self._no_replica(last)

    async def _stream_from(self, state: _State, model: str,
                           request: service_pb2.ModelInferRequest) -> AsyncIterator[np.ndarray]:
        """One attempt on one replica. Raises ``_Transport`` (replica/connection) or ``BackendError``
        (the model's error). Runs its clean-up (cancel, outstanding count) when closed early."""
        self._begin(state, model)
        call = None
        finished = False
        try:
            call = self._stub(state).ModelStreamInfer(timeout=self.request_timeout_s)
            try:
                await call.write(request)
                await call.done_writing()  # Triton still sends every response of the request
                while True:
                    response = await call.read()
                    if response is grpc.aio.EOF:
                        raise _Transport("the stream ended before the final response")
                    if response.error_message:
                        finished = True
                        self._failed(state, model, response.error_message, counts=False)
                        raise BackendError(f"{model} on {state.label}: {response.error_message}", replica=state.label,
                                           retryable=False)
                    wav = InferResult(response.infer_response).as_numpy("waveform")
                    if wav is not None and wav.size:
                        yield wav.reshape(-1).astype(np.float32, copy=False)
                    if _is_final(response.infer_response):
                        finished = True
                        self._succeeded(state)
                        return
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
                code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else await call.code()
                details = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else "the call ended"
                raise _Transport(f"{code.name}: {details}", retry=code != grpc.StatusCode.DEADLINE_EXCEEDED) from exc
        except _Transport as exc:
            self._failed(state, model, str(exc), counts=True)
            raise
        finally:
            if call is not None and not finished:
                call.cancel()  # the consumer stopped or the call failed: Triton cancels the request
            self._end(state)

    async def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        """One unary request (e.g. ``audio_tokenizer``): the same balancing, retried once on another
        replica when the replica was unavailable."""
        request = _infer_request(model, inputs, outputs=outputs)

        async def call(stub: service_pb2_grpc.GRPCInferenceServiceStub):
            return await stub.ModelInfer(request, timeout=self.request_timeout_s)

        response = await self._unary(model, call)
        result = InferResult(response)
        return {name: result.as_numpy(name) for name in outputs}

    async def _config(self, model: str):
        """A model's config (Triton's ModelConfig message), read once per model, then cached."""
        if model not in self._configs:
            async def call(stub: service_pb2_grpc.GRPCInferenceServiceStub):
                return await stub.ModelConfig(service_pb2.ModelConfigRequest(name=model),
                                              timeout=min(30.0, self.request_timeout_s))

            self._configs[model] = (await self._unary(model, call, begin=False)).config
        return self._configs[model]

    async def model_parameter(self, model: str, key: str) -> str | None:
        """A ``parameters`` entry of a model's config (e.g. ``("token2wav", "sample_rate")``), None when absent."""
        parameters = (await self._config(model)).parameters
        return parameters[key].string_value if key in parameters else None

    async def model_inputs(self, model: str) -> list[str]:
        """The input names a model's config declares (e.g. whether the BLS takes ``speed``)."""
        return [tensor.name for tensor in (await self._config(model)).input]

    def _attempts(self, model: str, request_id: str = "") -> Iterator[_State]:
        """The replicas a request tries, in turn: the least loaded healthy one, then, when the caller
        comes back for another after a failure, one it has not tried (the retry is counted)."""
        tried: set[_State] = set()
        for attempt in range(BACKEND_RETRIES_MAX + 1):
            state = self._pick(tried)
            if state is None:
                return
            tried.add(state)
            if attempt:
                BACKEND_RETRIES.labels(model).inc()
                log.info("triton: retrying %s request %s on %s", model, request_id, state.label)
            yield state

    async def _unary(self, model: str, call, *, begin: bool = True):
        last: BackendError | None = None
        for state in self._attempts(model):
            if begin:
                self._begin(state, model)
            started = time.monotonic()
            try:
                response = await call(self._stub(state))
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                transport = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                why = f"{code.name}: {exc.details()}"
                self._failed(state, model, why, counts=transport)
                last = BackendError(f"{model} on {state.label}: {why}", replica=state.label, retryable=transport)
                if code != grpc.StatusCode.UNAVAILABLE:
                    raise last from exc
                log.info("triton: %s on %s unavailable after %.3f s", model, state.label, time.monotonic() - started)
                continue
            finally:
                if begin:
                    self._end(state)
            self._succeeded(state)
            return response
        raise self._no_replica(last)
