import json
import os
import shutil

import pytest

from cosyvoice.corpus import QUARANTINE_REASONS, prepare_libritts, read_data_dir
from cosyvoice.corpus.checks import check_data_dir
from tests.support.upstream import upstream_prepare_data

#: the generator's broken files and the reason each must be quarantined with
EXPECTED_QUARANTINE = {
    "9990_1_000000_000001": "missing_text",
    "9990_1_000000_000002": "empty_text",
    "9990_1_000000_000003": "empty_file",
    "9990_1_000000_000004": "unreadable_header",
    "9990_1_000000_000005": "truncated_audio",
    "9990_1_000000_000007": "multichannel",
    "9990_1_000000_000008": "low_sample_rate",
    "9990_1_000000_000009": "text_not_utf8",
    "9990_1_000000_000010": "no_audio_frames",
    "9990_2_000000_000001": "whitespace_in_path",
}


@pytest.fixture(scope="module")
def dev_manifest(broken_corpus, tmp_path_factory):
    dest = str(tmp_path_factory.mktemp("manifest") / "dev-clean")
    report = prepare_libritts(os.path.join(broken_corpus, "dev-clean"), dest, utts_per_shard=5)
    return report, dest


def lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def test_every_broken_case_is_quarantined_with_its_specific_reason(dev_manifest):
    report, dest = dev_manifest
    got = {q.utt: q.reason for q in report.quarantined}
    assert got == EXPECTED_QUARANTINE
    rows = [line.split("\t") for line in lines(os.path.join(dest, "quarantine.tsv"))]
    assert {r[0]: r[2] for r in rows} == EXPECTED_QUARANTINE
    assert all(len(r) == 3 and r[1].endswith(".wav") for r in rows)
    assert set(got.values()) <= set(QUARANTINE_REASONS)


def test_kept_plus_quarantined_equals_files_found(dev_manifest):
    report, dest = dev_manifest
    assert report.files_found == 3 * 4 + 11
    assert report.utterances + len(report.quarantined) == report.files_found
    assert len(lines(os.path.join(dest, "wav.scp"))) == report.utterances == 13


def test_long_audio_is_kept_and_listed(dev_manifest):
    report, dest = dev_manifest
    (row,) = [line.split("\t") for line in lines(os.path.join(dest, "long_audio.tsv"))]
    assert row[0] == "9990_1_000000_000006" and float(row[2]) > 30.0
    assert any(line.startswith("9990_1_000000_000006 ") for line in lines(os.path.join(dest, "wav.scp")))
    assert report.long_audio == [("9990_1_000000_000006", pytest.approx(float(row[2]), abs=1e-3))]


def test_files_are_sorted_and_consistent(dev_manifest):
    _, dest = dev_manifest
    data = read_data_dir(dest)
    utts = [line.split()[0] for line in lines(os.path.join(dest, "wav.scp"))]
    assert utts == sorted(utts)
    assert set(data.text) == set(data.utt2spk) == set(utts)
    assert all(data.utt2spk[u] == u.split("_")[0] for u in utts)
    assert sorted(u for us in data.spk2utt.values() for u in us) == sorted(utts)
    spks = [line.split()[0] for line in lines(os.path.join(dest, "spk2utt"))]
    assert spks == sorted(spks)
    assert all(d > 0 for d in data.utt2dur.values())


def test_shard_plan_holds_sorted_ids_n_per_shard(dev_manifest):
    report, dest = dev_manifest
    with open(os.path.join(dest, "shards.json")) as f:
        plan = json.load(f)
    assert list(plan) == ["dev-clean-000000", "dev-clean-000001", "dev-clean-000002"] == report.shard_keys
    assert [len(v) for v in plan.values()] == [5, 5, 3]
    flat = [u for v in plan.values() for u in v]
    assert flat == sorted(flat) and flat == [line.split()[0] for line in lines(os.path.join(dest, "wav.scp"))]


def test_lines_equal_upstream_prepare_data_on_a_clean_subset(clean_corpus, tmp_path):
    src = os.path.join(clean_corpus, "dev-clean")
    upstream_prepare_data(src, str(tmp_path / "up"), instruct="You are a helpful assistant.<|endofprompt|>")
    prepare_libritts(src, str(tmp_path / "ours"), instruct="You are a helpful assistant.<|endofprompt|>")
    for name in ("wav.scp", "text", "utt2spk", "instruct"):
        ours, theirs = lines(tmp_path / "ours" / name), lines(tmp_path / "up" / name)
        assert ours == sorted(theirs), name
    spk2utt = {line.split()[0]: sorted(line.split()[1:]) for line in lines(tmp_path / "up" / "spk2utt")}
    assert {line.split()[0]: line.split()[1:] for line in lines(tmp_path / "ours" / "spk2utt")} == spk2utt


def test_rerun_is_byte_identical_touches_nothing_and_leaves_no_temp_files(clean_corpus, tmp_path):
    src, dest = os.path.join(clean_corpus, "dev-clean"), str(tmp_path / "m")
    first = prepare_libritts(src, dest)
    before = {n: (open(os.path.join(dest, n), "rb").read(), os.stat(os.path.join(dest, n)).st_mtime_ns)
              for n in os.listdir(dest)}
    second = prepare_libritts(src, dest, num_workers=1)
    after = {n: (open(os.path.join(dest, n), "rb").read(), os.stat(os.path.join(dest, n)).st_mtime_ns)
             for n in os.listdir(dest)}
    assert before == after
    assert all(first.files_written.values()) and not any(second.files_written.values())
    assert not [n for n in os.listdir(dest) if ".tmp-" in n]


