"""The gRPC frontend (cosyvoice/serve/grpc_server.py) over a fake Synthesizer: upstream's proto
interface, request mapping, real chunk streaming, error statuses, cancellation, health and auth, and a
client built from upstream-style generated stubs (protoc output, as upstream's client imports it).

Server and client share one event loop per test (grpc.aio), so each test runs in about a second."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_tools import protoc

from cosyvoice.serve import grpc_server, metrics
from cosyvoice.serve.backend import BackendError, NoHealthyReplica
from cosyvoice.serve.grpc_server import cosyvoice_pb2, cosyvoice_pb2_grpc, create_server
from cosyvoice.serve.service import BadRequest, Mode, Synthesizer
from cosyvoice.serve.settings import GatewaySettings
from cosyvoice.triton.server import free_port

PROTO_FILE = Path(grpc_server.__file__).with_name("cosyvoice.proto")
RATE = 24000
TIMEOUT_S = 10.0


class FakeSynthesizer:
    """Stands in for service.Synthesizer: records each request and streams ``chunks``.

    ``hold_before_last``: the last chunk is produced only once the event is set (the test sets it
    after the client received the first). ``fail_after``: raise ``error`` after that many chunks.
    ``hang_after``: after that many chunks wait forever (a client cancel must close the generator)."""

    sample_rate = RATE

    def __init__(self, chunks=None, *, error: BaseException | None = None, fail_after: int = 0,
                 hold_before_last: asyncio.Event | None = None, hang_after: int | None = None) -> None:
        self.chunks = chunks if chunks is not None else [np.full(4, 0.25, np.float32)]
        self.error, self.fail_after = error, fail_after
        self.hold_before_last, self.hang_after = hold_before_last, hang_after
        self.requests: list = []
        self.request_ids: list = []
        self.produced: list[int] = []
        self.closed = asyncio.Event()
        self.completed = False

    async def stream(self, req, *, endpoint: str, request_id: str | None = None):
        self.requests.append((req, endpoint))
        self.request_ids.append(request_id)
        try:
            for i, chunk in enumerate(self.chunks):
                if self.error is not None and i == self.fail_after:
                    raise self.error
                if self.hang_after is not None and i == self.hang_after:
                    await asyncio.Event().wait()
                if self.hold_before_last is not None and i == len(self.chunks) - 1:
                    await self.hold_before_last.wait()
                self.produced.append(i)
                yield chunk
            if self.error is not None and self.fail_after >= len(self.chunks):
                raise self.error
            self.completed = True
        finally:
            self.closed.set()


class FakePool:
    """What service.Synthesizer asks of backend.TritonPool for readiness (and counts streams)."""

    def __init__(self, *, ready: bool) -> None:
        self.is_ready, self.sample_rate, self.streams = ready, "24000", 0
        self.hang, self.stream_closed = False, asyncio.Event()

    def ready(self) -> bool:
        return self.is_ready

    async def model_parameter(self, model: str, key: str) -> str | None:
        assert (model, key) == ("token2wav", "sample_rate")
        return self.sample_rate

    async def stream(self, inputs, **kwargs):
        """One chunk, then (``hang``) nothing more until closed; ``stream_closed`` records the close."""
        self.streams += 1
        try:
            yield np.zeros(4, np.float32)
            if self.hang:
                await asyncio.Event().wait()
        finally:
            self.stream_closed.set()

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True


class Readiness:
    def __init__(self, ready: bool = True) -> None:
        self.value = ready

    def __call__(self) -> bool:
        return self.value


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 3 * TIMEOUT_S))


@contextlib.asynccontextmanager
async def serving(synthesizer, **kwargs):
    """A started server on a free 127.0.0.1 port and a channel to it; both closed afterwards."""
    kwargs.setdefault("ready", Readiness(True))
    server, port = create_server(synthesizer, port=0, **kwargs)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


def pcm(seconds: float, seed: int = 0) -> tuple[bytes, np.ndarray]:
    samples = np.random.default_rng(seed).integers(-20000, 20000, int(seconds * 16000), dtype=np.int16)
    return samples.astype("<i2").tobytes(), samples


def sft(text: str = "Hello there.", spk_id: str = "001"):
    return cosyvoice_pb2.Request(sft_request=cosyvoice_pb2.sftRequest(spk_id=spk_id, tts_text=text))


def zero_shot(audio: bytes, text: str = "Hello there.", prompt_text: str = "A prompt."):
    return cosyvoice_pb2.Request(zero_shot_request=cosyvoice_pb2.zeroshotRequest(
        tts_text=text, prompt_text=prompt_text, prompt_audio=audio))


async def call_error(stub, request, **kwargs) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.Inference(request, timeout=TIMEOUT_S, **kwargs):
            pass
    return info.value


# --- the interface ---------------------------------------------------------------------------------

def test_proto_is_upstreams_interface():
    """Package, service, method and every message field (name, number, type) as upstream's proto."""
    proto = descriptor_pb2.FileDescriptorProto()
    cosyvoice_pb2.DESCRIPTOR.CopyToProto(proto)
    assert proto.package == "cosyvoice" and proto.options.go_package == "protos/"
    (service,) = proto.service
    (method,) = service.method
    assert (service.name, method.name, method.input_type, method.output_type) == (
        "CosyVoice", "Inference", ".cosyvoice.Request", ".cosyvoice.Response")
    assert method.server_streaming and not method.client_streaming
    assert grpc_server.INFERENCE_METHOD == "/cosyvoice.CosyVoice/Inference"
    string, data, message = (descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                             descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
                             descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE)
    fields = {m.name: [(f.name, f.number, f.type, f.type_name) for f in m.field] for m in proto.message_type}
    assert fields == {
        "Request": [("sft_request", 1, message, ".cosyvoice.sftRequest"),
                    ("zero_shot_request", 2, message, ".cosyvoice.zeroshotRequest"),
                    ("cross_lingual_request", 3, message, ".cosyvoice.crosslingualRequest"),
                    ("instruct_request", 4, message, ".cosyvoice.instructRequest")],
        "sftRequest": [("spk_id", 1, string, ""), ("tts_text", 2, string, "")],
        "zeroshotRequest": [("tts_text", 1, string, ""), ("prompt_text", 2, string, ""), ("prompt_audio", 3, data, "")],
        "crosslingualRequest": [("tts_text", 1, string, ""), ("prompt_audio", 2, data, "")],
        "instructRequest": [("tts_text", 1, string, ""), ("spk_id", 2, string, ""), ("instruct_text", 3, string, "")],
        "Response": [("tts_audio", 1, data, "")],
    }
    assert [d.name for d in proto.message_type[0].oneof_decl] == ["RequestPayload"]


