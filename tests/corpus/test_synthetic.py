import hashlib
import os

import soundfile as sf

from cosyvoice.corpus.synthetic import BROKEN_CASES, make_synthetic_corpus


def digest(root):
    h = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            path = os.path.join(folder, name)
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def test_layout_and_audio_format_follow_libritts(clean_corpus):
    wavs = []
    for folder, _, files in os.walk(os.path.join(clean_corpus, "dev-clean")):
        wavs += [os.path.join(folder, f) for f in files if f.endswith(".wav")]
    assert len(wavs) == 15
    for wav in wavs:
        spk, chapter, name = wav.split(os.sep)[-3:]
        parts = name[:-4].split("_")
        assert parts[:2] == [spk, chapter] and len(parts[2]) == len(parts[3]) == 6
        info = sf.info(wav)
        assert (info.samplerate, info.channels, info.subtype) == (24000, 1, "PCM_16") and info.duration > 0.5
        for suffix in (".normalized.txt", ".original.txt"):
            with open(wav[:-4] + suffix, encoding="utf-8") as f:
                text = f.read()
            assert text.strip() and not text.endswith("\n")
        assert os.path.exists(os.path.join(os.path.dirname(wav), f"{spk}_{chapter}.trans.tsv"))


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    for name, seed in (("a", 11), ("b", 11), ("c", 12)):
        make_synthetic_corpus(str(tmp_path / name), speakers=2, utts_per_speaker=2, seed=seed)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")


def test_fallback_synthesiser_needs_no_espeak(tmp_path):
    report = make_synthetic_corpus(str(tmp_path / "x"), speakers=2, utts_per_speaker=2, seed=1,
                                   synthesiser="formant", with_broken=True)
    assert report.synthesiser == "formant" and report.utterances == 4 and report.broken == len(BROKEN_CASES)
    wav = next(os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "x") for f in fs
               if f.endswith(".wav") and not f.startswith("9990"))
    audio, rate = sf.read(wav)
    assert rate == 24000 and audio.std() > 0.01
