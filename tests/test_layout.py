import pytest

from cosyvoice import storage
from cosyvoice.corpus.shard_plan import ShardKey, dumps_plan, plan_shards
from cosyvoice.layout import DataLayout


def test_every_location_sits_where_the_stages_write_it(tmp_path):
    root = str(tmp_path)
    layout = DataLayout(root)
    key = ShardKey("dev-clean", 3)
    assert layout.manifest_dir("dev-clean") == f"{root}/manifest/dev-clean"
    assert layout.shard_plan_file("dev-clean") == f"{root}/manifest/dev-clean/shards.json"
    assert layout.shard_file("speech_tokens", key) == f"{root}/speech_tokens/dev-clean/dev-clean-000003.parquet"
    assert layout.shard_file("speaker_embeddings", "dev-clean-000003") == (
        f"{root}/speaker_embeddings/dev-clean/dev-clean-000003.parquet")
    assert layout.shard_failures("speech_tokens", key) == f"{root}/speech_tokens/dev-clean/dev-clean-000003.failed.tsv"
    assert layout.shard_file("parquet_shards", key) == f"{root}/parquet/dev-clean/parquet_000000003.tar"
    assert layout.shard_failures("parquet_shards", key) == f"{root}/parquet/dev-clean/parquet_000000003.failed.tsv"
    assert layout.parquet_dir("dev-clean") == f"{root}/parquet/dev-clean"
    assert layout.speaker_means("dev-clean") == f"{root}/speaker_means/dev-clean.parquet"
    assert (layout.train_list(), layout.cv_list()) == (f"{root}/train.data.list", f"{root}/cv.data.list")
    assert layout.llm_model() == f"{root}/llm/llm.pt"
    assert layout.export_dir("hf") == f"{root}/export/hf"
    assert layout.export_dir("trtllm") == f"{root}/export/trtllm"
    assert layout.export_dir("engine", "bfloat16_none") == f"{root}/export/engine/bfloat16_none"
    assert layout.triton_root("cosyvoice2") == f"{root}/triton/cosyvoice2"
    assert layout.spk2info("cosyvoice2") == f"{root}/triton/cosyvoice2-spk2info.pt"


def test_an_object_store_root_gives_urls_of_the_same_shape():
    layout = DataLayout("s3://data/prefix")
    assert layout.manifest_dir("dev-clean") == "s3://data/prefix/manifest/dev-clean"
    assert layout.shard_file("speech_tokens", "train-clean-100-000012") == (
        "s3://data/prefix/speech_tokens/train-clean-100/train-clean-100-000012.parquet")


def test_unknown_stages_kinds_and_unsafe_names_are_refused_with_the_choices():
    layout = DataLayout("/data")
    with pytest.raises(ValueError, match="not a per-shard stage.*speech_tokens"):
        layout.shard_file("speech_token", "dev-clean-000000")
    with pytest.raises(ValueError, match="not a shard key"):
        layout.shard_file("speech_tokens", "dev-clean")
    with pytest.raises(ValueError, match="not an export kind.*hf"):
        layout.export_dir("onnx")
    with pytest.raises(ValueError, match="has no variants"):
        layout.export_dir("hf", "bfloat16_none")
    for bad in ("../other", "", "a/b"):
        with pytest.raises(ValueError, match="not a name"):
            layout.triton_root(bad)
        with pytest.raises(ValueError, match="not a name"):
            layout.export_dir("engine", bad)


def test_the_shard_plan_is_read_parsed_and_explained_when_missing_or_broken(tmp_path):
    layout = DataLayout(str(tmp_path))
    assert not layout.has_shard_plan("dev-clean")
    with pytest.raises(FileNotFoundError, match="manifest/dev-clean/shards.json: no shard plan.*materialize the manifest"):
        layout.shard_plan("dev-clean")
    plan = plan_shards("dev-clean", ["u3", "u1", "u2"], utts_per_shard=2)
    storage.write_text(layout.shard_plan_file("dev-clean"), dumps_plan(plan))
    assert layout.has_shard_plan("dev-clean")
    assert layout.shard_plan("dev-clean") == {"dev-clean-000000": ["u1", "u2"], "dev-clean-000001": ["u3"]}
    storage.write_text(layout.shard_plan_file("dev-clean"), '{"dev-clean-000000": "u1"}')
    with pytest.raises(ValueError, match="shards.json: shards.json must map"):
        layout.shard_plan("dev-clean")


def test_shard_plan_on_s3(s3_bucket):
    layout = DataLayout(f"s3://{s3_bucket}/data")
    storage.write_text(layout.shard_plan_file("dev-clean"), dumps_plan({"dev-clean-000000": ["u1"]}))
    assert layout.shard_plan("dev-clean") == {"dev-clean-000000": ["u1"]}
    with pytest.raises(FileNotFoundError, match="manifest/test-clean/shards.json: no shard plan"):
        layout.shard_plan("test-clean")
