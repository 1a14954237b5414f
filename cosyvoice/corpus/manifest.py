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
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from cosyvoice import storage
from cosyvoice.corpus.kaldi import DataDir, format_tsv, spk2utt_of
from cosyvoice.corpus.scan import DEFAULT_POLICY, AudioPolicy, ScanResult, scan_subset
from cosyvoice.corpus.shard_plan import PLAN_FILE, dumps_plan, plan_shards
from cosyvoice.problems import UtteranceProblem

LIBRITTS_SUBSETS = (
    "dev-clean", "test-clean", "dev-other", "test-other",
    "train-clean-100", "train-clean-360", "train-other-500",
)


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
    durations: list[float] = field(repr=False)
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


def build_data_dir(scan: ScanResult, instruct: str | None = None) -> DataDir:
    utt2spk = {u.utt: u.spk for u in scan.kept}
    return DataDir(
        wav={u.utt: u.path for u in scan.kept},
        text={u.utt: u.text for u in scan.kept},
        utt2spk=utt2spk,
        spk2utt=spk2utt_of(utt2spk),
        instruct={u.utt: instruct for u in scan.kept} if instruct else None,
        utt2dur={u.utt: u.audio.duration for u in scan.kept},
    )


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
) -> ManifestReport:
    """Scan one LibriTTS subset folder (``src``, local or ``s3://``) and write its manifest to ``dest``.

    Re-running on unchanged input rewrites nothing (files are compared before they are stored).
    """
    started = time.perf_counter()
    subset = subset or subset_name(src)
    scan = scan_subset(src, policy=policy, executor=executor, num_workers=num_workers, progress=progress)
    data = build_data_dir(scan, instruct)
    plan = plan_shards(subset, data.wav, utts_per_shard)
    long_audio = [(u.utt, u.path, u.audio.duration) for u in scan.kept
                  if u.audio.duration > policy.long_audio_seconds]

    outputs = data.files()
    outputs["quarantine.tsv"] = format_tsv((q.utt, q.path, q.reason) for q in scan.quarantined)
    outputs["long_audio.tsv"] = format_tsv((utt, path, f"{secs:.4f}") for utt, path, secs in long_audio)
    outputs[PLAN_FILE] = dumps_plan(plan)  # last: its presence marks a complete manifest
    storage.makedirs(dest)
    written = {name: storage.write_text(storage.join(dest, name), content).changed
               for name, content in outputs.items()}
    stale = [name for name in ("instruct",) if name not in outputs and storage.exists(storage.join(dest, name))]
    for name in stale:  # a previous run with --instruct must not leave a file that no longer applies
        storage.remove(storage.join(dest, name))
        written[name] = True

    durations = [u.audio.duration for u in scan.kept]
    return ManifestReport(
        subset=subset, src=src, dest=dest, files_found=scan.files_found,
        utterances=len(scan.kept), speakers=len(data.spk2utt), audio_seconds=sum(durations),
        quarantined=scan.quarantined, long_audio=[(utt, secs) for utt, _, secs in long_audio],
        shard_keys=list(plan), durations=durations, files_written=written,
        seconds=time.perf_counter() - started,
    )
