"""Discover and validate the utterances of one LibriTTS subset.

Discovery follows the upstream recipe (``<subset>/<speaker>/<chapter>/*wav``, utterance id =
file name without ``.wav``, speaker = text before the first ``_``, text = first line of
``<utt>.normalized.txt``), but where upstream silently skips or crashes, every candidate file
ends up either *kept* or *quarantined with a reason*: ``kept + quarantined == found``.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

from cosyvoice import storage
from cosyvoice.corpus.audio import AudioInfo, AudioProblem, probe_audio
from cosyvoice.problems import UtteranceProblem

TEXT_SUFFIX = ".normalized.txt"
_WHITESPACE = re.compile(r"\s")
#: below this many files a local scan runs in-process (a pool costs more than it saves)
_POOL_THRESHOLD = 2000

#: every quarantine reason this stage can give, with what it means for the user
QUARANTINE_REASONS = {
    "misplaced_file": "audio file not at <subset>/<speaker>/<chapter>/<utt>.wav",
    "hidden_file": "name starts with '.' (e.g. macOS '._' resource forks)",
    "bad_suffix": "name ends in 'wav' but not in '.wav'",
    "whitespace_in_path": "path contains whitespace, which breaks whitespace-separated kaldi files",
    "duplicate_utt_id": "another file with the same utterance id was kept",
    "missing_text": "no <utt>.normalized.txt next to the audio",
    "text_not_utf8": "the .normalized.txt is not valid UTF-8",
    "empty_text": "the first line of the .normalized.txt is empty",
    "empty_file": "audio file is 0 bytes",
    "unreadable_header": "not a readable audio header",
    "truncated_audio": "header declares more audio data than the file holds",
    "no_audio_frames": "header is valid but holds 0 audio frames",
    "undecodable_audio": "header opens but the samples do not decode",
    "low_sample_rate": "sample rate below the policy minimum (default 16 kHz)",
    "multichannel": "more channels than the policy allows (default mono)",
}


@dataclass(frozen=True)
class AudioPolicy:
    """What audio the manifest accepts. Long audio is kept but listed (the tokenizer skips it)."""

    min_sample_rate: int = 16000
    max_channels: int = 1
    long_audio_seconds: float = 30.0


DEFAULT_POLICY = AudioPolicy()


@dataclass(frozen=True)
class Utterance:
    utt: str
    spk: str
    path: str
    text: str
    audio: AudioInfo


@dataclass
class ScanResult:
    kept: list[Utterance]
    quarantined: list[UtteranceProblem]
    files_found: int


def _relative_parts(root: str, url: str) -> list[str]:
    rel = url[len(root):].lstrip("/" if not storage.is_local(root) else os.sep + "/")
    return rel.replace(os.sep, "/").split("/")


def utterance_id(path: str) -> str:
    name = path.rsplit("/", 1)[-1].rsplit(os.sep, 1)[-1]
    return name[: -len(".wav")] if name.endswith(".wav") else name


def first_line(raw: bytes) -> str:
    """Upstream reads the first line in text mode (universal newlines) and drops the newline."""
    text = raw.decode("utf-8")
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n", 1)[0]


def _check_one(path: str, size: int, text_path: str, policy: AudioPolicy) -> Utterance | UtteranceProblem:
    utt = utterance_id(path)
    try:
        text = first_line(storage.read_bytes(text_path))
    except UnicodeDecodeError as exc:
        return UtteranceProblem(utt, path, "text_not_utf8", f"{text_path} is not UTF-8 ({exc.reason} at byte {exc.start})")
    if not text.strip():
        return UtteranceProblem(utt, path, "empty_text", f"{text_path} has an empty first line")

    def read(nbytes: int | None) -> bytes:
        return storage.read_bytes(path) if nbytes is None else storage.read_head(path, nbytes)

    try:
        info = probe_audio(read, size)
    except AudioProblem as problem:
        return UtteranceProblem(utt, path, problem.reason, problem.detail)
    except OSError as exc:
        if storage.is_transient(exc):  # retried by storage already: fail the stage, do not quarantine
            raise
        return UtteranceProblem(utt, path, "unreadable_header", f"cannot read the file: {exc}")
    if info.sample_rate < policy.min_sample_rate:
        return UtteranceProblem(utt, path, "low_sample_rate",
                           f"{info.sample_rate} Hz is below the minimum of {policy.min_sample_rate} Hz")
    if info.channels > policy.max_channels:
        return UtteranceProblem(utt, path, "multichannel",
                           f"{info.channels} channels, at most {policy.max_channels} allowed")
    return Utterance(utt=utt, spk=utt.split("_")[0], path=path, text=text, audio=info)


def _check_chunk(chunk: list[tuple[str, int, str]], policy: AudioPolicy) -> list[Utterance | UtteranceProblem]:
    return [_check_one(path, size, text_path, policy) for path, size, text_path in chunk]


def default_executor(src: str, num_files: int, num_workers: int) -> Executor | None:
    """Local files: processes (the checks are CPU-bound once the page cache is warm, and threads
    only fight over the GIL); object stores: threads (each check waits on a ranged GET).
    None means "run in this process"."""
    if storage.is_local(src):
        workers = min(num_workers, os.cpu_count() or 1)
        if workers < 2 or num_files < _POOL_THRESHOLD:
            return None
        # fork is fastest, but forking a process that runs other threads can deadlock
        method = "fork" if threading.active_count() == 1 else "forkserver"
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))
    return ThreadPoolExecutor(max_workers=max(1, num_workers))


def _run_checks(candidates, policy, executor: Executor | None, workers: int) -> Iterator[Utterance | UtteranceProblem]:
    if executor is None:
        for path, size, text_path in candidates:
            yield _check_one(path, size, text_path, policy)
        return
    size = max(16, min(512, len(candidates) // (max(workers, 1) * 8) or 16))
    chunks = [candidates[i:i + size] for i in range(0, len(candidates), size)]
    for results in executor.map(_check_chunk, chunks, [policy] * len(chunks)):
        yield from results


def scan_subset(
    src: str,
    *,
    policy: AudioPolicy = DEFAULT_POLICY,
    executor: Executor | None = None,
    num_workers: int = 8,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> ScanResult:
    """Find every audio candidate below ``src`` and validate it (headers checked in parallel).

    ``executor`` may be any ``concurrent.futures.Executor``; by default see ``default_executor``.
    ``progress`` wraps the per-file result iterator (e.g. tqdm).
    """
    if storage.is_local(src):
        src = storage.strip_protocol(src)  # file:// URLs list as plain paths
    src = src.rstrip("/") if len(src) > 1 else src
    listing = storage.list_files(src)
    files = {url: size for url, size in listing}
    quarantined: list[UtteranceProblem] = []
    candidates: list[tuple[str, int, str]] = []
    found = 0
    for url, size in listing:
        parts = _relative_parts(src, url)
        name = parts[-1]
        if not name.lower().endswith("wav") or any(p.startswith(".") for p in parts[:-1]):
            continue  # text files, and hidden folders which upstream's glob never enters
        found += 1
        utt = utterance_id(url)
        if name.startswith("."):
            quarantined.append(UtteranceProblem(utt, url, "hidden_file", "hidden file (name starts with '.')"))
        elif len(parts) != 3:
            quarantined.append(UtteranceProblem(utt, url, "misplaced_file",
                                           "expected <speaker>/<chapter>/<utt>.wav below the subset folder"))
        elif not name.endswith(".wav"):
            quarantined.append(UtteranceProblem(utt, url, "bad_suffix", "name ends in 'wav' but not '.wav'"))
        elif _WHITESPACE.search(url):
            quarantined.append(UtteranceProblem(utt, url, "whitespace_in_path",
                                           "path contains whitespace; kaldi files are whitespace separated"))
        else:
            text_path = url[: -len(".wav")] + TEXT_SUFFIX
            if text_path not in files:
                quarantined.append(UtteranceProblem(utt, url, "missing_text", f"{text_path} does not exist"))
            else:
                candidates.append((url, size, text_path))

    own_pool = executor is None
    pool = default_executor(src, len(candidates), num_workers) if own_pool else executor
    try:
        results: Iterable = _run_checks(candidates, policy, pool, num_workers)
        if progress is not None:
            results = progress(results)
        checked = list(results)
    finally:
        if own_pool and pool is not None:
            pool.shutdown()

    kept: list[Utterance] = []
    seen: dict[str, str] = {}
    for item in sorted(checked, key=lambda r: r.path):
        if isinstance(item, UtteranceProblem):
            quarantined.append(item)
        elif item.utt in seen:
            quarantined.append(UtteranceProblem(item.utt, item.path, "duplicate_utt_id",
                                           f"utterance id already used by {seen[item.utt]}"))
        else:
            seen[item.utt] = item.path
            kept.append(item)
    kept.sort(key=lambda u: u.utt)
    quarantined.sort(key=lambda q: (q.utt, q.path))
    return ScanResult(kept=kept, quarantined=quarantined, files_found=found)
