"""The library's source files, for tests that check the code as text (layering, names)."""

from __future__ import annotations

import os

import cosyvoice

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIBRARY = os.path.dirname(os.path.abspath(cosyvoice.__file__))


def library_sources() -> dict[str, str]:
    """Every ``.py`` file below ``cosyvoice/`` (Triton templates included), by path relative to the
    repository -> its text."""
    found = {}
    for root, _, files in os.walk(LIBRARY):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path, encoding="utf-8") as f:
                    found[os.path.relpath(path, REPO)] = f.read()
    return found
