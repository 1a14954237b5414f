"""TritonPool against real tritonservers serving a tiny echo stand-in of the cosyvoice2 BLS.

``backend_models/cosyvoice2`` streams ``chunks`` float32 chunks filled with ``replica * 1000 + k``
(the server's ``ECHO_REPLICA``), so every test can tell which replica produced a chunk and whether
any chunk was duplicated, lost or reordered; it leaves ``<request_id>.<outcome>`` files in
``ECHO_LOG_DIR`` so a test can see that the server saw a request cancelled.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from cosyvoice.serve.backend import BackendError, NoHealthyReplica, Replica, TritonPool
from cosyvoice.serve.metrics import REGISTRY
from tests.support.tritonserver import remove_files, shm_regions, stop_servers

MODELS = os.path.join(os.path.dirname(__file__), "backend_models")


@pytest.fixture(scope="session")
def triton_env():
    from cosyvoice.triton.server import build_server_env

    return build_server_env()


class Echo:
    """One tritonserver over a copy of ``backend_models`` whose chunks carry ``replica_id``."""

    def __init__(self, root, triton_env, replica_id: int):
        from cosyvoice.triton.server import TritonServer

        self.id = replica_id
        self.root = root / f"echo{replica_id}"
        shutil.copytree(MODELS, self.root / "repo")
        self.log_dir = self.root / "requests"
        self.log_dir.mkdir()
        self.server = TritonServer(str(self.root / "repo"), env=triton_env, explicit=False,
                                   log_path=str(self.root / "tritonserver.log"),
                                   extra_env={"ECHO_REPLICA": str(replica_id), "ECHO_LOG_DIR": str(self.log_dir)})
        self.server.start()
        deadline = time.monotonic() + 60
        while not self.server.ready():
            assert time.monotonic() < deadline, self.server.log_tail()
            time.sleep(0.1)

    @property
    def replica(self) -> Replica:
        return Replica(self.server.grpc_url, f"http://{self.server.http_url}")

    def outcome(self, request_id: str, timeout: float = 5.0) -> str | None:
        """What the model recorded for ``request_id`` (done | cancelled | failed), waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name in os.listdir(self.log_dir):
                if name.startswith(request_id + "."):
                    return name[len(request_id) + 1:]
            time.sleep(0.05)
        return None

    def kill(self) -> None:
        """Crash the server (SIGKILL to its process group), then reap it and remove its stub's shared memory."""
        regions = shm_regions(self.server)
        os.killpg(self.server.process.pid, signal.SIGKILL)
        self.server.stop()
        remove_files(regions)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, triton_env):
    root = tmp_path_factory.mktemp("backend")
    servers = []
    try:
        servers = [Echo(root, triton_env, 1), Echo(root, triton_env, 2)]
        yield servers
    finally:
        stop_servers([echo.server for echo in servers])


@pytest.fixture
def doomed(tmp_path, triton_env):
    """A third replica that the test stops or kills."""
    echo = Echo(tmp_path, triton_env, 3)
    try:
        yield echo
    finally:
        stop_servers([echo.server])


class HealthSwitch:
    """A stand-in health endpoint: ``/v2/health/ready`` answers 200 when ``up``, else 503."""

    def __init__(self):
        switch = self
        self.up = False

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200 if switch.up and self.path == "/v2/health/ready" else 503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def switch():
    health = HealthSwitch()
    try:
        yield health
    finally:
        health.close()


def closed_port() -> int:
    from cosyvoice.triton.server import free_port

    return free_port()  # nothing listens there once free_port has closed its socket


def text(s: str) -> dict[str, np.ndarray]:
    return {"target_text": np.array([[s]], dtype=object)}


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def collect(pool: TritonPool, s: str, request_id: str) -> list[np.ndarray]:
    return [chunk async for chunk in pool.stream(text(s), request_id=request_id)]


def origin(chunks: list[np.ndarray]) -> list[float]:
    """The value each chunk is filled with (replica * 1000 + index)."""
    assert all(c.dtype == np.float32 and c.ndim == 1 and np.all(c == c[0]) for c in chunks)
    return [float(c[0]) for c in chunks]


