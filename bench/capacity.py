"""Capacity model: wall time, nodes, Kubernetes settings and object-store requests for a corpus of
``--hours``, from the rates the benchmarks measured (``bench/results/*.json``).

Every rate comes from a benchmark's JSON or from a flag; a rate that neither gives is printed as
"unmeasured" and every figure that needs it is left out (never filled in with a guess). A rate given
by a flag is labelled as given, not measured. Nothing here is timed: the script only does arithmetic.

    python bench/capacity.py [--hours 100000] [--gpus 8] [--cpu_cores 512] [--results bench/results]
                             [--gpu_tokens_rate AUDIO_S_PER_S] [--gpu_train_tokens_per_s TOKENS] [--markdown]
    python bench/capacity.py --update_doc [docs/scaling.md]   # its tables, recomputed with the doc's command

Inputs it reads (each optional): ``features.json`` (bench/features.py: CAM++ and speech tokens on CPU;
a file whose ``speech_token_torch`` ran on ``cuda`` gives the GPU token rate), ``shards.json``
(bench/shards.py), ``manifest.json`` (bench/manifest.py), ``control_plane.json`` (bench/control_plane.py),
``gate_scale.json`` (bench/gate_scale.py), ``object_store.json`` (bench/object_store_requests.py).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNMEASURED = "unmeasured"
#: speech tokens per second of audio (S3 tokenizer v2/v3), what the LLM trains on
TOKENS_PER_AUDIO_SECOND = 25
#: s3fs: one PUT below 2 x 50 MiB, else a multipart upload in 50 MiB parts; reads in 50 MiB blocks
S3FS_CHUNK = 50 * 2**20
#: S3's documented request rates per partitioned prefix
PREFIX_LIMITS = {"PUT": 3500, "GET": 5500}
#: request types billed as PUT-class (PUT, COPY, POST, LIST) and GET-class (GET, HEAD, all other); DELETE is free
PUT_CLASS = {"PUT", "PUT_PART", "MPU_CREATE", "MPU_COMPLETE", "COPY", "POST", "LIST", "CREATE_BUCKET"}
GET_CLASS = {"GET", "HEAD"}


# --- measured rates -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rate:
    """A per-unit rate and where it came from; ``value`` None means nobody measured it."""

    value: float | None
    unit: str
    source: str

    @property
    def known(self) -> bool:
        return self.value is not None


def unmeasured(unit: str, why: str = "") -> Rate:
    return Rate(None, unit, UNMEASURED + (f" ({why})" if why else ""))


def load_results(folder: str) -> dict[str, dict]:
    """Every ``*.json`` of ``folder`` by file stem (unreadable files are reported, not skipped silently)."""
    out: dict[str, dict] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        try:
            with open(path) as f:
                out[os.path.splitext(os.path.basename(path))[0]] = json.load(f)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"{path}: not readable JSON ({exc}); fix or remove it") from exc
    return out


def dig(data, *path):
    """``data[path[0]][path[1]]...``, or None where the path is missing."""
    for key in path:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def machine_cores(data: dict, default: float) -> float:
    """Cores of the machine a result was measured on: ``cores``, or ``machine`` as a dict or "N cores, ..."."""
    machine = data.get("machine")
    found = data.get("cores") or (machine.get("cores") if isinstance(machine, dict) else None)
    if found is None and isinstance(machine, str):
        match = re.search(r"(\d+) cores", machine)
        found = int(match.group(1)) if match else None
    return float(found or default)


def _source(name: str, data: dict, figures: dict | None = None) -> str:
    """Where a rate came from; with the machine's load average when the run started, where recorded."""
    load = (figures or {}).get("load_average_at_start")
    busy = f", load {load:g} on {data.get('cores', '?')} cores" if load is not None else ""
    return f"bench/results/{name}.json ({data.get('date', 'undated')}{busy})"


def cpu_rate(results: dict, kind: str) -> Rate:
    """Audio seconds per second per core of ``kind`` (``embedding`` / ``speech_token``) from features.json."""
    data = results.get("features")
    figures = (data or {}).get("kinds", {}).get(kind)
    if not figures:
        return unmeasured("audio s/s per core", "run bench/features.py --json bench/results/features.json")
    cores = min(data["workers"], data.get("cores") or data["workers"])
    return Rate(data["audio_seconds"] / figures["ours_seconds"] / cores, "audio s/s per core",
                _source("features", data, figures))


def gpu_token_rate(results: dict, given: float | None) -> Rate:
    """Audio seconds per second per GPU: a features JSON whose torch tokenizer ran on cuda (the fastest
    fp32 run, tokens identical to upstream), else ``--gpu_tokens_rate``, else unmeasured."""
    for name, data in results.items():
        torch_kind = (data.get("kinds") or {}).get("speech_token_torch") if data.get("benchmark") == "features" else None
        if torch_kind and str(torch_kind.get("device", "")).startswith("cuda"):
            exact = [r for r in torch_kind["runs"] if r["precision"] == "fp32"
                     and r["identical_token_lists"] == data["utterances"]]
            if exact:
                return Rate(max(r["audio_s_per_s"] for r in exact), "audio s/s per GPU", _source(name, data))
    if given:
        return Rate(given, "audio s/s per GPU", "--gpu_tokens_rate (given, not measured)")
    return unmeasured("audio s/s per GPU", "no GPU run; pass --gpu_tokens_rate")


