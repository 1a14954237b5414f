"""The manifest stage: one LibriTTS subset -> a kaldi data dir, a shard plan and a quarantine list.

Output folder (``dest``):

==================  =====================================================================
``wav.scp``         ``utt path`` (same lines as upstream ``prepare_data.py``, sorted by utt)
``text``            ``utt normalized-text``
``utt2spk``         ``utt spk``
``spk2utt``         ``spk utt1 utt2 ...`` (sorted by speaker, utterances sorted)
``instruct``        ``utt instruction`` (only with ``instruct=``; CosyVoice3 needs it)
``utt2dur``         ``utt seconds`` (kaldi convention; used by downstream checks)
``quarantine.tsv``  ``utt<TAB>path<TAB>reason`` for every file that was not kept
``long_audio.tsv``  ``utt<TAB>path<TAB>seconds`` for kept audio longer than the tokenizer's 30 s
``shards.json``     the shard plan ``{shard_key: [utt, ...]}``; written last = "manifest complete"
==================  =====================================================================

Memory is flat in the size of the subset (50M utterances as 10k): the subset is walked one speaker
folder at a time (:class:`~cosyvoice.corpus.scan.SubsetWalk`), checked in bounded chunks, sorted a
batch at a time into run files (:class:`~cosyvoice.corpus.sorted_runs.SortedRuns`), and merged in
one pass that streams every output into a staging file (:class:`~cosyvoice.corpus.staged_output.StagedOutput`)
and the shard plan as it goes; the bytes are the same as when everything was held in lists. What
stays in memory is per-problem (quarantine entries, long-audio rows) and per-shard (the keys).
A huge subset can also be split into parts by speaker-folder prefix (``cosyvoice.corpus.parts``).
"""

from __future__ import annotations

import os
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

from cosyvoice import storage
from cosyvoice.corpus.kaldi import format_tsv
from cosyvoice.corpus.parts import SubsetPart, check_coverage, parts_from_env
from cosyvoice.corpus.scan import DEFAULT_POLICY, AudioPolicy, Kept, SubsetWalk, check_stream
from cosyvoice.corpus.shard_plan import PLAN_FILE, PlanWriter
from cosyvoice.corpus.sorted_runs import SortedRuns
from cosyvoice.corpus.staged_output import StagedOutput
from cosyvoice.problems import UtteranceProblem

LIBRITTS_SUBSETS = (
    "dev-clean", "test-clean", "dev-other", "test-other",
    "train-clean-100", "train-clean-360", "train-other-500",
)


#: checked utterances sorted in memory at a time before they are spilled to a sorted run
DEFAULT_BATCH = 20_000
#: durations the report keeps for its histogram; beyond that an evenly spaced sample
DURATION_SAMPLE = 65_536
#: characters of spk2utt blocks held before they are spilled to a sorted run
_BLOCK_CHARS = 8 << 20
#: utterances whose lines are buffered before they are handed to the output files
_LINES_PER_WRITE = 1024


@dataclass
class ManifestReport:
    """What the manifest stage did: the CLI prints it, the asset reports it, tests assert on it."""

    subset: str
    src: str
    dest: str
    files_found: int
    utterances: int
    speakers: int
    audio_seconds: float
    quarantined: list[UtteranceProblem]
    long_audio: list[tuple[str, float]]
    shard_keys: list[str]
    #: kept durations in utterance order: all of them up to DURATION_SAMPLE, else every k-th (a histogram's input)
    durations: Sequence[float] = field(repr=False)
    files_written: dict[str, bool] = field(default_factory=dict)  # name -> changed
    seconds: float = 0.0

    @property
    def audio_hours(self) -> float:
        return self.audio_seconds / 3600.0

    @property
    def quarantined_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(q.reason for q in self.quarantined).items()))

    def as_metadata(self) -> dict:
        """Plain values (no framework types) describing the run."""
        return {
            "subset": self.subset,
            "path": self.dest,
            "files_found": self.files_found,
            "utterances": self.utterances,
            "speakers": self.speakers,
            "audio_hours": round(self.audio_hours, 4),
            "quarantined": len(self.quarantined),
            "quarantined_by_reason": self.quarantined_by_reason,
            "long_audio": len(self.long_audio),
            "shards": len(self.shard_keys),
            "files_changed": sorted(k for k, changed in self.files_written.items() if changed),
            "seconds": round(self.seconds, 3),
        }

    def summary(self) -> str:
        lines = [
            f"{self.subset}: {self.utterances} utterances, {self.speakers} speakers, "
            f"{self.audio_hours:.3f} h of audio, {len(self.shard_keys)} shard(s) -> {self.dest}",
            f"found {self.files_found} audio files: kept {self.utterances}, quarantined {len(self.quarantined)}"
            + (f" {self.quarantined_by_reason}" if self.quarantined else ""),
        ]
        if self.long_audio:
            lines.append(f"{len(self.long_audio)} utterance(s) longer than 30 s listed in long_audio.tsv")
        lines.append(f"took {self.seconds:.2f} s")
        return "\n".join(lines)


