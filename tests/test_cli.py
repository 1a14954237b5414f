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
