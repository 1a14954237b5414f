"""The Grafana dashboard (deploy/grafana/dashboards/cosyvoice-gateway.json) against the gateway's metrics.

Statically: every series a panel queries is exported by ``cosyvoice.serve.metrics`` and every exported
metric is charted. Live: a real Prometheus (Debian package) scrapes a real gateway on 127.0.0.1 every
second while a short load runs through it, and every panel expression, evaluated through Prometheus'
HTTP API, must return data. The load goes through the real FastAPI app, the real ``TritonPool`` and the
real prompt cache; only Triton is a stand-in (an in-process gRPC server speaking Triton's protocol, one
replica that answers and one that fails), so a panel on a series no code path records comes back empty
and fails the test.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import soundfile as sf
import yaml
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import np_to_triton_dtype

from cosyvoice.serve import metrics
from cosyvoice.triton import runtime
from cosyvoice.triton.server import free_port

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "cosyvoice-gateway.json"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
#: Grafana's built-in variables, as concrete PromQL for a 1 s scrape interval
GRAFANA_VARIABLES = {"$__rate_interval": "10s", "$__interval": "2s", "$__range": "1m"}
METRIC_NAME = re.compile(r"\b(cosyvoice_[a-z0-9_]+)\b")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}



def _stop(process: subprocess.Popen, *, timeout: float) -> None:
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()

def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels() -> list[dict]:
    panels = []
    for panel in _dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # panels of collapsed rows
    return [p for p in panels if p["type"] != "row"]


def _expressions() -> list[tuple[str, str]]:
    """(``panel title / refId``, PromQL with Grafana's variables replaced) of every panel query."""
    found = []
    for panel in _panels():
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: unreplaced Grafana variable in {expr}"
            found.append((f"{panel['title']} / {target['refId']}", expr))
    return found


def _exported_series() -> dict[str, str]:
    """Series name -> metric family, for every metric of ``metrics.REGISTRY`` (children or not)."""
    series = {}
    for family in metrics.REGISTRY.collect():
        for suffix in SUFFIXES[family.type]:
            series[family.name + suffix] = family.name
    return series


# --- the dashboard file itself --------------------------------------------------------------------


def test_dashboard_is_a_provisionable_grafana_dashboard():
    dashboard = _dashboard()
    assert dashboard["uid"] == "cosyvoice-gateway" and dashboard["title"] and dashboard["id"] is None
    assert 36 <= dashboard["schemaVersion"] <= 41
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    (variable,) = dashboard["templating"]["list"]
    assert (variable["name"], variable["type"], variable["query"]) == ("datasource", "datasource", "prometheus")
    occupied: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
    for panel in _panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and panel["description"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"].strip()


def test_every_queried_series_is_exported_and_every_exported_metric_is_charted():
    exported = _exported_series()
    used = {name for _, expr in _expressions() for name in METRIC_NAME.findall(expr)}
    assert used, "no panel queries a cosyvoice_ metric"
    unknown = used - set(exported)
    assert not unknown, f"panels query series cosyvoice.serve.metrics does not export: {sorted(unknown)}"
    uncharted = {family for family in exported.values()} - {exported[name] for name in used}
    assert not uncharted, f"metrics no panel charts: {sorted(uncharted)}"
    # what the issue asks the dashboard to show, by the series that answer it
    text = "\n".join(expr for _, expr in _expressions())
    for quantile in ("0.5", "0.95", "0.99"):
        for histogram in ("cosyvoice_gateway_request_seconds", "cosyvoice_gateway_first_chunk_seconds"):
            assert f"histogram_quantile({quantile}, sum by (le, endpoint) (rate({histogram}_bucket" in text
    assert "rate(cosyvoice_triton_queue_seconds_total[" in text and "rate(cosyvoice_triton_inferences_total[" in text


# --- a real Prometheus scraping the gateway ---------------------------------------------------------


def _get(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def prometheus(tmp_path: Path, target: str) -> Iterator[str]:
    """A Prometheus on a free 127.0.0.1 port scraping ``target`` every second, with the deploy config's
    gateway job (its name and metrics path); yields its base URL and stops it afterwards."""
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    deployed = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [j for j in deployed["scrape_configs"] if j["job_name"] == "cosyvoice-gateway"]
    job = {**job, "static_configs": [{"targets": [target]}]}
    config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
              "scrape_configs": [job]}
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "w")
    process = subprocess.Popen([binary, f"--config.file={config_path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"prometheus did not start:\n{(tmp_path / 'prometheus.log').read_text()}") from None
                time.sleep(0.1)
        yield url
    finally:
        _stop(process, timeout=10)
        log.close()


def query(url: str, expr: str) -> list[dict]:
    body = _get(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
    assert body["status"] == "success", body
    return body["data"]["result"]


def _has_data(result: list[dict]) -> bool:
    """Non-empty, and at least one value is a number (a quantile over no new observations is NaN)."""
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


# --- a stand-in for Triton: its gRPC protocol and HTTP health route, in process --------------------


class FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """One Triton replica for the real ``TritonPool``: ``cosyvoice2`` streams a few waveform chunks,
    ``audio_tokenizer``/``speaker_embedding`` answer like the real models, ``token2wav`` carries the
    ``sample_rate`` parameter, inference statistics grow with every request (queue time included).
    ``failing``: every inference fails before its first byte (the pool retries elsewhere)."""

    SAMPLE_RATE = 24000
    BLS_INPUTS = ("reference_wav", "reference_wav_len", "reference_text", "target_text", "prompt_speech_tokens",
                  "prompt_speech_feat", "prompt_spk_embedding", "mode")

    def __init__(self, *, failing: bool = False, chunk_s: float = 0.02, chunks: int = 3):
        self.failing = failing
        self.chunk_s = chunk_s
        self.chunks = chunks
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._grpc = self._http = None
        self.grpc_port = self.http_port = 0

    # the GRPCInferenceService methods the pool calls (the others answer UNIMPLEMENTED)
    def ServerLive(self, request, context):  # noqa: N802 (protocol names)
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):  # noqa: N802
        return service_pb2.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):  # noqa: N802
        return service_pb2.ModelReadyResponse(ready=True)

    def ModelMetadata(self, request, context):  # noqa: N802
        inputs = self.BLS_INPUTS if request.name == "cosyvoice2" else ("reference_wav",)
        return service_pb2.ModelMetadataResponse(
            name=request.name, versions=["1"], platform="python",
            inputs=[service_pb2.ModelMetadataResponse.TensorMetadata(name=n, datatype="FP32", shape=[-1])
                    for n in inputs])

    def ModelConfig(self, request, context):  # noqa: N802
        config = model_config_pb2.ModelConfig(name=request.name, backend="python")
        if request.name == "token2wav":
            config.parameters["sample_rate"].string_value = str(self.SAMPLE_RATE)
        if request.name == "cosyvoice2":
            config.model_transaction_policy.decoupled = True
            for name in self.BLS_INPUTS:
                config.input.add(name=name, data_type=model_config_pb2.TYPE_FP32, dims=[-1])
        return service_pb2.ModelConfigResponse(config=config)

    def ModelStatistics(self, request, context):  # noqa: N802
        with self._lock:
            counts = dict(self.counts)
        names = [request.name] if request.name else sorted(counts)
        stats = []
        for name in names:
            n = counts.get(name, 0)
            duration = service_pb2.StatisticDuration
            stats.append(service_pb2.ModelStatistics(
                name=name, version="1", inference_count=n, execution_count=n,
                inference_stats=service_pb2.InferStatistics(success=duration(count=n, ns=n * 30_000_000),
                                                            queue=duration(count=n, ns=n * 2_000_000))))
        return service_pb2.ModelStatisticsResponse(model_stats=stats)

    def _count(self, model: str) -> None:
        with self._lock:
            self.counts[model] = self.counts.get(model, 0) + 1

    def ModelInfer(self, request, context):  # noqa: N802
        if self.failing:
            context.abort(grpc.StatusCode.UNAVAILABLE, "replica down")
        self._count(request.model_name)
        samples = len(request.raw_input_contents[0]) // 4
        if request.model_name == "audio_tokenizer":
            tokens = (np.arange(max(1, samples * 25 // 16000), dtype=np.int32) % 6561) + runtime.ORIGINAL_VOCAB_SIZE
            return _response(request, {"prompt_speech_tokens": tokens[None]})
        if request.model_name == "speaker_embedding":
            return _response(request, {"prompt_spk_embedding": np.full((1, 192), 0.1, dtype=np.float16)})
        context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model_name}")

    def ModelStreamInfer(self, request_iterator, context):  # noqa: N802
        for request in request_iterator:
            if self.failing:
                context.abort(grpc.StatusCode.UNAVAILABLE, "replica down")
            self._count(request.model_name)
            for _ in range(self.chunks):
                time.sleep(self.chunk_s)
                chunk = np.full(int(self.SAMPLE_RATE * self.chunk_s * 4), 0.1, dtype=np.float32)
                response = _response(request, {"waveform": chunk})
                response.parameters["triton_final_response"].bool_param = False
                yield service_pb2.ModelStreamInferResponse(infer_response=response)
            final = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
            final.parameters["triton_final_response"].bool_param = True
            if request.parameters["triton_enable_empty_final_response"].bool_param:
                yield service_pb2.ModelStreamInferResponse(infer_response=final)

    def start(self) -> FakeTriton:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self, server)
        self.grpc_port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._grpc = server

        class Health(http.server.BaseHTTPRequestHandler):
            def do_GET(handler):  # noqa: N802,N805
                handler.send_response(200 if handler.path in ("/v2/health/ready", "/v2/health/live") else 404)
                handler.send_header("Content-Length", "0")
                handler.end_headers()

            def log_message(handler, *args):  # noqa: N805
                pass

        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
        self.http_port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._grpc is not None:
            self._grpc.stop(0).wait(5)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    @property
    def spec(self) -> str:
        return f"127.0.0.1:{self.grpc_port}|http://127.0.0.1:{self.http_port}"


def _response(request, outputs: dict[str, np.ndarray]):
    response = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
    for name, array in outputs.items():
        response.outputs.add(name=name, datatype=np_to_triton_dtype(array.dtype), shape=list(array.shape))
        response.raw_output_contents.append(np.ascontiguousarray(array).tobytes())
    return response


# --- the live check -----------------------------------------------------------------------------------


def _wav(seconds: float, frequency: float) -> bytes:
    t = np.arange(int(seconds * 16000)) / 16000
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * frequency * t)).astype(np.float32), 16000, format="WAV",
             subtype="PCM_16")
    return buffer.getvalue()


