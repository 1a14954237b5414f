"""Upstream ``.pt`` feature dicts (``torch.save`` of ``dict[str, list]``) without torch.

Such a file is a zip archive holding an ordinary pickle of builtin containers. It is read here with
an unpickler that refuses every class and function reference (the way pickles run code), so it is
as safe as ``torch.load(weights_only=True)`` and costs no torch import (~0.5 GB of RSS). Anything
else (tensors, the legacy format) goes through ``torch.load(weights_only=True)``.

Whole-corpus dicts are large as Python objects (~32 bytes per number); ``load_pt_compact`` decodes
one in a short-lived child process and hands back numpy views of one flat array, so the caller's
peak memory does not grow with the corpus.
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
import zipfile

from cosyvoice import storage


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing {module}.{name}: only plain dicts/lists/numbers are expected")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("tensor storage found: not a plain container")


def load_pt(url: str) -> dict:
    data = storage.read_bytes(url)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            (name,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            return _PlainUnpickler(io.BytesIO(archive.read(name))).load()
    except (zipfile.BadZipFile, ValueError, pickle.UnpicklingError):
        import torch

        return torch.load(io.BytesIO(data), weights_only=True)


def _flatten_to_npz(url: str, dtype: str, out: str) -> None:
    import numpy as np

    table = load_pt(url)
    keys = list(table)
    offsets = np.zeros(len(keys) + 1, dtype=np.int64)
    np.cumsum([len(table[k]) for k in keys], out=offsets[1:])
    flat = np.empty(int(offsets[-1]), dtype=dtype)
    for i, key in enumerate(keys):
        flat[offsets[i]:offsets[i + 1]] = table.pop(key)
    np.savez(out, keys=np.array(keys, dtype=object), offsets=offsets, values=flat)


def load_pt_compact(url: str, dtype: str) -> dict:
    """``{key: numpy view}`` of a ``.pt`` dict of lists, decoded in a child process."""
    import multiprocessing

    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "table.npz")
        context = multiprocessing.get_context("spawn")
        child = context.Process(target=_flatten_to_npz, args=(url, dtype, out))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"{url}: could not read the feature dict (exit code {child.exitcode}); "
                               "run load_pt on it to see the error")
        with np.load(out, allow_pickle=True) as archive:
            keys, offsets, values = archive["keys"], archive["offsets"], archive["values"]
    return {str(k): values[offsets[i]:offsets[i + 1]] for i, k in enumerate(keys)}
