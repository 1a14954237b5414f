import os

import pyarrow.parquet as pq
import s3fs

from cosyvoice.corpus.manifest import prepare_libritts
from cosyvoice.features.stages import extract_embedding, extract_speech_token
from cosyvoice.shards.make_parquet import make_parquet


def test_corpus_features_and_shards_all_on_s3_match_a_local_run(clean_corpus, tiny_models, s3_bucket, s3_server, tmp_path):
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.put(os.path.join(clean_corpus, "dev-clean"), f"{s3_bucket}/LibriTTS/", recursive=True)
    fs.put(os.path.join(tiny_models, "campplus.onnx"), f"{s3_bucket}/models/campplus.onnx")
    src, data = f"s3://{s3_bucket}/LibriTTS/dev-clean", f"s3://{s3_bucket}/data/dev-clean"
    prepare_libritts(src, data)
    extract_embedding(data, f"s3://{s3_bucket}/models/campplus.onnx", num_workers=2)
    extract_speech_token(data, os.path.join(tiny_models, "speech_tokenizer_v2.onnx"), num_workers=1)
    report = make_parquet(data, f"{data}/parquet", num_utts_per_parquet=8, num_processes=2)
    assert report.rows == 15 and len(report.shards) == 2

    local = tmp_path / "dev-clean"
    prepare_libritts(os.path.join(clean_corpus, "dev-clean"), str(local))
    extract_embedding(str(local), os.path.join(tiny_models, "campplus.onnx"), num_workers=1)
    extract_speech_token(str(local), os.path.join(tiny_models, "speech_tokenizer_v2.onnx"), num_workers=1)
    make_parquet(str(local), str(local / "parquet"), num_utts_per_parquet=8)

    listed = fs.cat_file(f"{s3_bucket}/data/dev-clean/parquet/data.list").decode().splitlines()
    assert listed == [f"{data}/parquet/parquet_{i:09d}.tar" for i in range(2)]
    for i in range(2):
        with fs.open(f"{s3_bucket}/data/dev-clean/parquet/parquet_{i:09d}.tar", "rb") as f:
            remote = pq.read_table(f)
        ours = pq.read_table(str(local / "parquet" / f"parquet_{i:09d}.tar"))
        assert remote.drop_columns(["wav"]).equals(ours.drop_columns(["wav"]))
        assert all(w.startswith(f"{src}/") for w in remote.column("wav").to_pylist())
    for name in ("failed_extract_embedding.tsv", "failed_extract_speech_token.tsv", "parquet/failed_make_parquet.tsv"):
        assert fs.cat_file(f"{s3_bucket}/data/dev-clean/{name}") == (local / name).read_bytes() == (
            b"utt\tpath\tstage\treason\tdetail\n")  # stored on S3 like locally: the header, no failures
