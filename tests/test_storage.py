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


def _client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "injected"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


@pytest.mark.parametrize("exc", [
    ConnectionResetError("reset by peer"), TimeoutError("read timed out"), BrokenPipeError(),
    OSError(16, "Please reduce your request rate."),  # s3fs: SlowDown / ServiceUnavailable / 503 -> EBUSY
    OSError(121, "We encountered an internal error. Please try again."),  # s3fs: InternalError / 500 -> EREMOTEIO
    OSError(5, "An error occurred (502) when calling the GetObject operation: Bad Gateway"),
    OSError(5, "An error occurred (SlowDown) when calling the PutObject operation"),
    _client_error("SlowDown", 503), _client_error("InternalError", 500), _client_error("ThrottlingException", 400),
    _client_error("", 504), _client_error("TooManyRequests", 429),
])
def test_throttling_5xx_resets_and_timeouts_are_transient(exc):
    assert storage.is_transient(exc)
    wrapped = RuntimeError("while reading shard 3")
    wrapped.__cause__ = exc
    assert storage.is_transient(wrapped)
    if isinstance(exc, OSError):
        # what a worker process hands back: an exception is sent as its class and args and rebuilt
        # from them, so the errno and message survive and the cause chain is gone
        assert storage.is_transient(type(exc)(*exc.args))


@pytest.mark.parametrize("exc", [
    FileNotFoundError("s3://b/x.wav"), PermissionError("Access Denied"), IsADirectoryError("/data"),
    _client_error("NoSuchKey", 404), _client_error("AccessDenied", 403), _client_error("InvalidRange", 416),
    OSError(22, "The specified bucket is not valid."), OSError(5, "Input/output error"),
    ValueError("WAV header declares 0 frames"), RuntimeError("Error opening <_io.BytesIO>: Format not recognised."),
])
def test_missing_forbidden_and_undecodable_are_permanent(exc):
    assert not storage.is_transient(exc)


def test_the_first_error_in_a_chain_that_tells_decides():
    missing = FileNotFoundError("s3://b/x.wav")
    missing.__context__ = ConnectionResetError("reset while listing")  # raised while handling a reset
    assert not storage.is_transient(missing)
    decode = ValueError("not a WAV file")
    decode.__cause__ = TimeoutError("timed out")
    assert storage.is_transient(decode)


def test_pipelines_use_the_storage_classification():
    from pipelines import retries

    assert retries.is_transient is storage.is_transient


def test_retrying_repeats_transient_errors_with_backoff_then_reraises_the_same_error(monkeypatch):
    monkeypatch.setenv("COSYVOICE_IO_RETRIES", "3")
    monkeypatch.setenv("COSYVOICE_IO_RETRY_DELAY_S", "0.01")
    waits = []
    monkeypatch.setattr(storage.time, "sleep", waits.append)
    calls = []

    def flaky(fail_times, exc):
        def read():
            calls.append(1)
            if len(calls) <= fail_times:
                raise exc
            return b"data"
        return read

    assert storage.retrying(flaky(3, ConnectionResetError("reset"))) == b"data" and len(calls) == 4
    assert len(waits) == 3 and all(0.0075 * 2 ** i <= w <= 0.0125 * 2 ** i for i, w in enumerate(waits))

    calls.clear()
    throttled = OSError(16, "Please reduce your request rate.")
    with pytest.raises(OSError) as raised:
        storage.retrying(flaky(10, throttled))
    assert raised.value is throttled and len(calls) == 4  # first try + 3 retries, then the error unchanged

    calls.clear()
    with pytest.raises(FileNotFoundError):
        storage.retrying(flaky(10, FileNotFoundError("gone")))
    assert len(calls) == 1  # permanent: not retried


def test_reads_retry_transient_errors_where_they_happen(tmp_path, monkeypatch):
    monkeypatch.setenv("COSYVOICE_IO_RETRY_DELAY_S", "0")
    path = tmp_path / "x.bin"
    path.write_bytes(b"payload")
    real_open, failures = open, [ConnectionResetError("reset"), TimeoutError("timed out")]

    def flaky_open(file, *args, **kwargs):
        if file == str(path) and failures:
            raise failures.pop(0)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", flaky_open)
    assert storage.read_bytes(str(path)) == b"payload" and not failures
    failures[:] = [TimeoutError("timed out")]
    assert storage.read_head(str(path), 3) == b"pay"
    failures[:] = [ConnectionResetError("reset")]
    with storage.open_read(str(path)) as f:
        assert f.read() == b"payload"


def _tree(folder) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(r, n), folder).replace(os.sep, "/"): open(os.path.join(r, n), "rb").read()
            for r, _, names in os.walk(folder) for n in names}


def _make_tree(folder) -> dict[str, bytes]:
    files = {"config.json": b"{}", "rank0.engine": b"\0" * 1000, "sub/deeper/x.txt": b"hello"}
    for rel, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(folder, rel)), exist_ok=True)
        open(os.path.join(folder, rel), "wb").write(data)
    return files


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_folder_uploads_and_downloads_under_the_same_relative_names(tmp_path, where, request):
    files = _make_tree(tmp_path / "src")
    url = (str(tmp_path / "stored") if where == "local"
           else f"s3://{request.getfixturevalue('s3_bucket')}/stored")
    assert storage.upload_dir(str(tmp_path / "src"), url) == {k: len(v) for k, v in files.items()}
    assert storage.download_dir(url, str(tmp_path / "back")) == {k: len(v) for k, v in files.items()}
    assert _tree(tmp_path / "back") == files
    with storage.local_dir(url) as folder:
        assert _tree(folder) == files
    assert storage.download_file(storage.join(url, "sub", "deeper", "x.txt"), str(tmp_path / "one" / "x.txt")) == 5
    with pytest.raises(FileNotFoundError):
        storage.download_dir(storage.join(url, "missing"), str(tmp_path / "never"))
    with pytest.raises(FileNotFoundError):
        storage.upload_dir(str(tmp_path / "missing"), url)


def test_uploading_an_identical_file_is_a_noop_and_a_failed_upload_leaves_the_old_file(tmp_path, monkeypatch):
    src, url = tmp_path / "engine", str(tmp_path / "stored" / "engine")
    src.write_bytes(b"v1" * 100)
    assert storage.upload_file(str(src), url).changed
    mtime = os.stat(url).st_mtime_ns
    assert not storage.upload_file(str(src), url).changed and os.stat(url).st_mtime_ns == mtime
    src.write_bytes(b"v2" * 100)  # same size, other bytes

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        storage.upload_file(str(src), url)
    monkeypatch.undo()
    assert open(url, "rb").read() == b"v1" * 100 and os.listdir(tmp_path / "stored") == ["engine"]
    assert storage.upload_file(str(src), url).changed and open(url, "rb").read() == b"v2" * 100


def test_an_empty_folder_downloads_as_an_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert storage.download_dir(str(tmp_path / "empty"), str(tmp_path / "dest")) == {}
    assert os.listdir(tmp_path / "dest") == []
