"""One URL-addressed storage layer: local paths and ``s3://`` URLs through the same calls.

Everything that reads or writes stage inputs/outputs goes through here, so the rest of the code
never knows whether it talks to a folder or an object store. Writes are atomic: local files are
written to a temporary name in the same folder and renamed; objects are uploaded in one PUT
(readers never see a partial object). Writing content identical to what is already stored is a
no-op, so re-runs leave files (and their modification times) untouched. Folders move file by
file (``upload_dir`` / ``download_dir``, ``local_dir`` for tools that read only local files), each
file with the same atomic, no-op-when-identical upload.

S3 credentials come only from the environment (``AWS_ACCESS_KEY_ID`` etc.); an S3-compatible
endpoint is taken from ``COSYVOICE_S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL``.

Faults are classified here, once (``is_transient``): throttling, 5xx answers, connection resets
and timeouts are transient; a missing object, a refused permission and anything that is wrong with
the data itself are permanent. Reads (``read_bytes``, ``read_head``, ``open_read``, ``exists``,
``list_files``) retry transient errors a few times with exponential backoff (``retrying``) and then
re-raise the last error unchanged, so the step fails and the orchestrator's retry policy takes over;
they never turn a transient fault into a permanent outcome.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import posixpath
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import TypeVar

import fsspec

log = logging.getLogger(__name__)
T = TypeVar("T")

_ENDPOINT_VARS = ("COSYVOICE_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_CHUNK = 8 << 20  # bytes per read when comparing files


def environment() -> dict[str, str]:
    """The variables that configure storage access (and its retries). Worker processes started from
    a forkserver inherit the server's environment, not the caller's current one, so pools pass this along."""
    return {k: v for k, v in os.environ.items()
            if k.startswith(("AWS_", "COSYVOICE_S3_", "COSYVOICE_IO_")) or k in ("FSSPEC_CONFIG_DIR",)}


# --- fault classification -------------------------------------------------------------------------

#: errno values of OSErrors that a later attempt can fix: sockets, network file systems, and what
#: s3fs maps throttling/5xx answers to (SlowDown/ServiceUnavailable/503 -> EBUSY, InternalError/500 -> EREMOTEIO)
TRANSIENT_ERRNOS = frozenset({
    errno.EAGAIN, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.ENETRESET, errno.ESTALE, errno.EBUSY,
    getattr(errno, "EREMOTEIO", errno.EIO + 1000),
})
#: class names of transient errors from libraries not imported here (botocore, urllib3, aiohttp, torch)
TRANSIENT_CLASS_NAMES = frozenset({
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "ResponseStreamingError", "IncompleteReadError", "ServerDisconnectedError", "ClientConnectionError",
    "ClientPayloadError", "IncompleteRead", "ProtocolError", "FSTimeoutError",
    "OutOfMemoryError",  # torch.cuda: a GPU momentarily short of memory (another job, fragmentation)
})
#: S3 error codes (and HTTP statuses as codes) that mean "try again": throttling and server-side hiccups
TRANSIENT_CODES = frozenset({
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling", "ThrottlingException",
    "ThrottledException", "TooManyRequests", "TooManyRequestsException", "RequestLimitExceeded",
    "BandwidthLimitExceeded", "RequestThrottled", "ProvisionedThroughputExceededException",
    "429", "500", "502", "503", "504",
})
#: the same codes inside a message (``An error occurred (SlowDown) when calling ...``), and the
#: phrases of resets/timeouts, for errors that lost their structured cause (e.g. crossing a process)
_TRANSIENT_MESSAGE = re.compile(
    r"\((?:SlowDown|ServiceUnavailable|InternalError|RequestTimeout|Throttl\w*|TooManyRequests\w*|"
    r"RequestLimitExceeded|BandwidthLimitExceeded|429|5\d\d)\)|reduce your request rate|Connection reset|"
    r"Connection aborted|timed out", re.IGNORECASE)
#: errors about the request or the data: retrying cannot help
_PERMANENT_TYPES = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def _classify(exc: BaseException) -> bool | None:
    """True/False when ``exc`` itself says transient/permanent, None when it does not tell."""
    if isinstance(exc, _PERMANENT_TYPES):
        return False
    response = getattr(exc, "response", None)  # botocore ClientError: {"Error": {"Code"}, "ResponseMetadata": ...}
    if isinstance(response, dict):
        code = str((response.get("Error") or {}).get("Code") or "")
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if code in TRANSIENT_CODES or (isinstance(status, int) and (status >= 500 or status == 429)):
            return True
        if code or isinstance(status, int):
            return False  # 4xx: NoSuchKey, AccessDenied, InvalidRange ...
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if any(cls.__name__ in TRANSIENT_CLASS_NAMES for cls in type(exc).__mro__):
        return True
    if isinstance(exc, OSError) and (exc.errno in TRANSIENT_ERRNOS or _TRANSIENT_MESSAGE.search(str(exc))):
        return True
    return None


def is_transient(exc: BaseException) -> bool:
    """True when repeating the same operation can succeed without anyone changing data, code or
    config: throttling (SlowDown, 429), 5xx answers, connection resets/refusals and timeouts.
    False for missing objects (404, FileNotFoundError), refused access (403, PermissionError),
    undecodable data and everything unknown. Looks through ``raise ... from`` chains; the first
    error in the chain that tells decides (a FileNotFoundError raised while handling a reset is
    permanent)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        verdict = _classify(current)
        if verdict is not None:
            return verdict
        current = current.__cause__ or current.__context__
    return False