def test_imports_from_any_directory(tmp_path):
    """The proto is found through the package's location, not the working directory."""
    out = subprocess.run([sys.executable, "-c", "import cosyvoice.serve.grpc_server as g; print(g.INFERENCE_METHOD)"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "/cosyvoice.CosyVoice/Inference"


# --- requests and streaming ------------------------------------------------------------------------

PROMPT_BYTES, PROMPT_INT16 = pcm(1.5)

REQUESTS = {
    "sft": (sft("Read this.", "spk7"),
            dict(mode=Mode.sft, text="Read this.", speaker_id="spk7")),
    "zero_shot": (zero_shot(PROMPT_BYTES, "Clone me.", "What the prompt says."),
                  dict(mode=Mode.zero_shot, text="Clone me.", prompt_text="What the prompt says.")),
    "cross_lingual": (cosyvoice_pb2.Request(cross_lingual_request=cosyvoice_pb2.crosslingualRequest(
        tts_text="Bonjour.", prompt_audio=PROMPT_BYTES)), dict(mode=Mode.cross_lingual, text="Bonjour.")),
    "instruct": (cosyvoice_pb2.Request(instruct_request=cosyvoice_pb2.instructRequest(
        tts_text="Say it.", spk_id="spk7", instruct_text="Whisper.")),
        dict(mode=Mode.instruct, text="Say it.", speaker_id="spk7", instruct_text="Whisper.")),
}


@pytest.mark.parametrize("kind", list(REQUESTS))
def test_each_request_kind_maps_to_a_synthesis_request(kind):
    request, expected = REQUESTS[kind]
    synth = FakeSynthesizer()

    async def scenario():
        async with serving(synth) as channel:
            stub = cosyvoice_pb2_grpc.CosyVoiceStub(channel)
            responses = [r async for r in stub.Inference(request, timeout=TIMEOUT_S)]
        assert len(responses) == 1

    run(scenario())
    ((req, endpoint),) = synth.requests
    assert endpoint == "grpc.Inference"
    for name, value in expected.items():
        assert getattr(req, name) == value, name
    if kind in ("zero_shot", "cross_lingual"):
        assert req.prompt_wav_16k.dtype == np.float32
        np.testing.assert_array_equal(req.prompt_wav_16k, PROMPT_INT16.astype(np.float32) / 32768.0)
        assert req.prompt_text == expected.get("prompt_text", "")
    else:
        assert req.prompt_wav_16k is None


def test_chunks_stream_as_int16_pcm_in_order_the_first_before_the_last_is_produced():
    chunks = [np.array([0.5, -0.5, 0.0], np.float32), np.linspace(-1, 1, 7, dtype=np.float32),
              np.array([0.25, 1.5, -1.5], np.float32)]
    release = asyncio.Event()
    synth = FakeSynthesizer(chunks, hold_before_last=release)
    got: list[bytes] = []

    async def scenario():
        async with serving(synth) as channel:
            call = cosyvoice_pb2_grpc.CosyVoiceStub(channel).Inference(sft(), timeout=TIMEOUT_S)
            first = await call.read()
            # the last chunk does not exist yet: the server forwarded the first without waiting for it
            assert 2 not in synth.produced
            metadata = dict(await call.initial_metadata())
            assert metadata["x-sample-rate"] == str(RATE)
            assert metadata["x-request-id"] == synth.request_ids[0]  # the id the gateway's logs carry
            got.append(first.tts_audio)
            release.set()
            while (response := await call.read()) is not grpc.aio.EOF:
                got.append(response.tts_audio)
            assert await call.code() == grpc.StatusCode.OK

    run(scenario())
    assert len(got) == 3
    decoded = [np.frombuffer(b, "<i2") for b in got]
    # the FastAPI app's encoding (service.pcm16): x * 32767, clipped to [-1, 1] first (never wrapped)
    np.testing.assert_array_equal(decoded[0], [16383, -16383, 0])
    np.testing.assert_array_equal(decoded[1], (chunks[1] * 32767).astype(np.int16))
    np.testing.assert_array_equal(decoded[2], [8191, 32767, -32767])


# --- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("audio, message", [
    (b"", "prompt_audio is empty"),
    (PROMPT_BYTES + b"\x00", "odd number of bytes"),
    (pcm(0.6)[0], "at least 1 s"),
    (pcm(31.0)[0], "at most 30 s"),
    (b"RIFF\x24\x00\x00\x00WAVEfmt " + PROMPT_BYTES, "is a WAV file"),
], ids=["empty", "odd", "too_short", "too_long", "wav_header"])
def test_bad_prompt_audio_is_invalid_argument(audio, message):
    synth = FakeSynthesizer()
    rejected = metrics.REJECTED.labels(endpoint="grpc.Inference", reason="bad_audio")
    before = rejected._value.get()

    async def scenario():
        async with serving(synth) as channel:
            return await call_error(cosyvoice_pb2_grpc.CosyVoiceStub(channel), zero_shot(audio))

    error = run(scenario())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details() and "zero_shot_request.prompt_audio" in error.details()
    assert synth.requests == []
    assert rejected._value.get() == before + 1


