import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cosyvoice.corpus.manifest import prepare_libritts
from cosyvoice.features.stages import extract_embedding, extract_speech_token
from cosyvoice.shards.make_parquet import make_parquet

INSTRUCT = "You are a helpful assistant.<|endofprompt|>"


@pytest.fixture(scope="module")
def data_dir(clean_corpus, tiny_models, tmp_path_factory):
    """A manifest with instruct and all three upstream feature files."""
    dest = str(tmp_path_factory.mktemp("shards") / "dev-clean")
    prepare_libritts(os.path.join(clean_corpus, "dev-clean"), dest, instruct=INSTRUCT)
    extract_embedding(dest, os.path.join(tiny_models, "campplus.onnx"), num_workers=1)
    extract_speech_token(dest, os.path.join(tiny_models, "speech_tokenizer_v2.onnx"), num_workers=1)
    return dest


def upstream_tables(src_dir: str, des_dir: str, n: int, reject: dict | None = None) -> dict[str, pa.Table]:
    """What upstream make_parquet_list.py stores, built the way pandas converts it (types inferred)."""
    def read(name):
        out = {}
        with open(os.path.join(src_dir, name)) as f:
            for line in f:
                parts = line.replace("\n", "").split()
                out[parts[0]] = " ".join(parts[1:])
        return out

    wav, text, utt2spk, instruct = read("wav.scp"), read("text"), read("utt2spk"), read("instruct")
    utt2embedding = torch.load(os.path.join(src_dir, "utt2embedding.pt"), weights_only=True)
    spk2embedding = torch.load(os.path.join(src_dir, "spk2embedding.pt"), weights_only=True)
    tokens = torch.load(os.path.join(src_dir, "utt2speech_token.pt"), weights_only=True)
    utts = list(wav)
    tables = {}
    for i, j in enumerate(range(0, len(utts), n)):
        chunk = utts[j:j + n]
        columns = {
            "utt": chunk, "audio_data": [open(wav[u], "rb").read() for u in chunk], "wav": [wav[u] for u in chunk],
            "text": [text[u] for u in chunk], "spk": [utt2spk[u] for u in chunk],
            "utt_embedding": [utt2embedding[u] for u in chunk],
            "spk_embedding": [spk2embedding[utt2spk[u]] for u in chunk],
            "speech_token": [tokens[u] for u in chunk], "instruct": [instruct[u] for u in chunk],
        }
        if reject is not None:
            columns["reject_speech_token"] = [reject.get(u, []) for u in chunk]
        tables[os.path.join(des_dir, f"parquet_{i:09d}.tar")] = _round_trip(pa.table(columns))
    return tables


def _round_trip(table: pa.Table) -> pa.Table:
    """Through a parquet file written with pyarrow's defaults, as pandas' to_parquet does."""
    import io

    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return pq.read_table(io.BytesIO(buffer.getvalue()))


def test_shards_hold_exactly_what_upstream_writes(data_dir, tmp_path):
    des = str(tmp_path / "parquet")
    report = make_parquet(data_dir, des, num_utts_per_parquet=4, num_processes=2)
    expected = upstream_tables(data_dir, des, 4)
    assert [s.url for s in report.shards] == list(expected) and report.rows == 15 and not report.skipped
    for path, table in expected.items():
        ours = pq.read_table(path)
        assert ours.schema.names == ["utt", "audio_data", "wav", "text", "spk", "utt_embedding", "spk_embedding",
                                     "speech_token", "instruct"]
        assert [str(t) for t in ours.schema.types] == [
            "string", "binary", "string", "string", "string", "list<element: double>", "list<element: double>",
            "list<element: int64>", "string"]
        assert ours.schema.equals(table.schema) and ours.equals(table)
    with open(os.path.join(des, "data.list")) as f:
        assert f.read().splitlines() == list(expected)
    with open(os.path.join(des, "utt2data.list")) as f:
        utt_lists = f.read().splitlines()
    with open(utt_lists[1]) as f:
        assert json.load(f) == {u: list(expected)[1] for u in expected[list(expected)[1]].column("utt").to_pylist()}
    with open(os.path.join(des, "spk2data.list")) as f:
        spk_lists = f.read().splitlines()
    assert all(os.path.exists(p) for p in spk_lists)  # upstream never writes these (defect D1)
    with open(spk_lists[0]) as f:
        assert sorted(json.load(f)) == sorted(set(expected[list(expected)[0]].column("spk").to_pylist()))


def test_audio_data_is_the_whole_original_file(data_dir, tmp_path):
    import io

    import soundfile as sf

    make_parquet(data_dir, str(tmp_path / "p"), num_utts_per_parquet=100)
    row = pq.read_table(str(tmp_path / "p" / "parquet_000000000.tar")).slice(0, 1).to_pylist()[0]
    assert row["audio_data"] == open(row["wav"], "rb").read()
    audio, rate = sf.read(io.BytesIO(row["audio_data"]))
    assert rate == 24000 and len(audio) > 0


def test_dpo_reject_tokens_are_empty_lists_never_null(data_dir, tmp_path):
    src = tmp_path / "train"
    shutil.copytree(data_dir, src)
    tokens = torch.load(src / "utt2speech_token.pt", weights_only=True)
    reject = {u: list(reversed(t)) for u, t in list(tokens.items())[:5]}
    (tmp_path / "train_reject").mkdir()
    torch.save(reject, tmp_path / "train_reject" / "utt2speech_token.pt")
    make_parquet(str(src), str(tmp_path / "p"), num_utts_per_parquet=100, dpo=True)
    table = pq.read_table(str(tmp_path / "p" / "parquet_000000000.tar"))
    assert str(table.schema.field("reject_speech_token").type) == "list<element: int64>"
    assert table.column("reject_speech_token").null_count == 0
    values = dict(zip(table.column("utt").to_pylist(), table.column("reject_speech_token").to_pylist()))
    assert {u: v for u, v in values.items() if v} == reject and sum(1 for v in values.values() if v == []) == 10