def test_replica_parse():
    assert Replica.parse("127.0.0.1:8001") == Replica("127.0.0.1:8001", "http://127.0.0.1:8000")
    assert Replica.parse(" h:9|http://h:7/ ") == Replica("h:9", "http://h:7")
    assert Replica.parse("h:9|h:7") == Replica("h:9", "http://h:7")
    with pytest.raises(ValueError):
        Replica.parse("no-port")


def test_chunks_are_yielded_in_order_as_they_arrive(pair):
    a, _ = pair

    async def main():
        async with TritonPool([a.replica]) as pool:
            arrivals, chunks = [], []
            async for chunk in pool.stream(text("chunks=4 delay=0.25 size=5"), request_id="timing"):
                arrivals.append(time.monotonic())
                chunks.append(chunk)
            return arrivals, chunks, pool.states()

    arrivals, chunks, states = run(main())
    assert origin(chunks) == [1000, 1001, 1002, 1003] and all(len(c) == 5 for c in chunks)
    # the server waits 0.75 s between the first and the last chunk: the first reached us long before
    assert arrivals[-1] - arrivals[0] > 0.5
    assert states == [{"replica": a.replica.grpc, "healthy": True, "outstanding": 0, "failures": 0}]
    assert a.outcome("timing") == "done"


def test_least_outstanding_spreads_requests_over_two_replicas(pair):
    a, b = pair

    async def main():
        async with TritonPool([a.replica, b.replica]) as pool:
            # six concurrent streams: 3 + 3, each wholly from one replica
            started = [asyncio.Event() for _ in range(6)]

            async def one(i):
                chunks = []
                async for chunk in pool.stream(text("chunks=2 delay=0.5"), request_id=f"spread-{i}"):
                    chunks.append(chunk)
                    started[i].set()
                return origin(chunks)

            tasks = [asyncio.create_task(one(i)) for i in range(6)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 10)
            in_flight = [s["outstanding"] for s in pool.states()]
            streams = await asyncio.gather(*tasks)
            # one long stream on a: the next requests go to b (least outstanding, not plain round robin)
            long = asyncio.create_task(collect(pool, "chunks=2 delay=1", "long"))
            while pool.states()[0]["outstanding"] + pool.states()[1]["outstanding"] == 0:
                await asyncio.sleep(0.01)
            busy = [s["outstanding"] for s in pool.states()].index(1)
            short = [origin(await collect(pool, "chunks=1", f"short-{i}"))[0] for i in range(3)]
            await long
            # all idle: round robin
            idle = [origin(await collect(pool, "chunks=1", f"idle-{i}"))[0] for i in range(4)]
            return in_flight, streams, busy, short, idle, pool.states()

    in_flight, streams, busy, short, idle, states = run(main())
    assert in_flight == [3, 3]
    assert sorted(streams) == [[1000, 1001]] * 3 + [[2000, 2001]] * 3
    other = 2000 if busy == 0 else 1000
    assert short == [other] * 3
    assert sorted(idle) == [1000, 1000, 2000, 2000] and idle[0] != idle[1]
    assert [s["outstanding"] for s in states] == [0, 0]


def test_a_replica_stopped_before_the_request_is_retried_on_the_other_then_taken_out(pair, doomed):
    a, _ = pair
    dead = doomed.replica.grpc
    retries = metric("cosyvoice_gateway_backend_retries_total", model="cosyvoice2")
    errors = metric("cosyvoice_gateway_backend_errors_total", replica=dead, model="cosyvoice2")

    async def main():
        async with TritonPool([doomed.replica, a.replica], health_interval_s=600, max_failures=2) as pool:
            assert pool.ready() and all(s["healthy"] for s in pool.states())
            doomed.server.stop()
            first = await collect(pool, "chunks=3", "retried-1")  # the dead replica is picked first
            after_one = pool.states()[0]
            second = await collect(pool, "chunks=3", "retried-2")  # round robin: the dead one again
            after_two = pool.states()[0]
            third = await collect(pool, "chunks=3", "not-retried")
            await pool.check_health()  # its health endpoint is gone too: it stays out
            return first, after_one, second, after_two, third, pool.states()[0]

    first, after_one, second, after_two, third, final = run(main())
    assert origin(first) == origin(second) == origin(third) == [1000, 1001, 1002]  # no duplicate, no gap
    assert after_one["healthy"] and after_one["failures"] == 1
    assert not after_two["healthy"] and after_two["failures"] == 2  # max_failures: out at once
    assert not final["healthy"] and final["outstanding"] == 0
    assert metric("cosyvoice_gateway_backend_retries_total", model="cosyvoice2") == retries + 2  # not for the third
    assert metric("cosyvoice_gateway_backend_errors_total", replica=dead, model="cosyvoice2") == errors + 2
    assert metric("cosyvoice_gateway_backend_healthy", replica=dead) == 0


