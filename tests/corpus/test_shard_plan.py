import pytest

from cosyvoice.corpus.shard_plan import dumps_plan, loads_plan, plan_shards, shard_key, shard_subset


def test_plan_sorts_ids_and_cuts_consecutive_shards_of_n():
    plan = plan_shards("dev-clean", ["c", "a", "e", "b", "d"], utts_per_shard=2)
    assert plan == {"dev-clean-000000": ["a", "b"], "dev-clean-000001": ["c", "d"], "dev-clean-000002": ["e"]}


def test_keys_round_trip_to_their_subset():
    assert shard_key("train-clean-100", 12) == "train-clean-100-000012"
    assert shard_subset("train-clean-100-000012") == "train-clean-100"
    with pytest.raises(ValueError):
        shard_subset("nodigits")


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