def test_missing_features_are_reported_not_a_keyerror(data_dir, tmp_path):
    src = tmp_path / "d"
    shutil.copytree(data_dir, src)
    tokens = torch.load(src / "utt2speech_token.pt", weights_only=True)
    dropped = sorted(tokens)[3]
    del tokens[dropped]
    torch.save(tokens, src / "utt2speech_token.pt")
    report = make_parquet(str(src), str(tmp_path / "p"), num_utts_per_parquet=100)
    assert report.rows == 14 and [(p.utt, p.stage, p.reason) for p in report.skipped] == [
        (dropped, "make_parquet", "missing_speech_token")]
    listed = (tmp_path / "p" / "failed_make_parquet.tsv").read_text().splitlines()
    assert listed[0].split("\t") == ["utt", "path", "stage", "reason", "detail"]
    assert [line.split("\t")[:4] for line in listed[1:]] == [
        [dropped, report.skipped[0].path, "make_parquet", "missing_speech_token"]]


def test_one_embedding_file_without_the_other_is_a_clear_error(data_dir, tmp_path):
    src = tmp_path / "d"
    shutil.copytree(data_dir, src)
    os.unlink(src / "spk2embedding.pt")
    with pytest.raises(ValueError, match="together"):
        make_parquet(str(src), str(tmp_path / "p"))


def test_a_failing_worker_raises_instead_of_being_swallowed(data_dir, tmp_path):
    blocker = tmp_path / "p"
    blocker.write_text("a file where the output folder should be")
    with pytest.raises(OSError):
        make_parquet(data_dir, str(blocker), num_utts_per_parquet=4, num_processes=2)


def test_rerun_gives_identical_shards(data_dir, tmp_path):
    make_parquet(data_dir, str(tmp_path / "a"), num_utts_per_parquet=4, num_processes=2)
    make_parquet(data_dir, str(tmp_path / "b"), num_utts_per_parquet=4, num_processes=1)
    for name in sorted(os.listdir(tmp_path / "a")):
        if name.endswith(".tar"):
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_a_feature_stage_failure_is_carried_with_its_stage_not_reported_again(data_dir, tmp_path):
    """An utterance the embedding stage failed is listed once, with that stage's reason, and
    ``parquet rows + listed failures == wav.scp utterances`` holds from the files alone."""
    from cosyvoice.problems import UtteranceProblem, read_failures, write_failures

    src = tmp_path / "d"
    shutil.copytree(data_dir, src)
    assert read_failures(str(src / "failed_extract_embedding.tsv")) == []  # the stage wrote its (empty) list
    wav = dict(line.split() for line in (src / "wav.scp").read_text().splitlines())
    vectors = torch.load(src / "utt2embedding.pt", weights_only=True)
    failed = sorted(vectors)[5]
    del vectors[failed]
    torch.save(vectors, src / "utt2embedding.pt")
    write_failures(str(src / "failed_extract_embedding.tsv"), [UtteranceProblem(
        failed, wav[failed], "feature_error", "RuntimeError: too short", stage="extract_embedding")])
    des = tmp_path / "p"
    report = make_parquet(str(src), str(des), num_utts_per_parquet=4)
    assert [(p.utt, p.stage, p.reason) for p in report.skipped] == [(failed, "extract_embedding", "feature_error")]

    rows = sum(pq.read_metadata(p).num_rows for p in (des / "data.list").read_text().splitlines())
    listed = read_failures(str(des / "failed_make_parquet.tsv"))
    assert rows + len(listed) == len(wav) == 15
    assert [(p.utt, p.path, p.stage, p.reason, p.detail) for p in listed] == [
        (failed, wav[failed], "extract_embedding", "feature_error", "RuntimeError: too short")]

    shutil.copy(os.path.join(data_dir, "utt2embedding.pt"), src / "utt2embedding.pt")  # fixed upstream
    write_failures(str(src / "failed_extract_embedding.tsv"), [])
    assert make_parquet(str(src), str(des), num_utts_per_parquet=4).skipped == []
    assert (des / "failed_make_parquet.tsv").read_text() == "utt\tpath\tstage\treason\tdetail\n"


def test_one_planned_shard_is_written_with_its_failure_list_and_no_lists(data_dir, tmp_path):
    """``shard=``: the pipeline's per-shard form of the same function: exactly the planned utterances,
    ``parquet_<index>.failed.tsv`` beside the file, the lists left to the training-lists stage."""
    plan = json.load(open(os.path.join(data_dir, "shards.json")))
    (shard, planned), = plan.items()
    report = make_parquet(data_dir, str(tmp_path), shard=shard)
    assert report.planned == planned and report.rows == len(planned) and report.skipped == []
    assert pq.read_table(str(tmp_path / "parquet_000000000.tar")).column("utt").to_pylist() == planned
    assert report.failures_url == str(tmp_path / "parquet_000000000.failed.tsv")
    assert (tmp_path / "parquet_000000000.failed.tsv").read_text() == "utt\tpath\tstage\treason\tdetail\n"
    assert not (tmp_path / "data.list").exists()
    with pytest.raises(ValueError, match="'dev-clean-000009' is not in"):
        make_parquet(data_dir, str(tmp_path), shard="dev-clean-000009")