def parquet_rate(results: dict) -> Rate:
    data = results.get("shards")
    if not data:
        return unmeasured("audio s/s per core", "run bench/shards.py --json bench/results/shards.json")
    cores = min(data["processes"], data.get("cores") or data["processes"])
    return Rate(data["audio_seconds"] / data["ours"]["seconds"] / cores, "audio s/s per core",
                _source("shards", data, data["ours"]))


def manifest_rate(results: dict) -> Rate:
    """Utterances per second per core at the largest measured size (bench/manifest.py's points)."""
    data = results.get("manifest")
    points = [p for p in (data or {}).get("points", []) if p.get("utterances") and p.get("seconds")]
    if not points:
        return unmeasured("utterances/s per core", "bench/manifest.py --json bench/results/manifest.json not run")
    largest = max(points, key=lambda p: p["utterances"])
    cores = machine_cores(data, 2)  # the project's CPU machine unless the file says otherwise
    load = f", load {largest['load_average']:.0f}" if largest.get("load_average") is not None else ""
    cpu = f"; {largest['cpu_seconds']:,.0f} CPU s of {largest['seconds']:,.0f} s" if largest.get("cpu_seconds") else ""
    return Rate(largest["utterances"] / largest["seconds"] / cores, "utterances/s per core",
                f"bench/results/manifest.json ({largest['utterances']:,} utterances on {cores:g} cores{load}{cpu})")


def train_rate(given: float | None) -> Rate:
    if given:
        return Rate(given, "tokens/s per GPU", "--gpu_train_tokens_per_s (given, not measured)")
    return unmeasured("tokens/s per GPU", "no GPU run; pass --gpu_train_tokens_per_s")


# --- the corpus and the cluster ------------------------------------------------------------------

@dataclass(frozen=True)
class Corpus:
    hours: float
    utterance_seconds: float
    utts_per_shard: int
    shards_per_run: int
    utts_per_part: int

    @property
    def audio_seconds(self) -> float:
        return self.hours * 3600

    @property
    def utterances(self) -> int:
        return math.ceil(self.audio_seconds / self.utterance_seconds)

    @property
    def shards(self) -> int:
        return math.ceil(self.utterances / self.utts_per_shard)

    @property
    def runs_per_asset(self) -> int:
        return math.ceil(self.shards / self.shards_per_run)

    @property
    def parts(self) -> int:
        return math.ceil(self.utterances / self.utts_per_part)


