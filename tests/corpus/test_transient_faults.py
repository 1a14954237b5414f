"""The corpus scan and the shard writer on S3 with injected 5xx answers: a transient fault is retried
(same manifest as without faults); one that outlasts the retries fails the stage instead of
quarantining or dropping the utterance."""

import os

import pytest
import s3fs

from cosyvoice import storage
from cosyvoice.corpus.manifest import prepare_libritts
from cosyvoice.shards.make_parquet import make_parquet

BUCKET = "corpus-faults"


@pytest.fixture(scope="module")
def s3_corpus(clean_corpus, s3_server):
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir(BUCKET)
    fs.put(os.path.join(clean_corpus, "dev-clean"), f"{BUCKET}/LibriTTS/", recursive=True)
    wavs = sorted(p for p in fs.find(f"{BUCKET}/LibriTTS") if p.endswith(".wav"))
    return f"s3://{BUCKET}/LibriTTS/dev-clean", [p.split("/", 1)[1] for p in wavs]


def test_the_scan_retries_a_throttled_header_read_and_fails_on_one_that_stays_throttled(
        s3_corpus, faulty_s3, tmp_path, monkeypatch):
    src, keys = s3_corpus
    prepare_libritts(src, str(tmp_path / "clean"))
    faulty_s3.use(monkeypatch, retries=2)
    faulty_s3.plan(keys[0], [503, 500])
    prepare_libritts(src, str(tmp_path / "faulty"))
    for name in ("wav.scp", "text", "utt2spk"):
        assert (tmp_path / "faulty" / name).read_text() == (tmp_path / "clean" / name).read_text()
    assert faulty_s3.served[keys[0]] == 2

    faulty_s3.plan(keys[1], always=503)
    with pytest.raises(OSError) as raised:  # not a quarantine entry "unreadable_header"
        prepare_libritts(src, str(tmp_path / "failing"))
    assert storage.is_transient(raised.value)


def test_make_parquet_fails_on_a_throttled_audio_read_instead_of_dropping_the_row(
        s3_corpus, faulty_s3, tmp_path, monkeypatch):
    src, keys = s3_corpus
    data = str(tmp_path / "data")
    prepare_libritts(src, data)
    faulty_s3.use(monkeypatch, retries=1)
    faulty_s3.plan(keys[2], always=503)
    with pytest.raises(OSError) as raised:  # not a skipped row "unreadable_audio"
        make_parquet(data, str(tmp_path / "parquet"), num_utts_per_parquet=8)
    assert storage.is_transient(raised.value) and faulty_s3.gets[keys[2]] == 2
    faulty_s3.plan(keys[2], [503])  # one fault: retried, nothing left out
    report = make_parquet(data, str(tmp_path / "parquet"), num_utts_per_parquet=8)
    assert report.rows == len(keys)