def io_retries() -> int:
    """Retries of a transient read before it is re-raised (``COSYVOICE_IO_RETRIES``, default 4)."""
    return max(0, int(os.environ.get("COSYVOICE_IO_RETRIES", "4")))


def retry_delays() -> Iterator[float]:
    """The waits between attempts: ``COSYVOICE_IO_RETRY_DELAY_S`` (default 0.5 s) doubling per
    retry, capped at 30 s, with +-25 % jitter so that parallel readers do not retry in lockstep."""
    delay = float(os.environ.get("COSYVOICE_IO_RETRY_DELAY_S", "0.5"))
    for attempt in range(io_retries()):
        yield min(delay * 2 ** attempt, 30.0) * random.uniform(0.75, 1.25)


def retrying(fn: Callable[..., T], *args, what: str = "", **kwargs) -> T:
    """``fn(*args, **kwargs)``, repeated after a backoff while it raises a transient error (at most
    ``io_retries()`` times); a permanent error, or the last transient one, is re-raised unchanged."""
    delays = retry_delays()
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            wait = next(delays, None) if is_transient(exc) else None
            if wait is None:
                raise
            log.warning("%s: transient error (%s: %s), retrying in %.2f s", what or getattr(fn, "__name__", fn),
                        type(exc).__name__, exc, wait)
            time.sleep(wait)


