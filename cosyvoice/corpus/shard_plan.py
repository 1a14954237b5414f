"""The shard plan: utterances sorted by id, cut into consecutive shards of N.

Shards are the partition unit of every downstream stage (features, tokens, parquet), so their
keys are stable names: ``<subset>-<index:06d>``, e.g. ``train-clean-100-000012``
(:class:`ShardKey`). The plan is stored as ``shards.json`` in the subset's manifest folder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from json.encoder import encode_basestring  # what json.dumps(..., ensure_ascii=False) uses for a str

from cosyvoice import storage

#: the plan's file name in the manifest folder; written last, so its presence marks a complete manifest
PLAN_FILE = "shards.json"
_KEY = re.compile(r"(?P<subset>.+)-(?P<index>[0-9]{6,})", re.ASCII)


@dataclass(frozen=True, order=True)
class ShardKey:
    """One shard of a subset's plan; ``str(key)`` is the partition key ``<subset>-<index:06d>``."""

    subset: str
    index: int

    def __post_init__(self):
        if not self.subset or "/" in self.subset:
            raise ValueError(f"{self.subset!r} is not a subset name for a shard key")
        if self.index < 0:
            raise ValueError(f"a shard index is >= 0, got {self.index}")

    @classmethod
    def parse(cls, key: str) -> ShardKey:
        """``"dev-clean-000003"`` -> ``ShardKey("dev-clean", 3)``; anything that does not round-trip
        through ``str`` (no index, an index of fewer than six digits) is refused."""
        match = _KEY.fullmatch(key)
        parsed = cls(match["subset"], int(match["index"])) if match else None
        if parsed is None or str(parsed) != key:
            raise ValueError(f"{key!r} is not a shard key (<subset>-<index:06d>, e.g. dev-clean-000003)")
        return parsed

    def __str__(self) -> str:
        return f"{self.subset}-{self.index:06d}"


def shard_key(subset: str, index: int) -> str:
    return str(ShardKey(subset, index))


def plan_shards(subset: str, utts: Iterable[str], utts_per_shard: int = 1000) -> dict[str, list[str]]:
    if utts_per_shard < 1:
        raise ValueError(f"utts_per_shard must be >= 1, got {utts_per_shard}")
    ordered = sorted(utts)
    if len(set(ordered)) != len(ordered):
        raise ValueError("utterance ids must be unique to plan shards")
    return {
        shard_key(subset, i // utts_per_shard): ordered[i:i + utts_per_shard]
        for i in range(0, len(ordered), utts_per_shard)
    }


def dumps_plan(plan: dict[str, list[str]]) -> str:
    return json.dumps(plan, indent=1, ensure_ascii=False, sort_keys=True) + "\n"


#: shard indices have six digits; from a million shards on, key order stops being index order
MAX_SHARDS = 1_000_000


class PlanWriter:
    """``plan_shards`` + ``dumps_plan`` one utterance at a time: the same text, written as it goes.

    Feed it the utterance ids in sorted order (unique); ``write`` receives the JSON piece by piece.
    """

    def __init__(self, subset: str, utts_per_shard: int, write: Callable[[str], None]):
        if utts_per_shard < 1:
            raise ValueError(f"utts_per_shard must be >= 1, got {utts_per_shard}")
        shard_key(subset, 0)  # validates the subset name before any work is done
        self.subset, self.utts_per_shard, self._write = subset, utts_per_shard, write
        self.keys: list[str] = []
        self._count = 0
        self._last: str | None = None

    def add(self, utt: str) -> None:
        if self._last is not None and utt <= self._last:
            raise ValueError(f"shard plan: utterance ids must arrive sorted and unique, got {utt!r} after {self._last!r}")
        self._last = utt
        if self._count % self.utts_per_shard:
            self._write(f",\n  {encode_basestring(utt)}")
        else:
            index = self._count // self.utts_per_shard
            if index >= MAX_SHARDS:
                raise ValueError(f"{self.subset}: more than {MAX_SHARDS - 1} shards of {self.utts_per_shard} utterances; "
                                 "raise utts_per_shard or split the subset into parts (COSYVOICE_SUBSET_PARTS)")
            key = shard_key(self.subset, index)
            self.keys.append(key)
            self._write(("{\n" if index == 0 else "\n ],\n") + f" {encode_basestring(key)}: [\n  {encode_basestring(utt)}")
        self._count += 1

    def close(self) -> list[str]:
        """Finish the JSON text; returns the shard keys in order."""
        self._write("\n ]\n}\n" if self._count else "{}\n")
        return self.keys


def loads_plan(content: str) -> dict[str, list[str]]:
    plan = json.loads(content)
    if not isinstance(plan, dict) or not all(isinstance(v, list) for v in plan.values()):
        raise ValueError(f"{PLAN_FILE} must map shard keys to lists of utterance ids")
    for key in plan:
        ShardKey.parse(key)  # raises, naming the key
    return plan


def read_plan(url: str) -> dict[str, list[str]]:
    """The shard plan stored at ``url`` (a manifest's ``shards.json``), validated; the errors name
    the file and, for a missing one, what writes it."""
    try:
        text = storage.read_text(url)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{url}: no shard plan; the manifest writes it last, so materialize the manifest "
                                "(prepare-libritts) of this subset first") from exc
    try:
        return loads_plan(text)
    except ValueError as exc:
        raise ValueError(f"{url}: {exc}") from exc
