"""Where a benchmark's ``--json`` figures go: one JSON file per run, read back by ``bench/capacity.py``."""

from __future__ import annotations

import json
import os


def write_figures(path: str, figures: dict) -> None:
    """``figures`` as sorted, indented JSON at ``path`` (its folder created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(figures, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"figures: {path}")
