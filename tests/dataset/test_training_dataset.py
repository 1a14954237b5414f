import os
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cosyvoice.dataset.processors import (
    UnreadableShardError,
    decode_audio,
    dynamic_batch,
    filter_samples,
    padding,
    parquet_opener,
    resample,
)
from cosyvoice.dataset.sampler import Placement, shard_indices


@pytest.mark.parametrize("n_shards", [1, 3, 7, 16])
def test_train_epoch_reads_every_shard_exactly_once_across_ranks_and_workers(n_shards):
    world, workers = 2, 2
    for epoch in (0, 1):
        seen = Counter(i for rank in range(world) for worker in range(workers)
                       for i in shard_indices(n_shards, Placement(rank, world, worker, workers), epoch=epoch))
        if n_shards >= world * workers:
            assert seen == Counter(range(n_shards))
        else:  # too few shards: upstream repeats the list so no rank or worker idles
            assert set(seen) == set(range(n_shards))
    assert shard_indices(16, Placement(), epoch=0) != shard_indices(16, Placement(), epoch=1)


def test_cv_is_read_completely_by_every_rank():
    for rank in range(3):
        got = sorted(i for w in range(2) for i in shard_indices(5, Placement(rank, 3, w, 2), shuffle=False, partition=False))
        assert got == list(range(5))


def test_shuffle_follows_random_with_the_epoch_as_seed():
    import random

    expected = list(range(10))
    random.Random(3).shuffle(expected)
    assert shard_indices(10, Placement(1, 2, 0, 1), epoch=3) == expected[1::2]


@pytest.fixture(scope="module")
def shards(clean_corpus, tmp_path_factory):
    from cosyvoice.corpus.manifest import prepare_libritts
    from cosyvoice.shards.make_parquet import make_parquet

    root = tmp_path_factory.mktemp("ds")
    prepare_libritts(os.path.join(clean_corpus, "dev-clean"), str(root / "data"))
    make_parquet(str(root / "data"), str(root / "parquet"), num_utts_per_parquet=6)
    return (root / "parquet" / "data.list").read_text().splitlines()


def test_opener_streams_every_row_of_every_shard_and_skips_a_bad_shard_only_when_asked(shards, tmp_path):
    bad = tmp_path / "broken.tar"
    bad.write_bytes(b"not parquet")
    sources = [{"src": s} for s in shards[:1]] + [{"src": str(bad)}] + [{"src": s} for s in shards[1:]]
    with pytest.raises(UnreadableShardError, match=f"{bad}: cannot read training shard"):
        list(parquet_opener(sources, batch_rows=4))
    stats = Counter()
    rows = list(parquet_opener(sources, batch_rows=4, stats=stats, skip_unreadable_shards=True))
    expected = [r for s in shards for r in pq.read_table(s).to_pylist()]
    assert [r["utt"] for r in rows] == [r["utt"] for r in expected] and stats == {"unreadable_shards": 1}
    assert rows[0]["audio_data"] == expected[0]["audio_data"] and rows[0]["src"] == shards[0]


def test_undecodable_audio_is_dropped_and_counted(shards):
    rows = list(parquet_opener([{"src": shards[0]}]))
    rows[1]["audio_data"] = b"garbage"
    stats = Counter()
    out = list(decode_audio(rows, stats=stats))
    assert len(out) == len(rows) - 1 and stats == {"undecodable_audio": 1}
    assert out[0]["speech"].dtype == torch.float32 and out[0]["speech"].shape[0] == 1 and out[0]["sample_rate"] == 24000


def sample(seconds, rate=24000, tokens=10, speech_tokens=(1, 2)):
    return {"utt": f"u{seconds}", "speech": torch.zeros(1, int(seconds * rate)), "sample_rate": rate,
            "text_token": list(range(tokens)), "speech_token": np.array(speech_tokens)}


def test_filter_applies_the_recipe_bounds_with_reasons():
    stats = Counter()
    data = [sample(0.5), sample(70), sample(5, tokens=0), sample(5, tokens=300), sample(5, speech_tokens=()),
            sample(1.5, tokens=180), sample(5)]
    kept = list(filter_samples(data, max_length=6000, min_length=100, stats=stats))
    assert kept == [data[-1]]
    assert stats == {"too_short": 1, "too_long": 1, "text_token_length": 2, "empty_speech_token": 1,
                     "text_audio_ratio": 1}


def test_resample_drops_low_rates_and_peak_normalises():
    loud = {"speech": torch.full((1, 22050), 2.0), "sample_rate": 22050}
    low = {"speech": torch.zeros(1, 8000), "sample_rate": 8000}
    stats = Counter()
    (out,) = list(resample([loud, low], stats=stats))
    assert out["sample_rate"] == 24000 and out["speech"].abs().max() <= 1.0 + 1e-6 and stats == {"low_sample_rate": 1}


