"""Object-store requests per stage, counted at an S3 endpoint (moto on 127.0.0.1) while the asset graph
runs on a small ``s3://`` corpus.

Every request that reaches the endpoint, from this process and from the stages' worker processes, is
classified (LIST, GET, HEAD, PUT, multipart, DELETE) and attributed to the stage running and to the
object's key with its numbers replaced by ``#`` (``data/speech_tokens/dev-clean/dev-clean-#.parquet``).
A key holding an utterance id is a per-utterance request, one holding a shard number a per-shard one;
the rest are per run (the per-shard assets run as ``--runs`` runs over the shard range, so a read of
``wav.scp`` per run shows as such) or per partition (the per-subset assets). Model reads are per shard
(each shard's extraction starts a worker pool whose workers each load the model: ``--workers`` loads). The manifest lists the
corpus one speaker folder at a time (one paginated listing each, 1000 keys a page), so its corpus LISTs
are per speaker folder. Each stage starts with fresh S3 clients and caches, as a stage's own pod does.
``bench/capacity.py`` scales these counts to a corpus.

There is no upstream baseline for requests; the printed check is the counts against the ones read
from the code (docs/scaling.md, "Object store"), a mismatch exits non-zero.

    python bench/object_store_requests.py [--speakers 4] [--utts_per_speaker 10] [--utts_per_shard 5]
                                          [--runs 2] [--json bench/results/object_store.json]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from urllib.parse import parse_qs, unquote

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.figures import write_figures  # noqa: E402

#: S3 lists at most this many keys per ListObjectsV2 page
LIST_PAGE_KEYS = 1000
_UTT = re.compile(r"#_#_#_#")
_SHARD = re.compile(r"-#\.|_#\.")  # <subset>-#.parquet, parquet_#.tar / utt2parquet_#.json


def classify(method: str, path: str, query: dict[str, list[str]], copy_source: bool) -> str:
    """The request type as S3 bills it (LIST/PUT/COPY/POST vs GET/HEAD; DELETE is free)."""
    has_key = "/" in path.strip("/")
    if method == "HEAD":
        return "HEAD"
    if method == "GET":
        return "GET" if has_key else "LIST"
    if method == "PUT":
        if "partNumber" in query:
            return "PUT_PART"
        return "COPY" if copy_source else ("PUT" if has_key else "CREATE_BUCKET")
    if method == "POST":
        if "uploads" in query:
            return "MPU_CREATE"
        if "uploadId" in query:
            return "MPU_COMPLETE"
        return "DELETE" if "delete" in query else "POST"
    return method


def key_pattern(path: str, query: dict[str, list[str]]) -> str:
    """The object key (a LIST: its prefix) without the bucket, every number replaced by ``#``."""
    parts = path.strip("/").split("/", 1)
    key = parts[1] if len(parts) > 1 else "prefix=" + (query.get("prefix") or [""])[0]
    return re.sub(r"[0-9]+", "#", key)


def unit_of(key: str, corpus_prefix: str) -> str:
    if key.startswith(f"prefix={corpus_prefix}/#"):
        return "speaker_folder"
    if key.startswith("models/"):  # each shard's extraction starts its own workers, and each loads the model
        return "shard"
    if _UTT.search(key):
        return "utterance"
    if _SHARD.search(key):
        return "shard"
    return "run"


class CountingS3:
    """moto's S3 app behind a WSGI middleware that counts ``(stage, type, key pattern)``."""

    def __init__(self):
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        self.app = DomainDispatcherApplication(create_backend_app)
        self.counts: Counter = Counter()
        self.stage = "setup"
        self.lock = threading.Lock()
        self.server = make_server("127.0.0.1", 0, self, threaded=True, request_handler=MotoRequestHandler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __call__(self, environ, start_response):
        path = unquote(environ.get("PATH_INFO", ""))
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        kind = classify(environ["REQUEST_METHOD"], path, query, "HTTP_X_AMZ_COPY_SOURCE" in environ)
        with self.lock:
            self.counts[(self.stage, kind, key_pattern(path, query))] += 1
        return self.app(environ, start_response)

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join()
        self.server.server_close()


def fresh_clients() -> None:
    """Forget every S3 client and listing cache of this process, as a stage's own pod starts without them."""
    import s3fs

    from cosyvoice import storage

    storage.use_environment({})  # drops the cached file systems
    s3fs.S3FileSystem.clear_instance_cache()


def run_graph(counter: CountingS3, bucket: str, utts_per_shard: int, runs: int, workers: int) -> list[str]:
    """The data path of ``tests/pipelines/test_s3_data_path.py``, one stage per run; returns the shard keys."""
    import dagster as dg

    from assets.features import speaker_embeddings, speaker_means, speech_tokens, upstream_feature_files
    from assets.manifest import manifest
    from assets.shards import parquet_shards, training_data_lists
    from pipelines.resources import CorpusResource, DataStore, ModelStore, TrainingResource

    # speech_tokens asks the training resource which recipe (so which speech tokenizer) it tokenizes for;
    # nothing is trained here, so its model dir is only named
    resources = {"corpus": CorpusResource(root=f"s3://{bucket}/LibriTTS"), "store": DataStore(root=f"s3://{bucket}/data"),
                 "models": ModelStore(root=f"s3://{bucket}/models"),
                 "training": TrainingResource(model_dir=os.path.join(tempfile.gettempdir(), "object_store_bench_llm"))}
    with dg.instance_for_test() as instance:
        def stage(name: str, assets: list, **kwargs) -> None:
            fresh_clients()
            counter.stage = name
            result = dg.materialize(assets, instance=instance, resources=resources, **kwargs)
            counter.stage = "between"
            if not result.success:
                raise RuntimeError(f"{name} failed")

        stage("manifest", [manifest], partition_key="dev-clean",
              run_config={"ops": {"manifest": {"config": {"utts_per_shard": utts_per_shard}}}})
        shards = sorted(instance.get_dynamic_partitions("shards"))
        size = math.ceil(len(shards) / runs)
        ranges = [(shards[i], shards[min(i + size, len(shards)) - 1]) for i in range(0, len(shards), size)]
        per_shard = [("speaker_embeddings", [speaker_embeddings], {"num_workers": workers}),
                     ("speech_tokens", [speech_tokens], {"num_workers": workers}),
                     ("speaker_means", [speaker_means], None), ("upstream_feature_files", [upstream_feature_files], None),
                     ("parquet_shards", [parquet_shards], {})]
        for name, assets, config in per_shard:
            if config is None:
                stage(name, assets, partition_key="dev-clean")
                continue
            for first, last in ranges:
                run_config = {"ops": {name: {"config": config}}} if config else None
                stage(name, assets, run_config=run_config, tags={"dagster/asset_partition_range_start": first,
                                                                 "dagster/asset_partition_range_end": last})
        stage("training_data_lists", [training_data_lists])
    return shards


def per_unit(counts: Counter, stage: str, units: dict[str, int], corpus_prefix: str) -> tuple[dict, list[dict]]:
    """``{unit: {type: requests per unit}}`` of one stage and its rows by key pattern."""
    rates: dict[str, Counter] = {}
    rows = []
    for (name, kind, key), count in sorted(counts.items()):
        if name != stage:
            continue
        unit = unit_of(key, corpus_prefix)
        if unit == "run" and stage in PARTITION_STAGES:
            unit = "partition"
        rate = count / units[unit]
        rates.setdefault(unit, Counter())[kind] += rate
        rows.append({"type": kind, "key": key, "count": count, "unit": unit, "per_unit": round(rate, 4)})
    return {u: {k: round(v, 4) for k, v in sorted(c.items())} for u, c in sorted(rates.items())}, rows


#: stages with one run per subset partition (their non-shard requests are per partition)
PARTITION_STAGES = ("manifest", "speaker_means", "upstream_feature_files", "training_data_lists")
STAGES = ("manifest", "speaker_embeddings", "speech_tokens", "speaker_means", "upstream_feature_files",
          "parquet_shards", "training_data_lists")
#: what reading the code says each per-shard stage costs per utterance (docs/scaling.md, "Object store")
EXPECTED_PER_UTTERANCE = {"manifest": {"GET": 2.0}, "speaker_embeddings": {"GET": 1.0}, "speech_tokens": {"GET": 1.0},
                          "parquet_shards": {"GET": 1.0}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speakers", type=int, default=4)
    parser.add_argument("--utts_per_speaker", type=int, default=10)
    parser.add_argument("--utts_per_shard", type=int, default=5)
    parser.add_argument("--runs", type=int, default=2, help="runs per per-shard asset (the shard range split)")
    parser.add_argument("--workers", type=int, default=2, help="feature worker processes (their requests count too)")
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args()
    import logging

    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log line per request

    from cosyvoice.corpus.synthetic import make_synthetic_corpus
    from cosyvoice.features.reference_models import make_reference_models

    counter = CountingS3()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "COSYVOICE_S3_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      COSYVOICE_S3_ENDPOINT_URL=counter.endpoint)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            corpus = make_synthetic_corpus(os.path.join(tmp, "LibriTTS"), subsets=["dev-clean"], speakers=args.speakers,
                                           utts_per_speaker=args.utts_per_speaker, seed=3)
            make_reference_models(os.path.join(tmp, "models"), seed=0, size="tiny")
            fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": counter.endpoint})
            bucket = "requests"
            fs.mkdir(bucket)
            fs.put(os.path.join(tmp, "LibriTTS", "dev-clean"), f"{bucket}/LibriTTS/", recursive=True)
            for name in ("campplus.onnx", "speech_tokenizer_v2.onnx"):
                fs.put(os.path.join(tmp, "models", name), f"{bucket}/models/{name}")
            objects = len(fs.find(f"{bucket}/LibriTTS/dev-clean"))
            shards = run_graph(counter, bucket, args.utts_per_shard, args.runs, args.workers)
    finally:
        counter.stop()
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    utterances = corpus.utterances
    runs = math.ceil(len(shards) / math.ceil(len(shards) / args.runs))
    units = {"utterance": utterances, "shard": len(shards), "run": runs, "partition": 1,
             "speaker_folder": args.speakers}
    results = {"benchmark": "object_store_requests", "command": " ".join(["python", *sys.argv]),
               "date": datetime.date.today().isoformat(), "utterances": utterances, "shards": len(shards),
               "runs_per_shard_stage": runs, "corpus_objects": objects, "speakers": args.speakers,
               "corpus_objects_per_utterance": round(objects / utterances, 4), "list_page_keys": LIST_PAGE_KEYS,
               "seconds": round(time.perf_counter() - started, 1), "stages": {}}
    print(f"corpus: {utterances} utterances, {objects} objects, {len(shards)} shards, {runs} run(s) per shard stage")
    print(f"{'stage':24s} {'unit':12s} requests per unit")
    mismatches = []
    for stage in STAGES:
        rates, rows = per_unit(counter.counts, stage, {**units, "run": runs if stage not in PARTITION_STAGES else 1},
                               "LibriTTS/dev-clean")
        results["stages"][stage] = {"per": rates, "by_key": rows}
        for unit, kinds in rates.items():
            print(f"{stage:24s} {unit:12s} " + ", ".join(f"{k} {v:g}" for k, v in kinds.items()))
        for kind, want in EXPECTED_PER_UTTERANCE.get(stage, {}).items():
            got = rates.get("utterance", {}).get(kind, 0.0)
            if abs(got - want) > 1e-9:
                mismatches.append(f"{stage}: {got:g} {kind} per utterance, the code says {want:g}")
    print("counts as read from the code" if not mismatches else "MISMATCH: " + "; ".join(mismatches))
    if args.json:
        write_figures(args.json, results)
    sys.exit(1 if mismatches else 0)


if __name__ == "__main__":
    main()