@dataclass(frozen=True)
class Cluster:
    gpus: int
    cpu_cores: int
    reserved_cores: float  # webserver, daemon, code server, PostgreSQL
    step_cpu: float  # CPU request of a step Job (pipelines/executors.py STEP_K8S_CONFIG)
    run_pod_cpu: float  # CPU request of a run pod (k8s/helm/values.yaml runK8sConfig)
    gpu_step_cpu: float  # CPU request of a GPU step (pipelines/k8s.py gpu_op_tags)

    @property
    def cpu_runs(self) -> int:
        """Concurrent CPU runs the CPU nodes hold: each is a run pod plus one step Job."""
        return int((self.cpu_cores - self.reserved_cores) // (self.run_pod_cpu + self.step_cpu))

    @property
    def working_cores(self) -> float:
        return self.cpu_runs * self.step_cpu


# --- the model ------------------------------------------------------------------------------------

@dataclass
class Stage:
    name: str
    where: str
    rate: Rate
    work: float  # in the rate's numerator unit (audio seconds, utterances, tokens)
    parallel: float  # cores or GPUs working at once
    per_run: float = 0.0  # work per run, 0 = not a per-run stage
    parallel_per_run: float = 1.0  # cores or GPUs of one run
    note: str = ""

    @property
    def seconds(self) -> float | None:
        return self.work / (self.rate.value * self.parallel) if self.rate.known and self.parallel else None

    @property
    def run_minutes(self) -> float | None:
        if not self.rate.known or not self.per_run:
            return None
        return self.per_run / (self.rate.value * self.parallel_per_run) / 60


def stages(corpus: Corpus, cluster: Cluster, rates: dict[str, Rate]) -> list[Stage]:
    audio_per_run = corpus.audio_seconds / corpus.runs_per_asset
    manifest_parallel = min(corpus.parts, cluster.cpu_runs) * cluster.step_cpu
    return [
        Stage("manifest", f"{corpus.parts} manifest partitions, {min(corpus.parts, cluster.cpu_runs)} at once x "
              f"{cluster.step_cpu:g} cores", rates["manifest"], corpus.utterances, manifest_parallel,
              note="local-disk rate: on S3 each utterance waits on a ranged GET, a HEAD and a GET"),
        Stage("speaker_embeddings", f"CPU pool, {cluster.working_cores:g} working cores", rates["embedding"],
              corpus.audio_seconds, cluster.working_cores, audio_per_run, parallel_per_run=cluster.step_cpu),
        Stage("parquet_shards", "CPU pool (shared with speaker_embeddings)", rates["parquet"], corpus.audio_seconds,
              cluster.working_cores, audio_per_run, parallel_per_run=cluster.step_cpu),
        Stage("speech_tokens (GPU)", f"{cluster.gpus} GPU steps (gpu pool = {cluster.gpus})", rates["gpu_tokens"],
              corpus.audio_seconds, cluster.gpus, audio_per_run, parallel_per_run=1),
        Stage("speech_tokens (device=cpu in the GPU steps)",
              f"{cluster.gpus} GPU steps x {cluster.gpu_step_cpu:g} cores", rates["cpu_tokens"], corpus.audio_seconds,
              cluster.gpus * cluster.gpu_step_cpu, audio_per_run, parallel_per_run=cluster.gpu_step_cpu,
              note="the fallback while no GPU rate is measured"),
        Stage("speech_tokens (CPU pool)", f"CPU pool, {cluster.working_cores:g} working cores", rates["cpu_tokens"],
              corpus.audio_seconds, cluster.working_cores, audio_per_run, parallel_per_run=cluster.step_cpu,
              note="not a configuration today: speech_tokens' op tags always request a GPU"),
    ]


def training_tokens(corpus: Corpus, text_tokens_per_s: float) -> float:
    return corpus.audio_seconds * (TOKENS_PER_AUDIO_SECOND + text_tokens_per_s)


def hours(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 3600:,.1f} h"


@dataclass
class Plan:
    corpus: Corpus
    cluster: Cluster
    rates: dict[str, Rate]
    stages: list[Stage]
    training: Stage
    results: dict
    args: argparse.Namespace

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def features_phase(self) -> tuple[float | None, str]:
        """Embeddings + parquet share the CPU pool while tokens run on the GPUs: the phase lasts as long
        as the slower side. Returns (seconds or None, which side)."""
        cpu = [self.stage("speaker_embeddings").seconds, self.stage("parquet_shards").seconds]
        cpu_s = sum(cpu) if all(s is not None for s in cpu) else None
        gpu_s = self.stage("speech_tokens (GPU)").seconds
        side = "GPU tokens (measured/given rate)"
        if gpu_s is None:
            gpu_s, side = self.stage("speech_tokens (device=cpu in the GPU steps)").seconds, "tokens on the GPU steps' CPUs"
        if cpu_s is None or gpu_s is None:
            return None, "unmeasured"
        return max(cpu_s, gpu_s), ("CPU pool (embeddings + parquet)" if cpu_s >= gpu_s else side)


def plan(args: argparse.Namespace) -> Plan:
    results = load_results(args.results)
    corpus = Corpus(args.hours, args.utterance_seconds, args.utts_per_shard, args.shards_per_run, args.utts_per_part)
    cluster = Cluster(args.gpus, args.cpu_cores, args.reserved_cores, args.step_cpu, args.run_pod_cpu,
                      args.gpu_step_cpu)
    rates = {"manifest": manifest_rate(results), "embedding": cpu_rate(results, "embedding"),
             "cpu_tokens": cpu_rate(results, "speech_token"), "gpu_tokens": gpu_token_rate(results, args.gpu_tokens_rate),
             "parquet": parquet_rate(results), "train": train_rate(args.gpu_train_tokens_per_s)}
    training = Stage("training (per epoch)", f"{cluster.gpus} GPUs", rates["train"],
                     training_tokens(corpus, args.text_tokens_per_s), cluster.gpus,
                     note=f"{TOKENS_PER_AUDIO_SECOND} speech + {args.text_tokens_per_s:g} text tokens per audio second")
    return Plan(corpus, cluster, rates, stages(corpus, cluster, rates), training, results, args)


# --- tables ---------------------------------------------------------------------------------------

def rate_text(rate: Rate) -> str:
    return UNMEASURED if not rate.known else f"{rate.value:,.1f} {rate.unit}"


def stage_table(p: Plan) -> list[list[str]]:
    rows = [["stage", "runs on", "rate", "rate from", "minutes per run", "wall", "note"]]
    for s in [*p.stages, p.training]:
        minutes = s.run_minutes
        rows.append([s.name, s.where, rate_text(s.rate), s.rate.source, "-" if minutes is None else f"{minutes:.1f}",
                     hours(s.seconds) if s.rate.known else UNMEASURED, s.note])
    return rows


def total_table(p: Plan) -> list[list[str]]:
    """The critical path: manifest, then the features phase, then training."""
    phase, side = p.features_phase()
    manifest, training = p.stage("manifest").seconds, p.training.seconds
    parts = [("manifest", manifest), ("features (embeddings, tokens, parquet)", phase), ("training, per epoch", training)]
    known = sum(s for _, s in parts if s is not None)
    missing = [name for name, s in parts if s is None]
    if len(missing) == len(parts):
        known = None
    rows = [["step of the critical path", "wall", "bound by"]]
    rows.append(["manifest", hours(manifest) if manifest is not None else UNMEASURED, "manifest partitions"])
    rows.append(["features (embeddings, tokens, parquet)", hours(phase) if phase is not None else UNMEASURED, side])
    rows.append(["training, per epoch", hours(training) if training is not None else UNMEASURED, "GPUs"])
    total = (UNMEASURED if known is None else hours(known) if not missing
             else f">= {hours(known)} (without: {', '.join(missing)})")
    rows.append(["total", total, ""])
    tokens = p.training.work
    rows.append([f"training per epoch at R tokens/s per GPU ({tokens / 1e9:,.1f} G tokens)",
                 f"{tokens / (p.cluster.gpus * 10_000) / 3600:,.1f} h x (10,000 / R)", "formula, R unmeasured"
                 if not p.training.rate.known else "formula"])
    gpu_needed = None
    cpu = [p.stage("speaker_embeddings").seconds, p.stage("parquet_shards").seconds]
    if all(s is not None for s in cpu):
        gpu_needed = p.corpus.audio_seconds / (p.cluster.gpus * sum(cpu))
        rows.append(["GPU token rate at which the GPUs keep pace with the CPU pool",
                     f"{gpu_needed:,.0f} audio s/s per GPU", "break-even, computed"])
    return rows


def nodes_table(p: Plan) -> list[list[str]]:
    c = p.cluster
    per_run = c.run_pod_cpu + c.step_cpu
    return [["resource", "value", "from"],
            ["utterances / shards / runs per shard asset", f"{p.corpus.utterances:,} / {p.corpus.shards:,} / "
             f"{p.corpus.runs_per_asset:,}", f"{p.corpus.hours:,.0f} h at {p.corpus.utterance_seconds:g} s per "
             f"utterance, {p.corpus.utts_per_shard} per shard, {p.corpus.shards_per_run} shards per run"],
            ["manifest partitions", f"{p.corpus.parts}", f"<= {p.corpus.utts_per_part:,} utterances each"],
            ["speaker folders", f"{p.args.speakers:,}", "assumed (--speakers): one more LIST page each"],
            ["CPU cores", f"{c.cpu_cores}", f"{c.reserved_cores:g} kept for the webserver, daemon, code server, PostgreSQL"],
            ["concurrent CPU runs", f"{c.cpu_runs}", f"(cores - reserved) / ({c.run_pod_cpu:g} run pod + "
             f"{c.step_cpu:g} step) = {per_run:g} cores each"],
            ["working CPU cores", f"{c.working_cores:g}", f"{c.cpu_runs} runs x {c.step_cpu:g} (the rest wait in run pods)"],
            ["GPU steps", f"{c.gpus}", f"1 GPU + {c.gpu_step_cpu:g} cores each"]]


def settings_table(p: Plan) -> list[list[str]]:
    c = p.cluster
    runs = c.cpu_runs + c.gpus
    return [["setting", "value", "where"],
            ["max concurrent runs", f"{runs + 4}", "k8s/helm/values.yaml dagsterDaemon.runCoordinator ... "
             "maxConcurrentRuns (CPU runs + GPU runs + 4 for manifest/per-subset runs)"],
            ["runs per backfill", f"{runs}", "same file, tagConcurrencyLimits dagster/backfill limit (the chart's "
             "default: 232; a lower limit leaves cores idle)"],
            ["gpu pool", f"{c.gpus}", "COSYVOICE_GPU_POOL_LIMIT (code server env and k8s/pool-limits-job.yaml)"],
            ["run pod CPU request", f"{c.run_pod_cpu:g}", "k8s/helm/values.yaml runLauncher ... runK8sConfig "
             "containerConfig.resources.requests.cpu (the chart's default: 250m)"],
            ["step CPU request", f"{c.step_cpu:g}", "pipelines/executors.py STEP_K8S_CONFIG (fixed in code)"],
            ["speaker_embeddings run config", f"num_workers: {c.step_cpu:g}",
             "backfill run config ops.speaker_embeddings.config (0 = the cores the pod may use: its cgroup CPU quota)"],
            ["speech_tokens run config", f"device: cuda, runtime: torch, batch_size: 64, num_workers: {c.gpu_step_cpu:g}",
             "backfill run config ops.speech_tokens.config"],
            ["shards per run", f"{p.corpus.shards_per_run}",
             f"COSYVOICE_SHARDS_PER_RUN on the code location (project default {shards_per_run_in_code()}; the "
             "smallest batch whose runs the control plane requests within 10 min at the measured time per run)"],
            ["manifest partitions", f"{p.corpus.parts} speaker-folder prefixes",
             "COSYVOICE_SUBSET_PARTS (cosyvoice/corpus/parts.py)"],
            ["PostgreSQL connections", "through PgBouncer (session pooling)",
             "k8s/pgbouncer.yaml; k8s/helm/values.yaml postgresql.enabled: false, postgresqlHost: cosyvoice-pgbouncer"],
            ["planned events", "one per asset and run", "DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS=true on "
             "dagsterDaemon and dagsterWebserver (k8s/helm/values.yaml)"]]


# --- object store -----------------------------------------------------------------------------------

def parquet_shard_bytes(p: Plan) -> float | None:
    data = p.results.get("shards")
    if not data:
        return None
    return data["output_bytes"] / data["audio_seconds"] * p.corpus.audio_seconds / p.corpus.shards


def upload_requests(size: float) -> dict[str, int]:
    """What s3fs sends to store an object of ``size`` bytes."""
    if size < 2 * S3FS_CHUNK:
        return {"PUT": 1}
    return {"MPU_CREATE": 1, "PUT_PART": math.ceil(size / S3FS_CHUNK), "MPU_COMPLETE": 1}


def request_rows(p: Plan) -> list[dict] | None:
    """Per stage: requests by type at the corpus' size, from object_store.json's per-unit counts."""
    data = p.results.get("object_store")
    if not data:
        return None
    c = p.corpus
    pages = math.ceil(c.utterances * data["corpus_objects_per_utterance"] / data["list_page_keys"]) + p.args.speakers
    units = {"utterance": c.utterances, "shard": c.shards, "run": c.runs_per_asset, "partition": c.parts,
             "speaker_folder": p.args.speakers}
    shard_bytes = parquet_shard_bytes(p)
    rows = []
    for stage, figures in sorted(data["stages"].items(), key=lambda item: PIPELINE_ORDER.index(item[0])
                                 if item[0] in PIPELINE_ORDER else len(PIPELINE_ORDER)):
        counts: dict[str, float] = {}
        for row in figures["by_key"]:
            unit = "partition" if stage in PER_SUBSET and row["unit"] == "run" else row["unit"]
            # one paginated listing per speaker folder: the pages of all of them, at the corpus' size
            scale = pages if unit == "speaker_folder" and row["type"] == "LIST" else units[unit]
            kinds = {row["type"]: row["per_unit"]}
            if row["type"] == "PUT" and row["key"].endswith(".tar") and shard_bytes is not None:
                kinds = {k: v * row["per_unit"] for k, v in upload_requests(shard_bytes).items()}
            for kind, per_unit in kinds.items():
                counts[kind] = counts.get(kind, 0.0) + per_unit * scale
        rows.append({"stage": stage, "counts": counts})
    if shard_bytes is not None:
        reads = math.ceil(shard_bytes / S3FS_CHUNK) + 1
        rows.append({"stage": "training, per epoch (from the code, not counted)",
                     "counts": {"HEAD": float(c.shards), "GET": float(reads * c.shards)}})
    return rows


PIPELINE_ORDER = ["manifest", "speaker_embeddings", "speech_tokens", "speaker_means", "upstream_feature_files",
                  "parquet_shards", "training_data_lists"]
#: stages with one run per manifest partition (their per-run requests scale with the partitions)
PER_SUBSET = ("manifest", "speaker_means", "upstream_feature_files", "training_data_lists")


def object_store_table(p: Plan) -> list[list[str]]:
    rows = request_rows(p)
    header = ["stage", "LIST", "GET + HEAD", "PUT (+ multipart)", f"cost at ${p.args.price_put:g} / "
              f"${p.args.price_get:g} per 1,000 PUT-class / GET-class"]
    if rows is None:
        return [header, ["all", UNMEASURED, UNMEASURED, UNMEASURED,
                         "- (run bench/object_store_requests.py --json bench/results/object_store.json)"]]
    out = [header]
    total = [0.0, 0.0, 0.0, 0.0]
    for row in rows:
        lists, gets, puts = request_classes(row["counts"])
        cost = ((lists + puts) * p.args.price_put + gets * p.args.price_get) / 1000
        out.append([row["stage"], f"{lists:,.0f}", f"{gets:,.0f}", f"{puts:,.0f}", f"${cost:,.2f}"])
        total = [t + v for t, v in zip(total, (lists, gets, puts, cost))]
    out.append(["total", *(f"{v:,.0f}" for v in total[:3]), f"${total[3]:,.2f}"])
    return out


def request_classes(counts: dict[str, float]) -> tuple[float, float, float]:
    """(LIST, GET-class, PUT-class without LIST) requests of one stage."""
    lists = counts.get("LIST", 0.0)
    gets = sum(v for k, v in counts.items() if k in GET_CLASS)
    return lists, gets, sum(v for k, v in counts.items() if k in PUT_CLASS) - lists


def get_rates(p: Plan) -> list[tuple[str, float]] | None:
    """GET-class requests per second of each phase, ``(phase, rate)``: the manifest over its wall time,
    the features phase as modelled, and the features phase with GPU tokens at the break-even rate. In
    the features phase embeddings and parquet share the CPU pool and tokens run beside them; parquet
    of a shard needs its tokens, so it goes no faster than the tokens do."""
    rows = request_rows(p)
    if rows is None:
        return None
    gets = {r["stage"]: request_classes(r["counts"])[1] for r in rows}
    features = sum(gets.get(s, 0.0) for s in ("speaker_embeddings", "speech_tokens", "parquet_shards"))
    out = []
    manifest_s = p.stage("manifest").seconds
    if manifest_s:
        out.append(("manifest, at the local-disk rate", gets.get("manifest", 0.0) / manifest_s))
    embeddings_s, parquet_s = p.stage("speaker_embeddings").seconds, p.stage("parquet_shards").seconds
    tokens_s = p.stage("speech_tokens (GPU)").seconds or p.stage("speech_tokens (device=cpu in the GPU steps)").seconds
    if embeddings_s and parquet_s and tokens_s:
        cpu_s = embeddings_s + parquet_s
        if tokens_s <= cpu_s:
            rate = features / cpu_s
        else:
            rate = (gets.get("speaker_embeddings", 0.0) / embeddings_s
                    + (gets.get("speech_tokens", 0.0) + gets.get("parquet_shards", 0.0)) / tokens_s)
        out.append(("features phase", rate))
        if tokens_s > cpu_s:
            out.append(("features phase, GPU tokens at the break-even rate", features / cpu_s))
    return out


# --- control plane and saturation ------------------------------------------------------------------

def control_plane_run(p: Plan) -> dict | None:
    """The control-plane measurement at the project's batch size (else the first one)."""
    runs = dig(p.results, "control_plane", "results") or []
    return next((r for r in runs if r.get("shards_per_run") == p.corpus.shards_per_run), runs[0] if runs else None)


def control_plane_table(p: Plan) -> list[list[str]]:
    run, gate = control_plane_run(p), p.results.get("gate_scale")
    rows = [["control plane", "measured", "at this corpus", "goal"]]

    def seconds(value) -> str:
        return UNMEASURED if value is None else f"{value:,.2f} s"

    shards = dig(run, "partitions")
    requested = dig(run, "all_runs_requested_s")
    where = f" at {shards:,} shards x 3 assets, {dig(run, 'runs_created') or '?'} runs" if shards else ""
    per_run = request_seconds_per_run(p.results)
    scaled = (f"{p.corpus.runs_per_asset * per_run / 60:,.1f} min ({p.corpus.runs_per_asset:,} runs x "
              f"{per_run:.2f} s per run measured)") if per_run else "-"
    rows.append(["time until every run is requested", seconds(requested) + where, scaled,
                 "<= 10 min for 150k asset-partitions"])
    ratio = dig(p.results, "control_plane", "per_partition_ratio_vs_baseline")
    rows.append(["request cost per asset-partition vs a tenth of the shards",
                 UNMEASURED if ratio is None else f"{ratio:.2f}x", "-", "1.0 = linear"])
    rows.append(["runs to request", "-", f"{p.corpus.runs_per_asset:,} for {3 * p.corpus.shards:,} "
                 f"asset-partitions (one run takes all three shard assets)",
                 f"{p.corpus.shards_per_run} shards per run"])
    rows.append(["partition-status query (asset page)", seconds(dig(run, "partition_status", "worst_s")), "-", "<= 3 s"])
    gate_where = f" (bench/gate_scale.py, {dig(gate, 'partitions') or 0:,} shards, {dig(gate, 'storage') or '?'})"

    def both(in_run, in_gate: str | None = None, extra: str = "") -> str:
        """The control-plane run's figure and bench/gate_scale.py's, whichever exist."""
        parts = [f"{seconds(in_run)} (control-plane run)"] if in_run is not None else []
        if in_gate and dig(gate, in_gate) is not None:
            parts.append(f"{seconds(dig(gate, in_gate))}{extra}{gate_where}")
        return "; ".join(parts) or UNMEASURED

    rows.append(["prepare_subset_shards sensor tick",
                 both(dig(run, "instigators", "prepare_subset_shards", "seconds"), "prepare_subset_shards_tick_seconds"),
                 "-", "<= 5 s"])
    rows.append(["corpus_sensor tick", both(dig(run, "instigators", "corpus_sensor", "seconds")), "-", "<= 5 s"])
    previous = dig(gate, "previous_gate_seconds")
    rows.append(["retrain schedule gate", both(dig(run, "instigators", "retrain_schedule_gate", "seconds"), "gate_seconds",
                                               f", previous version {previous:,.2f} s" if previous else ""),
                 "-", "<= 5 s"])
    rows.append(["retrain schedule tick (gate + decision)", both(None, "schedule_tick_seconds"), "-", "<= 5 s"])
    growth = dig(run, "db_growth_bytes")
    scaled = (f"{growth / shards * p.corpus.shards / 2**30:,.2f} GiB (linear in shards; real runs add their step "
              "events)") if growth and shards else "-"
    rows.append(["PostgreSQL growth (backfill)", UNMEASURED if growth is None else f"{growth / 2**20:,.0f} MiB",
                 scaled, "-"])
    return rows


def saturation_table(p: Plan) -> list[list[str]]:
    """Each shared resource: what this corpus asks of it, against what it can give."""
    rows = [["resource", "demand", "limit", "verdict"]]
    phase, side = p.features_phase()
    rows.append(["CPU pool / GPU tokens (features phase)", hours(phase) if phase else UNMEASURED, side,
                 "the longest phase" if phase else UNMEASURED])
    rates = get_rates(p)
    if rates is None:
        rows.append(["object store", UNMEASURED, f"{PREFIX_LIMITS['GET']:,} GET / {PREFIX_LIMITS['PUT']:,} PUT per s "
                     "per prefix", UNMEASURED])
    for phase_name, rate in rates or []:
        over = rate / PREFIX_LIMITS["GET"]
        verdict = (f"{over:,.1f}x one prefix's limit: needs >= {math.ceil(over)} prefix partitions (S3 adds them "
                   "as load stays high; SlowDown answers until then, retried)") if over > 1 else "within one prefix"
        rows.append([f"object store GETs ({phase_name})", f"{rate:,.0f} GET/s",
                     f"{PREFIX_LIMITS['GET']:,} GET/s per prefix", verdict])
    manifest = next((r for r in request_rows(p) or [] if r["stage"] == "manifest"), None)
    if manifest:
        gets = request_classes(manifest["counts"])[1]
        rows.append(["manifest on S3 at the per-prefix GET limit", f"{gets:,.0f} GETs",
                     f"{PREFIX_LIMITS['GET']:,} GET/s per prefix", f">= {hours(gets / PREFIX_LIMITS['GET'])} per prefix "
                     "partition"])
    busy = p.cluster.cpu_runs + p.cluster.gpus
    run_minutes = p.stage("speaker_embeddings").run_minutes
    run = control_plane_run(p)
    measured = (dig(run, "runs_created") / dig(run, "all_runs_requested_s")
                if dig(run, "runs_created") and dig(run, "all_runs_requested_s") else None)
    if run_minutes:
        needed = busy / (run_minutes * 60)
        verdict = (UNMEASURED if measured is None else
                   f"{measured / needed:,.0f}x headroom" if measured >= needed else "the control plane saturates first")
        rows.append(["runs requested by the backfill daemon", f"{needed:.2f} runs/s keep {busy} runs busy",
                     UNMEASURED if measured is None else f"{measured:.1f} runs/s measured", verdict])
    growth, shards = dig(run, "db_growth_bytes"), dig(run, "partitions")
    if growth and shards:
        rows.append(["PostgreSQL", f"{growth / shards * p.corpus.shards / 2**30:,.2f} GiB for the backfill",
                     "the volume of the chart's PostgreSQL", "size the volume with headroom for run/step events"])
    return rows


# --- output -----------------------------------------------------------------------------------------

def render(rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows[1:]]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def report(p: Plan, markdown: bool) -> str:
    sections = [("Corpus and cluster", nodes_table(p)), ("Stages", stage_table(p)), ("Critical path", total_table(p)),
                ("Settings", settings_table(p)), ("Object store", object_store_table(p)),
                ("Control plane", control_plane_table(p)), ("What saturates", saturation_table(p))]
    out = []
    for title, rows in sections:
        out.append(f"#### {title}\n" if markdown else f"== {title}")
        out.append(render(rows, markdown))
        out.append("")
    return "\n".join(out)


def shards_per_run_in_code() -> int:
    """The default of ``COSYVOICE_SHARDS_PER_RUN`` in assets/_per_shard.py (read as text: no dagster import
    here, and the model describes the project's default, not this shell's environment)."""
    with open(os.path.join(REPO, "assets", "_per_shard.py")) as f:
        found = re.search(r"""COSYVOICE_SHARDS_PER_RUN["'],\s*["']?(\d+)""", f.read())
    if found is None:
        raise RuntimeError("assets/_per_shard.py no longer reads COSYVOICE_SHARDS_PER_RUN with a default; "
                           "update bench/capacity.py's shards_per_run_in_code")
    return int(found.group(1))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=100_000)
    ap.add_argument("--utterance_seconds", type=float, default=7.2, help="mean utterance length (100k h / 50M)")
    ap.add_argument("--utts_per_shard", type=int, default=1000)
    ap.add_argument("--shards_per_run", type=int, default=None,
                    help="default: SHARDS_PER_RUN of assets/_per_shard.py, raised until the backfill's runs are "
                         "requested within 10 min at the control-plane measurement's time per run")
    ap.add_argument("--utts_per_part", type=int, default=1_000_000, help="utterances per manifest partition")
    ap.add_argument("--speakers", type=int, default=10_000, help="speaker folders (each is one LIST page more)")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--cpu_cores", type=int, default=512)
    ap.add_argument("--reserved_cores", type=float, default=8, help="cores kept for the control plane")
    ap.add_argument("--step_cpu", type=float, default=2, help="CPU request of a step Job (STEP_K8S_CONFIG)")
    ap.add_argument("--run_pod_cpu", type=float, default=1, help="CPU request of a run pod (Helm runK8sConfig)")
    ap.add_argument("--gpu_step_cpu", type=float, default=8, help="CPU request of a GPU step (gpu_op_tags)")
    ap.add_argument("--results", default=os.path.join(REPO, "bench", "results"))
    ap.add_argument("--gpu_tokens_rate", type=float, default=None, help="audio s/s per GPU (given, not measured)")
    ap.add_argument("--gpu_train_tokens_per_s", type=float, default=None, help="tokens/s per GPU (given, not measured)")
    ap.add_argument("--text_tokens_per_s", type=float, default=0.0, help="text tokens per audio second in training")
    ap.add_argument("--price_put", type=float, default=0.005, help="$ per 1,000 PUT/COPY/POST/LIST")
    ap.add_argument("--price_get", type=float, default=0.0004, help="$ per 1,000 GET/HEAD")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--update_doc", nargs="?", const=os.path.join(REPO, "docs", "scaling.md"), default=None,
                    metavar="DOC", help="rewrite DOC's capacity block with its own command's output (other flags unused)")
    return ap