def test_a_replica_killed_mid_stream_ends_the_stream_with_an_error(pair, doomed):
    a, _ = pair
    retries = metric("cosyvoice_gateway_backend_retries_total", model="cosyvoice2")

    async def main():
        async with TritonPool([doomed.replica, a.replica], health_interval_s=600) as pool:
            chunks = []
            with pytest.raises(BackendError) as caught:
                async for chunk in pool.stream(text("chunks=40 delay=0.1"), request_id="killed"):
                    chunks.append(chunk)
                    if len(chunks) == 2:
                        await asyncio.to_thread(doomed.kill)
            return chunks, caught.value, pool.states()

    chunks, error, states = run(main())
    got = origin(chunks)
    assert 2 <= len(got) < 40 and got == [3000 + k for k in range(len(got))]  # a prefix, nothing from a
    assert error.retryable and error.replica == doomed.replica.grpc
    assert metric("cosyvoice_gateway_backend_retries_total", model="cosyvoice2") == retries
    assert [s["outstanding"] for s in states] == [0, 0] and states[0]["failures"] == 1


def test_a_model_error_is_not_retried(pair):
    a, b = pair
    retries = metric("cosyvoice_gateway_backend_retries_total", model="cosyvoice2")

    async def main():
        async with TritonPool([a.replica, b.replica]) as pool:
            with pytest.raises(BackendError) as caught:
                await collect(pool, "error", "bad-input")
            return caught.value, pool.states()

    error, states = run(main())
    assert not error.retryable and "asked to fail" in str(error)
    assert error.replica == a.replica.grpc
    assert metric("cosyvoice_gateway_backend_retries_total", model="cosyvoice2") == retries
    assert all(s["healthy"] and s["failures"] == 0 and s["outstanding"] == 0 for s in states)
    assert a.outcome("bad-input") == "failed" and b.outcome("bad-input", timeout=0.1) is None


def test_a_consumer_that_stops_cancels_the_triton_request(pair):
    a, _ = pair

    async def main():
        async with TritonPool([a.replica]) as pool:
            stream = pool.stream(text("chunks=100 delay=0.05"), request_id="closed")
            first = await stream.__anext__()
            during = pool.states()[0]["outstanding"]
            await stream.aclose()
            after_close = pool.states()[0]["outstanding"]

            got_one = asyncio.Event()

            async def consume():
                async for _ in pool.stream(text("chunks=100 delay=0.05"), request_id="task-cancelled"):
                    got_one.set()

            task = asyncio.create_task(consume())
            await got_one.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return origin([first]), during, after_close, pool.states()[0]["outstanding"]

    first, during, after_close, after_cancel = run(main())
    assert first == [1000] and during == 1 and after_close == 0 and after_cancel == 0
    assert a.outcome("closed") == "cancelled"
    assert a.outcome("task-cancelled") == "cancelled"


def test_a_replica_failing_its_health_check_leaves_the_rotation_and_comes_back(pair, switch):
    a, b = pair
    watched = Replica(a.replica.grpc, switch.url)

    async def until(pool, healthy):
        deadline = time.monotonic() + 5
        while pool.states()[0]["healthy"] != healthy:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)

    async def main():
        async with TritonPool([watched, b.replica], health_interval_s=0.2) as pool:
            out = [origin(await collect(pool, "chunks=1", f"out-{i}"))[0] for i in range(3)]
            gauge_out = metric("cosyvoice_gateway_backend_healthy", replica=watched.grpc)
            switch.up = True
            await until(pool, True)
            back = [origin(await collect(pool, "chunks=1", f"back-{i}"))[0] for i in range(2)]
            gauge_back = metric("cosyvoice_gateway_backend_healthy", replica=watched.grpc)
            switch.up = False
            await until(pool, False)
            return out, gauge_out, back, gauge_back, pool.ready()

    out, gauge_out, back, gauge_back, ready = run(main())
    assert out == [2000] * 3 and gauge_out == 0
    assert sorted(back) == [1000, 2000] and gauge_back == 1
    assert ready  # b is still in rotation


