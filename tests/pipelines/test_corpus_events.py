"""The corpus sensor's event mode against moto: S3 bucket notifications delivered to a real SQS queue."""

import json
import time

import boto3
import dagster as dg
import pytest

from pipelines.corpus_events import CorpusEventQueue, CorpusEventSettings, corpus_events_tick
from pipelines.resources import CorpusResource
from pipelines.sensors import corpus_sensor

VISIBILITY_S = 1  # short, so kept messages come back within the test


@pytest.fixture()
def notified_bucket(s3_server, s3_bucket, monkeypatch):
    """A bucket whose ObjectCreated/ObjectRemoved notifications go to an SQS queue (moto delivers them,
    and sends S3's test event when the notification is configured); the event mode is switched on."""
    sqs = boto3.client("sqs", endpoint_url=s3_server, region_name="us-east-1")
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    url = sqs.create_queue(QueueName=s3_bucket)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3.put_bucket_notification_configuration(Bucket=s3_bucket, NotificationConfiguration={"QueueConfigurations": [
        {"QueueArn": arn, "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]}]})
    for name, value in {"COSYVOICE_CORPUS_EVENTS_QUEUE_URL": url, "AWS_ENDPOINT_URL_SQS": s3_server,
                        "COSYVOICE_CORPUS_EVENTS_VISIBILITY_S": str(VISIBILITY_S),
                        "COSYVOICE_CORPUS_EVENTS_TIME_BUDGET_S": "0.9", "COSYVOICE_CORPUS_EVENTS_WAIT_S": "0"}.items():
        monkeypatch.setenv(name, value)
    try:
        yield s3, sqs, url
    finally:
        sqs.delete_queue(QueueUrl=url)


def upload(s3, bucket: str, subset: str, *utts: str) -> None:
    """LibriTTS-shaped objects: audio, transcript and the original text (not a corpus file) per utterance."""
    for utt in utts:
        spk, chapter = utt.split("_")[:2]
        for suffix in (".wav", ".normalized.txt", ".original.txt"):
            s3.put_object(Bucket=bucket, Key=f"LibriTTS/{subset}/{spk}/{chapter}/{utt}{suffix}", Body=b"x")


def on_queue(sqs, url: str) -> tuple[int, int]:
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]), int(attrs["ApproximateNumberOfMessagesNotVisible"])


def test_event_mode_requests_each_changed_subset_once_per_tick_and_never_twice_for_a_redelivery(
        notified_bucket, s3_bucket, capsys):
    s3, sqs, url = notified_bucket
    resource = CorpusResource(root=f"s3://{s3_bucket}/LibriTTS")
    upload(s3, s3_bucket, "dev-clean", "84_121_000001_000000", "84_121_000002_000000")
    upload(s3, s3_bucket, "train-clean-100", "19_198_000000_000000")
    s3.put_object(Bucket=s3_bucket, Key="elsewhere/notes.wav", Body=b"x")  # outside the corpus root
    s3.put_object(Bucket=s3_bucket, Key="LibriTTS/my-corpus/1/2/1_2_3.wav", Body=b"x")  # not a subset

    with dg.DagsterInstance.ephemeral() as instance:
        def tick(cursor):
            result = corpus_sensor(dg.build_sensor_context(instance=instance, cursor=cursor,
                                                           resources={"corpus": resource}))
            return {r.partition_key: r.run_key for r in result.run_requests}, result.cursor

        capsys.readouterr()
        first, cursor1 = tick(None)
        assert sorted(first) == ["dev-clean", "train-clean-100"]  # one request per subset for 6 corpus files
        logged = capsys.readouterr().err  # the sensor's log (the tick's log in the UI)
        assert "s3_test_event: 1" in logged and "elsewhere/notes.wav" in logged and "unknown_subset: 1" in logged
        assert "not_a_corpus_file: 3" in logged
        assert on_queue(sqs, url) == (0, 6)  # irrelevant messages deleted; the 6 relevant ones kept until covered

        upload(s3, s3_bucket, "dev-clean", "84_121_000003_000000")
        time.sleep(VISIBILITY_S + 0.1)  # tick 1's messages come back: its cursor (stored) covers them
        second, cursor2 = tick(cursor1)
        assert list(second) == ["dev-clean"] and second["dev-clean"] != first["dev-clean"]
        assert on_queue(sqs, url) == (0, 2)  # tick 1's six deleted, the two new ones kept

        time.sleep(VISIBILITY_S + 0.1)
        old_body = json.dumps({"Records": [{
            "eventVersion": "2.1", "eventSource": "aws:s3", "eventTime": json.loads(cursor1)["covered"]["dev-clean"],
            "eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": s3_bucket},
                                                     "object": {"key": "LibriTTS/dev-clean/84/121/84_121_000001_000000.wav"}}}]})
        sqs.send_message(QueueUrl=url, MessageBody=old_body)  # SQS delivers at least once: a late duplicate
        third, cursor3 = tick(cursor2)  # tick 2's messages redelivered, plus the duplicate: nothing new
        assert third == {} and on_queue(sqs, url) == (0, 0)

        s3.delete_object(Bucket=s3_bucket, Key="LibriTTS/train-clean-100/19/198/19_198_000000_000000.wav")
        removed, _ = tick(cursor3)
        assert list(removed) == ["train-clean-100"]  # a removal makes the manifest stale too


