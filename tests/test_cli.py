import json
import os
import subprocess
import sys

BIN = os.path.join(os.path.dirname(sys.executable), "cosyvoice-pipeline")


def run(*args, **kw):
    return subprocess.run([BIN, *args], capture_output=True, text=True, **kw)


def test_prepare_libritts_cli_writes_the_data_dir_and_prints_a_summary(broken_corpus, tmp_path):
    out = run("prepare-libritts", "--src_dir", os.path.join(broken_corpus, "train-clean-100"),
              "--des_dir", str(tmp_path / "m"), "--utts_per_shard", "4", "--num_workers", "2",
              "--instruct", "You are a helpful assistant.<|endofprompt|>")
    assert out.returncode == 0, out.stderr
    assert "train-clean-100: 13 utterances, 4 speakers" in out.stdout
    assert "found 23 audio files: kept 13, quarantined 10" in out.stdout
    assert "left out (reason: truncated_audio)" in out.stderr
    names = sorted(os.listdir(tmp_path / "m"))
    assert names == ["instruct", "long_audio.tsv", "quarantine.tsv", "shards.json", "spk2utt", "text",
                     "utt2dur", "utt2spk", "wav.scp"]
    plan = json.loads((tmp_path / "m" / "shards.json").read_text())
    assert [len(v) for v in plan.values()] == [4, 4, 4, 1]


def test_cli_reports_a_missing_source_with_exit_code_2(tmp_path):
    out = run("prepare-libritts", "--src_dir", str(tmp_path / "missing"), "--des_dir", str(tmp_path / "m"))
    assert out.returncode == 2 and "no such directory" in out.stderr


def test_prepare_libritts_imports_neither_torch_nor_dagster(clean_corpus, tmp_path):
    code = (
        "import sys; from cosyvoice.cli import main;"
        f"rc = main(['prepare-libritts', '--src_dir', {os.path.join(clean_corpus, 'dev-clean')!r},"
        f" '--des_dir', {str(tmp_path / 'm')!r}]);"
        "heavy = [m for m in ('torch', 'dagster', 'numpy', 'onnxruntime') if m in sys.modules];"
        "print('HEAVY', heavy); sys.exit(rc)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout


def test_make_synthetic_corpus_cli(tmp_path):
    out = run("make-synthetic-corpus", "--out", str(tmp_path / "LibriTTS"), "--subsets", "dev-clean,test-clean",
              "--speakers", "2", "--utts-per-speaker", "2", "--seed", "5", "--with-broken")
    assert out.returncode == 0, out.stderr
    assert "wrote 8 utterances" in out.stdout and "+ 22 broken files" in out.stdout
    assert sorted(os.listdir(tmp_path / "LibriTTS")) == ["dev-clean", "test-clean"]


def test_cli_chain_accounts_for_a_20ms_clip_in_files_alone(clean_corpus, tiny_models, tmp_path, capsys):
    """extract-embedding fails a 20 ms clip (no 25 ms fbank window): it is listed in
    failed_extract_embedding.tsv and carried by make-parquet with that stage and reason, so
    parquet rows + failed_make_parquet.tsv rows == wav.scp lines, read from the files only."""
    import numpy as np
    import pyarrow.parquet as pq
    import soundfile as sf

    from cosyvoice.cli import main

    data = tmp_path / "dev-clean"
    assert main(["prepare-libritts", "--src_dir", os.path.join(clean_corpus, "dev-clean"), "--des_dir", str(data),
                 "--num_workers", "1"]) == 0
    clip = tmp_path / "clip.wav"
    sf.write(clip, np.full(480, 0.1, dtype=np.float32), 24000, subtype="PCM_16")  # 20 ms
    spk = (data / "utt2spk").read_text().split()[1]
    short = f"{spk}_1_000000_000099"

    def add(name, value):
        lines = (data / name).read_text().splitlines() + [f"{short} {value}"]
        (data / name).write_text("".join(f"{line}\n" for line in sorted(lines)))

    add("wav.scp", clip)
    add("text", "a short clip")
    add("utt2spk", spk)
    for command, model in (("extract-embedding", "campplus.onnx"), ("extract-speech-token", "speech_tokenizer_v2.onnx")):
        assert main([command, "--dir", str(data), "--onnx_path", os.path.join(tiny_models, model),
                     "--num_thread", "1"]) == 0
    assert main(["make-parquet", "--src_dir", str(data), "--des_dir", str(data / "parquet"),
                 "--num_utts_per_parquet", "6"]) == 0
    capsys.readouterr()

    def tsv(path):
        header, *rows = path.read_text().splitlines()
        assert header.split("\t") == ["utt", "path", "stage", "reason", "detail"]
        return [row.split("\t") for row in rows]

    embedding_failures = tsv(data / "failed_extract_embedding.tsv")
    assert [r[:4] for r in embedding_failures] == [[short, str(clip), "extract_embedding", "feature_error"]]
    token_failures = tsv(data / "failed_extract_speech_token.tsv")
    assert all(r[2] == "extract_speech_token" for r in token_failures)
    utterances = (data / "wav.scp").read_text().splitlines()
    shards = (data / "parquet" / "data.list").read_text().splitlines()
    rows = [u for shard in shards for u in pq.read_table(shard, columns=["utt"]).column("utt").to_pylist()]
    listed = tsv(data / "parquet" / "failed_make_parquet.tsv")
    assert len(rows) + len(listed) == len(utterances) == 16
    assert sorted(rows + [r[0] for r in listed]) == sorted(line.split()[0] for line in utterances)
    assert [r[:4] for r in listed] == [[short, str(clip), "extract_embedding", "feature_error"]]  # not missing_utt_embedding

    # the clip removed and the stage re-run: its list is replaced by one with the header alone
    (data / "wav.scp").write_text("".join(f"{line}\n" for line in utterances if not line.startswith(short)))
    assert main(["extract-embedding", "--dir", str(data), "--onnx_path", os.path.join(tiny_models, "campplus.onnx"),
                 "--num_thread", "1"]) == 0
    assert (data / "failed_extract_embedding.tsv").read_text() == "utt\tpath\tstage\treason\tdetail\n"


def test_make_reference_models_writes_the_family_named_by_family(tmp_path, capsys):
    """``--family cosyvoice1`` writes a CosyVoice1 dir (cosyvoice.yaml: 22.05 kHz flow/HiFT), the default a
    CosyVoice2 one (cosyvoice2.yaml, 24 kHz); an unknown family is a usage error."""
    from cosyvoice.acoustic.runtimes import sample_rate
    from cosyvoice.cli import main
    from cosyvoice.model_family import COSYVOICE1, COSYVOICE2, model_dir_family

    v1, v2 = str(tmp_path / "v1"), str(tmp_path / "v2")
    args = ["make-reference-models", "--size", "tiny", "--models", "flow,hift"]
    assert main([*args, "--out", v1, "--family", "cosyvoice1"]) == 0
    assert main([*args, "--out", v2]) == 0
    assert "cosyvoice.yaml: built" in capsys.readouterr().out
    assert model_dir_family(v1) is COSYVOICE1 and sample_rate(v1) == 22050 and "cosyvoice2.yaml" not in os.listdir(v1)
    assert model_dir_family(v2) is COSYVOICE2 and sample_rate(v2) == 24000
    out = run("make-reference-models", "--out", str(tmp_path / "x"), "--family", "cosyvoice9")
    assert out.returncode == 2 and "invalid choice: 'cosyvoice9'" in out.stderr
