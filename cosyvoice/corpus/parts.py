"""Manifest partitions: a whole subset, or one part of a huge subset split by speaker-folder prefix.

A 50-million-utterance subset is too much for one manifest run (one process, hours of listing), so
an operator may split it: ``COSYVOICE_SUBSET_PARTS="train-other-500=1,2,3,4,5,6,7,8,9"`` turns the
manifest partition ``train-other-500`` into nine partitions ``train-other-500~1`` ...
``train-other-500~9``, each holding the speaker folders whose names start with its prefix. Every
speaker lies inside exactly one part, so the per-subset stages (speaker means, data lists) stay
correct per part. A part is a subset everywhere downstream: its own manifest folder, shard keys
(``train-other-500~3-000012``) and parquet folder.

Prefixes of one subset must not overlap (no prefix may start another), and a speaker folder that
matches none is an error at manifest time (:func:`check_coverage`), never silently left out.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: separates a subset from its part's prefix in a partition key
PART_SEP = "~"
PARTS_ENV = "COSYVOICE_SUBSET_PARTS"


@dataclass(frozen=True, order=True)
class SubsetPart:
    """One manifest partition: ``subset`` alone (``prefix`` None) or its speaker folders starting with ``prefix``."""

    subset: str
    prefix: str | None = None

    def __post_init__(self):
        if not self.subset or PART_SEP in self.subset or "/" in self.subset:
            raise ValueError(f"{self.subset!r} is not a subset name (one path segment without {PART_SEP!r})")
        if self.prefix is not None and (not self.prefix or PART_SEP in self.prefix or "/" in self.prefix
                                        or any(c.isspace() for c in self.prefix)):
            raise ValueError(f"{self.prefix!r} is not a speaker-folder prefix (non-empty, no '/', "
                             f"{PART_SEP!r} or whitespace)")

    @property
    def key(self) -> str:
        """The partition key (and the name downstream stages use as the subset)."""
        return self.subset if self.prefix is None else f"{self.subset}{PART_SEP}{self.prefix}"

    @classmethod
    def parse(cls, key: str) -> SubsetPart:
        subset, sep, prefix = key.partition(PART_SEP)
        return cls(subset, prefix if sep else None)

    def selects(self, speaker_folder: str) -> bool:
        return self.prefix is None or speaker_folder.startswith(self.prefix)

    def __str__(self) -> str:
        return self.key


def parse_parts_spec(spec: str) -> dict[str, list[str]]:
    """``"train-other-500=1,2,3;emilia-en=EN_B0,EN_B1"`` -> ``{subset: [prefix, ...]}``, validated."""
    parts: dict[str, list[str]] = {}
    for item in (s.strip() for s in spec.split(";")):
        if not item:
            continue
        subset, sep, prefixes = item.partition("=")
        subset = subset.strip()
        names = [p.strip() for p in prefixes.split(",") if p.strip()]
        if not sep or not names:
            raise ValueError(f"{PARTS_ENV}: {item!r} is not <subset>=<prefix>,<prefix>,...")
        if subset in parts:
            raise ValueError(f"{PARTS_ENV}: subset {subset!r} is split twice")
        for p in names:
            SubsetPart(subset, p)  # validates both names
        if len(set(names)) != len(names):
            raise ValueError(f"{PARTS_ENV}: {subset} repeats a prefix in {names}")
        overlapping = [(a, b) for a in names for b in names if a != b and b.startswith(a)]
        if overlapping:
            a, b = overlapping[0]
            raise ValueError(f"{PARTS_ENV}: {subset} prefixes {a!r} and {b!r} overlap (a speaker folder "
                             f"starting with {b!r} would belong to both parts)")
        parts[subset] = names
    return parts


def parts_from_env(environ: Mapping[str, str] = os.environ) -> dict[str, list[str]]:
    return parse_parts_spec(environ.get(PARTS_ENV, ""))


def manifest_partition_keys(subsets: Iterable[str], parts: Mapping[str, list[str]]) -> list[str]:
    """The manifest partitions: each subset, or its parts when split; split subsets that are not in
    ``subsets`` (another corpus' names) are appended."""
    ordered = list(dict.fromkeys([*subsets, *parts]))
    return [SubsetPart(s, p).key for s in ordered for p in (parts.get(s) or [None])]


def partition_for(subset: str, speaker_folder: str, parts: Mapping[str, list[str]]) -> str | None:
    """The manifest partition a speaker folder of ``subset`` belongs to (None: no part takes it)."""
    prefixes = parts.get(subset)
    if not prefixes:
        return subset
    for prefix in prefixes:
        if speaker_folder.startswith(prefix):
            return SubsetPart(subset, prefix).key
    return None


def expand_subsets(subsets: Iterable[str], parts: Mapping[str, list[str]]) -> list[str]:
    """Subset names as the per-subset stages see them: a split subset becomes its part keys."""
    return [key for s in subsets for key in manifest_partition_keys([s], {s: parts[s]} if s in parts else {})]


def check_coverage(subset: str, speaker_folders: Iterable[str], parts: Mapping[str, list[str]]) -> None:
    """Raise when a speaker folder of a split subset belongs to no part (it would never be prepared)."""
    if subset not in parts:
        return
    orphans = sorted(f for f in speaker_folders if partition_for(subset, f, parts) is None)
    if orphans:
        raise ValueError(f"{subset} is split by {PARTS_ENV} into prefixes {parts[subset]}, but {len(orphans)} "
                         f"speaker folder(s) match none of them, e.g. {orphans[:5]}: add their prefix to the spec")
