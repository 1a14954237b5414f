"""The shard plan: utterances sorted by id, cut into consecutive shards of N.

Shards are the partition unit of every downstream stage (features, tokens, parquet), so their
keys are stable names: ``<subset>-<index:06d>``, e.g. ``train-clean-100-000012``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable


def shard_key(subset: str, index: int) -> str:
    return f"{subset}-{index:06d}"


def shard_subset(key: str) -> str:
    """The subset a shard key belongs to (``train-clean-100-000012`` -> ``train-clean-100``)."""
    subset, _, index = key.rpartition("-")
    if not subset or not index.isdigit():
        raise ValueError(f"{key!r} is not a shard key (<subset>-<index>)")
    return subset


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


def loads_plan(content: str) -> dict[str, list[str]]:
    plan = json.loads(content)
    if not isinstance(plan, dict) or not all(isinstance(v, list) for v in plan.values()):
        raise ValueError("shards.json must map shard keys to lists of utterance ids")
    return plan