def _retried(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate a storage call whose first argument is its URL with ``retrying``."""
    @functools.wraps(fn)
    def wrapper(url, *args, **kwargs):
        return retrying(fn, url, *args, what=f"{fn.__name__} {url}", **kwargs)
    return wrapper


def use_environment(env: dict[str, str]) -> None:
    """Adopt a caller's storage variables (see ``environment``) in a worker process."""
    os.environ.update(env)
    _filesystem.cache_clear()


def protocol_of(url: str) -> str:
    """``"file"`` for plain paths and ``file://`` URLs, else the URL scheme (``"s3"``, ...)."""
    if "://" not in url:
        return "file"
    return url.split("://", 1)[0]


def is_local(url: str) -> bool:
    return protocol_of(url) == "file"


def storage_options(protocol: str) -> dict:
    """fsspec options for a protocol, read from the environment (never from code or config)."""
    if protocol in ("s3", "s3a"):
        endpoint = next((os.environ[v] for v in _ENDPOINT_VARS if os.environ.get(v)), None)
        return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    return {}


@cache
def _filesystem(protocol: str, endpoint_key: str) -> fsspec.AbstractFileSystem:
    del endpoint_key  # part of the cache key only: a changed endpoint gets a new client
    return fsspec.filesystem(protocol, **storage_options(protocol))


def filesystem(url: str) -> fsspec.AbstractFileSystem:
    proto = protocol_of(url)
    endpoint = next((os.environ.get(v, "") for v in _ENDPOINT_VARS if os.environ.get(v)), "")
    return _filesystem(proto, endpoint if proto != "file" else "")


def strip_protocol(url: str) -> str:
    """The path part fsspec uses for ``url`` (bucket/key for S3, absolute-or-relative path locally)."""
    if is_local(url):
        return url[len("file://"):] if url.startswith("file://") else url
    return url.split("://", 1)[1]


def with_protocol(url_like: str, path: str) -> str:
    """Re-attach the scheme of ``url_like`` to a bare fsspec path returned by a listing."""
    proto = protocol_of(url_like)
    return path if proto == "file" else f"{proto}://{path}"


def join(base: str, *parts: str) -> str:
    """Join URL/path components with ``/`` (``os.path.join`` semantics for local paths)."""
    if is_local(base):
        return os.path.join(base, *parts)
    return posixpath.join(base, *parts)


@_retried
def exists(url: str) -> bool:
    return filesystem(url).exists(strip_protocol(url))


@_retried
def read_bytes(url: str) -> bytes:
    if is_local(url):
        with open(strip_protocol(url), "rb") as f:
            return f.read()
    return filesystem(url).cat_file(strip_protocol(url))


def read_text(url: str, encoding: str = "utf-8") -> str:
    return read_bytes(url).decode(encoding)


def open_read(url: str, *, retry: bool = True):
    """A binary file object to read ``url``. Opening (finding the object) is retried unless
    ``retry=False`` (for a caller with its own retry loop); reads from the handle are the caller's
    to retry, see ``cosyvoice.dataset.processors.parquet_opener``."""
    def opened(url: str):
        if is_local(url):
            return open(strip_protocol(url), "rb")
        return filesystem(url).open(strip_protocol(url), "rb")

    return retrying(opened, url, what=f"open {url}") if retry else opened(url)


@_retried
def read_head(url: str, nbytes: int) -> bytes:
    """The first ``nbytes`` of an object (one ranged GET on S3)."""
    if is_local(url):
        with open(strip_protocol(url), "rb") as f:
            return f.read(nbytes)
    return filesystem(url).cat_file(strip_protocol(url), start=0, end=nbytes)


def remove(url: str) -> None:
    """Delete one file/object; missing is fine (idempotent)."""
    try:
        filesystem(url).rm_file(strip_protocol(url))
    except FileNotFoundError:
        pass


def makedirs(url: str) -> None:
    if is_local(url):
        os.makedirs(strip_protocol(url), exist_ok=True)
    # object stores have no folders


@dataclass(frozen=True)
class WriteResult:
    url: str
    bytes: int
    changed: bool


def write_bytes(url: str, data: bytes) -> WriteResult:
    """Atomically store ``data`` at ``url``; a no-op when identical bytes are already there."""
    path = strip_protocol(url)
    if is_local(url):
        try:
            if os.path.getsize(path) == len(data):
                with open(path, "rb") as f:
                    if f.read() == data:
                        return WriteResult(url, len(data), changed=False)
        except OSError:
            pass
        tmp = staging_path(url)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            os.unlink(tmp)
            raise
        publish(tmp, url)
        return WriteResult(url, len(data), changed=True)
    fs = filesystem(url)
    try:
        if fs.info(path)["size"] == len(data) and fs.cat_file(path) == data:
            return WriteResult(url, len(data), changed=False)
    except FileNotFoundError:
        pass
    fs.pipe_file(path, data)  # a single PUT/multipart upload: visible only when complete
    return WriteResult(url, len(data), changed=True)


def staging_path(url: str) -> str:
    """A local temporary file to build ``url`` in (then ``publish`` it). For local targets it sits
    hidden next to the target (same file system: the final rename is atomic); stale ones of a
    killed writer are removed."""
    if is_local(url):
        path = strip_protocol(url)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        prefix = f".{os.path.basename(path)}.tmp-"
        for stale in os.listdir(folder):
            if stale.startswith(prefix):
                try:
                    os.unlink(os.path.join(folder, stale))
                except FileNotFoundError:
                    pass
    else:
        folder, prefix = None, ".staging-"
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=folder)
    os.close(fd)
    return tmp


def publish(staged: str, url: str) -> None:
    """Move a finished staging file to ``url``: a rename locally, a streamed upload to object stores
    (visible only once complete). The staging file is gone afterwards."""
    try:
        if is_local(url):
            os.chmod(staged, 0o644)
            os.replace(staged, strip_protocol(url))
        else:
            filesystem(url).put_file(staged, strip_protocol(url))
    finally:
        if os.path.exists(staged):
            os.unlink(staged)


