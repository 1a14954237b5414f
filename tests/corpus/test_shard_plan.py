import pytest

from cosyvoice.corpus.shard_plan import ShardKey, dumps_plan, loads_plan, plan_shards, shard_key


def test_plan_sorts_ids_and_cuts_consecutive_shards_of_n():
    plan = plan_shards("dev-clean", ["c", "a", "e", "b", "d"], utts_per_shard=2)
    assert plan == {"dev-clean-000000": ["a", "b"], "dev-clean-000001": ["c", "d"], "dev-clean-000002": ["e"]}


def test_keys_round_trip_to_their_subset():
    assert shard_key("train-clean-100", 12) == "train-clean-100-000012"
    assert ShardKey.parse("train-clean-100-000012").subset == "train-clean-100"
    with pytest.raises(ValueError):
        ShardKey.parse("nodigits")


def test_a_shard_key_parses_into_subset_and_index_and_prints_back_unchanged():
    key = ShardKey.parse("dev-clean-000003")
    assert (key.subset, key.index) == ("dev-clean", 3) and key == ShardKey("dev-clean", 3)
    assert str(key) == "dev-clean-000003" and str(ShardKey("dev-clean", 1234567)) == "dev-clean-1234567"
    assert ShardKey.parse(str(ShardKey("train-other-500", 42))) == ShardKey("train-other-500", 42)
    assert sorted([ShardKey("b", 0), ShardKey("a", 2), ShardKey("a", 1)]) == [ShardKey("a", 1), ShardKey("a", 2), ShardKey("b", 0)]
    assert len({ShardKey("a", 1), ShardKey.parse("a-000001")}) == 1  # frozen: usable as a dict key


@pytest.mark.parametrize("bad", ["dev-clean", "dev-clean-3", "dev-clean-0000003", "-000003", "dev-clean-00000x",
                                 "dev-clean-\u0663\u0663\u0663\u0663\u0663\u0663", "a/b-000001"])
def test_strings_that_do_not_round_trip_are_not_shard_keys(bad):
    with pytest.raises(ValueError, match="not a"):
        ShardKey.parse(bad)


def test_a_shard_key_refuses_a_negative_index_or_an_empty_subset():
    with pytest.raises(ValueError, match=">= 0"):
        ShardKey("dev-clean", -1)
    with pytest.raises(ValueError, match="subset"):
        ShardKey("", 0)


def test_empty_subset_has_no_shards_and_bad_arguments_raise():
    assert plan_shards("dev-clean", []) == {}
    with pytest.raises(ValueError, match="utts_per_shard"):
        plan_shards("dev-clean", ["a"], utts_per_shard=0)
    with pytest.raises(ValueError, match="unique"):
        plan_shards("dev-clean", ["a", "a"])


def test_plan_json_round_trips_and_is_validated():
    plan = plan_shards("x", [f"u{i}" for i in range(5)], utts_per_shard=3)
    assert loads_plan(dumps_plan(plan)) == plan
    with pytest.raises(ValueError):
        loads_plan('{"x-000000": "not a list"}')
    with pytest.raises(ValueError, match="'x-1' is not a shard key"):
        loads_plan('{"x-1": ["u1"]}')


def test_a_stored_plan_is_read_back_and_a_missing_or_broken_one_names_the_file(tmp_path):
    from cosyvoice import storage
    from cosyvoice.corpus.shard_plan import PLAN_FILE, read_plan

    url = str(tmp_path / PLAN_FILE)
    with pytest.raises(FileNotFoundError, match=f"{url}: no shard plan.*prepare-libritts"):
        read_plan(url)
    plan = plan_shards("dev-clean", ["b", "a", "c"], utts_per_shard=2)
    storage.write_text(url, dumps_plan(plan))
    assert read_plan(url) == plan
    storage.write_text(url, '{"dev-clean-7": ["a"]}')
    with pytest.raises(ValueError, match=f"{url}: 'dev-clean-7' is not a shard key"):
        read_plan(url)
