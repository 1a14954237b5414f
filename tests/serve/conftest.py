"""End-to-end fixtures of the gateway tests: two real tritonservers (CPU, python backend) serving one
rendered decoupled repository with the tiny reference models, and helpers to talk to Triton directly.

The Triton fixtures of tests/triton (environment, tiny HF LLM, model dir) are imported here so the
gateway tests share them (and, in one pytest session, the tests/triton ones) instead of rebuilding.
Everything is session scoped: a tritonserver takes ~30 s to load the five models on 2 cores.

The LLM is the tiny random stand-in of tests/triton with its ``<|eos1|>`` logit raised (``EOS_BOOST``):
the plain one rarely stops before hundreds of tokens (~15 CPU seconds a request); this one answers
in tens of tokens, so a request costs 1-3 s and the end-to-end tests stay within a few minutes.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import AsyncIterator

import numpy as np
import pytest

from cosyvoice.triton.server import TritonServer, free_port
from tests.support.tritonserver import stop_servers
from tests.triton.conftest import data_dir, model_dir, triton_env  # noqa: F401 (fixtures used here)

ALL_MODELS = ("speaker_embedding", "audio_tokenizer", "tensorrt_llm", "token2wav", "cosyvoice2")
SEED = 1234  # token2wav_seed: the vocoder noise of every replica is the same, so replicas are interchangeable
SAMPLE_RATE = 24000
SAMPLES_PER_TOKEN = 2 * 480  # 2 mel frames per speech token, 480 samples (24 kHz) per frame
#: cosyvoice2 instances per replica: a decoupled python BLS runs one request at a time per instance
BLS_INSTANCES = 2
#: the replicas' environment: one OpenMP thread per backend stub. With the default (one per core) the
#: stubs' OpenMP pools (token2wav, onnxruntime, the LLM) spin against each other: on 2 cores, 4
#: concurrent requests over two replicas ran 13x slower (0.26 vs 3.5 requests/s, bench/gateway.py)
REPLICA_ENV = {"OMP_NUM_THREADS": "1"}
#: added to the LLM decoder's <|eos1|> bias (speech row 6561): generations of ~10-150 tokens, not ~750
EOS_BOOST = 4.0
EOS_ROW = 6561


def export_short_llm(work: str) -> str:
    """The HF export (``export_hf``) of tests/triton's tiny random CosyVoice2 LLM (seed 1) with
    ``EOS_BOOST`` on its end-of-speech logit; returns the HF folder."""
    from cosyvoice.export.hf import export_hf
    from cosyvoice.export.tokenizer import blank_en_tokenizer_dir
    from tests.export.conftest import TINY_QWEN2, save_pt, tiny_state_dict

    state = tiny_state_dict("cosyvoice2", seed=1)
    state["llm_decoder.bias"][EOS_ROW] += EOS_BOOST
    llm_pt = save_pt(state, os.path.join(work, "llm.pt"))
    out = os.path.join(work, "cosyvoice2_llm")
    export_hf(llm_pt, out, tokenizer_dir=blank_en_tokenizer_dir(os.path.join(work, "blank_en")), config=dict(TINY_QWEN2))
    return out


def render_decoupled_repo(out: str, hf_dir: str, model_dir: str, *,  # noqa: F811 (a path here)
                          bls_instances: int = BLS_INSTANCES) -> str:
    """The streaming repository as tests/triton/test_server.py serves it (HF LLM stand-in, seeded
    token2wav on CPU), ``bls_instances`` BLS instances."""
    from cosyvoice.triton.render import render_repo, repo_values

    values = repo_values(engine_dir=hf_dir, hf_dir=hf_dir, model_dir=model_dir, bls_instances=bls_instances,
                         decoupled=True, overrides={"token2wav_seed": str(SEED), "token2wav_device": "cpu"})
    render_repo(out, values, llm_backend="python")
    return out


def start_replica(repo: str, env, log_path: str, *, ports: tuple[int, int] | None = None,
                  extra_env: dict[str, str] | None = None) -> TritonServer:
    """A started tritonserver on ``repo`` with every model loaded (its own log file)."""
    server = TritonServer(repo, env=env, log_path=log_path, extra_env=extra_env, ports=ports)
    server.start()
    try:
        server.load(*ALL_MODELS)
    except BaseException:
        server.stop()
        raise
    return server


def start_replicas(repo: str, env, log_dir: str, n: int, *, extra_env: dict[str, str] | None = None) -> list[TritonServer]:
    """``n`` replicas started side by side (loading is mostly waiting on the stubs' imports)."""
    servers: list[TritonServer | None] = [None] * n
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            servers[i] = start_replica(repo, env, os.path.join(log_dir, f"tritonserver-{i}.log"), extra_env=extra_env)
        except BaseException as exc:  # reported after every thread ended
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,), name=f"start-replica-{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for server in servers:
            if server is not None:
                server.stop()
        raise errors[0]
    return servers  # type: ignore[return-value]