def test_no_healthy_replica_when_all_are_down(switch):
    async def main():
        async with TritonPool([f"127.0.0.1:{closed_port()}", Replica(f"127.0.0.1:{closed_port()}", switch.url)],
                              health_interval_s=600) as pool:
            assert not pool.ready()
            with pytest.raises(NoHealthyReplica):
                await collect(pool, "chunks=1", "nowhere")
            with pytest.raises(NoHealthyReplica):
                await pool.infer("echo_unary", {"x": np.ones(2, np.float32)}, ["y"])
            return pool.states()

    states = run(main())
    assert [s["healthy"] for s in states] == [False, False]


def test_infer_retries_an_unavailable_replica_and_model_parameter_is_cached(pair, switch):
    a, _ = pair
    switch.up = True
    unreachable = Replica(f"127.0.0.1:{closed_port()}", switch.url)  # its health says ready, its gRPC is gone
    retries = metric("cosyvoice_gateway_backend_retries_total", model="echo_unary")

    async def main():
        async with TritonPool([unreachable, a.replica], health_interval_s=600) as pool:
            out = await pool.infer("echo_unary", {"x": np.array([1, 2, 3], np.float32)}, ["y"])
            retried = metric("cosyvoice_gateway_backend_retries_total", model="echo_unary") - retries
            rate = await pool.model_parameter("echo_unary", "sample_rate")
            missing = await pool.model_parameter("echo_unary", "no_such_key")
            with pytest.raises(BackendError) as caught:
                await pool.infer("no_such_model", {"x": np.ones(1, np.float32)}, ["y"])
        async with TritonPool([a.replica], health_interval_s=600) as cached:
            first = await cached.model_parameter("echo_unary", "sample_rate")
            cached._states[0].healthy = False  # no replica left: only the cache can answer
            second = await cached.model_parameter("echo_unary", "sample_rate")
            inputs = await cached.model_inputs("echo_unary")
        return out, retried, rate, missing, caught.value, first, second, inputs

    out, retried, rate, missing, error, first, second, inputs = run(main())
    assert inputs == ["x"]
    assert out["y"].tolist() == [2, 4, 6] and out["y"].dtype == np.float32
    assert retried == 1
    assert rate == "24000" and missing is None
    assert not error.retryable, error
    assert first == second == "24000"


def test_triton_statistics_become_counters(pair):
    a, b = pair

    def counts(model):
        return [metric("cosyvoice_triton_inferences_total", replica=e.replica.grpc, model=model) for e in pair]

    def queued():
        return sum(metric("cosyvoice_triton_queue_seconds_total", replica=e.replica.grpc, model=m)
                   for e in pair for m in ("cosyvoice2", "echo_unary"))

    async def main():
        async with TritonPool([a.replica, b.replica], stats_interval_s=0.2) as pool:
            before = counts("cosyvoice2") + counts("echo_unary"), queued()
            for i in range(4):
                await collect(pool, "chunks=1", f"stats-{i}")  # round robin: 2 + 2
            for _ in range(2):
                await pool.infer("echo_unary", {"x": np.ones(2, np.float32)}, ["y"])  # 1 + 1
            deadline = time.monotonic() + 5
            while True:
                after = counts("cosyvoice2") + counts("echo_unary"), queued()
                if [x - y for x, y in zip(after[0], before[0])] == [2, 2, 1, 1] or time.monotonic() > deadline:
                    return before, after
                await asyncio.sleep(0.1)

    before, after = run(main())
    assert [x - y for x, y in zip(after[0], before[0])] == [2, 2, 1, 1]
    assert after[1] > before[1]
