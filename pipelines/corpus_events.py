"""The corpus sensor's event mode: S3 notifications on an SQS queue instead of a listing per tick.

Selected by ``COSYVOICE_CORPUS_EVENTS_QUEUE_URL`` (unset: the listing mode). The queue client takes
its endpoint from ``AWS_ENDPOINT_URL_SQS`` or ``AWS_ENDPOINT_URL`` and its region from
``AWS_REGION`` / ``AWS_DEFAULT_REGION`` (else the queue URL's), credentials as boto3 reads them.

A tick receives at most ``max_messages`` messages within ``time_budget_s`` (``receivers`` threads,
10 messages a call, short waits), plans them (:class:`cosyvoice.corpus.events.TickPlan`) and returns
one ``prepare_subset`` request per affected manifest partition together with the advanced cursor. Messages are deleted
only when the stored cursor already covers them, so no event is lost between a receive and the
daemon committing the requests:

* a message whose events are all irrelevant (test event, foreign key) or already covered is
  deleted in the tick that receives it;
* a message with new events stays on the queue, invisible for ``visibility_timeout_s``; when it
  comes back, a later tick finds it covered by the cursor stored with its request and deletes it.
  If the tick that requested it was never committed (daemon crash, timeout), it requests again
  under the same run key, so no event is lost and no run is doubled.

The cost: every relevant message is received twice (SQS charges per request; 10 per call) and
the queue holds a tick's messages until the next tick that follows their visibility timeout.
Messages that are not S3 notifications stay on the queue and are logged each time; give the queue
a redrive policy (``maxReceiveCount`` >= 5) so they end in a dead-letter queue.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import dagster as dg

from cosyvoice.corpus.events import EventCursor, EventRouter, QueueMessage, TickPlan

QUEUE_ENV = "COSYVOICE_CORPUS_EVENTS_QUEUE_URL"
_ENDPOINT_VARS = ("AWS_ENDPOINT_URL_SQS", "AWS_ENDPOINT_URL")
_AWS_QUEUE_HOST = re.compile(r"^https?://sqs[.-]([a-z0-9-]+)\.amazonaws\.com", re.IGNORECASE)
#: SQS' limits: messages per receive/delete call, visibility timeout, long-poll wait
_BATCH = 10
_MAX_VISIBILITY_S = 12 * 3600
_MAX_WAIT_S = 20


@dataclass(frozen=True)
class CorpusEventSettings:
    """The event mode's settings, from ``COSYVOICE_CORPUS_EVENTS_*`` (see :meth:`from_env`)."""

    queue_url: str
    visibility_timeout_s: int = 120
    max_messages: int = 20_000
    time_budget_s: float = 30.0
    wait_s: int = 1
    receivers: int = 4

    def __post_init__(self):
        if not self.queue_url.startswith(("http://", "https://")):
            raise ValueError(f"{QUEUE_ENV}={self.queue_url!r} is not an SQS queue URL (https://sqs.<region>."
                             "amazonaws.com/<account>/<queue>)")
        if not 0 < self.time_budget_s < self.visibility_timeout_s <= _MAX_VISIBILITY_S:
            raise ValueError(f"COSYVOICE_CORPUS_EVENTS_VISIBILITY_S ({self.visibility_timeout_s}) must exceed "
                             f"COSYVOICE_CORPUS_EVENTS_TIME_BUDGET_S ({self.time_budget_s} > 0), or one tick "
                             f"receives its own messages twice; SQS allows at most {_MAX_VISIBILITY_S} s")
        if self.max_messages < _BATCH or not 0 <= self.wait_s <= _MAX_WAIT_S or not 1 <= self.receivers <= 32:
            raise ValueError(f"COSYVOICE_CORPUS_EVENTS_MAX_MESSAGES must be >= {_BATCH} (got {self.max_messages}), "
                             f"COSYVOICE_CORPUS_EVENTS_WAIT_S within 0-{_MAX_WAIT_S} (got {self.wait_s}) and "
                             f"COSYVOICE_CORPUS_EVENTS_RECEIVERS within 1-32 (got {self.receivers})")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> CorpusEventSettings | None:
        """None when ``COSYVOICE_CORPUS_EVENTS_QUEUE_URL`` is unset or empty (the listing mode)."""
        url = environ.get(QUEUE_ENV, "").strip()
        if not url:
            return None

        def number(name: str, default, kind=int):
            value = environ.get(f"COSYVOICE_CORPUS_EVENTS_{name}", "").strip()
            try:
                return kind(value) if value else default
            except ValueError:
                raise ValueError(f"COSYVOICE_CORPUS_EVENTS_{name}={value!r} is not a number") from None

        return cls(url, visibility_timeout_s=number("VISIBILITY_S", cls.visibility_timeout_s),
                   max_messages=number("MAX_MESSAGES", cls.max_messages),
                   time_budget_s=number("TIME_BUDGET_S", cls.time_budget_s, float),
                   wait_s=number("WAIT_S", cls.wait_s), receivers=number("RECEIVERS", cls.receivers))


def sqs_client(queue_url: str, environ: Mapping[str, str] = os.environ):
    """A boto3 SQS client for ``queue_url``: endpoint and region from the environment (the region
    falls back to the one in an AWS queue URL, then ``us-east-1``)."""
    import boto3

    endpoint = next((environ[v] for v in _ENDPOINT_VARS if environ.get(v)), None)
    host_region = _AWS_QUEUE_HOST.match(queue_url)
    region = (environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
              or (host_region.group(1) if host_region else "us-east-1"))
    return boto3.client("sqs", endpoint_url=endpoint, region_name=region)


