import os

import numpy as np
import pytest
import torch

from cosyvoice.features.feature_files import load_pt
from cosyvoice.features.stages import extract_embedding, extract_speech_token
from tests.support.upstream import upstream_embedding, upstream_session, upstream_speech_token

BAD = "9004_1_000000_000001"
LONG = "9003_1_000000_000001"


def wavs(data_dir):
    return dict(line.split(None, 1) for line in open(os.path.join(data_dir, "wav.scp")).read().splitlines())


@pytest.fixture(scope="module")
def embeddings(feature_dir, tiny_models):
    report = extract_embedding(feature_dir, os.path.join(tiny_models, "campplus.onnx"), num_workers=2)
    return report, load_pt(os.path.join(feature_dir, "utt2embedding.pt")), load_pt(os.path.join(feature_dir, "spk2embedding.pt"))


def test_embeddings_equal_the_upstream_recipe_within_1e_4(feature_dir, tiny_models, embeddings):
    report, utt2embedding, _ = embeddings
    session = upstream_session(os.path.join(tiny_models, "campplus.onnx"))
    expected = {u: upstream_embedding(p, session) for u, p in wavs(feature_dir).items() if u != BAD}
    assert sorted(utt2embedding) == sorted(expected)
    for utt, vector in expected.items():
        assert len(utt2embedding[utt]) == 192 and isinstance(utt2embedding[utt][0], float)
        assert np.max(np.abs(np.array(utt2embedding[utt]) - np.array(vector))) <= 1e-4, utt
    assert [(f.utt, f.reason) for f in report.failures] == [(BAD, "undecodable_audio")]


def test_speaker_vectors_are_plain_means_of_their_utterances(feature_dir, embeddings):
    _, utt2embedding, spk2embedding = embeddings
    utt2spk = dict(line.split() for line in open(os.path.join(feature_dir, "utt2spk")))
    assert sorted(spk2embedding) == sorted({utt2spk[u] for u in utt2embedding})
    for spk, vector in spk2embedding.items():
        members = [utt2embedding[u] for u in utt2embedding if utt2spk[u] == spk]
        assert np.allclose(vector, np.mean(np.array(members, dtype=np.float32), axis=0), atol=1e-6)


def test_pt_files_load_with_weights_only(feature_dir, embeddings):
    loaded = torch.load(os.path.join(feature_dir, "utt2embedding.pt"), weights_only=True)
    assert isinstance(loaded, dict) and all(isinstance(v, list) for v in loaded.values())


@pytest.mark.parametrize("version,rate,vocab", [("v1", 50, 4096), ("v2", 25, 6561)])
def test_tokens_equal_the_upstream_recipe_exactly(feature_dir, tiny_models, tmp_path, version, rate, vocab):
    import shutil

    data = tmp_path / "d"
    shutil.copytree(feature_dir, data)
    model = os.path.join(tiny_models, f"speech_tokenizer_{version}.onnx")
    report = extract_speech_token(str(data), model, num_workers=2)
    tokens = load_pt(str(data / "utt2speech_token.pt"))
    session = upstream_session(model)
    expected = {u: upstream_speech_token(p, session) for u, p in wavs(feature_dir).items() if u != BAD}
    assert tokens == expected
    assert tokens[LONG] == [] and report.long_skipped == [LONG]
    for utt, codes in tokens.items():
        assert all(isinstance(c, int) and 0 <= c < vocab for c in codes)
        if utt != LONG:
            assert abs(len(codes) - rate * report.durations[utt]) <= 2
    assert [(f.utt, f.reason) for f in report.failures] == [(BAD, "undecodable_audio")]


@pytest.mark.parametrize("workers", [1, 2])
def test_batched_tokens_equal_the_upstream_recipe_exactly(feature_dir, tiny_models, tmp_path, workers):
    """Length-sorted padded batches through the batch-capable model give the per-utterance tokens
    of the single model; long and undecodable audio are handled as in the unbatched path."""
    import shutil

    data = tmp_path / "d"
    shutil.copytree(feature_dir, data)
    report = extract_speech_token(str(data), os.path.join(tiny_models, "speech_tokenizer_v2.batch.onnx"),
                                  num_workers=workers, batch_size=3)
    tokens = load_pt(str(data / "utt2speech_token.pt"))
    session = upstream_session(os.path.join(tiny_models, "speech_tokenizer_v2.onnx"))
    expected = {u: upstream_speech_token(p, session) for u, p in wavs(feature_dir).items() if u != BAD}
    assert tokens == expected
    assert report.long_skipped == [LONG] and [(f.utt, f.reason) for f in report.failures] == [(BAD, "undecodable_audio")]


def test_batch_size_needs_a_batch_capable_model(feature_dir, tiny_models):
    with pytest.raises(ValueError, match="batch dimension"):
        extract_speech_token(feature_dir, os.path.join(tiny_models, "speech_tokenizer_v2.onnx"), num_workers=1,
                             batch_size=4)


