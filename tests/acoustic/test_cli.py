"""``cosyvoice-pipeline synthesize``: token files / text -> a 24 kHz WAV with the tiny reference model dir."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf
import torch

from cosyvoice.cli import build_parser, main
from tests.triton.conftest import hf_dir  # noqa: F401  (the tiny HF export of the LLM, for --text)

SAMPLES_PER_TOKEN = 2 * 480

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 6561, n)


def _text_file(tmp_path, tokens, name="tokens.txt") -> str:
    path = tmp_path / name
    path.write_text("\n".join(" ".join(str(t) for t in tokens[i:i + 10]) for i in range(0, len(tokens), 10)) + "\n")
    return str(path)


def _synthesize(model_dir: str, out: str, *extra: str) -> int:
    return main(["synthesize", "--model_dir", model_dir, "--out", out, *extra])


def _read(path) -> tuple[np.ndarray, int, str]:
    info = sf.info(str(path))
    samples, rate = sf.read(str(path), dtype="float32")
    return samples, rate, info.subtype


def test_synthesize_is_a_subcommand_of_the_pipeline_cli():
    assert "synthesize" in build_parser().format_help()


def test_a_token_file_becomes_a_24khz_float_wav_of_960_samples_per_token(tiny_models, tmp_path, capsys):
    tokens = _tokens(40)
    out = tmp_path / "out.wav"
    assert _synthesize(tiny_models, str(out), "--tokens", _text_file(tmp_path, tokens)) == 0
    samples, rate, subtype = _read(out)
    assert (rate, subtype, samples.ndim) == (24000, "FLOAT", 1)
    assert len(samples) == SAMPLES_PER_TOKEN * 40 and np.isfinite(samples).all() and np.abs(samples).max() > 0
    assert f"wrote {out}: 1.60 s at 24000 Hz from 40 speech tokens" in capsys.readouterr().out
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".out.wav")]  # no staging file left behind




def test_every_token_file_format_reads_the_same_ids(tmp_path):
    import pyarrow as pa

    from cosyvoice.acoustic.synthesis import read_speech_tokens
    from cosyvoice.features.feature_files import TOKEN_SCHEMA, save_pt, write_parquet

    tokens = _tokens(30, seed=1)
    np.save(tmp_path / "tokens.npy", tokens.astype(np.int32))
    save_pt(str(tmp_path / "utt2speech_token.pt"), {"a": [1, 2, 3], "b": tokens.tolist()})
    write_parquet(str(tmp_path / "shard.parquet"), pa.table(
        {"utt": ["a", "b"], "speech_token": [[5, 6], tokens.tolist()], "duration": [0.1, 1.2],
         "long_audio": [None, None]}, schema=TOKEN_SCHEMA))
    (tmp_path / "commas.txt").write_text(", ".join(map(str, tokens)))
    torch.save({"a": torch.tensor([1]), "b": torch.from_numpy(tokens)}, tmp_path / "tensors.pt")
    np.save(tmp_path / "float.npy", tokens.astype(np.float32))
    inputs = [(_text_file(tmp_path, tokens), None), (str(tmp_path / "tokens.npy"), None),
              (str(tmp_path / "float.npy"), None), (str(tmp_path / "utt2speech_token.pt"), "b"),
              (str(tmp_path / "tensors.pt"), "b"), (str(tmp_path / "shard.parquet"), "b"),
              (str(tmp_path / "commas.txt"), None)]
    for url, utt in inputs:
        read = read_speech_tokens(url, utt)
        assert read.dtype == np.int64 and read.tolist() == tokens.tolist(), url
    assert read_speech_tokens(str(tmp_path / "shard.parquet"), "a").tolist() == [5, 6]


def test_the_same_tokens_and_seed_write_the_same_bytes(tiny_models, tmp_path):
    from cosyvoice.features.feature_files import save_pt

    tokens = _tokens(30, seed=1)
    save_pt(str(tmp_path / "utt2speech_token.pt"), {"a": [1, 2, 3], "b": tokens.tolist()})
    text = _text_file(tmp_path, tokens)
    runs = [("0.wav", ["--tokens", text]), ("1.wav", ["--tokens", str(tmp_path / "utt2speech_token.pt"), "--utt", "b"]),
            ("seed1.wav", ["--tokens", text, "--seed", "1"])]
    for name, extra in runs:
        assert _synthesize(tiny_models, str(tmp_path / name), *extra) == 0, extra
    assert (tmp_path / "0.wav").read_bytes() == (tmp_path / "1.wav").read_bytes()
    assert (tmp_path / "seed1.wav").read_bytes() != (tmp_path / "0.wav").read_bytes()  # the vocoder's noise
    samples, _, _ = _read(tmp_path / "seed1.wav")
    assert len(samples) == SAMPLES_PER_TOKEN * 30


def test_stream_writes_the_same_length_and_prints_when_each_chunk_was_ready(tiny_models, tmp_path, capsys):
    from cosyvoice.acoustic.token2wav import stream_hops

    tokens = _tokens(80, seed=2)
    token_file = _text_file(tmp_path, tokens)
    assert _synthesize(tiny_models, str(tmp_path / "offline.wav"), "--tokens", token_file) == 0
    assert _synthesize(tiny_models, str(tmp_path / "stream.wav"), "--tokens", token_file, "--stream") == 0
    printed = capsys.readouterr().out
    offline, _, _ = _read(tmp_path / "offline.wav")
    streamed, rate, _ = _read(tmp_path / "stream.wav")
    assert rate == 24000 and len(streamed) == len(offline) == SAMPLES_PER_TOKEN * 80 and np.isfinite(streamed).all()
    chunks = len(stream_hops(80)) + 1
    assert chunks >= 3 and all(f"chunk {i}:" in printed for i in range(chunks)) and f"chunk {chunks}:" not in printed
    assert f"{chunks} chunks, first after" in printed
    # the first chunk's audio is the offline audio up to the vocoder's cross-fade (chunk-causal flow, same noise)
    first = SAMPLES_PER_TOKEN * stream_hops(80)[0] - 3840
    assert np.abs(streamed[:first // 2] - offline[:first // 2]).max() < 0.05


def test_chunk_causal_final_streams_the_same_length(tiny_models, tmp_path):
    token_file = _text_file(tmp_path, _tokens(60, seed=3))
    assert _synthesize(tiny_models, str(tmp_path / "o.wav"), "--tokens", token_file, "--stream",
                       "--chunk_causal_final") == 0
    samples, _, _ = _read(tmp_path / "o.wav")
    assert len(samples) == SAMPLES_PER_TOKEN * 60 and np.isfinite(samples).all()


@pytest.fixture(scope="module")
def prompt_wav(tmp_path_factory) -> str:
    """2.5 s of a voiced-like 24 kHz signal (harmonics + noise)."""
    rate, seconds = 24000, 2.5
    t = np.arange(int(rate * seconds)) / rate
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    signal = sum(np.sin(k * phase) / k for k in range(1, 8)) * 0.2 + np.random.default_rng(0).normal(0, 0.01, t.size)
    path = tmp_path_factory.mktemp("prompt") / "ref.wav"
    sf.write(path, signal.astype(np.float32), rate, subtype="PCM_16")
    return str(path)


def test_a_prompt_wav_gives_the_voice_without_adding_its_audio(tiny_models, tmp_path, prompt_wav, capsys):
    from cosyvoice.acoustic.synthesis import prompt_from_wav

    prompt = prompt_from_wav(tiny_models, prompt_wav)
    assert len(prompt.tokens) > 0 and prompt.feat.shape == (2 * len(prompt.tokens), 80)
    assert prompt.embedding.shape == (192,) and np.isfinite(prompt.embedding).all()
    token_file = _text_file(tmp_path, _tokens(40, seed=4))
    assert _synthesize(tiny_models, str(tmp_path / "plain.wav"), "--tokens", token_file) == 0
    assert _synthesize(tiny_models, str(tmp_path / "prompted.wav"), "--tokens", token_file,
                       "--prompt_wav", prompt_wav) == 0
    assert f"(prompt: {len(prompt.tokens)} tokens)" in capsys.readouterr().out
    plain, _, _ = _read(tmp_path / "plain.wav")
    prompted, rate, _ = _read(tmp_path / "prompted.wav")
    assert rate == 24000 and len(prompted) == len(plain) == SAMPLES_PER_TOKEN * 40 and np.isfinite(prompted).all()
    assert np.abs(prompted - plain).max() > 1e-3  # the prompt conditions the flow
    assert _synthesize(tiny_models, str(tmp_path / "ps.wav"), "--tokens", token_file, "--prompt_wav", prompt_wav,
                       "--stream") == 0
    assert len(_read(tmp_path / "ps.wav")[0]) == SAMPLES_PER_TOKEN * 40


def test_text_is_spoken_through_the_llm_of_llm_dir(tiny_models, hf_dir, tmp_path, prompt_wav, capsys):  # noqa: F811
    from cosyvoice.acoustic.synthesis import text_to_tokens

    tokens = text_to_tokens(hf_dir, "Hello there.", seed=0, max_new_tokens=24)
    assert 0 < len(tokens) <= 24 and tokens.min() >= 0 and tokens.max() < 6561
    out = tmp_path / "text.wav"
    assert _synthesize(tiny_models, str(out), "--text", "Hello there.", "--llm_dir", hf_dir,
                       "--max_new_tokens", "24") == 0
    samples, rate, _ = _read(out)
    assert rate == 24000 and len(samples) == SAMPLES_PER_TOKEN * len(tokens) and np.isfinite(samples).all()
    assert "LLM" in capsys.readouterr().out
    assert _synthesize(tiny_models, str(tmp_path / "zs.wav"), "--text", "Hello there.", "--llm_dir", hf_dir,
                       "--max_new_tokens", "24", "--prompt_wav", prompt_wav, "--prompt_text", "A reference.") == 0
    assert len(_read(tmp_path / "zs.wav")[0]) % SAMPLES_PER_TOKEN == 0


@pytest.fixture()
def no_flow_dir(tiny_models, tmp_path) -> str:
    folder = tmp_path / "no_flow"
    folder.mkdir()
    os.symlink(os.path.join(tiny_models, "hift.pt"), folder / "hift.pt")
    return str(folder)


def _error_cases(tmp_path, tiny_models, no_flow_dir):
    good = _text_file(tmp_path, _tokens(10), "good.txt")
    (tmp_path / "empty.txt").write_text(" \n")
    (tmp_path / "big.txt").write_text("1 2 6561 4")
    (tmp_path / "negative.txt").write_text("1 -2")
    (tmp_path / "words.txt").write_text("1 2 three")
    (tmp_path / "binary.bin").write_bytes(b"\x89PNG\xff\xfe")
    torch.save({"a": [1], "b": [2]}, tmp_path / "two.pt")
    model = ["--model_dir", tiny_models]
    return [
        (model + ["--tokens", str(tmp_path / "absent.txt")], "absent.txt: token file not found"),
        (model + ["--tokens", str(tmp_path / "empty.txt")], "empty.txt: no speech tokens"),
        (model + ["--tokens", str(tmp_path / "big.txt")], "1 of 4 ids outside the speech tokens 0..6560; first: 6561 at position 2"),
        (model + ["--tokens", str(tmp_path / "negative.txt")], "first: -2 at position 1"),
        (model + ["--tokens", str(tmp_path / "words.txt")], "found 'three'"),
        (model + ["--tokens", str(tmp_path / "binary.bin")], "binary.bin: not a text file of token ids"),
        (model + ["--tokens", str(tmp_path / "two.pt")], "two.pt: holds 2 utterances; choose one with utt (--utt)"),
        (model + ["--tokens", str(tmp_path / "two.pt"), "--utt", "c"], "no utterance 'c'"),
        (model + ["--tokens", good, "--utt", "a"], "utt is only for .pt dicts and parquet shards"),
        (model, "give exactly one of tokens (a token file) or text"),
        (model + ["--tokens", good, "--text", "hi"], "give exactly one of tokens"),
        (model + ["--text", "hi"], "text needs llm_dir (--llm_dir)"),
        (model + ["--tokens", good, "--prompt_text", "hi"], "prompt_text needs prompt_wav"),
        (model + ["--tokens", good, "--prompt_wav", str(tmp_path / "absent.wav")], "absent.wav: prompt audio not found"),
        (model + ["--tokens", good, "--prompt_wav", good], "cannot decode the prompt audio"),
        (["--model_dir", str(tmp_path / "nowhere"), "--tokens", good], "nowhere: model dir not found"),
        (["--model_dir", no_flow_dir, "--tokens", good], "lacks the acoustic models ['flow.pt']"),
        (["--model_dir", no_flow_dir, "--tokens", good, "--prompt_wav", good], "lacks the acoustic models"),
    ]


def test_bad_input_is_a_clear_error_and_writes_nothing(tiny_models, tmp_path, no_flow_dir, capsys):
    out = tmp_path / "out.wav"
    for argv, message in _error_cases(tmp_path, tiny_models, no_flow_dir):
        assert main(["synthesize", "--out", str(out), *argv]) == 2, argv
        assert message in capsys.readouterr().err, (argv, message)
        assert not out.exists()


def test_a_prompt_needs_the_model_dirs_onnx_models(tiny_models, tmp_path, prompt_wav):
    from cosyvoice.acoustic.synthesis import prompt_from_wav

    folder = tmp_path / "acoustic_only"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match=r"a prompt needs \['speech_tokenizer_v2.onnx', 'campplus.onnx'\]"):
        prompt_from_wav(str(folder), prompt_wav)