def replica_spec(server: TritonServer) -> str:
    """The gateway's replica spec of a server: "host:grpc_port|http://host:http_port"."""
    return f"{server.grpc_url}|http://{server.http_url}"


def wav16k(path: str) -> np.ndarray:
    from cosyvoice.features import frontend

    audio, rate = frontend.load_audio(path)
    return frontend.mono_16k(audio, rate)[0].numpy().astype(np.float32)


def _infer_request(model: str, inputs: dict[str, np.ndarray], request_id: str):
    """A ModelInferRequest asking for the empty final response of a decoupled model (how a client
    learns that the stream ended; tritonclient's aio ``stream_infer`` cannot set that reserved flag)."""
    from tritonclient.grpc import service_pb2
    from tritonclient.utils import np_to_triton_dtype, serialize_byte_tensor

    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    for name, array in inputs.items():
        array = np.ascontiguousarray(array)
        datatype = np_to_triton_dtype(array.dtype)
        request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        if datatype == "BYTES":
            serialized = serialize_byte_tensor(array)
            request.raw_input_contents.append(serialized.item() if serialized.size else b"")
        else:
            request.raw_input_contents.append(array.tobytes())
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    return request


async def triton_stream(grpc_url: str, inputs: dict[str, np.ndarray], *, model: str = "cosyvoice2",
                        request_id: str | None = None, channel=None) -> AsyncIterator[np.ndarray]:
    """The ``waveform`` chunks (float32, 1-D) of one decoupled request straight to Triton, as they
    arrive (grpc.aio). Raises ``RuntimeError`` with Triton's message when the request fails."""
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    own = channel is None
    channel = channel or grpc.aio.insecure_channel(grpc_url, options=[("grpc.max_receive_message_length", -1)])
    request = _infer_request(model, inputs, request_id or uuid.uuid4().hex)

    async def requests():
        yield request

    call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests())
    try:
        async for response in call:
            if response.error_message:
                raise RuntimeError(response.error_message)
            result = response.infer_response
            for index, output in enumerate(result.outputs):
                if output.name == "waveform" and index < len(result.raw_output_contents):
                    yield np.frombuffer(result.raw_output_contents[index], dtype=np.float32).copy()
            if result.parameters["triton_final_response"].bool_param:
                return
    finally:
        call.cancel()
        if own:
            await channel.close()


@pytest.fixture(scope="session")
def short_llm_dir(tmp_path_factory) -> str:
    """The HF LLM stand-in whose replies end after tens of tokens (``export_short_llm``)."""
    return export_short_llm(str(tmp_path_factory.mktemp("short_llm")))


@pytest.fixture(scope="session")
def serve_repo(short_llm_dir, model_dir, tmp_path_factory) -> str:  # noqa: F811
    """The rendered decoupled repository both replicas serve."""
    return render_decoupled_repo(str(tmp_path_factory.mktemp("gateway_triton") / "model_repo"), short_llm_dir,
                                 model_dir)


@pytest.fixture(scope="session")
def triton_replicas(serve_repo, triton_env, tmp_path_factory):  # noqa: F811
    """Two tritonservers on ``serve_repo``. A test may stop one and put its replacement in the list
    (same ports): teardown stops whatever the list holds then."""
    servers = start_replicas(serve_repo, triton_env, str(tmp_path_factory.mktemp("triton_logs")), 2,
                             extra_env=REPLICA_ENV)
    try:
        yield servers
    finally:
        stop_servers(servers)