#: the block of a doc that holds this script's --markdown output, with the command that printed it
DOC_BLOCK = re.compile(r"(<!-- capacity: begin python bench/capacity.py (?P<argv>.*?) -->\n)(?P<body>.*?)"
                       r"(<!-- capacity: end -->)", re.S)


def doc_block(path: str) -> tuple[list[str], str]:
    """The arguments and the body of the capacity block in the doc at ``path``."""
    with open(path, encoding="utf-8") as f:
        match = DOC_BLOCK.search(f.read())
    if not match:
        raise SystemExit(f"{path}: no '<!-- capacity: begin python bench/capacity.py ... -->' block")
    return match["argv"].split(), match["body"]


#: the COSYVOICE_SHARDS_PER_RUN values the model chooses from
BATCH_STEPS = (8, 16, 25, 50, 100, 200, 250, 500, 1000)
#: the issue's goal for requesting every run of the shard backfill
REQUEST_GOAL_S = 600


def request_seconds_per_run(results: dict) -> float | None:
    """Wall time the backfill daemon took per run it requested, in the control-plane measurement."""
    run = (dig(results, "control_plane", "results") or [None])[0]
    if not dig(run, "runs_created") or not dig(run, "all_runs_requested_s"):
        return None
    return run["all_runs_requested_s"] / run["runs_created"]


