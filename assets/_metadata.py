"""Presentation helpers shared by assets: plots embedded in asset metadata."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import dagster as dg


def histogram(values: Sequence[float], *, title: str, xlabel: str, bins: int = 30) -> dg.MetadataValue:
    """A PNG histogram as markdown metadata (rendered inline by the Dagster UI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3), dpi=90)
    ax.hist(list(values), bins=bins, color="#4f6bed")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return dg.MetadataValue.md(f"![{title}](data:image/png;base64,{encoded})")