def test_a_request_without_payload_is_invalid_argument():
    async def scenario():
        async with serving(FakeSynthesizer()) as channel:
            return await call_error(cosyvoice_pb2_grpc.CosyVoiceStub(channel), cosyvoice_pb2.Request())

    error = run(scenario())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "sft_request" in error.details()


@pytest.mark.parametrize("error, code", [
    (BadRequest(400, "instruct needs a CosyVoice1 model; this gateway serves cosyvoice2"),
     grpc.StatusCode.INVALID_ARGUMENT),
    (BadRequest(401, "no token"), grpc.StatusCode.UNAUTHENTICATED),
    (BadRequest(404, "unknown speaker 'nobody'"), grpc.StatusCode.NOT_FOUND),
    (BadRequest(413, "text too long"), grpc.StatusCode.INVALID_ARGUMENT),
    (BadRequest(429, "slow down"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (BadRequest(503, "no Triton replica"), grpc.StatusCode.UNAVAILABLE),
    (BadRequest(500, "odd"), grpc.StatusCode.INTERNAL),
    (NoHealthyReplica("no healthy Triton replica"), grpc.StatusCode.UNAVAILABLE),
    (BackendError("Triton: model failed", retryable=False), grpc.StatusCode.INTERNAL),
    (RuntimeError("bug in the gateway"), grpc.StatusCode.INTERNAL),
], ids=["400", "401", "404", "413", "429", "503", "500", "no_replica", "model_error", "crash"])
def test_service_errors_map_to_status_codes(error, code):
    async def scenario():
        async with serving(FakeSynthesizer(error=error)) as channel:
            return await call_error(cosyvoice_pb2_grpc.CosyVoiceStub(channel), sft())

    rpc_error = run(scenario())
    assert rpc_error.code() == code
    if isinstance(error, RuntimeError) and not isinstance(error, BackendError):  # a bug: no internals to clients
        assert "internal error (RuntimeError)" in rpc_error.details() and "bug" not in rpc_error.details()
    else:
        assert str(getattr(error, "message", error)) in rpc_error.details()


def test_a_backend_failure_mid_stream_ends_with_an_error_status():
    chunks = [np.full(5, 0.1, np.float32)] * 3
    synth = FakeSynthesizer(chunks, error=BackendError("replica 127.0.0.1:8001 went away", retryable=True),
                            fail_after=2)
    received: list[bytes] = []

    async def scenario():
        async with serving(synth) as channel:
            call = cosyvoice_pb2_grpc.CosyVoiceStub(channel).Inference(sft(), timeout=TIMEOUT_S)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for response in call:
                    received.append(response.tts_audio)
            return info.value

    error = run(scenario())
    assert len(received) == 2  # what was produced arrived; the end is an error, not a short OK stream
    assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
    assert "after 2 audio chunk(s)" in error.details() and "went away" in error.details()


def test_a_client_cancel_closes_the_synthesis():
    synth = FakeSynthesizer([np.zeros(4, np.float32)] * 3, hang_after=1)

    async def scenario():
        async with serving(synth) as channel:
            call = cosyvoice_pb2_grpc.CosyVoiceStub(channel).Inference(sft(), timeout=TIMEOUT_S)
            await call.read()
            assert not synth.closed.is_set()
            call.cancel()
            await asyncio.wait_for(synth.closed.wait(), TIMEOUT_S)

    run(scenario())
    assert synth.produced == [0] and not synth.completed


def test_a_client_cancel_reaches_the_triton_stream_through_the_real_synthesizer():
    """grpc cancel -> handler cancelled -> Synthesizer.stream closed -> the pool's Triton stream closed."""
    pool = FakePool(ready=True)
    pool.hang = True

    class Speaker:
        text = "prompt transcript"

        def bls_inputs(self):
            return {}

    class Registry:
        def get(self, speaker_id):
            return Speaker()

    class Frontend:
        def segments(self, text):
            return [text]

    synth = Synthesizer(pool, Registry(), Frontend(), GatewaySettings())

    async def scenario():
        async with serving(synth) as channel:
            call = cosyvoice_pb2_grpc.CosyVoiceStub(channel).Inference(sft(), timeout=TIMEOUT_S)
            first = await call.read()
            assert dict(await call.initial_metadata())["x-sample-rate"] == "24000"
            assert not pool.stream_closed.is_set()
            call.cancel()
            await asyncio.wait_for(pool.stream_closed.wait(), TIMEOUT_S)
            return first

    assert len(run(scenario()).tts_audio) == 8
    assert pool.streams == 1


def test_calls_beyond_max_concurrent_rpcs_are_resource_exhausted_while_health_answers():
    synth = FakeSynthesizer([np.zeros(4, np.float32)] * 2, hang_after=1)
    overloaded = metrics.REJECTED.labels(endpoint="grpc.Inference", reason="overloaded")
    before = overloaded._value.get()

    async def scenario():
        async with serving(synth, max_concurrent_rpcs=1) as channel:
            stub = cosyvoice_pb2_grpc.CosyVoiceStub(channel)
            busy = stub.Inference(sft(), timeout=TIMEOUT_S)
            await busy.read()
            error = await call_error(stub, sft())
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                                     timeout=TIMEOUT_S)
            busy.cancel()
            await synth.closed.wait()
            # the slot is free again once the cancelled call closed its synthesis
            synth.hang_after = None
            after = [r async for r in stub.Inference(sft(), timeout=TIMEOUT_S)]
            return error, health, after

    error, health, after = run(scenario())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit of 1" in error.details()
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert len(after) == 2
    assert overloaded._value.get() == before + 1


def test_rate_limit_per_client():
    async def scenario():
        async with serving(FakeSynthesizer(), rate_limit=1) as channel:
            stub = cosyvoice_pb2_grpc.CosyVoiceStub(channel)
            first = [r async for r in stub.Inference(sft(), timeout=TIMEOUT_S)]
            return first, await call_error(stub, sft())

    first, error = run(scenario())
    assert len(first) == 1
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in error.details()


# --- health and auth -------------------------------------------------------------------------------

def test_health_follows_the_pool_readiness():
    readiness = Readiness(False)

    async def check(stub, service):
        return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)).status

    async def scenario():
        async with serving(FakeSynthesizer(), ready=readiness, health_interval_s=0.05) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", "cosyvoice.CosyVoice"):
                assert await check(stub, service) == health_pb2.HealthCheckResponse.NOT_SERVING
            watch = stub.Watch(health_pb2.HealthCheckRequest(service="cosyvoice.CosyVoice"), timeout=TIMEOUT_S)
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            readiness.value = True
            await asyncio.sleep(0.06)  # answers are kept for health_interval_s
            for service in ("", "cosyvoice.CosyVoice"):
                assert await check(stub, service) == health_pb2.HealthCheckResponse.SERVING
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            readiness.value = False
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await check(stub, "some.Other")
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

    run(scenario())


