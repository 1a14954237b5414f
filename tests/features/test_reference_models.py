import glob
import json
import os

import numpy as np
import onnxruntime as ort
import pytest
import soundfile as sf
import torch
import torchaudio
import whisper

from cosyvoice.features.reference_models import make_reference_models


def session(path):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def mel_of(wav):
    audio, rate = sf.read(wav, dtype="float32")
    audio = torchaudio.functional.resample(torch.from_numpy(audio), rate, 16000)
    return whisper.log_mel_spectrogram(audio[None], n_mels=128).numpy(), len(audio) / 16000


def fbank_of(wav):
    audio, rate = sf.read(wav, dtype="float32")
    audio = torchaudio.functional.resample(torch.from_numpy(audio), rate, 16000)
    feat = torchaudio.compliance.kaldi.fbank(audio[None], num_mel_bins=80, dither=0, sample_frequency=16000)
    return (feat - feat.mean(0, keepdim=True))[None].numpy()


@pytest.fixture(scope="module")
def full_models(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("models"))
    make_reference_models(out, seed=0)
    return out


def speech_wavs(corpus):
    return sorted(glob.glob(os.path.join(corpus, "dev-clean", "*", "*", "*.wav")))[:3]


@pytest.mark.slow
def test_full_size_models_have_the_upstream_signatures_rates_and_code_ranges(full_models, clean_corpus):
    emb = session(os.path.join(full_models, "campplus.onnx"))
    (inp,), (_out,) = emb.get_inputs(), emb.get_outputs()
    assert (inp.name, inp.type, inp.shape[0], inp.shape[2]) == ("input", "tensor(float)", 1, 80)
    for wav in speech_wavs(clean_corpus):
        vec = emb.run(None, {inp.name: fbank_of(wav)})[0]
        assert vec.shape == (1, 192) and vec.dtype == np.float32 and np.isfinite(vec).all()
    for name, vocab, rate in (("speech_tokenizer_v1", 4096, 50), ("speech_tokenizer_v2", 6561, 25)):
        tok = session(os.path.join(full_models, f"{name}.onnx"))
        feats, length = tok.get_inputs()
        assert (feats.type, feats.shape[:2], length.type, length.shape) == ("tensor(float)", [1, 128], "tensor(int32)", [1])
        seen = set()
        for wav in speech_wavs(clean_corpus):
            mel, seconds = mel_of(wav)
            codes = tok.run(None, {feats.name: mel, length.name: np.array([mel.shape[2]], np.int32)})[0]
            assert codes.shape[0] == 1 and np.issubdtype(codes.dtype, np.integer)
            assert 0 <= codes.min() and codes.max() < vocab
            assert abs(codes.shape[1] - rate * seconds) <= 2
            seen |= set(codes.ravel().tolist())
        assert len(seen) > 10, f"{name}: random weights should still give varied codes"
    spec = json.load(open(os.path.join(full_models, "reference_models.json")))
    assert {v["size"] for v in spec.values()} == {"full"} and spec["speech_tokenizer_v2"]["bytes"] > 100e6


def test_models_are_deterministic_for_a_seed_and_rebuilt_only_when_asked(tmp_path, clean_corpus):
    a = make_reference_models(str(tmp_path / "a"), seed=1, size="tiny", models=["speech_tokenizer_v2"])
    b = make_reference_models(str(tmp_path / "b"), seed=1, size="tiny", models=["speech_tokenizer_v2"])
    c = make_reference_models(str(tmp_path / "c"), seed=2, size="tiny", models=["speech_tokenizer_v2"])
    mel, _ = mel_of(speech_wavs(clean_corpus)[0])
    runs = {}
    for name in "abc":
        tok = session(str(tmp_path / name / "speech_tokenizer_v2.onnx"))
        runs[name] = tok.run(None, {"feats": mel, "feats_length": np.array([mel.shape[2]], np.int32)})[0]
    assert np.array_equal(runs["a"], runs["b"]) and not np.array_equal(runs["a"], runs["c"])
    assert a["speech_tokenizer_v2"]["sha256"] == b["speech_tokenizer_v2"]["sha256"] != c["speech_tokenizer_v2"]["sha256"]
    again = make_reference_models(str(tmp_path / "a"), seed=1, size="tiny", models=["speech_tokenizer_v2"])
    assert again["speech_tokenizer_v2"]["status"] == "up to date"
    with pytest.raises(ValueError, match="unknown reference model"):
        make_reference_models(str(tmp_path / "a"), models=["nope"])
