"""Presentation helpers shared by assets: plots and pictures embedded in asset metadata."""

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
    return _png_markdown(fig, title)


def line_plot(series: dict[str, tuple[Sequence[float], Sequence[float]]], *, title: str, xlabel: str) -> dg.MetadataValue:
    """Named (x, y) series as one PNG line chart in markdown metadata (loss curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3), dpi=90)
    for name, (xs, ys) in series.items():
        if len(xs):
            ax.plot(list(xs), list(ys), marker="o" if len(xs) < 30 else None, label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.legend()
    fig.tight_layout()
    return _png_markdown(fig, title)


def png_markdown(png: bytes, title: str) -> dg.MetadataValue:
    """PNG bytes (a library's drawing) as markdown metadata, inline as a data URI."""
    return dg.MetadataValue.md(f"![{title}](data:image/png;base64,{base64.b64encode(png).decode()})")


def _png_markdown(fig, title: str) -> dg.MetadataValue:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return png_markdown(buffer.getvalue(), title)