def test_health_defaults_to_the_real_synthesizers_readiness():
    """Over service.Synthesizer: SERVING once the pool is ready AND Triton told the sample rate."""
    pool = FakePool(ready=False)
    synth = Synthesizer(pool, registry=None, frontend=None, settings=GatewaySettings())

    async def scenario():
        statuses = []
        server, port = create_server(synth, port=0, health_interval_s=0.0)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                for ready, rate in ((False, "24000"), (True, None), (True, "24000"), (False, "24000")):
                    pool.is_ready, pool.sample_rate = ready, rate
                    response = await stub.Check(health_pb2.HealthCheckRequest(service="cosyvoice.CosyVoice"),
                                                timeout=TIMEOUT_S)
                    statuses.append(response.status)
        finally:
            await server.stop(None)
        return statuses

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert run(scenario()) == [not_serving, not_serving, serving, not_serving]


def test_instruct_on_a_cosyvoice2_gateway_is_invalid_argument():
    """The real Synthesizer refuses upstream's instruct (CosyVoice1 only) before touching Triton."""
    pool = FakePool(ready=True)
    synth = Synthesizer(pool, registry=None, frontend=None, settings=GatewaySettings(model="cosyvoice2"))
    request, _ = REQUESTS["instruct"]

    async def scenario():
        async with serving(synth) as channel:
            return await call_error(cosyvoice_pb2_grpc.CosyVoiceStub(channel), request)

    error = run(scenario())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "CosyVoice1" in error.details()
    assert pool.streams == 0