def test_split_subsets_request_their_parts_and_orphan_speaker_folders_are_logged(notified_bucket, s3_bucket, capsys):
    s3, _, _ = notified_bucket
    for spk in ("1034", "1088", "2001", "3001"):
        upload(s3, s3_bucket, "train-other-500", f"{spk}_5_000000_000000")
    settings = CorpusEventSettings.from_env()
    assert settings is not None and settings.visibility_timeout_s == VISIBILITY_S
    capsys.readouterr()
    result = corpus_events_tick(dg.build_sensor_context(), f"s3://{s3_bucket}/LibriTTS", settings,
                                partitions=["dev-clean", "train-other-500~1", "train-other-500~2"],
                                parts={"train-other-500": ["1", "2"]})
    assert sorted(r.partition_key for r in result.run_requests) == ["train-other-500~1", "train-other-500~2"]
    assert {r.partition_key: r.tags["cosyvoice/corpus_events"] for r in result.run_requests} == {
        "train-other-500~1": "4", "train-other-500~2": "2"}
    logged = capsys.readouterr().err
    assert "speaker_folder_in_no_part: 2" in logged and "train-other-500/3001/5/" in logged


def test_event_settings_are_validated_and_absent_without_a_queue_url():
    assert CorpusEventSettings.from_env({}) is None
    with pytest.raises(ValueError, match="VISIBILITY_S"):
        CorpusEventSettings.from_env({"COSYVOICE_CORPUS_EVENTS_QUEUE_URL": "https://sqs.eu-west-1.amazonaws.com/1/q",
                                      "COSYVOICE_CORPUS_EVENTS_VISIBILITY_S": "20"})
    with pytest.raises(ValueError, match="not an SQS queue URL"):
        CorpusEventSettings.from_env({"COSYVOICE_CORPUS_EVENTS_QUEUE_URL": "my-queue"})


class FakeSqs:
    """Answers receive calls from a script of batches and refuses chosen deletions (no server needed)."""

    def __init__(self, batches, refuse=()):
        self.batches, self.refuse, self.deleted = list(batches), set(refuse), []

    def receive_message(self, **kwargs):
        return {"Messages": self.batches.pop(0)[:kwargs["MaxNumberOfMessages"]] if self.batches else []}

    def delete_message_batch(self, QueueUrl, Entries):  # noqa: N803 (boto3's names)
        self.deleted += [e["ReceiptHandle"] for e in Entries if e["ReceiptHandle"] not in self.refuse]
        return {"Failed": [{"Id": e["Id"], "Code": "ReceiptHandleIsInvalid"} for e in Entries
                           if e["ReceiptHandle"] in self.refuse]}


def test_a_tick_takes_each_message_once_stops_at_the_cap_and_reports_refused_deletions():
    def batch(*ids):
        return [{"MessageId": i, "Body": i, "ReceiptHandle": f"r-{i}"} for i in ids]

    sqs = FakeSqs([batch(*"abcdefghij"), batch("a", "k", "x"), batch("l", "m"), batch("n")], refuse={"r-b"})
    settings = CorpusEventSettings("http://127.0.0.1:1/q", max_messages=12, receivers=1)
    taken = []
    consumed = CorpusEventQueue(settings, client=sqs).consume(lambda m: taken.append(m.message_id) or True)
    assert taken == [*"abcdefghij", "k", "l"]  # "a" delivered twice is taken once; no receive beyond the cap
    assert sqs.batches == [batch("n")]
    assert consumed.received == 12 and consumed.refused == ["b: ReceiptHandleIsInvalid"]
    assert sqs.deleted == [f"r-{i}" for i in "acdefghijkl"]


def test_listing_mode_fingerprints_each_part_of_a_split_subset(tmp_path, monkeypatch, capsys):
    import pipelines.sensors as sensors

    corpus = tmp_path / "LibriTTS"
    for spk in ("1034", "2001", "3001"):
        folder = corpus / "dev-clean" / spk / "5"
        folder.mkdir(parents=True)
        for suffix in (".wav", ".normalized.txt"):
            (folder / f"{spk}_5_000000_000000{suffix}").write_bytes(spk.encode())
    monkeypatch.setenv("COSYVOICE_SUBSET_PARTS", "dev-clean=1,2")  # as the definitions would be built with it
    monkeypatch.setattr(sensors, "SUBSETS", dg.StaticPartitionsDefinition(["dev-clean~1", "dev-clean~2", "test-clean"]))
    resource = CorpusResource(root=str(corpus))

    def tick(cursor):
        result = corpus_sensor(dg.build_sensor_context(cursor=cursor, resources={"corpus": resource}))
        return sorted(r.partition_key for r in result.run_requests), result.cursor

    capsys.readouterr()
    first, cursor = tick(None)
    assert first == ["dev-clean~1", "dev-clean~2"]
    assert "['3001'] belong to no part" in capsys.readouterr().err
    (corpus / "dev-clean" / "2001" / "5" / "2001_5_000000_000000.wav").write_bytes(b"changed")
    assert tick(cursor)[0] == ["dev-clean~2"]
