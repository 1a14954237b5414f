"""S3 event messages -> manifest partitions, without a queue: parsing, routing, the tick plan, the cursor."""

import json
from urllib.parse import quote_plus

import pytest

from cosyvoice.corpus import events as ev
from cosyvoice.corpus.events import (
    EventCursor,
    EventRouter,
    MalformedMessage,
    QueueMessage,
    is_event_cursor,
    parse_message,
    plan_tick,
)

PARTITIONS = ["dev-clean", "train-clean-100", "train-other-500~1", "train-other-500~2"]
PARTS = {"train-other-500": ["1", "2"]}
ROUTER = EventRouter.for_root("s3://corpus-bucket/LibriTTS/", PARTITIONS, PARTS)


def record(key: str, *, name: str = "ObjectCreated:Put", time: str = "2025-03-01T10:00:00.000Z",
           bucket: str = "corpus-bucket", sequencer: str | None = "0055AED6DCD90281E5") -> dict:
    obj = {"key": quote_plus(key), "size": 10, "eTag": "e" * 32}
    if sequencer:
        obj["sequencer"] = sequencer
    return {"eventVersion": "2.1", "eventSource": "aws:s3", "eventTime": time, "eventName": name,
            "s3": {"bucket": {"name": bucket}, "object": obj}}


def message(mid: str, *records: dict) -> QueueMessage:
    return QueueMessage(mid, json.dumps({"Records": list(records)}), f"receipt-{mid}")


def test_s3_bodies_parse_directly_and_inside_an_sns_envelope_with_url_decoded_keys():
    body = json.dumps({"Records": [record("LibriTTS/dev-clean/84/121/84_121 a+b.wav")]})
    direct = parse_message(body)
    via_sns = parse_message(json.dumps({"Type": "Notification", "MessageId": "x", "Message": body}))
    assert direct == via_sns
    (event,) = direct.events
    assert event.key == "LibriTTS/dev-clean/84/121/84_121 a+b.wav"  # '+' is a space, %2B a plus
    assert (event.bucket, event.name, event.sequencer) == ("corpus-bucket", "ObjectCreated:Put", "0055AED6DCD90281E5")
    assert event.time.isoformat() == "2025-03-01T10:00:00+00:00"


def test_a_test_event_and_other_event_types_carry_no_object_events_but_say_why():
    test = parse_message(json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "corpus-bucket"}))
    assert test.events == [] and test.ignored == [(ev.TEST_EVENT, "bucket corpus-bucket")]
    restore = parse_message(json.dumps({"Records": [record("LibriTTS/dev-clean/1/2/1_2.wav",
                                                           name="ObjectRestore:Post")]}))
    assert restore.events == [] and restore.ignored == [(ev.OTHER_EVENT_TYPE, "ObjectRestore:Post")]
    removed = parse_message(json.dumps({"Records": [record("k.wav", name="s3:ObjectRemoved:Delete")]}))
    assert removed.events[0].name == "ObjectRemoved:Delete"


@pytest.mark.parametrize("body", ["not json", "[]", '{"Records": "x"}', '{"Hello": 1}',
                                  json.dumps({"Records": [{"eventName": "ObjectCreated:Put", "s3": {}}]})])
def test_anything_else_is_malformed(body):
    with pytest.raises(MalformedMessage):
        parse_message(body)


@pytest.mark.parametrize(("key", "bucket", "expected"), [
    ("LibriTTS/dev-clean/84/121/84_121_1.wav", "corpus-bucket", ("dev-clean", None)),
    ("LibriTTS/dev-clean/84/121/84_121_1.normalized.txt", "corpus-bucket", ("dev-clean", None)),
    ("LibriTTS/dev-clean/stray.wav", "corpus-bucket", ("dev-clean", None)),  # the manifest quarantines it
    ("LibriTTS/train-other-500/1034/1/1034_1_1.wav", "corpus-bucket", ("train-other-500~1", None)),
    ("LibriTTS/train-other-500/2001/1/2001_1_1.wav", "corpus-bucket", ("train-other-500~2", None)),
    ("LibriTTS/train-other-500/3001/1/3001_1_1.wav", "corpus-bucket", (None, ev.ORPHAN_SPEAKER)),
    ("LibriTTS/dev-clean/84/121/84_121_1.original.txt", "corpus-bucket", (None, ev.NOT_CORPUS_FILE)),
    ("LibriTTS/my-corpus/1/2/1_2_3.wav", "corpus-bucket", (None, ev.UNKNOWN_SUBSET)),
    ("LibriTTS/dev-clean.wav", "corpus-bucket", (None, ev.UNKNOWN_SUBSET)),
    ("Other/dev-clean/84/121/84_121_1.wav", "corpus-bucket", (None, ev.OUTSIDE_ROOT)),
    ("LibriTTSX/dev-clean/84/121/84_121_1.wav", "corpus-bucket", (None, ev.OUTSIDE_ROOT)),
    ("LibriTTS/dev-clean/84/121/84_121_1.wav", "another-bucket", (None, ev.OTHER_BUCKET)),
])
def test_keys_route_to_their_manifest_partition_or_a_reason(key, bucket, expected):
    (event,) = parse_message(json.dumps({"Records": [record(key, bucket=bucket)]})).events
    assert ROUTER.route(event) == expected


