"""An output file written line by line, published atomically, and only when its bytes changed.

``storage.write_text`` needs the whole content in memory; a manifest of 50M utterances writes
files of gigabytes. ``StagedOutput`` streams the lines into a staging file (next to the target
locally, in TMPDIR for object stores) while hashing them; ``publish()`` then compares the hash with
the stored file's and either leaves the stored file untouched (a re-run that changes nothing
rewrites nothing and keeps its modification time) or moves the staged file into place with
``storage.publish`` (a rename locally, one upload to object stores: readers never see a partial file).
"""

from __future__ import annotations

import hashlib
import os

from cosyvoice import storage

#: characters buffered before they are encoded, hashed and written
_FLUSH_CHARS = 256 << 10
_READ_CHUNK = 8 << 20


class StagedOutput:
    def __init__(self, url: str):
        self.url = url
        self.bytes = 0
        self._staged = storage.staging_path(url)
        self._file = open(self._staged, "wb")  # noqa: SIM115 - closed by publish/discard
        self._hash = hashlib.sha256()
        self._pending: list[str] = []
        self._chars = 0

    def write(self, text: str) -> None:
        """Append ``text`` (typically one line); buffered, so many small writes stay cheap."""
        self._pending.append(text)
        self._chars += len(text)
        if self._chars >= _FLUSH_CHARS:
            self._flush()

    def publish(self) -> bool:
        """Finish the file; store it unless identical bytes are already there. True when it changed."""
        self._flush()
        self._file.flush()
        if storage.is_local(self.url):
            os.fsync(self._file.fileno())
        self._file.close()
        if self._stored_digest() == self._hash.digest():
            os.unlink(self._staged)
            return False
        storage.publish(self._staged, self.url)
        return True

    def discard(self) -> None:
        """Drop the staged file (the stage failed): the stored file stays as it was."""
        if not self._file.closed:
            self._file.close()
        if os.path.exists(self._staged):
            os.unlink(self._staged)

    def _flush(self) -> None:
        if self._pending:
            data = "".join(self._pending).encode("utf-8")
            self._pending.clear()
            self._chars = 0
            self._file.write(data)
            self._hash.update(data)
            self.bytes += len(data)

    def _stored_digest(self) -> bytes | None:
        """The sha256 of what is stored at the URL now; None when nothing is, or its size differs.
        Object stores: one HEAD, then one ranged GET per 8 MiB (a small file costs what a read costs)."""
        fs, path = storage.filesystem(self.url), storage.strip_protocol(self.url)
        digest = hashlib.sha256()
        try:
            if storage.is_local(self.url):
                if os.path.getsize(path) != self.bytes:
                    return None
                buffer = bytearray(64 << 10)
                view = memoryview(buffer)
                with open(path, "rb", buffering=0) as f:
                    while n := f.readinto(buffer):
                        digest.update(view[:n])
                return digest.digest()
            if storage.retrying(fs.size, path, what=f"size {self.url}") != self.bytes:
                return None
            for start in range(0, self.bytes, _READ_CHUNK):
                end = min(start + _READ_CHUNK, self.bytes)
                digest.update(storage.retrying(fs.cat_file, path, start=start, end=end, what=f"read {self.url}"))
            return digest.digest()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
