"""Gateway load test: first-chunk latency through the gateway vs straight to Triton, in the same run.

Starts the end-to-end set-up of tests/serve (two CPU tritonservers on the rendered decoupled
repository with the tiny reference models and the HF LLM stand-in that stops after tens of tokens,
``export_short_llm``), or uses running replicas (``--triton`` specs, with ``--spk2info`` holding the
speaker), and the gateway as deployed: ``uvicorn --factory cosyvoice.serve.app:create_app`` in its own
process on 127.0.0.1. Then sends ``--requests`` synthesis requests at ``--concurrency``, alternating
between the two paths so that both see the same load on the same replicas:

* gateway: ``POST /inference_sft`` (registered speaker, raw int16 PCM streamed) through an async
  httpx client; first chunk = first body bytes;
* direct: the identical BLS inputs (the speaker's cached prompt, the normalized target text, the mode:
  what the gateway sends) as one decoupled gRPC stream (grpc.aio) to a replica, the one with the
  fewest direct requests in flight; first chunk = first ``waveform`` response.

Before counting: ``--warmup`` rounds of one direct request per BLS instance (a fresh replica's first
requests are several times slower), one gateway request per replica, then ``--pairs`` back-to-back
(gateway, direct) pairs one at a time (the unloaded overhead: median of the pair differences).

Printed: p50/p95 first-chunk latency of both, the gateway overhead under load (gateway p50 - direct
p50; goal <= 5 ms) and ratio, the unloaded paired overhead, request throughput. ``--out`` writes the
figures and every request's sample as JSON. Not part of ``make test``.

Reading the figures: under load, first chunks wait in Triton's queue for seconds, so the difference of
two p50s carries a standard error of tens of ms at 100 requests a path; and on a small machine the
gateway process waits for a CPU behind the Triton stubs (``--gateway-nice -10`` shows how much). The
paired unloaded figure isolates what the gateway itself adds. Replicas started here run one OpenMP
thread per backend stub (``--threads``; the default pools oversubscribe 2 cores 13x over).

    python bench/gateway.py --requests 24 --concurrency 4          # quick check
    python bench/gateway.py --out /tmp/gateway.json                 # 200 requests at concurrency 8
    python bench/gateway.py --triton '127.0.0.1:8001|http://127.0.0.1:8000' --spk2info model/spk2info.pt
    python bench/gateway.py --direct-only --requests 20             # Triton alone
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.serve.conftest import (  # noqa: E402
    BLS_INSTANCES,
    export_short_llm,
    render_decoupled_repo,
    replica_spec,
    start_replicas,
    triton_stream,
    wait_until,
)

#: the LLM stand-in answers speaker "001" + this text with 29 speech tokens (2 chunks, ~1.2 s of audio)
DEFAULT_TEXT = "good morning."
SPEAKER = "001"


def prepare_models(work: str) -> tuple[str, str]:
    """(hf_dir, model_dir) of the tests' set-up: the tiny HF LLM stand-in (``export_short_llm``), the
    tiny reference ONNX models and a spk2info.pt whose "001" is the first speaker of a small synthetic
    corpus (the fixtures' corpus: same generator, same seed)."""
    from cosyvoice.corpus.kaldi import read_table
    from cosyvoice.corpus.manifest import prepare_libritts
    from cosyvoice.corpus.synthetic import make_synthetic_corpus
    from cosyvoice.features.reference_models import make_reference_models
    from cosyvoice.triton.spk2info import build_spk2info

    hf_dir = export_short_llm(work)
    corpus = os.path.join(work, "LibriTTS")
    make_synthetic_corpus(corpus, subsets=["dev-clean"], speakers=3, utts_per_speaker=5, seed=3)
    data = os.path.join(work, "manifest")
    prepare_libritts(os.path.join(corpus, "dev-clean"), data, utts_per_shard=100, num_workers=1)
    model_dir = os.path.join(work, "cosyvoice2_model")
    make_reference_models(model_dir, seed=0, size="tiny")
    first = sorted(set(read_table(data, "utt2spk").values()))[0]
    build_spk2info(data, model_dir, os.path.join(model_dir, "spk2info.pt"), speakers=[first])
    return hf_dir, model_dir


@dataclass
class Sample:
    path: str            # "gateway" | "direct"
    first_chunk_s: float
    total_s: float
    samples: int
    error: str = ""


@dataclass
class Result:
    requests: int
    concurrency: int
    text: str
    replicas: list[str]
    wall_s: float = 0.0
    gateway: dict = field(default_factory=dict)
    direct: dict = field(default_factory=dict)
    overhead_p50_ms: float | None = None
    overhead_ratio_p50: float | None = None
    throughput_rps: float = 0.0
    #: unloaded: ``pairs`` back-to-back (gateway, direct) requests, one at a time; median of the differences
    pairs: int = 0
    paired_overhead_p50_ms: float | None = None
    paired_overhead_iqr_ms: tuple[float, float] | None = None
    paired_gateway_p50_ms: float | None = None
    paired_direct_p50_ms: float | None = None
    machine: str = ""
    gateway_nice: int = 0
    replica_omp_threads: int | None = None
    samples: list = field(default_factory=list)


def summarize(samples: list[Sample]) -> dict:
    ok = [s for s in samples if not s.error]
    first = np.array([s.first_chunk_s for s in ok]) if ok else np.array([np.nan])
    total = np.array([s.total_s for s in ok]) if ok else np.array([np.nan])
    return {"ok": len(ok), "errors": len(samples) - len(ok),
            "first_chunk_p50_ms": float(np.percentile(first, 50) * 1e3),
            "first_chunk_p95_ms": float(np.percentile(first, 95) * 1e3),
            "first_chunk_mean_ms": float(first.mean() * 1e3),
            "total_p50_s": float(np.percentile(total, 50)),
            "error_examples": sorted({s.error for s in samples if s.error})[:3]}


class DirectPaths:
    """One grpc.aio channel per replica; each request goes to the replica with the fewest direct requests
    in flight (the gateway balances its own requests the same way)."""

    def __init__(self, grpc_urls: list[str]):
        import grpc

        self.urls = grpc_urls
        self.channels = [grpc.aio.insecure_channel(u, options=[("grpc.max_receive_message_length", -1)])
                         for u in grpc_urls]
        self.outstanding = [0] * len(grpc_urls)

    async def run(self, inputs: dict[str, np.ndarray], replica: int | None = None) -> Sample:
        i = replica if replica is not None else min(range(len(self.urls)), key=lambda k: self.outstanding[k])
        self.outstanding[i] += 1
        start = time.perf_counter()
        first, n = None, 0
        try:
            async for chunk in triton_stream(self.urls[i], inputs, request_id=uuid.uuid4().hex,
                                             channel=self.channels[i]):
                if first is None and chunk.size:
                    first = time.perf_counter() - start
                n += chunk.size
        except Exception as exc:  # counted, shown in the summary
            return Sample("direct", float("nan"), time.perf_counter() - start, n, f"{type(exc).__name__}: {exc}")
        finally:
            self.outstanding[i] -= 1
        return Sample("direct", first if first is not None else float("nan"), time.perf_counter() - start, n,
                      "" if first is not None else "no audio")

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


async def gateway_request(client, base_url: str, text: str, speaker: str) -> Sample:
    start = time.perf_counter()
    first, n = None, 0
    try:
        async with client.stream("POST", f"{base_url}/inference_sft",
                                 data={"tts_text": text, "spk_id": speaker}) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")[:200]
                return Sample("gateway", float("nan"), time.perf_counter() - start, 0,
                              f"HTTP {response.status_code}: {body}")
            async for part in response.aiter_raw():
                if first is None and part:
                    first = time.perf_counter() - start
                n += len(part) // 2
    except Exception as exc:
        return Sample("gateway", float("nan"), time.perf_counter() - start, n, f"{type(exc).__name__}: {exc}")
    return Sample("gateway", first if first is not None else float("nan"), time.perf_counter() - start, n,
                  "" if first is not None else "no audio")


async def load_test(*, requests: int, concurrency: int, direct: DirectPaths, direct_inputs: dict[str, np.ndarray],
                    base_url: str | None, text: str, speaker: str) -> tuple[list[Sample], float]:
    """``requests`` requests by ``concurrency`` workers, alternating gateway / direct (direct only
    without a gateway). Returns the samples and the wall time."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for k in range(requests):
        queue.put_nowait("gateway" if base_url and k % 2 == 0 else "direct")
    samples: list[Sample] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def worker():
            while not queue.empty():
                path = queue.get_nowait()
                if path == "gateway":
                    samples.append(await gateway_request(client, base_url, text, speaker))
                else:
                    samples.append(await direct.run(direct_inputs))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return samples, wall


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"


def report(result: Result) -> str:
    g, d = result.gateway, result.direct
    lines = [f"{result.requests} requests at concurrency {result.concurrency} over {len(result.replicas)} replicas "
             f"({result.wall_s:.1f} s, {result.throughput_rps:.2f} requests/s); text {result.text!r}; {result.machine}"]
    for name, s in (("gateway", g), ("direct ", d)):
        if s:
            lines.append(f"  {name}: first chunk p50 {s['first_chunk_p50_ms']:.1f} ms, p95 {s['first_chunk_p95_ms']:.1f} ms,"
                         f" whole request p50 {s['total_p50_s']:.2f} s ({s['ok']} ok, {s['errors']} errors"
                         f"{'; ' + s['error_examples'][0] if s['errors'] else ''})")
    if result.overhead_p50_ms is not None:
        lines.append(f"  gateway overhead under load (p50 gateway - p50 direct): {result.overhead_p50_ms:.1f} ms "
                     f"(ratio {result.overhead_ratio_p50:.3f}); goal <= 5 ms")
    if result.pairs:
        lines.append(f"  unloaded, {result.pairs} back-to-back pairs: first chunk p50 gateway "
                     f"{result.paired_gateway_p50_ms:.1f} ms, direct {result.paired_direct_p50_ms:.1f} ms; "
                     f"overhead (median of the pair differences) {result.paired_overhead_p50_ms:.1f} ms "
                     f"(interquartile {result.paired_overhead_iqr_ms[0]:.1f} .. {result.paired_overhead_iqr_ms[1]:.1f} ms)")
    return "\n".join(lines)


class GatewayProcess:
    """The gateway as deployed: ``uvicorn --factory cosyvoice.serve.app:create_app`` in its own process
    (its own interpreter, so the load generator does not share its GIL), configured by environment."""

    def __init__(self, specs: list[str], spk2info: str, log_path: str, *, nice: int = 0):
        from cosyvoice.serve.settings import GatewaySettings
        from cosyvoice.triton.server import free_port

        self.port = free_port()
        env = dict(os.environ, **GatewaySettings(triton=tuple(specs), spk2info=spk2info).to_env())
        self.log = open(log_path, "ab")
        self.process = subprocess.Popen(
            (["nice", "-n", str(nice)] if nice else []) + [sys.executable, "-m", "uvicorn", "--factory", "cosyvoice.serve.app:create_app", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning", "--no-access-log"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120.0) -> None:
        import httpx

        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited with {self.process.returncode} (log: {self.log.name})")
            try:
                return httpx.get(self.url + "/readyz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout=timeout, interval=0.5, what="the gateway's /readyz")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def direct_inputs(entry: dict, text: str) -> dict[str, np.ndarray]:
    """What the gateway sends Triton for ``POST /inference_sft`` with this speaker and text (one segment)."""
    from cosyvoice.serve.registry import Prompt
    from cosyvoice.serve.text import TextFrontend

    segments = TextFrontend().segments(text)
    if len(segments) != 1:
        raise SystemExit(f"--text must be one segment for the gateway (got {segments}): use a shorter text")
    return {**Prompt.from_spk2info(entry).bls_inputs(), "target_text": np.array([[segments[0]]], dtype=object),
            "mode": np.array([["zero_shot"]], dtype=object)}


async def paired(direct: DirectPaths, inputs: dict[str, np.ndarray], base_url: str, text: str, speaker: str,
                 pairs: int) -> list[tuple[Sample, Sample]]:
    """``pairs`` times: one gateway request, then the same request direct, alone on the replicas (the
    order alternates so neither always follows the other)."""
    import httpx

    out = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        for k in range(pairs):
            if k % 2 == 0:
                g = await gateway_request(client, base_url, text, speaker)
                d = await direct.run(inputs)
            else:
                d = await direct.run(inputs)
                g = await gateway_request(client, base_url, text, speaker)
            out.append((g, d))
    return out


async def warm_up(direct: DirectPaths, inputs: dict[str, np.ndarray], base_url: str | None, args) -> None:
    import httpx

    for _ in range(args.warmup):
        warm = await asyncio.gather(*(direct.run(inputs, replica=i % len(direct.urls))
                                      for i in range(len(direct.urls) * BLS_INSTANCES)))
        if any(w.error for w in warm):
            raise SystemExit(f"a direct warm-up request failed: {[w.error for w in warm if w.error][0]}")
    if base_url:
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
            warm = await asyncio.gather(*(gateway_request(client, base_url, args.text, args.speaker)
                                          for _ in range(len(direct.urls))))
        if any(w.error for w in warm):
            raise SystemExit(f"a gateway warm-up request failed: {[w.error for w in warm if w.error][0]}")


async def run_bench(args, grpc_urls: list[str], base_url: str | None, inputs: dict[str, np.ndarray]) -> Result:
    direct = DirectPaths(grpc_urls)
    try:
        # warm-ups, not counted: a fresh replica's first requests are several times slower (lazy imports,
        # first allocations in each BLS / LLM / token2wav instance), so every BLS instance takes a few
        await warm_up(direct, inputs, base_url, args)
        pairs = await paired(direct, inputs, base_url, args.text, args.speaker, args.pairs) if base_url else []
        samples, wall = await load_test(requests=args.requests, concurrency=args.concurrency, direct=direct,
                                        direct_inputs=inputs, base_url=base_url, text=args.text, speaker=args.speaker)
    finally:
        await direct.close()
    result = Result(requests=args.requests, concurrency=args.concurrency, text=args.text, replicas=grpc_urls,
                    wall_s=wall, throughput_rps=args.requests / wall, machine=machine(),
                    samples=[asdict(s) for s in samples])
    ok = [(g, d) for g, d in pairs if not g.error and not d.error]
    if ok:
        result.pairs = len(ok)
        diffs = np.array([g.first_chunk_s - d.first_chunk_s for g, d in ok]) * 1e3
        result.paired_overhead_p50_ms = float(np.median(diffs))
        result.paired_overhead_iqr_ms = (float(np.percentile(diffs, 25)), float(np.percentile(diffs, 75)))
        result.paired_gateway_p50_ms = float(np.median([g.first_chunk_s for g, _ in ok]) * 1e3)
        result.paired_direct_p50_ms = float(np.median([d.first_chunk_s for _, d in ok]) * 1e3)
    result.direct = summarize([s for s in samples if s.path == "direct"])
    if base_url:
        result.gateway = summarize([s for s in samples if s.path == "gateway"])
        result.overhead_p50_ms = result.gateway["first_chunk_p50_ms"] - result.direct["first_chunk_p50_ms"]
        result.overhead_ratio_p50 = result.gateway["first_chunk_p50_ms"] / result.direct["first_chunk_p50_ms"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--text", default=DEFAULT_TEXT, help="target text of every request (short: CPU)")
    parser.add_argument("--speaker", default=SPEAKER, help="registered speaker id of the requests")
    parser.add_argument("--triton", action="append", default=[],
                        help="running replica 'host:grpc|http://host:http' (repeat); default: start two here")
    parser.add_argument("--spk2info", help="spk2info.pt holding --speaker (with --triton)")
    parser.add_argument("--replicas", type=int, default=2, help="replicas started here (without --triton)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="warm-up rounds (one direct request per BLS instance of each replica), not counted")
    parser.add_argument("--pairs", type=int, default=30,
                        help="unloaded back-to-back (gateway, direct) pairs before the load test (0: none)")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of the replicas started here (0: OpenMP's default, one per core; "
                             "oversubscribes a small CPU, see tests/serve/conftest.py REPLICA_ENV)")
    parser.add_argument("--gateway-nice", type=int, default=0,
                        help="run the gateway under `nice -n N` (negative: ahead of the Triton stubs for the CPUs; "
                             "needs root). Shows how much of the overhead under load is waiting for a CPU")
    parser.add_argument("--direct-only", action="store_true", help="no gateway: Triton only")
    parser.add_argument("--work", help="folder for the set-up and logs (default: a temporary one)")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    if args.triton and not args.spk2info:
        parser.error("--triton needs --spk2info (the speaker's cached prompt)")

    from cosyvoice.triton import runtime

    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        work = args.work or tmp
        os.makedirs(work, exist_ok=True)
        servers, gateway = [], None
        try:
            if args.triton:
                specs, spk2info = args.triton, args.spk2info
            else:
                from cosyvoice.triton.server import build_server_env

                t0 = time.perf_counter()
                hf_dir, model_dir = prepare_models(work)
                repo = render_decoupled_repo(os.path.join(work, "model_repo"), hf_dir, model_dir)
                extra = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None
                servers = start_replicas(repo, build_server_env(), work, args.replicas, extra_env=extra)
                specs, spk2info = [replica_spec(s) for s in servers], os.path.join(model_dir, "spk2info.pt")
                print(f"set-up: {len(servers)} tritonservers ready in {time.perf_counter() - t0:.0f} s", flush=True)
            inputs = direct_inputs(runtime.load_spk2info(spk2info)[args.speaker], args.text)
            if not args.direct_only:
                gateway = GatewayProcess(specs, spk2info, os.path.join(work, "gateway.log"), nice=args.gateway_nice)
                gateway.wait_ready()
            result = asyncio.run(run_bench(args, [s.split("|")[0] for s in specs], gateway and gateway.url, inputs))
            result.gateway_nice = args.gateway_nice
            result.replica_omp_threads = None if args.triton else (args.threads or None)
        finally:
            if gateway is not None:
                gateway.stop()
            for server in servers:
                server.stop()
    print(report(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(asdict(result), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
