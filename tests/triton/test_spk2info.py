"""spk2info.pt built from corpus speakers: upstream layout, weights_only loading, offline-stage values."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from cosyvoice.cli import main
from cosyvoice.corpus.kaldi import read_table
from cosyvoice.features import frontend
from cosyvoice.triton import runtime
from cosyvoice.triton.spk2info import build_spk2info


def test_spk2info_holds_speaker_001_with_the_offline_tokens_embedding_and_mel(data_dir, tiny_models, tmp_path):
    from cosyvoice.features.stages import extract_embedding, extract_speech_token

    speakers = sorted(set(read_table(data_dir, "utt2spk").values()))
    out = str(tmp_path / "spk2info.pt")
    report = build_spk2info(data_dir, tiny_models, out, speakers=[speakers[1], speakers[0]])
    info = torch.load(out, map_location="cpu", weights_only=True)
    assert set(info) == {"001", speakers[0], speakers[1]}
    assert report.speakers["001"] == report.speakers[speakers[1]]
    work = str(tmp_path / "data")
    shutil.copytree(data_dir, work)
    tokens = extract_speech_token(work, os.path.join(tiny_models, "speech_tokenizer_v2.onnx"), num_workers=1).results
    embeddings = extract_embedding(work, os.path.join(tiny_models, "campplus.onnx"), num_workers=1).results
    texts, wavs = read_table(data_dir, "text", joined=True), read_table(data_dir, "wav.scp")
    for spk in speakers[:2]:
        entry, utt = info[spk], report.speakers[spk]
        assert utt == sorted(u for u, s in read_table(data_dir, "utt2spk").items() if s == spk)[0]
        assert entry["prompt_text"] == texts[utt]
        t, f = entry["speech_token"], entry["speech_feat"]
        assert t.dtype == torch.int32 and t.shape[0] == 1 and f.shape == (1, 2 * t.shape[1], 80)
        assert t[0].tolist() == tokens[utt][: t.shape[1]] and t.shape[1] >= len(tokens[utt]) - 1
        np.testing.assert_allclose(entry["embedding"][0].numpy(), embeddings[utt], rtol=0, atol=0)
        audio, rate = frontend.load_audio(wavs[utt])
        mel = runtime.prompt_speech_feat(frontend.mono_16k(audio, rate)[0].numpy())
        np.testing.assert_array_equal(f[0].numpy(), mel[: f.shape[1]])
    assert runtime.load_spk2info(out)["001"]["prompt_text"] == texts[report.speakers["001"]]


def test_spk2info_rejects_unknown_speakers_and_caches_without_001(data_dir, tiny_models, tmp_path, capsys):
    with pytest.raises(ValueError, match="speaker 'nobody' has no utterances"):
        build_spk2info(data_dir, tiny_models, str(tmp_path / "x.pt"), speakers=["nobody"])
    torch.save({"002": {"prompt_text": "x"}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="no speaker '001'"):
        runtime.load_spk2info(str(tmp_path / "bad.pt"))
    first = sorted(set(read_table(data_dir, "utt2spk").values()))[0]
    assert main(["triton-spk2info", "--dir", data_dir, "--model_dir", tiny_models, "--out", str(tmp_path / "s.pt"),
                 "--speakers", first]) == 0
    assert '"001"' in capsys.readouterr().out