def test_bearer_token_guards_inference_but_not_health():
    synth = FakeSynthesizer()

    async def scenario():
        async with serving(synth, api_token="s3cret") as channel:
            stub = cosyvoice_pb2_grpc.CosyVoiceStub(channel)
            missing = await call_error(stub, sft())
            wrong = await call_error(stub, sft(), metadata=(("authorization", "Bearer nope"),))
            assert synth.requests == []
            ok = [r async for r in stub.Inference(sft(), timeout=TIMEOUT_S,
                                                  metadata=(("authorization", "Bearer s3cret"),))]
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                                     timeout=TIMEOUT_S)
            return missing, wrong, ok, health

    missing, wrong, ok, health = run(scenario())
    assert missing.code() == wrong.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer" in missing.details()
    assert len(ok) == 1 and len(synth.requests) == 1
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_serve_builds_starts_drains_and_closes(unused_port):
    """serve_async: starts the pool, serves health + Inference with the settings' token and the metrics
    port, stops on the event and closes the pool and the metrics port."""
    import urllib.request

    metrics_port = free_port()
    pool = FakePool(ready=True)
    settings = GatewaySettings(api_token="s3cret")
    synth = Synthesizer(pool, registry=None, frontend=None, settings=settings)

    async def scenario():
        stop = asyncio.Event()
        task = asyncio.create_task(grpc_server.serve_async(settings, port=unused_port, stop=stop, grace_s=0.1,
                                                           synthesizer=synth, metrics_port=metrics_port))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{unused_port}") as channel:
                await asyncio.wait_for(channel.channel_ready(), TIMEOUT_S)
                health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                                         timeout=TIMEOUT_S)
                error = await call_error(cosyvoice_pb2_grpc.CosyVoiceStub(channel), sft())
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            exposed = (await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=TIMEOUT_S).read())).decode()
        finally:
            stop.set()
            await asyncio.wait_for(task, TIMEOUT_S)
        return health.status, error.code(), exposed

    status, code, exposed = run(scenario())
    assert (status, code) == (health_pb2.HealthCheckResponse.SERVING, grpc.StatusCode.UNAUTHENTICATED)
    assert 'cosyvoice_gateway_rejected_total{endpoint="grpc.Inference"' in exposed
    assert pool.started and pool.closed
    with pytest.raises(OSError):  # the metrics port is closed with the server
        urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2)


