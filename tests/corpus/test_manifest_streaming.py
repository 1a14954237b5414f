"""The streaming manifest against the in-memory algorithm it replaced: same bytes in every file,
whatever the batch size, plus flat memory and parts of a split subset."""

from __future__ import annotations

import os
import random
import shutil

import pytest

from cosyvoice import storage
from cosyvoice.corpus import manifest as manifest_module
from cosyvoice.corpus import sorted_runs, staged_output
from cosyvoice.corpus.kaldi import DataDir, format_tsv, spk2utt_of
from cosyvoice.corpus.manifest import prepare_libritts
from cosyvoice.corpus.parts import SubsetPart
from cosyvoice.corpus.scan import _WHITESPACE, TEXT_SUFFIX, _check_one, utterance_id
from cosyvoice.corpus.shard_plan import dumps_plan, plan_shards
from cosyvoice.corpus.sorted_runs import SortedRuns
from cosyvoice.problems import UtteranceProblem

OUTPUTS = ("wav.scp", "text", "utt2spk", "spk2utt", "instruct", "utt2dur", "quarantine.tsv", "long_audio.tsv",
           "shards.json")
INSTRUCT = "You are a helpful assistant.<|endofprompt|>"


def in_memory_manifest(src: str, *, utts_per_shard: int, instruct: str | None = None) -> dict[str, str]:
    """The previous algorithm (whole listing, every Utterance in lists, files built as strings), kept as the oracle."""
    src = src.rstrip("/")
    listing = storage.list_files(src)
    files = dict(listing)
    quarantined, candidates = [], []
    for url, size in listing:
        parts = url[len(src):].lstrip("/").split("/")
        name = parts[-1]
        if not name.lower().endswith("wav") or any(p.startswith(".") for p in parts[:-1]):
            continue
        utt = utterance_id(url)
        if name.startswith("."):
            quarantined.append(UtteranceProblem(utt, url, "hidden_file", ""))
        elif len(parts) != 3:
            quarantined.append(UtteranceProblem(utt, url, "misplaced_file", ""))
        elif not name.endswith(".wav"):
            quarantined.append(UtteranceProblem(utt, url, "bad_suffix", ""))
        elif _WHITESPACE.search(url):
            quarantined.append(UtteranceProblem(utt, url, "whitespace_in_path", ""))
        elif url[:-4] + TEXT_SUFFIX not in files:
            quarantined.append(UtteranceProblem(utt, url, "missing_text", ""))
        else:
            candidates.append((url, size, url[:-4] + TEXT_SUFFIX))
    checked = [_check_one(path, size, text, manifest_module.DEFAULT_POLICY) for path, size, text in candidates]
    kept, seen = [], {}
    for item in sorted(checked, key=lambda r: r.path):
        if isinstance(item, UtteranceProblem):
            quarantined.append(item)
        elif item.utt in seen:
            quarantined.append(UtteranceProblem(item.utt, item.path, "duplicate_utt_id", ""))
        else:
            seen[item.utt] = item.path
            kept.append(item)
    kept.sort(key=lambda u: u.utt)
    quarantined.sort(key=lambda q: (q.utt, q.path))
    utt2spk = {u.utt: u.spk for u in kept}
    data = DataDir(wav={u.utt: u.path for u in kept}, text={u.utt: u.text for u in kept}, utt2spk=utt2spk,
                   spk2utt=spk2utt_of(utt2spk), instruct={u.utt: instruct for u in kept} if instruct else None,
                   utt2dur={u.utt: u.audio.duration for u in kept})
    out = data.files()
    out["quarantine.tsv"] = format_tsv((q.utt, q.path, q.reason) for q in quarantined)
    out["long_audio.tsv"] = format_tsv((u.utt, u.path, f"{u.audio.duration:.4f}") for u in kept
                                       if u.audio.duration > 30.0)
    out["shards.json"] = dumps_plan(plan_shards(os.path.basename(src), data.wav, utts_per_shard))
    return out


def stored(dest) -> dict[str, str]:
    return {name: open(os.path.join(dest, name), encoding="utf-8").read()
            for name in OUTPUTS if os.path.exists(os.path.join(dest, name))}