def test_the_router_needs_an_s3_root_and_takes_a_whole_bucket():
    with pytest.raises(ValueError, match="s3://"):
        EventRouter.for_root("/data/LibriTTS", PARTITIONS)
    whole = EventRouter.for_root("s3://corpus-bucket", ["dev-clean"])
    (event,) = parse_message(json.dumps({"Records": [record("dev-clean/84/121/84_121_1.wav")]})).events
    assert whole.route(event) == ("dev-clean", None)


def test_a_tick_makes_one_change_per_partition_with_a_run_key_from_its_events():
    a = record("LibriTTS/dev-clean/84/121/84_121_1.wav", sequencer="01")
    b = record("LibriTTS/dev-clean/84/121/84_121_1.normalized.txt", sequencer="02", time="2025-03-01T10:00:05Z")
    c = record("LibriTTS/train-other-500/2001/1/2001_1_1.wav", name="ObjectRemoved:Delete")
    foreign = record("elsewhere/readme.wav")
    messages = [message("m1", a), message("m2", b, c), message("m3", foreign), message("m4", a)]  # m4: a duplicate
    plan = plan_tick(messages, EventCursor(), ROUTER)
    assert sorted(plan.changes) == ["dev-clean", "train-other-500~2"]
    dev = plan.changes["dev-clean"]
    assert len(dev.events) == 2 and dev.watermark.isoformat() == "2025-03-01T10:00:05+00:00"
    assert plan.changes["train-other-500~2"].removed == 1
    assert [m.message_id for m in plan.keep] == ["m1", "m2", "m4"] and [m.message_id for m in plan.delete] == ["m3"]
    assert plan.ignored.counts == {ev.OUTSIDE_ROOT: 1}
    assert plan.ignored.examples[ev.OUTSIDE_ROOT] == ["s3://corpus-bucket/elsewhere/readme.wav"]
    # the same events in another order and other messages: the same run key (the daemon starts no second run)
    again = plan_tick([message("x", b), message("y", a)], EventCursor(), ROUTER)
    assert again.changes["dev-clean"].run_key == dev.run_key and dev.run_key.startswith("dev-clean@")
    assert plan_tick([message("z", a)], EventCursor(), ROUTER).changes["dev-clean"].run_key != dev.run_key


def test_events_the_stored_cursor_covers_request_nothing_and_their_messages_are_deleted():
    first = plan_tick([message("m1", record("LibriTTS/dev-clean/1/2/1_2_3.wav", time="2025-03-01T10:00:00Z"))],
                      EventCursor(), ROUTER)
    cursor = EventCursor.from_json(first.cursor.to_json())  # as the daemon stores it
    older = record("LibriTTS/dev-clean/1/2/1_2_4.wav", time="2025-03-01T09:59:59Z", sequencer="07")
    redelivered = plan_tick([message("m1", record("LibriTTS/dev-clean/1/2/1_2_3.wav", time="2025-03-01T10:00:00Z")),
                             message("m0", older)], cursor, ROUTER)
    assert redelivered.changes == {} and redelivered.covered_events == 2
    assert {m.message_id for m in redelivered.delete} == {"m1", "m0"} and redelivered.keep == []
    newer = plan_tick([message("m5", record("LibriTTS/dev-clean/1/2/1_2_5.wav", time="2025-03-01T10:00:01Z"))],
                      cursor, ROUTER)
    assert list(newer.changes) == ["dev-clean"]
    assert newer.cursor.covered["dev-clean"].isoformat() == "2025-03-01T10:00:01+00:00"


def test_malformed_messages_are_neither_planned_nor_deleted():
    plan = plan_tick([QueueMessage("bad", "{oops", "r")], EventCursor(), ROUTER)
    assert [m.message_id for m, _ in plan.malformed] == ["bad"] and plan.delete == [] and plan.keep == []


def test_the_listing_modes_cursor_reads_as_an_empty_event_cursor():
    listing = json.dumps({"dev-clean": "ab" * 32})
    assert EventCursor.from_json(listing).covered == {} and EventCursor.from_json(None).covered == {}
    assert not is_event_cursor(json.loads(listing))
    assert is_event_cursor(json.loads(EventCursor().to_json()))
