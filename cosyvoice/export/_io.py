"""Directory-level storage helpers: exports are folders of a few files, written locally and then
published file by file through ``cosyvoice.storage`` (atomic per file; identical content is a no-op)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

from cosyvoice import storage


@contextlib.contextmanager
def local_dir(url: str) -> Iterator[str]:
    """A local folder holding the files of ``url`` (the folder itself when it is local)."""
    if storage.is_local(url):
        path = storage.strip_protocol(url)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{url}: no such directory")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="cosyvoice-export-") as tmp:
        base = url.rstrip("/")
        for file_url, _ in storage.list_files(base):
            rel = file_url[len(base) + 1:]
            dest = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as f:
                f.write(storage.read_bytes(file_url))
        yield tmp


def publish_dir(local: str, url: str) -> dict[str, int]:
    """Copy every file of ``local`` to ``url`` (same relative names); returns ``{name: bytes}``."""
    sizes: dict[str, int] = {}
    for root, _, files in os.walk(local):
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, local)
            with open(path, "rb") as f:
                sizes[rel] = storage.write_bytes(storage.join(url, *rel.split(os.sep)), f.read()).bytes
    return sizes
