"""One URL-addressed storage layer: local paths and ``s3://`` URLs through the same calls.

Everything that reads or writes stage inputs/outputs goes through here, so the rest of the code
never knows whether it talks to a folder or an object store. Writes are atomic: local files are
written to a temporary name in the same folder and renamed; objects are uploaded in one PUT
(readers never see a partial object). Writing content identical to what is already stored is a
no-op, so re-runs leave files (and their modification times) untouched.

S3 credentials come only from the environment (``AWS_ACCESS_KEY_ID`` etc.); an S3-compatible
endpoint is taken from ``COSYVOICE_S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from dataclasses import dataclass
from functools import cache

import fsspec

_ENDPOINT_VARS = ("COSYVOICE_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def environment() -> dict[str, str]:
    """The variables that configure storage access. Worker processes started from a forkserver
    inherit the server's environment, not the caller's current one, so pools pass this along."""
    return {k: v for k, v in os.environ.items()
            if k.startswith(("AWS_", "COSYVOICE_S3_")) or k in ("FSSPEC_CONFIG_DIR",)}


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


def exists(url: str) -> bool:
    return filesystem(url).exists(strip_protocol(url))


def read_bytes(url: str) -> bytes:
    if is_local(url):
        with open(strip_protocol(url), "rb") as f:
            return f.read()
    return filesystem(url).cat_file(strip_protocol(url))


def read_text(url: str, encoding: str = "utf-8") -> str:
    return read_bytes(url).decode(encoding)


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