def test_instruct_is_written_per_utterance_and_removed_when_dropped(clean_corpus, tmp_path):
    src, dest = os.path.join(clean_corpus, "dev-clean"), str(tmp_path / "m")
    prepare_libritts(src, dest, instruct="Speak   slowly.<|endofprompt|>")
    rows = lines(os.path.join(dest, "instruct"))
    assert len(rows) == 15 and all(r.split(" ", 1)[1] == "Speak   slowly.<|endofprompt|>" for r in rows)
    prepare_libritts(src, dest)
    assert not os.path.exists(os.path.join(dest, "instruct"))


def test_duplicate_ids_hidden_and_misplaced_files_are_quarantined(clean_corpus, tmp_path):
    src = tmp_path / "dev-clean"
    shutil.copytree(os.path.join(clean_corpus, "dev-clean"), src)
    spk = sorted(p for p in os.listdir(src))[0]
    chapter = sorted(os.listdir(src / spk))[0]
    utt = sorted(f for f in os.listdir(src / spk / chapter) if f.endswith(".wav"))[0][:-4]
    other = src / spk / "99999"
    other.mkdir()
    for suffix in (".wav", ".normalized.txt"):
        shutil.copy(src / spk / chapter / (utt + suffix), other / (utt + suffix))
    shutil.copy(src / spk / chapter / (utt + ".wav"), src / spk / chapter / ("._" + utt + ".wav"))
    shutil.copy(src / spk / chapter / (utt + ".wav"), src / spk / "stray.wav")
    shutil.copy(src / spk / chapter / (utt + ".wav"), src / spk / chapter / (utt + "_copy.WAV"))
    (src / ".ipynb_checkpoints" / "a" ).mkdir(parents=True)
    shutil.copy(src / spk / chapter / (utt + ".wav"), src / ".ipynb_checkpoints" / "a" / "x.wav")
    report = prepare_libritts(str(src), str(tmp_path / "m"))
    reasons = sorted(q.reason for q in report.quarantined)
    assert reasons == ["bad_suffix", "duplicate_utt_id", "hidden_file", "misplaced_file"]
    assert report.utterances == 15 and report.files_found == 19


def test_text_is_the_first_line_without_line_endings(tmp_path):
    from cosyvoice.corpus.synthetic import sine_wav

    folder = tmp_path / "dev-clean" / "12" / "34"
    folder.mkdir(parents=True)
    for i, text in enumerate([b"Hello there.\r\nSecond line", b"\xef\xbb\xbfWith a BOM.", b"  Trailing space  "]):
        (folder / f"12_34_000000_00000{i}.wav").write_bytes(sine_wav(0.5))
        (folder / f"12_34_000000_00000{i}.normalized.txt").write_bytes(text)
    prepare_libritts(str(tmp_path / "dev-clean"), str(tmp_path / "m"))
    assert lines(tmp_path / "m" / "text") == [
        "12_34_000000_000000 Hello there.", "12_34_000000_000001 With a BOM.", "12_34_000000_000002   Trailing space  "]


def test_missing_source_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        prepare_libritts(str(tmp_path / "nope"), str(tmp_path / "m"))


def test_checks_pass_on_a_fresh_manifest_and_fail_on_damage(dev_manifest, tmp_path):
    _, dest = dev_manifest
    assert all(o.passed for o in check_data_dir(dest).values())
    copy = tmp_path / "damaged"
    shutil.copytree(dest, copy)
    wav = lines(copy / "wav.scp")
    (copy / "wav.scp").write_text("\n".join(wav + [wav[0], "ghost /nonexistent/ghost.wav"]) + "\n")
    (copy / "text").write_text("\n".join(lines(copy / "text") + ["ghost "]) + "\n")
    result = check_data_dir(str(copy))
    assert not result["unique_utt_ids"].passed and result["unique_utt_ids"].examples == [wav[0].split()[0]]
    assert not result["wavs_exist"].passed and result["wavs_exist"].examples == ["/nonexistent/ghost.wav"]
    assert not result["text_non_empty"].passed and result["text_non_empty"].examples == ["ghost"]


def test_a_process_pool_gives_the_same_manifest_as_the_in_process_checks(broken_corpus, tmp_path):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    src = os.path.join(broken_corpus, "dev-clean")
    serial = prepare_libritts(src, str(tmp_path / "serial"), num_workers=1)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        pooled = prepare_libritts(src, str(tmp_path / "pooled"), executor=pool)
    assert pooled.quarantined == serial.quarantined
    assert pooled.files_found == serial.files_found == 23
    for name in os.listdir(tmp_path / "serial"):
        assert lines(tmp_path / "pooled" / name) == lines(tmp_path / "serial" / name), name


def test_file_urls_and_trailing_slashes_give_plain_paths_like_upstream_glob(clean_corpus, tmp_path):
    src = os.path.join(clean_corpus, "dev-clean")
    a = prepare_libritts("file://" + src, str(tmp_path / "a"))
    b = prepare_libritts(src + "/", str(tmp_path / "b"))
    assert a.utterances == b.utterances == 15
    assert lines(tmp_path / "a" / "wav.scp") == lines(tmp_path / "b" / "wav.scp")
    assert all(line.split()[1].startswith(src + "/") for line in lines(tmp_path / "a" / "wav.scp"))