@pytest.fixture(scope="module")
def tricky_subset(broken_corpus, tmp_path_factory) -> str:
    """The broken dev-clean plus what breaks naive streaming: speaker ids that prefix each other
    (``100`` / ``1001`` / ``10``), an id equal to its speaker, files in another speaker's folder,
    duplicate ids whose larger path is walked first or whose smaller path fails its checks, a tab in
    a transcript, loose/deep/hidden files (hard links: no audio is rewritten)."""
    src = str(tmp_path_factory.mktemp("tricky") / "dev-clean")
    shutil.copytree(os.path.join(broken_corpus, "dev-clean"), src, copy_function=os.link)
    wav = next(os.path.join(d, f) for d, _, fs in sorted(os.walk(src)) for f in sorted(fs)
               if f.endswith(".wav") and "9990" not in d)

    def add(rel: str, text: str | None = "Some words.") -> None:
        path = os.path.join(src, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.link(wav, path)
        if text is not None:
            with open(path[:-4] + TEXT_SUFFIX, "w", encoding="utf-8") as f:
                f.write(text)

    for rel in ("100/1/100_1_000000_000001.wav", "100/10/100_10_000000_000001.wav", "1001/5/1001_5_000000_000001.wav",
                "10/7/10_7_000000_000001.wav", "100/2/100.wav", "200/1/200_1_a.wav", "200/1/200_1_a-b.wav",
                "1001/6/1001_6_000000_000001.wav"):
        add(rel)
    add("1001/5/100_1_000000_000002.wav")          # speaker 100's id in speaker 1001's folder
    add("100/10/100_1_000000_000001.wav")          # duplicate id: 100/1/... has the smaller path
    add("1001/5/10_7_000000_000001.wav")           # duplicate, walked before 10/7/... (1001_ < 10_), larger path
    add("1001/5/1001_6_000000_000001.wav", "")     # duplicate whose smaller path fails (empty text): 1001/6 kept
    add("100/1/100_1_000000_000004.wav", "tab\there, caf\u00e9 \u2028 sep")
    add("stray.wav", None)
    add("100/1/extra/100_1_000000_000009.wav")
    add(".trash/1/100_1_000000_000005.wav")
    add("100/1/._100_1_000000_000001.wav", None)
    add("100/1/100_1_000000_000003.WAV", None)
    return src


def test_streaming_manifest_is_byte_identical_to_the_in_memory_algorithm(tricky_subset, tmp_path):
    report = prepare_libritts(tricky_subset, str(tmp_path / "m"), utts_per_shard=4, instruct=INSTRUCT)
    got = stored(tmp_path / "m")
    expected = in_memory_manifest(tricky_subset, utts_per_shard=4, instruct=INSTRUCT)
    assert list(got) == list(OUTPUTS)
    for name in OUTPUTS:
        assert got[name] == expected[name], name
    reasons = {q.utt + " " + q.path.rsplit("/dev-clean/", 1)[1]: q.reason for q in report.quarantined
               if q.reason == "duplicate_utt_id" or q.path.endswith("1001_6_000000_000001.wav")}
    assert reasons == {"100_1_000000_000001 100/10/100_1_000000_000001.wav": "duplicate_utt_id",
                       "10_7_000000_000001 1001/5/10_7_000000_000001.wav": "duplicate_utt_id",
                       "1001_6_000000_000001 1001/5/1001_6_000000_000001.wav": "empty_text"}
    assert got["spk2utt"].splitlines()[:3] == [
        "10 10_7_000000_000001", "100 100 100_10_000000_000001 100_1_000000_000001 100_1_000000_000002 "
        "100_1_000000_000004", "1001 1001_5_000000_000001 1001_6_000000_000001"]
    assert report.utterances + len(report.quarantined) == report.files_found
    assert report.utterances == len(got["wav.scp"].splitlines()) and report.speakers == len(got["spk2utt"].splitlines())


def test_tiny_batches_and_spilled_speaker_blocks_give_the_same_bytes(tricky_subset, tmp_path, monkeypatch):
    reference = prepare_libritts(tricky_subset, str(tmp_path / "a"), utts_per_shard=3)
    made: list[SortedRuns] = []
    monkeypatch.setattr(sorted_runs, "MAX_RUNS", 2)  # merge runs early and often
    monkeypatch.setattr(manifest_module, "_BLOCK_CHARS", 1)  # every speaker block is its own run
    monkeypatch.setattr(manifest_module, "_LINES_PER_WRITE", 1)
    monkeypatch.setattr(manifest_module, "SortedRuns", lambda *a, **k: made.append(SortedRuns(*a, **k)) or made[-1])
    tiny = prepare_libritts(tricky_subset, str(tmp_path / "b"), utts_per_shard=3, batch_size=1)
    assert stored(tmp_path / "a") == stored(tmp_path / "b")
    assert tiny.quarantined == reference.quarantined and tiny.shard_keys == reference.shard_keys
    assert [r.name for r in made] == ["kept", "spk2utt"] and all(r.collapses >= 1 for r in made)


def test_sorted_runs_merge_any_batch_order_with_bounded_runs(tmp_path):
    rng = random.Random(0)
    rows = [(f"u{rng.randrange(1000):04d}", f"p{i}", "x\ty") for i in range(500)]
    runs = SortedRuns(str(tmp_path), "t", 3, max_runs=3)
    for i in range(0, len(rows), 7):
        runs.add_sorted(sorted(rows[i:i + 7]))
        assert len(runs.runs) <= 4
    assert list(runs.merged()) == sorted(rows) and runs.rows == 500
    ordered = SortedRuns(str(tmp_path), "o", 3)
    for i in range(0, 500, 50):
        ordered.add_sorted(sorted(rows)[i:i + 50])
    assert len(ordered.runs) == 1  # batches that continue the run extend it


def test_a_rerun_rewrites_only_the_files_whose_bytes_change(tricky_subset, tmp_path):
    src = str(tmp_path / "dev-clean")
    shutil.copytree(tricky_subset, src, copy_function=os.link)
    dest = str(tmp_path / "m")
    prepare_libritts(src, dest)
    before = {n: os.stat(os.path.join(dest, n)).st_mtime_ns for n in os.listdir(dest)}
    assert not any(prepare_libritts(src, dest, batch_size=2).files_written.values())
    text = os.path.join(src, "200", "1", "200_1_a" + TEXT_SUFFIX)
    os.unlink(text)  # a hard link: replace, do not edit in place
    with open(text, "w", encoding="utf-8") as f:
        f.write("Other words.")
    changed = prepare_libritts(src, dest).files_written
    assert [n for n, c in changed.items() if c] == ["text"]
    after = {n: os.stat(os.path.join(dest, n)).st_mtime_ns for n in os.listdir(dest)}
    assert {n for n in before if before[n] != after[n]} == {"text"}
    assert not [n for n in os.listdir(dest) if ".tmp-" in n]


def test_a_failing_stage_leaves_the_previous_manifest_untouched(tricky_subset, tmp_path, monkeypatch):
    dest = str(tmp_path / "m")
    prepare_libritts(tricky_subset, dest)
    before = stored(dest)

    def broken_add(self, utt):
        raise RuntimeError("disk full")

    monkeypatch.setattr(manifest_module.PlanWriter, "add", broken_add)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_libritts(tricky_subset, dest, utts_per_shard=2)
    assert stored(dest) == before and sorted(os.listdir(dest)) == sorted(before)


def test_two_parts_cover_the_subset_like_the_unsplit_run(tricky_subset, tmp_path):
    spec = {"dev-clean": ["1", "2", "5", "6", "9"]}
    whole = prepare_libritts(tricky_subset, str(tmp_path / "whole"))
    reports = [prepare_libritts(tricky_subset, str(tmp_path / p), part=SubsetPart("dev-clean", p), parts=spec)
               for p in spec["dev-clean"]]
    union = sorted(line for p in spec["dev-clean"] for line in stored(tmp_path / p)["wav.scp"].splitlines())
    assert union == stored(tmp_path / "whole")["wav.scp"].splitlines()
    by_path = sorted((q for r in reports for q in r.quarantined), key=lambda q: q.path)
    assert by_path == sorted(whole.quarantined, key=lambda q: q.path)  # stray.wav: once, by the first part
    assert sum(r.files_found for r in reports) == whole.files_found
    assert reports[0].shard_keys == ["dev-clean~1-000000"] and reports[0].subset == "dev-clean~1"


def test_a_speaker_folder_that_no_part_takes_is_an_error_naming_it(tricky_subset, tmp_path):
    with pytest.raises(ValueError, match=r"9990"):
        prepare_libritts(tricky_subset, str(tmp_path / "m"), part=SubsetPart("dev-clean", "1"),
                         parts={"dev-clean": ["1", "2", "5", "6"]})
    with pytest.raises(ValueError, match="not one of the prefixes"):
        prepare_libritts(tricky_subset, str(tmp_path / "m"), part=SubsetPart("dev-clean", "7"),
                         parts={"dev-clean": ["1", "2", "5", "6", "9"]})
    assert not os.path.exists(tmp_path / "m")


def linked_subset(root, wav: str, utterances: int) -> str:
    """``utterances`` hard links of one WAV (+ a transcript each), 50 per speaker."""
    src = os.path.join(root, "dev-clean")
    for i in range(utterances):
        spk, n = i // 50 + 1, i % 50
        folder = os.path.join(src, str(spk), str(spk * 10))
        if n == 0:
            os.makedirs(folder)
        stem = os.path.join(folder, f"{spk}_{spk * 10}_{n:06d}_000000")
        os.link(wav, stem + ".wav")
        with open(stem + TEXT_SUFFIX, "w") as f:
            f.write("Some words.")
    return src


def peak_bytes(fn) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_number_of_utterances(clean_corpus, tmp_path, monkeypatch):
    """Peak Python memory at 1500 vs 300 utterances: the streaming stage holds a batch, not the subset
    (measured: +6 bytes per utterance, its durations array); the in-memory algorithm it replaced grows
    by about 1.5 KB per utterance here (``in_memory_manifest``: 0.78 MB at 500 -> 3.9 MB at 2500)."""
    wav = next(os.path.join(d, f) for d, _, fs in os.walk(clean_corpus) for f in fs if f.endswith(".wav"))
    monkeypatch.setattr(manifest_module, "_BLOCK_CHARS", 4096)  # the buffers' sizes, made small: a
    monkeypatch.setattr(manifest_module, "_LINES_PER_WRITE", 16)  # fixed cost, unlike the data they pass on
    monkeypatch.setattr(staged_output, "_FLUSH_CHARS", 4096)
    peaks = []
    for n in (300, 1500):
        src, dest = linked_subset(tmp_path / str(n), wav, n), str(tmp_path / f"m{n}")
        peaks.append(peak_bytes(lambda s=src, d=dest: prepare_libritts(s, d, num_workers=1, batch_size=100)))
    assert peaks[1] - peaks[0] < 1200 * 50, peaks
