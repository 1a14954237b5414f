"""The whole data path (manifest -> features -> speaker means/.pt -> parquet shards -> data lists)
through the Dagster assets with ``s3://`` corpus, model and data roots on moto's S3 server produces
the same files as the same graph on local folders."""

import io
import os

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import s3fs

from assets.features import speaker_embeddings, speaker_means, speech_tokens, upstream_feature_files
from assets.manifest import manifest
from assets.shards import parquet_shards, training_data_lists
from cosyvoice.features.feature_files import load_pt
from pipelines.resources import CorpusResource, DataStore, ModelStore, TrainingResource

SHARDS = ("dev-clean-000000", "dev-clean-000002")  # 15 utterances, 5 per shard


def run_graph(corpus: str, data: str, models: str) -> None:
    resources = {"corpus": CorpusResource(root=corpus), "store": DataStore(root=data),
                 "models": ModelStore(root=models), "training": TrainingResource(model_dir=os.path.join(data, "llm"))}
    shard_range = {"dagster/asset_partition_range_start": SHARDS[0], "dagster/asset_partition_range_end": SHARDS[1]}
    with dg.instance_for_test() as instance:
        steps = [
            ([manifest], {"partition_key": "dev-clean",
                          "run_config": {"ops": {"manifest": {"config": {"utts_per_shard": 5}}}}}),
            ([speaker_embeddings, speech_tokens], {"tags": shard_range, "run_config": {"ops": {
                n: {"config": {"num_workers": 1}} for n in ("speaker_embeddings", "speech_tokens")}}}),
            ([speaker_means, upstream_feature_files], {"partition_key": "dev-clean"}),
            ([parquet_shards], {"tags": shard_range}),
            ([training_data_lists], {}),
        ]
        for assets, kwargs in steps:
            result = dg.materialize(assets, instance=instance, resources=resources, **kwargs)
            assert result.success
            assert all(e.passed for e in result.get_asset_check_evaluations()), assets


def _table(data: bytes, normalise) -> pa.Table:
    """A parquet table with the data/corpus roots in its string columns replaced by placeholders."""
    table = pq.read_table(io.BytesIO(data))
    for i, field in enumerate(table.schema):
        if pa.types.is_string(field.type):
            column = pa.array([None if v is None else normalise(v) for v in table.column(i).to_pylist()],
                              type=field.type)
            table = table.set_column(i, field, column)
    return table


def test_the_data_path_on_s3_writes_the_same_files_as_on_local_folders(clean_corpus, tiny_models, s3_bucket,
                                                                        s3_server, tmp_path):
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.put(os.path.join(clean_corpus, "dev-clean"), f"{s3_bucket}/LibriTTS/", recursive=True)
    for name in ("campplus.onnx", "speech_tokenizer_v2.onnx"):
        fs.put(os.path.join(tiny_models, name), f"{s3_bucket}/models/{name}")
    remote = f"s3://{s3_bucket}/data"
    run_graph(f"s3://{s3_bucket}/LibriTTS", remote, f"s3://{s3_bucket}/models")
    local = tmp_path / "data"
    run_graph(clean_corpus, str(local), tiny_models)

    local_files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()
                         and not p.name.startswith("."))
    remote_files = sorted(p[len(f"{s3_bucket}/data/"):] for p in fs.find(f"{s3_bucket}/data"))
    assert remote_files == local_files
    assert "train.data.list" in local_files and "cv.data.list" in local_files
    assert sum(f.startswith("parquet/dev-clean/parquet_") and f.endswith(".tar") for f in local_files) == 3
    roots = {"local": (str(local), str(clean_corpus)), "remote": (remote, f"s3://{s3_bucket}/LibriTTS")}

    def normalise(text: str, which: str) -> str:
        data_root, corpus_root = roots[which]
        return text.replace(data_root, "<root>").replace(corpus_root, "<corpus>")

    for name in local_files:
        ours, theirs = (local / name).read_bytes(), fs.cat_file(f"{s3_bucket}/data/{name}")
        if name.endswith((".parquet", ".tar")):
            assert _table(ours, lambda v: normalise(v, "local")).equals(
                _table(theirs, lambda v: normalise(v, "remote"))), name
        elif name.endswith(".pt"):
            assert load_pt(str(local / name)) == load_pt(f"{remote}/{name}"), name
        else:
            assert normalise(ours.decode(), "local") == normalise(theirs.decode(), "remote"), name
