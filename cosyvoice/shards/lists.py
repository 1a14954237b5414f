"""``data.list`` files: one parquet path per line, what the training data pipeline reads."""

from __future__ import annotations

from dataclasses import dataclass

from cosyvoice import storage
from cosyvoice.shards.make_parquet import parquet_name


@dataclass
class ListsReport:
    train: list[str]
    cv: list[str]
    subsets: dict[str, int]  # subset -> shards listed


def subset_lists(parquet_dir: str, shard_indices: list[int]) -> list[str]:
    """Write ``data.list`` / ``utt2data.list`` / ``spk2data.list`` for one subset; every planned shard
    must exist (a partial list would silently train on part of the data)."""
    parquets = [storage.join(parquet_dir, parquet_name(i)) for i in shard_indices]
    missing = [p for p in parquets if not storage.exists(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(parquets)} planned shard(s) are missing, e.g. {missing[0]}")
    storage.write_text(storage.join(parquet_dir, "data.list"), "".join(f"{p}\n" for p in parquets))
    for kind in ("utt", "spk"):
        storage.write_text(storage.join(parquet_dir, f"{kind}2data.list"),
                           "".join(f"{storage.join(parquet_dir, f'{kind}2parquet_{i:09d}.json')}\n" for i in shard_indices))
    return parquets


def write_training_lists(root: str, per_subset: dict[str, list[str]], train_subsets: list[str],
                         cv_subsets: list[str]) -> ListsReport:
    """``train.data.list`` / ``cv.data.list`` below ``root``: the recipe's ``cat`` of subset lists."""
    train = [p for s in train_subsets if s in per_subset for p in per_subset[s]]
    cv = [p for s in cv_subsets if s in per_subset for p in per_subset[s]]
    storage.write_text(storage.join(root, "train.data.list"), "".join(f"{p}\n" for p in train))
    storage.write_text(storage.join(root, "cv.data.list"), "".join(f"{p}\n" for p in cv))
    return ListsReport(train=train, cv=cv, subsets={s: len(v) for s, v in per_subset.items()})