def test_long_audio_chunk_mode_tokenizes_30_second_windows(feature_dir, tiny_models, tmp_path):
    import shutil

    data = tmp_path / "d"
    shutil.copytree(feature_dir, data)
    report = extract_speech_token(str(data), os.path.join(tiny_models, "speech_tokenizer_v2.onnx"),
                                  num_workers=1, long_audio="chunk")
    codes = load_pt(str(data / "utt2speech_token.pt"))[LONG]
    assert report.long_chunked == [LONG] and report.long_skipped == []
    assert abs(len(codes) - 25 * 31) <= 2 * 2  # two windows, each within 1 token of 25 Hz


def test_one_shard_is_extracted_into_its_own_folder(feature_dir, tiny_models, clean_corpus, tmp_path):
    from cosyvoice.corpus.manifest import prepare_libritts

    dest = tmp_path / "m"
    prepare_libritts(os.path.join(clean_corpus, "dev-clean"), str(dest), utts_per_shard=4)
    report = extract_embedding(str(dest), os.path.join(tiny_models, "campplus.onnx"), num_workers=1,
                               shard="dev-clean-000001")
    assert len(report.results) == 4
    saved = load_pt(str(dest / "shards" / "dev-clean-000001" / "utt2embedding.pt"))
    import json

    assert sorted(saved) == json.loads((dest / "shards.json").read_text())["dev-clean-000001"]
    with pytest.raises(ValueError, match="not in"):
        extract_embedding(str(dest), os.path.join(tiny_models, "campplus.onnx"), shard="dev-clean-000099")


@pytest.mark.timeout(120)
def test_an_unreadable_model_fails_fast_instead_of_hanging(feature_dir, tmp_path):
    from concurrent.futures.process import BrokenProcessPool

    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidProtobuf

    broken = tmp_path / "campplus.onnx"
    broken.write_bytes(b"not an onnx model")
    with pytest.raises(BrokenProcessPool):
        extract_embedding(feature_dir, str(broken), num_workers=2)
    with pytest.raises(InvalidProtobuf):
        extract_embedding(feature_dir, str(broken), num_workers=1)


def test_an_utterance_without_a_speaker_is_reported_before_any_work(feature_dir, tiny_models, tmp_path):
    import shutil

    data = tmp_path / "d"
    shutil.copytree(feature_dir, data)
    for name in ("utt2embedding.pt", "spk2embedding.pt"):
        (data / name).unlink(missing_ok=True)
    lines = (data / "utt2spk").read_text().splitlines()
    (data / "utt2spk").write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(ValueError, match="no speaker in utt2spk, e.g. " + lines[0].split()[0]):
        extract_embedding(str(data), os.path.join(tiny_models, "campplus.onnx"), num_workers=1)
    assert not (data / "utt2embedding.pt").exists()


@pytest.mark.parametrize("kind,options", [
    ("embedding", {}),
    ("speech_token", {}),
    ("speech_token", {"batch_size": 4, "model": "speech_tokenizer_v2.batch.onnx"}),
    ("speech_token", {"batch_size": 4, "runtime": "torch"}),
])
def test_audio_too_short_for_the_features_is_reported_and_the_rest_extracted(feature_dir, tiny_models, tmp_path,
                                                                            kind, options):
    """A 5 ms clip has no STFT frame (whisper's reflect padding needs > 200 samples; kaldi's 25 ms
    window needs 400): upstream's tools stop on it; here it is one failure with a reason."""
    import soundfile as sf

    from cosyvoice.features.extract import run_extraction
    from cosyvoice.features.options import OPTIONS_BY_KIND

    tiny = tmp_path / "tiny.wav"
    sf.write(tiny, np.zeros(80, dtype=np.float32), 16000, subtype="PCM_16")
    good = sorted(wavs(feature_dir).items())[:3]
    options = dict(options)
    model = os.path.join(tiny_models, options.pop("model", "campplus.onnx" if kind == "embedding"
                                                   else "speech_tokenizer_v2.onnx"))
    report = run_extraction(good + [("0000_tiny", str(tiny))], model, OPTIONS_BY_KIND[kind](num_workers=1, **options))
    assert sorted(report.results) == sorted(u for u, _ in good)
    assert [f.utt for f in report.failures] == ["0000_tiny"]
    assert report.failures[0].reason == "feature_error"


def test_each_stage_stores_its_failures_sorted_with_a_header(feature_dir, tiny_models, embeddings, tmp_path):
    """``failed_<stage>.tsv`` beside the .pt files: the undecodable file with its reason; the token
    stage lists it under its own name."""
    from cosyvoice.problems import read_failures

    report, *_ = embeddings
    listed = read_failures(os.path.join(feature_dir, "failed_extract_embedding.tsv"))
    assert [(p.utt, p.path, p.stage, p.reason) for p in listed] == [
        (BAD, wavs(feature_dir)[BAD], "extract_embedding", "undecodable_audio")]
    assert report.failures_url == os.path.join(feature_dir, "failed_extract_embedding.tsv")
    import shutil

    data = tmp_path / "d"
    shutil.copytree(feature_dir, data)
    extract_speech_token(str(data), os.path.join(tiny_models, "speech_tokenizer_v2.onnx"), num_workers=1)
    text = (data / "failed_extract_speech_token.tsv").read_text()
    assert text.splitlines()[0] == "utt\tpath\tstage\treason\tdetail"
    assert [line.split("\t")[:4] for line in text.splitlines()[1:]] == [
        [BAD, wavs(feature_dir)[BAD], "extract_speech_token", "undecodable_audio"]]
