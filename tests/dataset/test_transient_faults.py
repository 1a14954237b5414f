"""Training shards on S3 with injected throttling/5xx answers: transient faults are retried and the
rows equal a fault-free read (also when the fault hits in the middle of a shard); a shard that
cannot be read fails the epoch with its URL, or, with ``skip_unreadable_shards`` (trainer flag
``--skip_unreadable_shards``), is skipped, logged and counted."""

import logging
import os
from collections import Counter
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import s3fs

from cosyvoice import storage
from cosyvoice.dataset.processors import UnreadableShardError, parquet_opener

BUCKET = "shard-faults"


@pytest.fixture(scope="module")
def s3_shards(clean_corpus, s3_server, tmp_path_factory):
    """Three parquet shards of 5 rows in row groups of 2 rows, on S3."""
    from cosyvoice.corpus.manifest import prepare_libritts
    from cosyvoice.shards.make_parquet import make_parquet

    root = tmp_path_factory.mktemp("shard_faults")
    prepare_libritts(os.path.join(clean_corpus, "dev-clean"), str(root / "data"))
    make_parquet(str(root / "data"), str(root / "parquet"), num_utts_per_parquet=5)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir(BUCKET)
    urls = []
    for i, path in enumerate((root / "parquet" / "data.list").read_text().split()):
        small_groups = root / f"shard{i}.parquet"
        pq.write_table(pq.read_table(path), small_groups, row_group_size=2)
        fs.put(str(small_groups), f"{BUCKET}/parquet/shard{i}.parquet")
        urls.append(f"s3://{BUCKET}/parquet/shard{i}.parquet")
    assert len(urls) == 3
    return urls


@pytest.fixture()
def small_reads(monkeypatch):
    """32 KiB read blocks: a shard is fetched in many ranged GETs, so a fault can hit mid-shard."""
    monkeypatch.setattr(s3fs.S3FileSystem, "default_block_size", 32 * 1024)
    storage._filesystem.cache_clear()
    yield
    storage._filesystem.cache_clear()


def _rows(urls, **kwargs):
    return list(parquet_opener([{"src": u} for u in urls], batch_rows=2, **kwargs))


def test_transient_s3_faults_leave_the_shard_rows_equal_to_a_fault_free_read(s3_shards, faulty_s3, small_reads,
                                                                            monkeypatch):
    expected = _rows(s3_shards)
    assert len(expected) == 15 and len({r["utt"] for r in expected}) == 15

    faulty_s3.use(monkeypatch)
    faulty_s3.plan("parquet/shard0.parquet", [503])  # the first GET (the footer)
    faulty_s3.plan("parquet/shard1.parquet", [None, None, None, 500, 502])  # mid-shard, after rows were read
    faulty_s3.plan("parquet/shard2.parquet", [None, 503, None, None, 503])
    got = _rows(s3_shards)

    assert got == expected  # every row once, same order, same bytes
    assert faulty_s3.served == {"parquet/shard0.parquet": 1, "parquet/shard1.parquet": 2, "parquet/shard2.parquet": 2}


def test_a_shard_that_keeps_failing_fails_the_epoch_with_its_url(s3_shards, faulty_s3, monkeypatch):
    faulty_s3.use(monkeypatch, retries=2)
    faulty_s3.plan("parquet/shard1.parquet", always=503)
    rows = []
    with pytest.raises(UnreadableShardError, match=f"{s3_shards[1]}: cannot read training shard"):
        for row in parquet_opener([{"src": u} for u in s3_shards], batch_rows=2):
            rows.append(row)
    assert len(rows) == 5  # the first shard, then the failure (not a silent skip)
    assert faulty_s3.gets["parquet/shard1.parquet"] == 3  # the first try and two retries


def test_skip_unreadable_shards_logs_and_counts_the_skip(s3_shards, faulty_s3, monkeypatch, caplog):
    expected = _rows(s3_shards[:1] + s3_shards[2:])
    faulty_s3.use(monkeypatch, retries=1)
    faulty_s3.plan("parquet/shard1.parquet", always=503)
    stats = Counter()
    with caplog.at_level(logging.WARNING, logger="cosyvoice.dataset.processors"):
        got = _rows(s3_shards, stats=stats, skip_unreadable_shards=True)
    assert got == expected and stats == {"unreadable_shards": 1}
    skips = [r.getMessage() for r in caplog.records if "skipping unreadable shard" in r.getMessage()]
    assert len(skips) == 1 and s3_shards[1] in skips[0] and "OSError" in skips[0]


def test_a_missing_shard_is_permanent_and_not_retried(s3_shards, faulty_s3, monkeypatch, caplog):
    faulty_s3.use(monkeypatch, retries=3)
    missing = f"s3://{BUCKET}/parquet/gone.parquet"
    with pytest.raises(UnreadableShardError, match=f"{missing}: cannot read training shard") as raised:
        _rows([missing])
    assert isinstance(raised.value.__cause__, FileNotFoundError)
    assert not [r for r in caplog.records if "transient error" in r.getMessage()]


def test_trainer_flag_skip_unreadable_shards_reaches_the_dataset(training_list, tmp_path):
    from cosyvoice.cli import build_parser
    from cosyvoice.dataset.pipeline import PipelineConfig, TrainingDataset
    from cosyvoice.dataset.text import bundled_qwen_tokenizer_dir
    from cosyvoice.train.trainer import Trainer, TrainOptions

    required = ["train", "--model", "llm", "--config", "c.yaml", "--train_data", "t", "--cv_data", "c", "--model_dir", "m"]
    for flags, skip in (([], False), (["--skip_unreadable_shards"], True)):
        args = vars(build_parser().parse_args(required + flags))
        opts = TrainOptions(**{k: v for k, v in args.items() if k in TrainOptions.__dataclass_fields__})
        config = Trainer._pipeline_config(SimpleNamespace(opts=opts, configs={},
                                                          task=SimpleNamespace(pipeline_changes=dict)))
        assert config.skip_unreadable_shards is skip

    missing = str(tmp_path / "gone.tar")
    data_list = tmp_path / "data.list"
    data_list.write_text("\n".join(open(training_list).read().split() + [missing]) + "\n")
    config = PipelineConfig(qwen_pretrain_path=bundled_qwen_tokenizer_dir(), whisper_feat=False)
    with pytest.raises(UnreadableShardError, match=missing):
        list(TrainingDataset(str(data_list), config, train=False))
    config.skip_unreadable_shards = True
    dataset = TrainingDataset(str(data_list), config, train=False)
    utts = [u for batch in dataset for u in batch["utts"]]
    expected = [r["utt"] for p in open(training_list).read().split() for r in pq.read_table(p, columns=["utt"]).to_pylist()]
    assert sorted(utts) == sorted(expected) and dataset.stats["unreadable_shards"] == 1