def _load(base: str, stop: threading.Event, worker: int) -> None:
    """Requests until ``stop``: zero-shot synthesis with a repeated prompt (cache hits) and a new one now
    and then (misses), and a refused request (empty text)."""
    repeated = _wav(1.5, 220.0)
    with httpx.Client(base_url=base, timeout=30) as client:
        n = 0
        while not stop.is_set():
            n += 1
            prompt = repeated if n % 4 else _wav(1.5, 200.0 + 10 * n + worker)
            response = client.post("/inference_zero_shot", data={"tts_text": "Hello there.", "prompt_text": "Hi."},
                                   files={"prompt_wav": ("prompt.wav", prompt, "audio/wav")})
            assert response.status_code == 200, response.text
            if n % 3 == 0:
                refused = client.post("/inference_cross_lingual", data={"tts_text": " "},
                                      files={"prompt_wav": ("prompt.wav", repeated, "audio/wav")})
                assert 400 <= refused.status_code < 500, refused.text


#: the gateway process: the real app and TritonPool, with health and statistics rounds every 0.5 s (the
#: defaults, 2 s and 10 s, would need a minute of load before every rate had two points)
GATEWAY = """
import sys
import uvicorn
from cosyvoice.serve.app import create_app
from cosyvoice.serve.backend import TritonPool
from cosyvoice.serve.settings import GatewaySettings

settings = GatewaySettings.from_env()
pool = TritonPool(list(settings.triton), health_interval_s=0.5, stats_interval_s=0.5, max_failures=2)
uvicorn.run(create_app(settings, pool=pool), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


@contextlib.contextmanager
def gateway(tmp_path: Path, replicas: list[str], port: int) -> Iterator[str]:
    """The gateway in its own process (so /metrics holds only this test's series) on ``port`` over
    ``replicas``, in Prometheus multiprocess mode as ``cosyvoice-pipeline gateway --workers N`` runs it;
    yields its URL once ready."""
    multiproc = tmp_path / "multiproc"
    multiproc.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSYVOICE_GATEWAY_")}
    env.update({"COSYVOICE_GATEWAY_TRITON": ",".join(replicas), "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
                "PYTHONPATH": str(ROOT)})
    log = open(tmp_path / "gateway.log", "w")
    process = subprocess.Popen([sys.executable, "-c", GATEWAY, str(port)], env=env, cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not get ready:\n{(tmp_path / 'gateway.log').read_text()}")
            time.sleep(0.1)
        yield url
    finally:
        _stop(process, timeout=15)
        log.close()


@pytest.mark.skipif(not (shutil.which("prometheus") or Path("/usr/bin/prometheus").exists()),
                    reason="prometheus (Debian package) not installed")
def test_every_panel_expression_returns_data_from_a_prometheus_scraping_the_gateway_under_load(tmp_path):
    good, bad = FakeTriton().start(), FakeTriton(failing=True).start()
    port = free_port()
    try:
        # Prometheus first: it applies new targets after a few seconds, while the gateway imports
        with prometheus(tmp_path, f"127.0.0.1:{port}") as url, gateway(tmp_path, [good.spec, bad.spec], port) as base:
            stop = threading.Event()
            errors: list[BaseException] = []

            def worker(i: int) -> None:
                try:
                    _load(base, stop, i)
                except BaseException as exc:  # reported below
                    errors.append(exc)
                    stop.set()

            workers = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(2)]
            for thread in workers:
                thread.start()
            expressions = _expressions()
            missing: dict[str, tuple[str, list]] = {}
            deadline = time.monotonic() + 25
            try:
                while time.monotonic() < deadline and not stop.is_set():
                    time.sleep(1.0)
                    results = {name: (expr, query(url, expr)) for name, expr in expressions}
                    missing = {name: r for name, r in results.items() if not _has_data(r[1])}
                    if not missing:
                        break
                # the check can fail: a series nothing records has no data
                assert query(url, "rate(cosyvoice_gateway_never_recorded_total[10s])") == []
                # the replica labels are the replicas this gateway was given
                healthy = query(url, "cosyvoice_gateway_backend_healthy")
                assert {s["metric"]["replica"] for s in healthy} == {good.spec.split("|")[0], bad.spec.split("|")[0]}
            finally:
                stop.set()
                for thread in workers:
                    thread.join(timeout=30)
        assert not errors, errors
        assert not missing, "panel expressions without data:\n" + "\n".join(
            f"  {name}: {expr} -> {result}" for name, (expr, result) in missing.items())
    finally:
        good.stop()
        bad.stop()
