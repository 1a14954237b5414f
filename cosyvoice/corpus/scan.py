"""Discover and validate the utterances of one LibriTTS subset, folder by folder.

Discovery follows the upstream recipe (``<subset>/<speaker>/<chapter>/*wav``, utterance id =
file name without ``.wav``, speaker = text before the first ``_``, text = first line of
``<utt>.normalized.txt``), but where upstream silently skips or crashes, every candidate file
ends up either *kept* or *quarantined with a reason*: ``kept + quarantined == found``.

A subset may hold tens of millions of files, so nothing here lists it whole: :class:`SubsetWalk`
lists the subset folder once (its speaker folders), then one speaker folder at a time (local:
``os.scandir`` per folder; object stores: one paginated listing per speaker prefix), and
:func:`check_stream` validates the candidates in bounded chunks on an executor, keeping a bounded
number of chunks in flight. Speaker and chapter folders are visited in ``name + "_"`` order and files
by utterance id, so a well-formed corpus comes out in utterance-id order (cheap to sort downstream);
correctness never depends on it.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

from cosyvoice import storage
from cosyvoice.corpus.audio import AudioInfo, AudioProblem, probe_audio
from cosyvoice.problems import UtteranceProblem

TEXT_SUFFIX = ".normalized.txt"
_WHITESPACE = re.compile(r"\s")
#: below this many files a local scan runs in-process (a pool costs more than it saves)
_POOL_THRESHOLD = 2000
#: candidates per task: a process worker gets many (amortises pickling), a thread few (each check
#: waits on its own GETs, so small tasks keep every thread's request in flight)
PROCESS_CHUNK, THREAD_CHUNK = 256, 4

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
    """``size`` -1: a local file whose size is read here (in the worker, not by the walk)."""
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
        info = probe_audio(read, size if size >= 0 else os.stat(path).st_size)
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



#: an audio file to check: (url, size in bytes, url of its .normalized.txt)
Candidate = tuple[str, int, str]
#: a kept utterance as it travels between processes and into the sorted runs: (utt, url, seconds, text)
Kept = tuple[str, str, float, str]


def _kept(item: Utterance | UtteranceProblem) -> Kept | UtteranceProblem:
    if isinstance(item, UtteranceProblem):
        return item
    return item.utt, item.path, item.audio.duration, item.text


def _check_chunk(chunk: list[Candidate], policy: AudioPolicy) -> list[Kept | UtteranceProblem]:
    return [_kept(_check_one(path, size, text_path, policy)) for path, size, text_path in chunk]


def folder_order(name: str) -> str:
    """Sort key of speaker/chapter folders: ``"100"`` after ``"1001"``, as utterance ids ``100_...``
    sort after ``1001_...`` (``'1' < '_'``)."""
    return name + "_"


def classify(url: str, name: str, depth: int, has_text: Callable[[str], bool]) -> Candidate | UtteranceProblem | None:
    """What the listing alone says about one file ``depth`` path segments below the subset folder:
    a candidate to check (size filled in by the caller), a quarantine entry, or None (not audio)."""
    if not name.lower().endswith("wav"):
        return None
    utt = utterance_id(name)
    if name.startswith("."):
        return UtteranceProblem(utt, url, "hidden_file", "hidden file (name starts with '.')")
    if depth != 3:
        return UtteranceProblem(utt, url, "misplaced_file", "expected <speaker>/<chapter>/<utt>.wav below the subset folder")
    if not name.endswith(".wav"):
        return UtteranceProblem(utt, url, "bad_suffix", "name ends in 'wav' but not '.wav'")
    if _WHITESPACE.search(url):
        return UtteranceProblem(utt, url, "whitespace_in_path",
                                "path contains whitespace; kaldi files are whitespace separated")
    text_path = url[: -len(".wav")] + TEXT_SUFFIX
    if not has_text(text_path):
        return UtteranceProblem(utt, url, "missing_text", f"{text_path} does not exist")
    return url, 0, text_path


class SubsetWalk:
    """The audio candidates below one subset folder, one speaker folder at a time.

    Iterating yields the candidates to check; what the listing alone rules out is appended to
    ``problems`` and every audio file counts in ``found``. ``take_folder`` / ``take_loose_file``
    choose the speaker folders and the files lying directly in the subset folder that this walk
    covers (a part of a split subset); hidden folders are never entered, as upstream's glob never does.
    """

    def __init__(self, src: str, *, take_folder: Callable[[str], bool] = lambda name: True,
                 take_loose_file: Callable[[str], bool] = lambda name: True):
        if storage.is_local(src):
            src = storage.strip_protocol(src)  # file:// URLs list as plain paths
        self.src = src.rstrip("/") if len(src) > 1 else src
        self.local = storage.is_local(self.src)
        self.take_folder, self.take_loose_file = take_folder, take_loose_file
        self.found = 0
        self.problems: list[UtteranceProblem] = []
        self._top: tuple[list[str], list[tuple[str, str, int]]] | None = None

    def speaker_folders(self) -> list[str]:
        """Every (non-hidden) folder directly in the subset folder, whichever part takes it."""
        return list(self._top_level()[0])

    def __iter__(self) -> Iterator[Candidate]:
        folders, loose = self._top_level()
        for url, name, size in loose:
            if self.take_loose_file(name):
                yield from self._emit([(utterance_id(name), url, name, 1, size)], lambda _: False)
        for name in sorted((f for f in folders if self.take_folder(f)), key=folder_order):
            if self.local:
                yield from self._walk_local(os.path.join(self.src, name), 2)
            else:
                yield from self._walk_remote(name)

    def _top_level(self) -> tuple[list[str], list[tuple[str, str, int]]]:
        if self._top is None:
            self._top = storage.retrying(self._list_top, what=f"list {self.src}")
        return self._top

    def _list_top(self) -> tuple[list[str], list[tuple[str, str, int]]]:
        folders: list[str] = []
        loose: list[tuple[str, str, int]] = []  # (url, name, size)
        if self.local:
            if not os.path.isdir(self.src):
                raise FileNotFoundError(f"{self.src}: no such directory")
            with os.scandir(self.src) as entries:
                for entry in entries:
                    if entry.is_dir():
                        if not entry.name.startswith("."):
                            folders.append(entry.name)
                    elif entry.is_file():
                        loose.append((entry.path, entry.name, -1))
            return folders, loose
        fs, root = storage.filesystem(self.src), storage.strip_protocol(self.src).rstrip("/")
        if not fs.isdir(root):
            raise FileNotFoundError(f"{self.src}: no such prefix")
        for info in fs.ls(root, detail=True):
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            if info.get("type") == "directory":
                if not name.startswith("."):
                    folders.append(name)
            elif info.get("type", "file") == "file":
                loose.append((storage.with_protocol(self.src, info["name"]), name, int(info.get("size") or 0)))
        return folders, loose

    def _emit(self, files: list[tuple[str, str, str, int, int]], has_text: Callable[[str], bool]) -> Iterator[Candidate]:
        """Classify ``(utt, url, name, depth, size)`` audio files of one folder in utterance-id order
        (size -1: the checking worker stats the file, so the walk stays cheap)."""
        files.sort()
        for _, url, name, depth, size in files:
            verdict = classify(url, name, depth, has_text)
            if verdict is None:
                continue
            self.found += 1
            if isinstance(verdict, UtteranceProblem):
                self.problems.append(verdict)
            else:
                yield url, size, verdict[2]

    def _walk_local(self, folder: str, depth: int) -> Iterator[Candidate]:
        """``depth``: path segments below the subset folder of the files in ``folder``."""
        files: dict[str, str] = {}
        subfolders: list[str] = []
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir():
                    if not entry.name.startswith("."):
                        subfolders.append(entry.name)
                elif entry.is_file():
                    files[entry.path] = entry.name
        yield from self._emit([(utterance_id(name), url, name, depth, -1) for url, name in files.items()
                               if name.lower().endswith("wav")], files.__contains__)
        for name in sorted(subfolders, key=folder_order):
            yield from self._walk_local(os.path.join(folder, name), depth + 1)

    def _walk_remote(self, speaker: str) -> Iterator[Candidate]:
        """One paginated listing of the speaker prefix; the listing cache it fills is dropped afterwards
        (it would otherwise grow with the whole corpus)."""
        fs, root = storage.filesystem(self.src), storage.strip_protocol(self.src).rstrip("/")
        prefix = f"{root}/{speaker}"
        listing = storage.retrying(fs.find, prefix, detail=True, what=f"list {prefix}")
        keys = {path for path, info in listing.items() if info.get("type", "file") == "file"}
        files = []
        for path in keys:
            parts = path[len(root) + 1:].split("/")
            if any(p.startswith(".") for p in parts[:-1]) or not parts[-1].lower().endswith("wav"):
                continue
            files.append((utterance_id(parts[-1]), storage.with_protocol(self.src, path), parts[-1], len(parts),
                          int(listing[path].get("size") or 0)))
        for folder in {path.rsplit("/", 1)[0] for path in listing}:
            fs.invalidate_cache(folder)
        yield from self._emit(files, lambda text_url: storage.strip_protocol(text_url) in keys)


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


def check_stream(
    src: str,
    candidates: Iterable[Candidate],
    *,
    policy: AudioPolicy = DEFAULT_POLICY,
    executor: Executor | None = None,
    num_workers: int = 8,
    chunk_size: int | None = None,
) -> Iterator[Kept | UtteranceProblem]:
    """Validate ``candidates`` (text + header checks): an iterator of one result per candidate, in their order.

    ``executor`` may be any ``concurrent.futures.Executor``; by default see ``default_executor``
    (decided here, once the first ``_POOL_THRESHOLD`` candidates are known, so a small subset runs
    in-process; deciding before the caller wraps the iterator, e.g. in tqdm with its monitor thread,
    keeps the fast fork start). At most 16 chunks per worker are in flight: memory does not grow with
    the subset. Iterate to the end or close the iterator: an own pool is shut down then.
    """
    candidates = iter(candidates)
    own_pool = executor is None
    pool = executor
    if own_pool:
        head: list[Candidate] = []
        if storage.is_local(src) and min(num_workers, os.cpu_count() or 1) >= 2:  # a pool only pays off above
            head = list(itertools.islice(candidates, _POOL_THRESHOLD))            # _POOL_THRESHOLD files
        pool = default_executor(src, len(head), num_workers)
        candidates = itertools.chain(head, candidates)
        del head  # the chain holds it only until it is consumed
    if pool is None:
        return (_kept(_check_one(path, size, text_path, policy)) for path, size, text_path in candidates)
    if chunk_size is None:
        chunk_size = THREAD_CHUNK if isinstance(pool, ThreadPoolExecutor) else PROCESS_CHUNK
    return _pooled(pool, own_pool, candidates, policy, chunk_size, max(1, getattr(pool, "_max_workers", num_workers)))


def _pooled(pool: Executor, own_pool: bool, candidates: Iterator[Candidate], policy: AudioPolicy, chunk_size: int,
            workers: int) -> Iterator[Kept | UtteranceProblem]:
    in_flight: collections.deque[Future] = collections.deque()
    try:
        for chunk in _chunks(candidates, chunk_size):
            in_flight.append(pool.submit(_check_chunk, chunk, policy))
            while len(in_flight) >= 16 * workers:
                yield from in_flight.popleft().result()
        while in_flight:
            yield from in_flight.popleft().result()
    finally:
        for future in in_flight:
            future.cancel()
        if own_pool:
            pool.shutdown(cancel_futures=True)


def _chunks(items: Iterable[Candidate], size: int) -> Iterator[list[Candidate]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk
