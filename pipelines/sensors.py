"""Sensors: new corpus data -> manifest runs -> shard backfills; failed runs -> log and webhook.

* ``corpus_sensor`` lists the corpus root (one paginated listing per subset on S3, a directory walk
  locally; no per-file requests) and fingerprints each manifest partition (a LibriTTS subset, or
  a part of one split by speaker folder) by the path, size and version (S3 ETag / local mtime) of
  its audio and transcripts. A partition that appears or whose fingerprint changed gets a
  ``prepare_subset`` run; the cursor keeps the fingerprints. With
  ``COSYVOICE_CORPUS_EVENTS_QUEUE_URL`` set it lists nothing: it reads the bucket's S3
  ObjectCreated/ObjectRemoved notifications from that SQS queue and requests each manifest
  partition they touch once per tick (``pipelines/corpus_events.py``), for corpora too big to list.
* ``prepare_subset_shards`` picks up successful ``prepare_subset`` runs (cursor: their update time):
  the manifest registered the subset's shard partitions, so it requests one asset backfill over
  exactly those shards (and the subset's per-subset assets). The backfill honours each asset's
  BackfillPolicy and pools.
* ``report_run_failures`` logs every failed run of this code location and, when
  ``COSYVOICE_ALERT_WEBHOOK_URL`` is set, POSTs a JSON message (Slack/Mattermost/Teams-compatible
  ``text`` plus structured fields) to it.
"""

import hashlib
import json
import os
import urllib.request
from collections.abc import Mapping
from datetime import datetime, timezone

import dagster as dg
from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset

from cosyvoice import storage
from cosyvoice.corpus.events import CORPUS_SUFFIXES, is_event_cursor
from cosyvoice.corpus.parts import PARTS_ENV, SubsetPart, partition_for, parts_from_env
from cosyvoice.corpus.shard_plan import ShardKey
from pipelines.corpus_events import CorpusEventSettings, corpus_events_tick
from pipelines.jobs import SHARD_ASSETS, SUBSET_ASSETS, prepare_subset
from pipelines.partitions import SHARDS, SUBSETS
from pipelines.resources import CorpusResource

CORPUS_SENSOR_INTERVAL_S = int(os.environ.get("COSYVOICE_CORPUS_SENSOR_INTERVAL_S", "600"))
WEBHOOK_ENV = "COSYVOICE_ALERT_WEBHOOK_URL"


def subset_fingerprints(subset_url: str, subset: str, parts: Mapping[str, list[str]]
                        ) -> tuple[dict[str, tuple[str, int]], list[str]]:
    """From one listing of the subset, per manifest partition (the subset, or each part of a subset
    split by ``COSYVOICE_SUBSET_PARTS``): (sha256 over the sorted ``relative path, size, version``
    lines of its corpus files, file count); plus the speaker folders that no part takes. The version
    is the object's ETag on S3 and the mtime in nanoseconds locally, so a file rewritten in place with
    the same size still changes the fingerprint."""
    fs = storage.filesystem(subset_url)
    root = storage.strip_protocol(subset_url).rstrip("/")
    digests: dict[str, tuple] = {}
    orphans: set[str] = set()
    for path, info in sorted(fs.find(root, detail=True).items()):
        if info.get("type", "file") != "file" or not path.endswith(CORPUS_SUFFIXES):
            continue
        relative = path[len(root):]
        folders = relative.lstrip("/").split("/")
        partition = partition_for(subset, folders[0] if len(folders) > 1 else "", parts)
        if partition is None:
            orphans.add(folders[0])
            continue
        digest, count = digests.get(partition) or (hashlib.sha256(), 0)
        version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
        digest.update(f"{relative}\t{info.get('size')}\t{version}\n".encode())
        digests[partition] = (digest, count + 1)
    return {p: (d.hexdigest(), n) for p, (d, n) in digests.items()}, sorted(orphans)


def present_subsets(corpus_root: str) -> list[str]:
    """The subsets of the manifest partitions (a split subset's parts name it) that have a folder
    under the corpus root (other folders are ignored)."""
    fs = storage.filesystem(corpus_root)
    root = storage.strip_protocol(corpus_root).rstrip("/")
    if not fs.exists(root):
        return []
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
    subsets = dict.fromkeys(SubsetPart.parse(key).subset for key in SUBSETS.get_partition_keys())
    return [s for s in subsets if s in names]


@dg.sensor(
    job=prepare_subset,
    minimum_interval_seconds=CORPUS_SENSOR_INTERVAL_S,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Requests prepare_subset (the manifest) for corpus subsets that are new or whose audio changed: "
                "by listing them, or from S3 notifications on the SQS queue $COSYVOICE_CORPUS_EVENTS_QUEUE_URL.",
)
def corpus_sensor(context: dg.SensorEvaluationContext, corpus: CorpusResource) -> dg.SensorResult:
    events = CorpusEventSettings.from_env()
    if events is not None:
        return corpus_events_tick(context, corpus.root, events, partitions=SUBSETS.get_partition_keys(),
                                  parts=parts_from_env())
    known: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    if is_event_cursor(known):
        known = {}  # the event mode ran before: list everything afresh
    current = dict(known)
    requests = []
    parts, partitions = parts_from_env(), set(SUBSETS.get_partition_keys())
    for subset in present_subsets(corpus.root):
        fingerprints, orphans = subset_fingerprints(corpus.subset_url(subset), subset, parts)
        if orphans:
            context.log.warning(f"{subset}: speaker folder(s) {orphans[:5]} belong to no part of {PARTS_ENV} "
                                f"{parts[subset]}; no manifest covers them (the manifest of a part fails on them)")
        for partition, (fingerprint, files) in sorted(fingerprints.items()):
            if partition not in partitions:
                context.log.warning(f"{partition}: not a manifest partition of this code location ({PARTS_ENV} "
                                    "differs between the sensor and the definitions?)")
                continue
            if known.get(partition) == fingerprint:
                continue
            change = "new subset" if partition not in known else "audio or transcripts changed"
            context.log.info(f"{partition}: {change} ({files} files, fingerprint {fingerprint[:12]})")
            current[partition] = fingerprint
            requests.append(dg.RunRequest(partition_key=partition, run_key=f"{partition}@{fingerprint[:20]}",
                                          tags={"cosyvoice/corpus_fingerprint": fingerprint,
                                                "cosyvoice/corpus_files": str(files)}))
    if not requests:
        return dg.SensorResult(skip_reason=dg.SkipReason("no new or changed corpus subsets"), cursor=json.dumps(current))
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(current, sort_keys=True))


def shard_backfill_subset(asset_graph, subset: str, shards: list[str]) -> AssetGraphSubset:
    """What a prepared subset still needs: the shard assets for its shards plus its per-subset assets. Built
    as one partitions subset per asset: a subset of 25k shards is not 75k (asset, partition) objects."""
    wanted = {a.key: shards for a in SHARD_ASSETS} | {a.key: [subset] for a in SUBSET_ASSETS}
    return AssetGraphSubset(partitions_subsets_by_asset_key={
        key: asset_graph.get(key).partitions_def.subset_with_partition_keys(keys) for key, keys in wanted.items()})


@dg.sensor(
    asset_selection=[*SHARD_ASSETS, *SUBSET_ASSETS],
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="After a successful prepare_subset run, backfills features, speaker means and parquet shards "
                "for exactly that subset's shards.",
)
def prepare_subset_shards(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    """Cursor: the update time of the last ``prepare_subset`` run handled. A RunRequest carrying an
    asset graph subset is submitted by the sensor daemon as one asset backfill (the mechanism
    declarative automation uses), so BackfillPolicy and pools apply and the graph's order is kept."""
    after = float(context.cursor) if context.cursor else 0.0
    records = context.instance.get_run_records(
        filters=dg.RunsFilter(job_name=prepare_subset.name, statuses=[dg.DagsterRunStatus.SUCCESS],
                              updated_after=datetime.fromtimestamp(after, tz=timezone.utc)),
        order_by="update_timestamp", ascending=True, limit=50)
    records = [r for r in records if r.update_timestamp.timestamp() > after]
    if not records:
        return dg.SensorResult(skip_reason=dg.SkipReason("no new successful prepare_subset runs"), cursor=context.cursor)
    shards_by_subset: dict[str, list[str]] = {}
    for key in context.instance.get_dynamic_partitions(SHARDS.name):
        shards_by_subset.setdefault(ShardKey.parse(key).subset, []).append(key)
    requests = []
    for record in records:
        run = record.dagster_run
        subset = run.tags.get("dagster/partition")
        shards = shards_by_subset.get(subset or "", [])
        if not shards:
            context.log.warning(f"run {run.run_id}: {subset} has no shard partitions (every utterance quarantined?)")
            continue
        context.log.info(f"{subset}: backfilling {len(shards)} shard(s) after run {run.run_id}")
        requests.append(dg.RunRequest.for_asset_graph_subset(
            shard_backfill_subset(context.repository_def.asset_graph, subset, shards),
            tags={"cosyvoice/subset": subset, "cosyvoice/after_run": run.run_id}))
    return dg.SensorResult(run_requests=requests, cursor=str(records[-1].update_timestamp.timestamp()))


def failure_message(context: dg.RunFailureSensorContext) -> dict:
    run = context.dagster_run
    steps = sorted({e.step_key for e in context.get_step_failure_events() if e.step_key})
    partition = run.tags.get("dagster/partition") or (
        f"{run.tags['dagster/asset_partition_range_start']}...{run.tags['dagster/asset_partition_range_end']}"
        if "dagster/asset_partition_range_start" in run.tags else None)
    ui = os.environ.get("COSYVOICE_UI_URL", "").rstrip("/")
    link = f"{ui}/runs/{run.run_id}" if ui else run.run_id
    text = (f"Dagster run failed: job {run.job_name}" + (f", partition {partition}" if partition else "")
            + (f", steps {', '.join(steps)}" if steps else "") + f" -- {context.failure_event.message} ({link})")
    return {"text": text, "run_id": run.run_id, "job": run.job_name, "partition": partition, "steps": steps,
            "error": context.failure_event.message, "backfill": run.tags.get("dagster/backfill")}


def post_webhook(url: str, payload: dict, timeout_s: float = 10.0) -> int:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 (URL from operator config)
        return response.status


@dg.run_failure_sensor(
    name="report_run_failures",
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=f"Logs failed runs; POSTs them to ${WEBHOOK_ENV} when set.",
)
def report_run_failures(context: dg.RunFailureSensorContext) -> None:
    payload = failure_message(context)
    context.log.error(payload["text"])
    url = os.environ.get(WEBHOOK_ENV)
    if url:
        try:
            status = post_webhook(url, payload)
        except OSError as exc:  # the sensor tick shows this; the run's failure is still logged above
            raise RuntimeError(f"{WEBHOOK_ENV}: POST of the failure of run {payload['run_id']} failed: {exc}") from exc
        context.log.info(f"failure of run {payload['run_id']} posted to the webhook (HTTP {status})")