@pytest.fixture
def unused_port() -> int:
    return free_port()


# --- upstream's client side ------------------------------------------------------------------------

UPSTREAM_STYLE_CLIENT = """
import json, sys
import grpc
import numpy as np
import cosyvoice_pb2
import cosyvoice_pb2_grpc

target, prompt_path = sys.argv[1], sys.argv[2]
with grpc.insecure_channel(target) as channel:
    stub = cosyvoice_pb2_grpc.CosyVoiceStub(channel)
    request = cosyvoice_pb2.Request()
    zero_shot_request = cosyvoice_pb2.zeroshotRequest()
    zero_shot_request.tts_text = "Hello from an upstream client."
    zero_shot_request.prompt_text = "The prompt transcript."
    zero_shot_request.prompt_audio = open(prompt_path, "rb").read()
    request.zero_shot_request.CopyFrom(zero_shot_request)
    response = stub.Inference(request, timeout=30)
    chunks = [r.tts_audio for r in response]
    print(json.dumps({"chunks": [c.hex() for c in chunks], "metadata": dict(response.initial_metadata())}))
"""


def test_a_client_from_upstream_style_generated_stubs_talks_to_the_server(tmp_path):
    """Stubs generated by grpc_tools.protoc from cosyvoice.proto into a directory of their own (what
    upstream's client imports as cosyvoice_pb2 / cosyvoice_pb2_grpc), in a separate process."""
    shutil.copy(PROTO_FILE, tmp_path / "cosyvoice.proto")
    assert protoc.main(["grpc_tools.protoc", f"-I{tmp_path}", f"--python_out={tmp_path}",
                        f"--grpc_python_out={tmp_path}", str(tmp_path / "cosyvoice.proto")]) == 0
    generated = (tmp_path / "cosyvoice_pb2_grpc.py").read_text()
    assert "/cosyvoice.CosyVoice/Inference" in generated
    (tmp_path / "client.py").write_text(UPSTREAM_STYLE_CLIENT)
    (tmp_path / "prompt.pcm").write_bytes(PROMPT_BYTES)
    chunks = [np.full(3, 0.5, np.float32), np.full(2, -0.25, np.float32)]
    synth = FakeSynthesizer(chunks)

    async def scenario():
        server, port = create_server(synth, port=0, ready=Readiness(True))
        await server.start()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(tmp_path / "client.py"), f"127.0.0.1:{port}", str(tmp_path / "prompt.pcm"),
                cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)},
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, err.decode()
            return json.loads(out)
        finally:
            await server.stop(None)

    result = run(scenario())
    assert [bytes.fromhex(c) for c in result["chunks"]] == [
        np.array([16383] * 3, "<i2").tobytes(), np.array([-8191] * 2, "<i2").tobytes()]
    assert result["metadata"]["x-sample-rate"] == str(RATE)
    ((req, _),) = synth.requests
    assert req.mode == Mode.zero_shot and req.text == "Hello from an upstream client."
    np.testing.assert_array_equal(req.prompt_wav_16k, PROMPT_INT16.astype(np.float32) / 32768.0)
