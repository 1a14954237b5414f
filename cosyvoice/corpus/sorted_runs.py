"""An external merge sort for rows of strings: what lets the manifest sort 50M utterances in flat memory.

Rows arrive in batches that the caller has sorted; each batch is appended to a *run* file on local
disk (a batch that starts at or after the end of the current run extends it, so a walk that is
already in order costs one run), and ``merged()`` streams every row back in order with a k-way
merge that holds one row per run. When ``max_runs`` runs exist, the smaller half of them is merged
into one (so a row is rewritten a logarithmic number of times), keeping the open files bounded
whatever the input order.

Rows are tuples of ``fields`` strings compared as tuples; only the last field may contain a tab and
no field may contain a newline (the manifest's ids and paths hold no whitespace, and its text is
one line).
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterable, Iterator
from typing import IO

Row = tuple[str, ...]
#: runs kept before they are merged into one (each open file costs a descriptor and a read buffer)
MAX_RUNS = 64
_ENCODING = {"encoding": "utf-8", "errors": "surrogateescape", "newline": "\n"}


class SortedRuns:
    """Sorted rows spilled to run files below ``folder`` (which the caller creates and removes)."""

    def __init__(self, folder: str, name: str, fields: int, *, max_runs: int | None = None):
        max_runs = MAX_RUNS if max_runs is None else max_runs
        if fields < 1 or max_runs < 2:
            raise ValueError(f"need fields >= 1 and max_runs >= 2, got {fields} and {max_runs}")
        self.folder, self.name, self.fields, self.max_runs = folder, name, fields, max_runs
        self.runs: list[str] = []
        self.sizes: dict[str, int] = {}  # run -> rows
        self.rows = 0
        self._out: IO[str] | None = None
        self._last: Row | None = None
        self._made = 0
        self.collapses = 0

    def add_sorted(self, rows: list[Row]) -> None:
        """Append ``rows`` (already sorted) as a run, or to the current run when they continue it."""
        if not rows:
            return
        if self._out is None or self._last is None or rows[0] < self._last:
            self._start_run()
        assert self._out is not None
        self._out.writelines(["\t".join(row) + "\n" for row in rows])
        self._last = rows[-1]
        self.rows += len(rows)
        self.sizes[self.runs[-1]] += len(rows)

    def merged(self) -> Iterator[Row]:
        """Every row added, in sorted order (rows that compare equal keep no particular order)."""
        self._close_run()
        if len(self.runs) == 1:
            yield from self._read(self.runs[0])
            return
        yield from heapq.merge(*(self._read(run) for run in self.runs))

    def _start_run(self) -> None:
        self._close_run()
        if len(self.runs) >= self.max_runs:
            self._collapse()
        self._made += 1
        path = os.path.join(self.folder, f"{self.name}.{self._made:06d}.run")
        self.runs.append(path)
        self.sizes[path] = 0
        self._out = open(path, "w", **_ENCODING)  # noqa: SIM115 - closed by _close_run
        self._last = None

    def _close_run(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def _collapse(self) -> None:
        """Merge the smaller half of the runs into one (bounded open files, few passes over the data)."""
        chosen = sorted(self.runs, key=self.sizes.__getitem__)[: max(2, self.max_runs // 2)]
        self._made += 1
        self.collapses += 1
        path = os.path.join(self.folder, f"{self.name}.{self._made:06d}.run")
        with open(path, "w", **_ENCODING) as out:
            out.writelines("\t".join(row) + "\n" for row in heapq.merge(*(self._read(run) for run in chosen)))
        for run in chosen:
            os.unlink(run)
            self.runs.remove(run)
        self.sizes[path] = sum(self.sizes.pop(run) for run in chosen)
        self.runs.append(path)

    def _read(self, path: str) -> Iterable[Row]:
        split = self.fields - 1
        with open(path, **_ENCODING) as f:
            for line in f:
                yield tuple(line[:-1].split("\t", split))
