"""A subset split into parts by speaker-folder prefix: the spec, the partition keys, the CLI and
the training lists that stand for every part."""

from __future__ import annotations

import os
import shutil

import pytest

from cosyvoice.cli import main
from cosyvoice.corpus.parts import (
    PARTS_ENV,
    SubsetPart,
    expand_subsets,
    manifest_partition_keys,
    parse_parts_spec,
    partition_for,
)
from cosyvoice.corpus.shard_plan import ShardKey
from cosyvoice.layout import DataLayout
from cosyvoice.shards.lists import make_data_lists
from cosyvoice.shards.make_parquet import parquet_name


def test_the_spec_names_parts_that_become_partition_keys_and_subsets_downstream():
    parts = parse_parts_spec(" train-other-500=1,2, 3 ; emilia-en=EN_B0,EN_B1")
    assert parts == {"train-other-500": ["1", "2", "3"], "emilia-en": ["EN_B0", "EN_B1"]}
    keys = manifest_partition_keys(["dev-clean", "train-other-500"], parts)
    assert keys == ["dev-clean", "train-other-500~1", "train-other-500~2", "train-other-500~3",
                    "emilia-en~EN_B0", "emilia-en~EN_B1"]
    assert SubsetPart.parse("train-other-500~3") == SubsetPart("train-other-500", "3")
    assert ShardKey.parse("train-other-500~3-000012") == ShardKey("train-other-500~3", 12)
    assert partition_for("train-other-500", "3044", parts) == "train-other-500~3"
    assert partition_for("train-other-500", "4044", parts) is None
    assert expand_subsets(["dev-clean", "train-other-500"], parts) == ["dev-clean", *keys[1:4]]


@pytest.mark.parametrize("spec, message", [("a=1,12", "overlap"), ("a=1;a=2", "split twice"), ("a", "not <subset>="),
                                           ("a=1,1", "repeats"), ("a~b=1", "not a subset name")])
def test_a_bad_spec_is_refused_with_the_reason(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_parts_spec(spec)


def test_the_cli_prepares_one_part_under_part_shard_keys(broken_corpus, tmp_path, monkeypatch, capsys):
    src = os.path.join(broken_corpus, "dev-clean")
    monkeypatch.setenv(PARTS_ENV, "dev-clean=2,5,6,9")
    assert main(["prepare-libritts", "--src_dir", src, "--des_dir", str(tmp_path / "m"), "--speaker_prefix", "9",
                 "--utts_per_shard", "2", "--num_workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "dev-clean~9: 1 utterances, 1 speakers" in out and "found 11 audio files" in out
    assert (tmp_path / "m" / "shards.json").read_text().startswith('{\n "dev-clean~9-000000": [')
    monkeypatch.setenv(PARTS_ENV, "dev-clean=2,5,9")
    assert main(["prepare-libritts", "--src_dir", src, "--des_dir", str(tmp_path / "x"), "--speaker_prefix", "9"]) == 2
    assert "6478" in capsys.readouterr().err  # the folder no part takes is named


def test_training_lists_cover_every_part_of_a_split_subset(tmp_path, monkeypatch):
    layout = DataLayout(str(tmp_path))
    for key, shards in (("train-clean-100~1", 2), ("train-clean-100~2", 1), ("dev-clean", 1)):
        os.makedirs(layout.manifest_dir(key))
        with open(layout.shard_plan_file(key), "w") as f:
            f.write("{" + ", ".join(f'"{key}-{i:06d}": ["u{i}"]' for i in range(shards)) + "}")
        os.makedirs(layout.parquet_dir(key))
        for i in range(shards):
            open(os.path.join(layout.parquet_dir(key), parquet_name(i)), "w").close()
    monkeypatch.setenv(PARTS_ENV, "train-clean-100=1,2")
    report = make_data_lists(layout, ["train-clean-100"], ["dev-clean"])
    assert [p.rsplit("/", 2)[1] for p in report.train] == ["train-clean-100~1"] * 2 + ["train-clean-100~2"]
    assert report.subsets == {"dev-clean": 1, "train-clean-100~1": 2, "train-clean-100~2": 1}
    shutil.rmtree(layout.manifest_dir("train-clean-100~2"))
    assert make_data_lists(layout, ["train-clean-100"], []).unprepared == ["train-clean-100~2"]


def test_the_manifest_asset_prepares_a_part_partition_from_its_subset_folder(broken_corpus, tmp_path, monkeypatch):
    import dagster as dg

    from assets.manifest import ManifestConfig, manifest
    from pipelines.resources import CorpusResource, DataStore

    monkeypatch.setenv(PARTS_ENV, "dev-clean=2,5,6,9")
    with dg.instance_for_test() as instance:
        context = dg.build_asset_context(partition_key="dev-clean~5", instance=instance)
        result = manifest(context, ManifestConfig(utts_per_shard=2), CorpusResource(root=broken_corpus),
                          DataStore(root=str(tmp_path)))
        assert instance.get_dynamic_partitions("shards") == ["dev-clean~5-000000", "dev-clean~5-000001"]
    assert result.metadata["utterances"] == 4 and os.listdir(tmp_path / "manifest") == ["dev-clean~5"]
    assert all(r.passed for r in result.check_results)