@pytest.fixture(scope="session")
def corpus_utterances(data_dir) -> list[tuple[str, np.ndarray, str]]:  # noqa: F811
    """(utterance id, 16 kHz samples, transcript) of the corpus, sorted by id: prompts of the requests."""
    from cosyvoice.corpus.kaldi import read_table

    texts, wavs = read_table(data_dir, "text", joined=True), read_table(data_dir, "wav.scp")
    return [(utt, wav16k(wavs[utt]), texts[utt]) for utt in sorted(wavs)]


class UvicornThread:
    """An ASGI app served by uvicorn on 127.0.0.1 (a free port) in a background thread; its lifespan
    (the gateway's Triton pool) runs in that thread's event loop."""

    def __init__(self, app, *, port: int | None = None):
        import uvicorn

        self.port = port or free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> UvicornThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"uvicorn did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class AsyncServerThread:
    """An ``async def serve(stop: asyncio.Event)`` coroutine run in a background thread's event loop
    (the gRPC gateway); ``stop`` sets the event and waits for it to return."""

    def __init__(self, serve, *, name: str):
        import asyncio

        self.loop = asyncio.new_event_loop()
        self.stop_event = asyncio.Event()
        self.error: BaseException | None = None

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(serve(self.stop_event))
            except BaseException as exc:  # shown by stop()/the caller
                self.error = exc
            finally:
                self.loop.close()

        self.thread = threading.Thread(target=run, name=name, daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stop_event.set)
            self.thread.join(timeout)


def wait_until(predicate, *, timeout: float, interval: float = 0.2, what: str = "condition"):
    """``predicate()``'s first truthy value, polled until ``timeout`` s (then ``TimeoutError``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _get_status(url: str) -> int:
    import httpx

    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0


def gateway_settings(replicas: list[TritonServer], spk2info: str):
    from cosyvoice.serve.settings import GatewaySettings

    return GatewaySettings(triton=tuple(replica_spec(r) for r in replicas), spk2info=spk2info, model="cosyvoice2")


@pytest.fixture(scope="session")
def registry_file(model_dir, tmp_path_factory) -> str:  # noqa: F811
    """The gateway's speaker registry: a copy of the serving model dir's spk2info.pt (speaker "001")."""
    import shutil

    path = str(tmp_path_factory.mktemp("registry") / "spk2info.pt")
    shutil.copy(os.path.join(model_dir, "spk2info.pt"), path)
    return path


@pytest.fixture(scope="session")
def gateway(triton_replicas, registry_file):
    """The FastAPI gateway (``create_app``) over both replicas, served by uvicorn on 127.0.0.1; yields
    its base URL once ``/readyz`` answers 200 (both replicas healthy). Redis off (in-memory cache)."""
    from cosyvoice.serve.app import create_app

    server = UvicornThread(create_app(gateway_settings(triton_replicas, registry_file))).start()
    try:
        wait_until(lambda: _get_status(server.url + "/readyz") == 200, timeout=60, what="the gateway's /readyz")
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def grpc_gateway(triton_replicas, registry_file):
    """The gRPC gateway (``grpc_server.serve_async``) over both replicas on a free port: "127.0.0.1:PORT"."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from cosyvoice.serve.grpc_server import serve_async

    settings = gateway_settings(triton_replicas, registry_file)
    port = free_port()
    server = AsyncServerThread(lambda stop: serve_async(settings, port=port, stop=stop), name=f"grpc-gateway-{port}")
    address = f"127.0.0.1:{port}"

    def serving() -> bool:
        if server.error is not None:
            raise server.error
        with grpc.insecure_channel(address) as channel:
            try:
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
            except grpc.RpcError:
                return False
        return status == health_pb2.HealthCheckResponse.SERVING

    try:
        wait_until(serving, timeout=60, what="the gRPC gateway's health SERVING")
        yield address
    finally:
        server.stop()