def subset_name(src: str) -> str:
    return os.path.basename(src.rstrip("/")) or src


def subset_walk(src: str, part: SubsetPart | None = None, parts: Mapping[str, list[str]] | None = None) -> SubsetWalk:
    """The walk over ``src`` that ``part`` covers. When ``parts`` (the split spec, see
    ``cosyvoice.corpus.parts``; None: the ``COSYVOICE_SUBSET_PARTS`` environment variable) splits the
    part's subset, ``part`` must be one of its parts and every speaker folder must belong to one (else
    ValueError, naming the folders). Files lying directly in the subset folder (always misplaced) are
    quarantined by the part whose prefix starts their name, or by the first part when none does, so
    each is reported exactly once. Duplicate ids are found within a part (parts never share a speaker
    folder, so only a file misplaced into another speaker's folder can collide across parts)."""
    if part is None or part.prefix is None:
        return SubsetWalk(src)
    parts = parts_from_env() if parts is None else parts
    prefixes = list(parts.get(part.subset) or [])
    if prefixes and part.prefix not in prefixes:
        raise ValueError(f"{part.key}: {part.prefix!r} is not one of the prefixes {prefixes} that split {part.subset}")
    prefix = part.prefix

    def take_loose_file(name: str) -> bool:
        return name.startswith(prefix) or (prefixes[:1] == [prefix] and not any(name.startswith(p) for p in prefixes))

    walk = SubsetWalk(src, take_folder=part.selects, take_loose_file=take_loose_file)
    if prefixes:
        check_coverage(part.subset, walk.speaker_folders(), parts)
    return walk


