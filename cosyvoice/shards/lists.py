"""``data.list`` files: one parquet path per line, what the training data pipeline reads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from cosyvoice import storage
from cosyvoice.corpus.manifest import LIBRITTS_SUBSETS
from cosyvoice.corpus.parts import expand_subsets, parts_from_env
from cosyvoice.corpus.shard_plan import ShardKey
from cosyvoice.shards.make_parquet import parquet_name

#: what ``train.data.list`` / ``cv.data.list`` cover by default (the recipe's choice)
TRAIN_SUBSETS = tuple(s for s in LIBRITTS_SUBSETS if s.startswith("train-"))
CV_SUBSETS = tuple(s for s in LIBRITTS_SUBSETS if s.startswith("dev-"))


@dataclass
class ListsReport:
    train: list[str]
    cv: list[str]
    subsets: dict[str, int]  # subset -> shards listed
    unprepared: list[str] = field(default_factory=list)  # asked for, but no shard plan (not listed)
    train_list: str = ""
    cv_list: str = ""

    def summary(self) -> str:
        skipped = f"; no manifest (not listed): {', '.join(self.unprepared)}" if self.unprepared else ""
        return (f"{len(self.train)} train shard(s) -> {self.train_list}, {len(self.cv)} cv shard(s) -> {self.cv_list}"
                f" from {len(self.subsets)} subset(s){skipped}")


def make_data_lists(layout, train_subsets: list[str] | tuple[str, ...] = TRAIN_SUBSETS,
                    cv_subsets: list[str] | tuple[str, ...] = CV_SUBSETS,
                    parts: Mapping[str, list[str]] | None = None) -> ListsReport:
    """The training lists of a pipeline data root (a :class:`cosyvoice.layout.DataLayout`): every
    subset asked for that has a shard plan gets its ``data.list`` (all planned shards must exist),
    then ``train.data.list`` / ``cv.data.list`` concatenate them. A subset without a shard plan is
    not listed and is named in the report. A subset split into parts (``parts``; default: the
    ``COSYVOICE_SUBSET_PARTS`` environment variable) stands for all of its parts, in spec order."""
    parts = parts_from_env() if parts is None else parts
    train_subsets, cv_subsets = expand_subsets(train_subsets, parts), expand_subsets(cv_subsets, parts)
    per_subset, unprepared = {}, []
    for subset in sorted(set(train_subsets) | set(cv_subsets)):
        if not layout.has_shard_plan(subset):
            unprepared.append(subset)
            continue
        indices = [ShardKey.parse(key).index for key in layout.shard_plan(subset)]
        per_subset[subset] = subset_lists(layout.parquet_dir(subset), indices)
    report = write_training_lists(layout.train_list(), layout.cv_list(), per_subset, list(train_subsets),
                                  list(cv_subsets))
    report.unprepared = unprepared
    return report


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


def write_training_lists(train_list: str, cv_list: str, per_subset: dict[str, list[str]], train_subsets: list[str],
                         cv_subsets: list[str]) -> ListsReport:
    """``train_list`` / ``cv_list``: the recipe's ``cat`` of the subset lists."""
    train = [p for s in train_subsets if s in per_subset for p in per_subset[s]]
    cv = [p for s in cv_subsets if s in per_subset for p in per_subset[s]]
    storage.write_text(train_list, "".join(f"{p}\n" for p in train))
    storage.write_text(cv_list, "".join(f"{p}\n" for p in cv))
    return ListsReport(train=train, cv=cv, subsets={s: len(v) for s, v in per_subset.items()},
                       train_list=train_list, cv_list=cv_list)