@dataclass
class Consumed:
    """What one tick took from the queue: messages received, and deletions the queue refused."""

    received: int = 0
    refused: list[str] = field(default_factory=list)


class CorpusEventQueue:
    """Receives and deletes the notifications on one SQS queue, within a tick's bounds."""

    def __init__(self, settings: CorpusEventSettings, client=None, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.client = client if client is not None else sqs_client(settings.queue_url)
        self._clock = clock

    def consume(self, take: Callable[[QueueMessage], bool]) -> Consumed:
        """Receive with ``receivers`` threads (10 messages a call) until the queue answers empty,
        ``max_messages`` were taken or ``time_budget_s`` is spent. ``take`` sees each message once
        (under a lock) and says whether it may be deleted now; those are deleted per received batch,
        the rest stay invisible for ``visibility_timeout_s``. Messages over the cap are not taken:
        they come back after their visibility timeout."""
        s = self.settings
        deadline = self._clock() + s.time_budget_s
        lock = threading.Lock()
        seen: set[str] = set()
        consumed = Consumed()

        def receiver() -> None:
            while self._clock() < deadline:
                with lock:
                    room = s.max_messages - len(seen)
                if room <= 0:
                    return
                batch = self.client.receive_message(
                    QueueUrl=s.queue_url, MaxNumberOfMessages=min(_BATCH, room),
                    VisibilityTimeout=s.visibility_timeout_s, WaitTimeSeconds=s.wait_s).get("Messages", [])
                if not batch:
                    return
                deletable = []
                with lock:
                    for m in batch:
                        if m["MessageId"] in seen or len(seen) >= s.max_messages:
                            continue  # delivered twice in this tick (at least once), or over the cap
                        seen.add(m["MessageId"])
                        message = QueueMessage(m["MessageId"], m["Body"], m["ReceiptHandle"])
                        if take(message):
                            deletable.append(message)
                refused = self.delete(deletable)
                with lock:
                    consumed.refused += refused

        with ThreadPoolExecutor(s.receivers, thread_name_prefix="corpus-events") as pool:
            for future in [pool.submit(receiver) for _ in range(s.receivers)]:
                future.result()
        consumed.received = len(seen)
        return consumed

    def delete(self, messages: Sequence[QueueMessage]) -> list[str]:
        """Delete ``messages`` (10 per call); returns ``"<message id>: <reason>"`` for each the queue
        refused (it comes back after its visibility timeout and is deleted by a later tick)."""
        failed: list[str] = []
        for start in range(0, len(messages), _BATCH):
            chunk = messages[start:start + _BATCH]
            answer = self.client.delete_message_batch(
                QueueUrl=self.settings.queue_url,
                Entries=[{"Id": str(i), "ReceiptHandle": m.receipt} for i, m in enumerate(chunk)])
            failed += [f"{chunk[int(f['Id'])].message_id}: {f.get('Code')} {f.get('Message', '')}".strip()
                       for f in answer.get("Failed", [])]
        return failed


def run_requests(plan: TickPlan) -> list[dg.RunRequest]:
    """One ``prepare_subset`` request per partition, keyed by its events (see ``PartitionChange.run_key``)."""
    return [dg.RunRequest(partition_key=c.partition, run_key=c.run_key,
                          tags={"cosyvoice/corpus_trigger": "s3_events",
                                "cosyvoice/corpus_events": str(len(c.events)),
                                "cosyvoice/corpus_events_until": c.watermark.isoformat()})
            for c in sorted(plan.changes.values(), key=lambda c: c.partition)]


def corpus_events_tick(context: dg.SensorEvaluationContext, corpus_root: str, settings: CorpusEventSettings, *,
                       partitions: Sequence[str], parts: Mapping[str, list[str]],
                       queue: CorpusEventQueue | None = None) -> dg.SensorResult:
    """One tick of the event mode (see the module docstring): receive, plan, delete what is
    covered, log what was ignored and why, request the stale manifest partitions."""
    plan = TickPlan(EventCursor.from_json(context.cursor), EventRouter.for_root(corpus_root, partitions, parts))
    consumed = (queue or CorpusEventQueue(settings)).consume(plan.add)
    log = context.log
    for message, error in plan.malformed:
        log.error(f"queue message {message.message_id} is not an S3 event notification, left on the queue for its "
                  f"dead-letter queue: {error}; body starts {message.body[:200]!r}")
    if plan.ignored.counts:
        log.warning(f"{sum(plan.ignored.counts.values())} event(s) need no manifest run: {plan.ignored.summary()}")
    if consumed.refused:
        log.warning(f"the queue refused {len(consumed.refused)} deletion(s); they return and a later tick deletes "
                    f"them: {consumed.refused[:3]}")
    for change in sorted(plan.changes.values(), key=lambda c: c.partition):
        log.info(f"{change.partition}: {len(change.events)} new event(s) ({change.removed} removal(s)) "
                 f"up to {change.watermark.isoformat()}")
    summary = (f"{consumed.received} message(s): {len(plan.changes)} partition(s) changed, "
               f"{plan.covered_events} event(s) already covered, {len(plan.delete)} message(s) deleted, "
               f"{len(plan.keep)} kept until covered, {len(plan.malformed)} malformed")
    log.info(summary)
    requests = run_requests(plan)
    if not requests:
        return dg.SensorResult(skip_reason=dg.SkipReason(f"no corpus changes ({summary})"),
                               cursor=plan.cursor.to_json())
    return dg.SensorResult(run_requests=requests, cursor=plan.cursor.to_json())