def prepare_libritts(
    src: str,
    dest: str,
    *,
    instruct: str | None = None,
    utts_per_shard: int = 1000,
    num_workers: int = 8,
    subset: str | None = None,
    policy: AudioPolicy = DEFAULT_POLICY,
    executor: Executor | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
    part: SubsetPart | None = None,
    parts: Mapping[str, list[str]] | None = None,
    batch_size: int = DEFAULT_BATCH,
    work_dir: str | None = None,
) -> ManifestReport:
    """Scan one LibriTTS subset folder (``src``, local or ``s3://``) and write its manifest to ``dest``.

    ``part``: only the speaker folders of this part of a split subset (``parts``: the split spec,
    default from the environment, checked for coverage; see :func:`subset_walk`); its key names the
    shards (``subset`` overrides).
    Memory stays flat in the number of utterances: checked utterances are sorted ``batch_size`` at a
    time into run files under ``work_dir`` (default TMPDIR; about 200 bytes per utterance) and merged
    while the outputs are streamed. Re-running on unchanged input rewrites nothing.
    """
    started = time.perf_counter()
    subset = subset or (part.key if part is not None else subset_name(src))
    if utts_per_shard < 1:
        raise ValueError(f"utts_per_shard must be >= 1, got {utts_per_shard}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    walk = subset_walk(src, part, parts)
    with tempfile.TemporaryDirectory(prefix="cosyvoice-manifest-", dir=work_dir) as tmp:
        kept = SortedRuns(tmp, "kept", 4)
        results: Iterable = check_stream(walk.src, walk, policy=policy, executor=executor, num_workers=num_workers)
        problems = _sort_into_runs(progress(results) if progress is not None else results, kept, batch_size)
        problems += walk.problems
        storage.makedirs(dest)
        report = _write_manifest(kept.merged(), problems, dest, subset=subset, instruct=instruct,
                                 utts_per_shard=utts_per_shard, policy=policy, tmp=tmp)
    report.src, report.files_found, report.seconds = src, walk.found, time.perf_counter() - started
    return report


def _sort_into_runs(results: Iterable[Kept | UtteranceProblem], runs: SortedRuns, batch_size: int) -> list[UtteranceProblem]:
    problems: list[UtteranceProblem] = []
    batch: list[tuple[str, str, str, str]] = []
    for item in results:
        if isinstance(item, UtteranceProblem):
            problems.append(item)
            continue
        utt, path, seconds, text = item
        batch.append((utt, path, repr(seconds), text))
        if len(batch) >= batch_size:
            batch.sort()
            runs.add_sorted(batch)
            batch = []
    batch.sort()
    runs.add_sorted(batch)
    return problems


def _write_manifest(kept: Iterator[tuple[str, ...]], problems: list[UtteranceProblem], dest: str, *, subset: str,
                    instruct: str | None, utts_per_shard: int, policy: AudioPolicy, tmp: str) -> ManifestReport:
    """One pass over the kept utterances in (utt, path) order: the first of equal ids is kept (the
    smaller path), later ones are quarantined; every output is streamed; shards.json is published last."""
    names = ["wav.scp", "text", "utt2spk", "spk2utt", *(["instruct"] if instruct else []), "utt2dur",
             "quarantine.tsv", "long_audio.tsv", PLAN_FILE]
    outs = {name: StagedOutput(storage.join(dest, name)) for name in names}
    try:
        lines: dict[str, list[str]] = {name: [] for name in ("wav.scp", "text", "utt2spk", "instruct", "utt2dur")}
        wav, text_out, utt2spk, instruct_out, utt2dur = (lines[n].append for n in lines)
        long_out = outs["long_audio.tsv"].write
        plan = PlanWriter(subset, utts_per_shard, outs[PLAN_FILE].write)
        blocks = _SpeakerBlocks(SortedRuns(tmp, "spk2utt", 3))
        durations = _DurationSample(DURATION_SAMPLE)
        long_audio: list[tuple[str, float]] = []
        count, total = 0, 0.0
        prev_utt, prev_path = None, ""
        for utt, path, seconds_repr, text in kept:
            if utt == prev_utt:
                problems.append(UtteranceProblem(utt, path, "duplicate_utt_id", f"utterance id already used by {prev_path}"))
                continue
            prev_utt, prev_path = utt, path
            seconds = float(seconds_repr)
            spk = utt.split("_", 1)[0]
            wav(f"{utt} {path}\n")
            text_out(f"{utt} {text}\n")
            utt2spk(f"{utt} {spk}\n")
            if instruct:
                instruct_out(f"{utt} {instruct}\n")
            utt2dur(f"{utt} {seconds:.4f}\n")
            if seconds > policy.long_audio_seconds:
                long_out(f"{utt}\t{path}\t{seconds:.4f}\n")
                long_audio.append((utt, seconds))
            plan.add(utt)
            blocks.add(spk, utt)
            durations.add(seconds)
            count += 1
            total += seconds
            if count % _LINES_PER_WRITE == 0:
                _hand_over(lines, outs)
        _hand_over(lines, outs)
        speakers = 0
        for line in blocks.lines():
            outs["spk2utt"].write(line)
            speakers += 1
        problems.sort(key=lambda q: (q.utt, q.path))
        outs["quarantine.tsv"].write(format_tsv((q.utt, q.path, q.reason) for q in problems))
        keys = plan.close()
        written = {name: out.publish() for name, out in outs.items()}  # in order: shards.json last
    except BaseException:
        for out in outs.values():
            out.discard()
        raise
    if not instruct and storage.exists(storage.join(dest, "instruct")):
        storage.remove(storage.join(dest, "instruct"))  # a previous run with --instruct must not leave it behind
        written["instruct"] = True
    return ManifestReport(
        subset=subset, src="", dest=dest, files_found=0, utterances=count, speakers=speakers, audio_seconds=total,
        quarantined=problems, long_audio=long_audio, shard_keys=keys, durations=durations.values,
        files_written=written,
    )


def _hand_over(lines: dict[str, list[str]], outs: dict[str, StagedOutput]) -> None:
    """Pass the buffered lines of each file to its output in one write (fewer calls per utterance)."""
    for name, buffered in lines.items():
        if buffered:
            outs[name].write("".join(buffered))
            buffered.clear()


class _SpeakerBlocks:
    """spk2utt without holding it: in utterance-id order a speaker's ids form one block (ids
    ``S_*`` are contiguous; only an id equal to ``S`` itself may stand apart), but blocks come in
    ``S + "_"`` order, not speaker order (``1001_*`` sorts before ``100_*``). Blocks are spilled to
    sorted runs by (speaker, first id) and merged; consecutive blocks of one speaker are joined."""

    def __init__(self, runs: SortedRuns):
        self.runs = runs
        self._spk: str | None = None
        self._utts: list[str] = []
        self._pending: list[tuple[str, str, str]] = []
        self._chars = 0

    def add(self, spk: str, utt: str) -> None:
        if spk != self._spk:
            self._end_block()
            self._spk = spk
        self._utts.append(utt)

    def lines(self) -> Iterator[str]:
        """``spk utt1 utt2 ...\\n`` per speaker, sorted by speaker."""
        self._end_block()
        self._spill()
        current, joined = None, []
        for spk, _first, utts in self.runs.merged():
            if spk != current:
                if current is not None:
                    yield f"{current} {' '.join(joined)}\n"
                current, joined = spk, []
            joined.append(utts)
        if current is not None:
            yield f"{current} {' '.join(joined)}\n"

    def _end_block(self) -> None:
        if self._spk is not None and self._utts:
            block = " ".join(self._utts)
            self._pending.append((self._spk, self._utts[0], block))
            self._chars += len(block)
            self._utts = []
            if self._chars >= _BLOCK_CHARS:
                self._spill()

    def _spill(self) -> None:
        self._pending.sort()
        self.runs.add_sorted(self._pending)
        self._pending, self._chars = [], 0


class _DurationSample:
    """Every ``stride``-th value, the stride doubling whenever ``cap`` values are held (bounded, evenly spaced)."""

    def __init__(self, cap: int):
        self.cap, self.stride, self.seen = cap, 1, 0
        self.values = array("d")

    def add(self, value: float) -> None:
        if self.seen % self.stride == 0:
            self.values.append(value)
            if len(self.values) > self.cap:
                self.values = self.values[::2]
                self.stride *= 2
        self.seen += 1