def write_text(url: str, text: str) -> WriteResult:
    return write_bytes(url, text.encode("utf-8"))


@_retried
def list_files(url: str) -> list[tuple[str, int]]:
    """Every file below ``url`` (recursively) as ``(url, size_in_bytes)``, sorted by URL.

    One listing call per folder locally and one paginated listing on S3, so scanning a corpus
    does not pay one request per file just to learn sizes.
    """
    if is_local(url):
        root = strip_protocol(url)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{url}: no such directory")
        found: list[tuple[str, int]] = []
        stack = [root]
        while stack:
            folder = stack.pop()
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_dir():
                        stack.append(entry.path)
                    elif entry.is_file():
                        found.append((entry.path, entry.stat().st_size))
        found.sort()
        return found
    fs = filesystem(url)
    root = strip_protocol(url).rstrip("/")
    if not fs.isdir(root):
        raise FileNotFoundError(f"{url}: no such prefix")
    detail = fs.find(root, detail=True)
    return sorted((with_protocol(url, p), int(info.get("size") or 0)) for p, info in detail.items()
                  if info.get("type", "file") == "file")


# --- folders -------------------------------------------------------------------------------------

def upload_file(local: str, url: str) -> WriteResult:
    """Copy the local file ``local`` to ``url``, streamed (never read whole into memory) and atomic:
    a staged copy renamed into place locally, one upload (visible only when complete) to object
    stores. A no-op when ``url`` already holds the same bytes."""
    size = os.path.getsize(local)
    if _same_content(local, url, size):
        return WriteResult(url, size, changed=False)
    if is_local(url):
        staged = staging_path(url)
        try:
            shutil.copyfile(local, staged)
        except BaseException:
            os.unlink(staged)
            raise
        publish(staged, url)
    else:
        filesystem(url).put_file(local, strip_protocol(url))
    return WriteResult(url, size, changed=True)


def _same_content(local: str, url: str, size: int) -> bool:
    fs, path = filesystem(url), strip_protocol(url)
    try:
        if fs.size(path) != size:
            return False
        with open(local, "rb") as mine, fs.open(path, "rb") as theirs:
            while block := mine.read(_CHUNK):
                if theirs.read(len(block)) != block:
                    return False
        return True
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return False


@_retried
def download_file(url: str, local: str) -> int:
    """Copy the file at ``url`` to the local path ``local`` (its folder is created); returns its bytes."""
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    if is_local(url):
        shutil.copyfile(strip_protocol(url), local)
    else:
        filesystem(url).get_file(strip_protocol(url), local)
    return os.path.getsize(local)


def upload_dir(local: str, url: str) -> dict[str, int]:
    """Every file below the local folder ``local`` to ``url`` under the same relative names, each
    with ``upload_file`` (atomic per file, identical files untouched); returns ``{relative name: bytes}``."""
    if not os.path.isdir(local):
        raise FileNotFoundError(f"{local}: no such directory")
    sizes: dict[str, int] = {}
    for folder, _, names in sorted(os.walk(local)):
        for name in sorted(names):
            rel = os.path.relpath(os.path.join(folder, name), local).replace(os.sep, "/")
            sizes[rel] = upload_file(os.path.join(folder, name), join(url, *rel.split("/"))).bytes
    return sizes


def download_dir(url: str, dest: str) -> dict[str, int]:
    """Every file below the folder ``url`` into the local folder ``dest`` (created; files already
    there are overwritten, others kept) under the same relative names; returns ``{relative name: bytes}``.
    ``FileNotFoundError`` when ``url`` is not a folder."""
    base = strip_protocol(url).rstrip("/")
    files = list_files(url)
    os.makedirs(dest, exist_ok=True)
    sizes: dict[str, int] = {}
    for file_url, _ in files:
        rel = strip_protocol(file_url)[len(base) + 1:].replace(os.sep, "/")
        sizes[rel] = download_file(file_url, os.path.join(dest, *rel.split("/")))
    return sizes


@contextlib.contextmanager
def local_dir(url: str) -> Iterator[str]:
    """A local folder holding the files of the folder ``url``: the folder itself when it is local
    (no copy), else a temporary download removed on exit. For tools that only read local files."""
    if is_local(url):
        path = strip_protocol(url)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{url}: no such directory")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="cosyvoice-dir-") as tmp:
        download_dir(url, tmp)
        yield tmp
