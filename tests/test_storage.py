import os

import pytest

from cosyvoice import storage


def test_local_write_is_atomic_and_a_noop_when_identical(tmp_path):
    url = str(tmp_path / "sub" / "f.txt")
    assert storage.write_text(url, "one\n").changed
    mtime = os.stat(url).st_mtime_ns
    assert not storage.write_text(url, "one\n").changed
    assert os.stat(url).st_mtime_ns == mtime
    assert storage.write_text(url, "two\n").changed and storage.read_text(url) == "two\n"
    assert os.listdir(tmp_path / "sub") == ["f.txt"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    url = str(tmp_path / "f.bin")
    storage.write_bytes(url, b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        storage.write_bytes(url, b"new")
    assert open(url, "rb").read() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_s3_roundtrip_listing_and_noop_rewrite(s3_bucket):
    base = f"s3://{s3_bucket}/data"
    assert storage.write_bytes(storage.join(base, "a", "x.bin"), b"123").changed
    assert storage.write_text(storage.join(base, "b.txt"), "hi").changed
    assert not storage.write_text(storage.join(base, "b.txt"), "hi").changed
    assert storage.list_files(base) == [(f"{base}/a/x.bin", 3), (f"{base}/b.txt", 2)]
    assert storage.read_head(f"{base}/a/x.bin", 2) == b"12"
    storage.remove(f"{base}/b.txt")
    assert not storage.exists(f"{base}/b.txt")
    with pytest.raises(FileNotFoundError):
        storage.list_files(f"s3://{s3_bucket}/nothing-here")


def test_temp_files_of_a_killed_writer_are_hidden_and_swept_on_the_next_write(tmp_path):
    leftover = tmp_path / ".shard.parquet.tmp-abc123"
    leftover.write_bytes(b"partial")
    assert not leftover.name.endswith(".parquet")
    storage.write_bytes(str(tmp_path / "shard.parquet"), b"complete")
    assert os.listdir(tmp_path) == ["shard.parquet"]