def shards_per_run_for(shards: int, results: dict, default: int) -> int:
    """The project's default if the daemon requests that many runs within the goal at the measured time per run;
    else the smallest listed batch that does (fewer, larger runs: the control plane pays per run)."""
    per_run = request_seconds_per_run(results)
    if per_run is None:
        return default
    fitting = [b for b in sorted({default, *BATCH_STEPS})
               if b >= default and math.ceil(shards / b) * per_run <= REQUEST_GOAL_S]
    return fitting[0] if fitting else BATCH_STEPS[-1]


def compute(argv: list[str] | None) -> tuple[Plan, str]:
    args = parser().parse_args(argv)
    if not args.shards_per_run:
        shards = Corpus(args.hours, args.utterance_seconds, args.utts_per_shard, 1, args.utts_per_part).shards
        args.shards_per_run = shards_per_run_for(shards, load_results(args.results), shards_per_run_in_code())
    p = plan(args)
    return p, report(p, args.markdown)


def update_doc(path: str) -> bool:
    """Rewrite the capacity block of ``path`` with what its own command prints now; True if it changed."""
    argv, body = doc_block(path)
    fresh = compute(argv)[1].strip() + "\n"
    if fresh == body:
        return False
    with open(path, encoding="utf-8") as f:
        text = f.read()
    match = DOC_BLOCK.search(text)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text[:match.start("body")] + fresh + text[match.end("body"):])
    return True


def main(argv: list[str] | None = None) -> Plan | None:
    args = parser().parse_args(argv)
    if args.update_doc:
        print(f"{args.update_doc}: {'updated' if update_doc(args.update_doc) else 'already current'}")
        return None
    p, text = compute(argv)
    print(text)
    return p


if __name__ == "__main__":
    main()
