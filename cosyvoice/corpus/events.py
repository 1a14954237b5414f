"""Corpus change events: S3 object notifications -> the manifest partitions whose manifest is stale.

At 50 million objects a listing per sensor tick is hours of LIST calls. Instead, the bucket sends
``s3:ObjectCreated:*`` / ``s3:ObjectRemoved:*`` notifications to a queue, and each tick turns the
messages received since the last one into at most one request per affected manifest partition
(:func:`plan_tick`). This module is the queue-independent part: parsing the messages (the direct
S3 -> SQS body and the SNS envelope), mapping object keys to partitions (subset = first folder
below the corpus root, speaker folder = second, split subsets via :mod:`cosyvoice.corpus.parts`)
and deciding which messages may be deleted.

Redelivery without a growing cursor: the cursor keeps, per partition, the latest S3 ``eventTime``
of the events a committed request covered (:class:`EventCursor`). A request makes the manifest
list the subset *after* those events were delivered, so any event of that partition at or before
the watermark is already covered, whenever it is delivered again and whatever message carries it;
such events request nothing and their messages can be deleted. The cursor stays one timestamp per
partition however many messages flow.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import unquote_plus

from cosyvoice import storage
from cosyvoice.corpus.parts import partition_for

#: files whose appearance, change or removal means the subset's manifest is out of date
CORPUS_SUFFIXES = (".wav", ".normalized.txt")
#: S3 event names (without ``s3:``) that change what a listing of the corpus returns
CHANGE_EVENTS = ("ObjectCreated:", "ObjectRemoved:", "LifecycleExpiration:")

# why an event (or a whole message) needs no manifest run; each is logged with a count and examples
TEST_EVENT = "s3_test_event"
OTHER_EVENT_TYPE = "not_a_create_or_remove_event"
OTHER_BUCKET = "other_bucket"
OUTSIDE_ROOT = "outside_corpus_root"
NOT_CORPUS_FILE = "not_a_corpus_file"
UNKNOWN_SUBSET = "unknown_subset"
ORPHAN_SPEAKER = "speaker_folder_in_no_part"


class MalformedMessage(ValueError):
    """A queue message that is neither an S3 event notification nor an SNS envelope of one."""


@dataclass(frozen=True)
class ObjectEvent:
    """One S3 event record: ``key`` is URL-decoded; ``sequencer`` orders the events of one key
    (S3's ``s3.object.sequencer``; the eTag or the event time when a sender gives none)."""

    bucket: str
    key: str
    name: str
    time: datetime
    sequencer: str

    @property
    def identity(self) -> str:
        """The same change, however often and in whatever message it is delivered."""
        return f"{self.key}\t{self.name}\t{self.sequencer}"


@dataclass(frozen=True)
class ParsedMessage:
    """The object events of one message, and what it carried that is not an object event."""

    events: list[ObjectEvent]
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (reason, detail)


def parse_message(body: str) -> ParsedMessage:
    """Parse one queue message body: ``{"Records": [...]}`` as S3 sends it, the same inside an SNS
    envelope (``{"Type": "Notification", "Message": "<json>"}``), or the ``s3:TestEvent`` S3 sends
    when a notification is configured. Raises :class:`MalformedMessage` for anything else."""
    try:
        doc = json.loads(body)
        if isinstance(doc, dict) and doc.get("Type") == "Notification" and isinstance(doc.get("Message"), str):
            doc = json.loads(doc["Message"])
    except (TypeError, ValueError) as exc:
        raise MalformedMessage(f"not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise MalformedMessage(f"expected a JSON object, got {type(doc).__name__}")
    if doc.get("Event") == "s3:TestEvent":
        return ParsedMessage([], [(TEST_EVENT, f"bucket {doc.get('Bucket', '?')}")])
    records = doc.get("Records")
    if not isinstance(records, list):
        raise MalformedMessage(f"no 'Records' list (keys: {sorted(doc)[:8]})")
    parsed = ParsedMessage([])
    for record in records:
        name = str(record.get("eventName", "")) if isinstance(record, dict) else ""
        name = name[len("s3:"):] if name.startswith("s3:") else name
        if not name.startswith(CHANGE_EVENTS):
            parsed.ignored.append((OTHER_EVENT_TYPE, name or repr(record)[:80]))
            continue
        parsed.events.append(_object_event(record, name))
    return parsed


def _object_event(record: dict, name: str) -> ObjectEvent:
    try:
        s3 = record["s3"]
        obj = s3["object"]
        bucket = s3["bucket"]["name"]
        key = unquote_plus(obj["key"])
        time = datetime.fromisoformat(record["eventTime"]).astimezone(timezone.utc)
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedMessage(f"S3 record without bucket, key or a valid eventTime ({type(exc).__name__}: "
                               f"{exc})") from exc
    sequencer = str(obj.get("sequencer") or obj.get("eTag") or obj.get("versionId") or record["eventTime"])
    return ObjectEvent(bucket=bucket, key=key, name=name, time=time, sequencer=sequencer)


@dataclass(frozen=True)
class EventRouter:
    """Maps an object event to the manifest partition it makes stale, or to the reason it does not
    (``route`` returns ``(partition, None)`` or ``(None, reason)``).

    ``partitions`` are the manifest partition keys that exist (a split subset's part keys);
    ``parts`` is the ``COSYVOICE_SUBSET_PARTS`` split (:func:`cosyvoice.corpus.parts.parts_from_env`)."""

    bucket: str
    prefix: str  # the corpus root's key prefix, "" or ending in "/"
    partitions: frozenset[str]
    parts: Mapping[str, list[str]] = field(default_factory=dict)

    @classmethod
    def for_root(cls, corpus_root: str, partitions: Collection[str],
                 parts: Mapping[str, list[str]] | None = None) -> EventRouter:
        if storage.protocol_of(corpus_root) not in ("s3", "s3a"):
            raise ValueError(f"corpus root {corpus_root!r}: S3 event notifications need an s3:// corpus root "
                             f"(unset COSYVOICE_CORPUS_EVENTS_QUEUE_URL to list a local corpus instead)")
        bucket, _, prefix = storage.strip_protocol(corpus_root).strip("/").partition("/")
        return cls(bucket, f"{prefix}/" if prefix else "", frozenset(partitions), dict(parts or {}))

    def route(self, event: ObjectEvent) -> tuple[str | None, str | None]:
        if event.bucket != self.bucket:
            return None, OTHER_BUCKET
        if not event.key.startswith(self.prefix):
            return None, OUTSIDE_ROOT
        if not event.key.endswith(CORPUS_SUFFIXES):
            return None, NOT_CORPUS_FILE
        folders = event.key[len(self.prefix):].split("/")
        subset = folders[0]
        if len(folders) < 2 or (subset not in self.partitions and subset not in self.parts):
            return None, UNKNOWN_SUBSET
        speaker = folders[1] if len(folders) > 2 else ""  # a file right below the subset: no speaker folder
        partition = partition_for(subset, speaker, self.parts)
        if partition is None:
            return None, ORPHAN_SPEAKER
        if partition not in self.partitions:
            return None, UNKNOWN_SUBSET
        return partition, None


@dataclass(frozen=True)
class QueueMessage:
    """One received message; ``receipt`` is what the queue needs to delete it."""

    message_id: str
    body: str
    receipt: str = ""


@dataclass
class PartitionChange:
    """The new events of one manifest partition in one tick: one run request."""

    partition: str
    events: dict[str, ObjectEvent] = field(default_factory=dict)  # identity -> event

    def add(self, event: ObjectEvent) -> None:
        self.events.setdefault(event.identity, event)

    @property
    def watermark(self) -> datetime:
        return max(e.time for e in self.events.values())

    @property
    def removed(self) -> int:
        return sum(1 for e in self.events.values() if not e.name.startswith("ObjectCreated:"))

    @property
    def run_key(self) -> str:
        """The same set of events gives the same key (the daemon then starts no second run)."""
        digest = hashlib.sha256("\n".join(sorted(self.events)).encode()).hexdigest()
        return f"{self.partition}@{digest[:20]}"


#: the cursor's marker, so that the listing mode's cursor (``{subset: fingerprint}``) is never misread
EVENT_CURSOR_MODE = "events"


@dataclass
class EventCursor:
    """Per manifest partition, the latest event time that a committed request covers."""

    covered: dict[str, datetime] = field(default_factory=dict)

    def covers(self, partition: str, event: ObjectEvent) -> bool:
        mark = self.covered.get(partition)
        return mark is not None and event.time <= mark

    def advanced(self, changes: Iterable[PartitionChange]) -> EventCursor:
        covered = dict(self.covered)
        for change in changes:
            covered[change.partition] = max(change.watermark, covered.get(change.partition, change.watermark))
        return EventCursor(covered)

    def to_json(self) -> str:
        return json.dumps({"mode": EVENT_CURSOR_MODE,
                           "covered": {k: v.isoformat() for k, v in sorted(self.covered.items())}})

    @classmethod
    def from_json(cls, text: str | None) -> EventCursor:
        """The stored cursor; empty for none, or for the listing mode's cursor (switching modes
        starts the event mode afresh)."""
        doc = json.loads(text) if text else {}
        if not isinstance(doc, dict) or doc.get("mode") != EVENT_CURSOR_MODE:
            return cls()
        return cls({k: datetime.fromisoformat(v) for k, v in doc.get("covered", {}).items()})


def is_event_cursor(doc: object) -> bool:
    """Whether a decoded sensor cursor is the event mode's (the listing mode then starts afresh)."""
    return isinstance(doc, dict) and doc.get("mode") == EVENT_CURSOR_MODE


@dataclass
class IgnoredEvents:
    """Events and messages that need no run, by reason, with a few examples for the log."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, detail: str, keep_examples: int = 3) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < keep_examples:
            shown.append(detail)

    def summary(self) -> str:
        return "; ".join(f"{reason}: {n} (e.g. {', '.join(self.examples[reason])})"
                         for reason, n in sorted(self.counts.items()))


@dataclass
class TickPlan:
    """What one tick does with the messages it receives, message by message (:meth:`add`), so a
    message can be deleted as soon as it is received when nothing in it is new.

    ``changes``: one run request per partition. ``delete``: messages safe to delete now (every event
    in them is irrelevant or covered by the ``stored`` cursor). ``keep``: messages with new events;
    a later tick deletes them, once the cursor that covers them was stored with the requests.
    ``malformed``: left on the queue (its redrive policy moves them to a dead-letter queue)."""

    stored: EventCursor
    router: EventRouter
    changes: dict[str, PartitionChange] = field(default_factory=dict)
    delete: list[QueueMessage] = field(default_factory=list)
    keep: list[QueueMessage] = field(default_factory=list)
    malformed: list[tuple[QueueMessage, str]] = field(default_factory=list)
    ignored: IgnoredEvents = field(default_factory=IgnoredEvents)
    covered_events: int = 0

    def add(self, message: QueueMessage) -> bool:
        """Take ``message`` into the plan; True when it may be deleted now."""
        try:
            parsed = parse_message(message.body)
        except MalformedMessage as exc:
            self.malformed.append((message, str(exc)))
            return False
        for reason, detail in parsed.ignored:
            self.ignored.add(reason, detail)
        new = False
        for event in parsed.events:
            partition, reason = self.router.route(event)
            if partition is None:
                self.ignored.add(reason or "", f"s3://{event.bucket}/{event.key}")
            elif self.stored.covers(partition, event):
                self.covered_events += 1
            else:
                self.changes.setdefault(partition, PartitionChange(partition)).add(event)
                new = True
        (self.keep if new else self.delete).append(message)
        return not new

    @property
    def cursor(self) -> EventCursor:
        """The cursor to store with this tick's requests."""
        return self.stored.advanced(self.changes.values())


def plan_tick(messages: Iterable[QueueMessage], cursor: EventCursor, router: EventRouter) -> TickPlan:
    """Group the messages' events into one change per manifest partition, skipping what ``cursor``
    already covers, and sort the messages into delete-now, keep-until-covered and malformed."""
    plan = TickPlan(cursor, router)
    for message in messages:
        plan.add(message)
    return plan