def reference_batches(lengths, budget):
    """The upstream rule, written plainly (including its empty first batch, D10, which we do not copy)."""
    out, buf, longest = [], [], 0
    for n in lengths:
        longest = max(longest, n)
        if longest * (len(buf) + 1) > budget:
            out.append(buf)
            buf, longest = [n], n
        else:
            buf.append(n)
    return out + [buf] if buf else out


@pytest.mark.parametrize("lengths", [[100, 200, 300, 400, 900, 1500, 2500, 50], [3000, 10, 20], [500] * 9])
def test_dynamic_batches_follow_the_upstream_rule_without_empty_batches(lengths):
    samples = [{"speech_feat": torch.zeros(n, 80)} for n in lengths]
    ours = [[s["speech_feat"].shape[0] for s in b] for b in dynamic_batch(samples, max_frames_in_batch=2000)]
    assert ours == [b for b in reference_batches(lengths, 2000) if b]
    assert all(ours)


def test_padding_builds_the_contract_batch():
    batch = []
    for n, (frames, tokens) in enumerate([(40, 3), (60, 5), (50, 4)]):
        batch.append({"utt": f"u{n}", "text": f"t{n}", "speech": torch.zeros(1, frames * 480),
                      "text_token": list(range(1, tokens + 1)), "speech_feat": torch.ones(frames, 80),
                      "utt_embedding": np.ones(192), "spk_embedding": np.full(192, 2.0),
                      "speech_token": np.arange(1, frames // 2 + 1), "whisper_feat": torch.ones(frames * 2, 128)})
    (out,) = list(padding([batch]))
    assert out["utts"] == ["u1", "u2", "u0"]  # longest raw speech first
    assert out["text_token"].dtype == torch.int64 and out["text_token"].shape == (3, 5)
    assert out["text_token_len"].dtype == torch.int32 and out["text_token_len"].tolist() == [5, 4, 3]
    assert out["speech_feat"].shape == (3, 60, 80) and out["speech_feat"].dtype == torch.float32
    assert out["speech_feat"][2, 40:].abs().sum() == 0 and out["speech_feat_len"].tolist() == [60, 50, 40]
    assert out["speech_token"].dtype == torch.int64 and out["speech_token_len"].tolist() == [30, 25, 20]
    assert out["whisper_feat"].shape == (3, 120, 128)
    assert out["utt_embedding"].shape == (3, 192) and out["embedding"] is out["utt_embedding"]
    (sft,) = list(padding([batch], use_spk_embedding=True))
    assert torch.equal(sft["embedding"], sft["spk_embedding"])


def reference_features(row):
    """The recipe's sample features computed plainly (librosa mel basis, HF tokenizer, whisper)."""
    import io

    import librosa
    import soundfile as sf
    import whisper
    from transformers import AutoTokenizer

    from cosyvoice.dataset.text import COSYVOICE2_SPECIAL_TOKENS, bundled_qwen_tokenizer_dir

    audio, rate = sf.read(io.BytesIO(row["audio_data"]), dtype="float32")
    speech = torch.from_numpy(audio)[None]
    speech = torch.nn.functional.pad(speech, (0, (-speech.shape[1]) % 960))
    basis = torch.from_numpy(librosa.filters.mel(sr=24000, n_fft=1920, n_mels=80, fmin=0, fmax=8000))
    padded = torch.nn.functional.pad(speech.unsqueeze(1), (720, 720), mode="reflect").squeeze(1)
    spec = torch.view_as_real(torch.stft(padded, 1920, hop_length=480, win_length=1920, window=torch.hann_window(1920),
                                         center=False, pad_mode="reflect", normalized=False, onesided=True,
                                         return_complex=True))
    mel = torch.log(torch.clamp(basis @ torch.sqrt(spec.pow(2).sum(-1) + 1e-9), min=1e-5)).squeeze(0).T
    tok = AutoTokenizer.from_pretrained(bundled_qwen_tokenizer_dir())
    tok.add_special_tokens(COSYVOICE2_SPECIAL_TOKENS)
    import torchaudio

    whisper_feat = whisper.log_mel_spectrogram(torchaudio.transforms.Resample(24000, 16000)(speech), n_mels=128)[0].T
    emb = torch.tensor(row["utt_embedding"], dtype=torch.float32)
    return {"speech_feat": mel, "text_token": tok([row["text"]])["input_ids"][0], "whisper_feat": whisper_feat,
            "utt_embedding": emb / emb.norm()}


def test_dataloader_batches_have_the_contract_keys_and_the_recipe_values(training_list):
    from cosyvoice.dataset.pipeline import PipelineConfig, TrainingDataset
    from cosyvoice.dataset.text import bundled_qwen_tokenizer_dir

    dataset = TrainingDataset(training_list, PipelineConfig(qwen_pretrain_path=bundled_qwen_tokenizer_dir(),
                                                            max_frames_in_batch=1000))
    dataset.set_epoch(0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2, prefetch_factor=2)
    batches = list(loader)
    utts = [u for b in batches for u in b["utts"]]
    assert sorted(utts) == sorted(set(utts)) and len(utts) == 15  # every utterance once per epoch
    for b in batches:
        n = len(b["utts"])
        assert b["speech_feat"].shape[0] * b["speech_feat"].shape[1] <= 1000 or n == 1
        assert b["speech_feat"].dtype == torch.float32 and b["speech_feat"].shape[2] == 80
        assert b["speech_feat_len"].dtype == torch.int32 and b["text_token"].dtype == torch.int64
        assert b["speech_token"].dtype == torch.int64 and b["speech_token_len"].dtype == torch.int32
        assert b["whisper_feat"].shape[2] == 128 and b["utt_embedding"].shape == (n, 192)
        assert torch.equal(b["whisper_feat_len"], 2 * b["speech_feat_len"])
    rows = {r["utt"]: r for s in open(training_list).read().split() for r in pq.read_table(s).to_pylist()}
    batch = batches[0]
    for i, utt in enumerate(batch["utts"]):
        ref = reference_features(rows[utt])
        t = batch["speech_feat_len"][i]
        assert torch.allclose(batch["speech_feat"][i, :t], ref["speech_feat"], atol=1e-5)
        assert batch["text_token"][i, :batch["text_token_len"][i]].tolist() == ref["text_token"]
        assert torch.allclose(batch["whisper_feat"][i, :batch["whisper_feat_len"][i]], ref["whisper_feat"], atol=1e-5)
        assert torch.allclose(batch["utt_embedding"][i], ref["utt_embedding"], atol=1e-6)
        assert batch["speech_token"][i, :batch["speech_token_len"][i]].tolist() == list(rows[utt]["speech_token"])


def test_text_tokenizers_match_the_recipes():
    from transformers import AutoTokenizer

    from cosyvoice.dataset.text import (
        COSYVOICE2_SPECIAL_TOKENS,
        WhisperTextTokenizer,
        bundled_qwen_tokenizer_dir,
        qwen_tokenizer,
    )

    text = "You are a helpful assistant.<|endofprompt|>Hello [breath] world."
    ours = qwen_tokenizer(bundled_qwen_tokenizer_dir())
    plain = AutoTokenizer.from_pretrained(bundled_qwen_tokenizer_dir())
    plain.add_special_tokens(COSYVOICE2_SPECIAL_TOKENS)
    ids = ours.encode(text)
    assert ids == plain([text])["input_ids"][0]
    assert plain.convert_tokens_to_ids("<|endofprompt|>") in ids and plain.convert_tokens_to_ids("[breath]") in ids
    assert len(plain) > 151643  # base Qwen2 vocabulary plus the added special tokens
    import whisper.tokenizer

    v1 = WhisperTextTokenizer()
    reference = whisper.tokenizer.get_tokenizer(multilingual=True, num_languages=100, language="en", task="transcribe")
    assert v1.encode("Hello world.") == reference.encoding.encode("Hello world.", allowed_special="all")
    assert v1.decode(v1.encode("Hello world.")) == "Hello world."


def test_dataset_reads_a_data_list_on_s3(training_list, s3_bucket, s3_server):
    import s3fs

    from cosyvoice.dataset.pipeline import PipelineConfig, TrainingDataset
    from cosyvoice.dataset.text import bundled_qwen_tokenizer_dir

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    local = open(training_list).read().split()
    remote = []
    for path in local:
        fs.put(path, f"{s3_bucket}/parquet/{os.path.basename(path)}")
        remote.append(f"s3://{s3_bucket}/parquet/{os.path.basename(path)}")
    fs.pipe(f"{s3_bucket}/data.list", ("\n".join(remote) + "\n").encode())
    config = PipelineConfig(qwen_pretrain_path=bundled_qwen_tokenizer_dir(), whisper_feat=False)
    batches = list(TrainingDataset(f"s3://{s3_bucket}/data.list", config, train=False))
    assert sorted(u for b in batches for u in b["utts"]) == sorted(
        r["utt"] for p in local for r in pq.read_table(p, columns=["utt"]).to_pylist())
    assert "whisper_feat" not in batches[0]


def test_cosyvoice1_tokenizer_option_and_config_errors(training_list):
    from cosyvoice.dataset.pipeline import PipelineConfig, TrainingDataset
    from cosyvoice.dataset.text import WhisperTextTokenizer

    config = PipelineConfig(text_tokenizer="whisper", whisper_feat=False)
    (first, *_) = list(TrainingDataset(training_list, config, train=False))
    expected = WhisperTextTokenizer().encode(first["text"][0])
    assert first["text_token"][0, :first["text_token_len"][0]].tolist() == expected
    with pytest.raises(ValueError, match="qwen_pretrain_path"):
        TrainingDataset(training_list, PipelineConfig())
