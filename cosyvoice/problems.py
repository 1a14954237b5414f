"""One record for "this utterance was not used, and why", shared by every stage's report, and the
``failed_<stage>.tsv`` files that persist them next to a stage's outputs.

A failures file is tab-separated with a header line ``utt path stage reason detail``, one row per
utterance sorted by ``utt``. ``stage`` names the stage where the utterance was first lost (a
later stage that carries an upstream failure keeps the original stage and reason); ``reason`` is a
stable code; ``detail`` is the message a person acts on. A stage writes its file on every run,
replacing the previous one; a run without failures writes the header alone, so "no failures" and
"the stage never ran" can be told apart from the files.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

FAILURE_COLUMNS = ("utt", "path", "stage", "reason", "detail")


@dataclass(frozen=True)
class UtteranceProblem:
    utt: str
    path: str
    reason: str  # a stable code, e.g. "truncated_audio"
    detail: str  # what a person needs to act on it
    stage: str = ""  # where the utterance was lost, e.g. "extract_embedding"

    @classmethod
    def from_exception(cls, utt: str, path: str, reason: str, exc: BaseException) -> UtteranceProblem:
        return cls(utt, path, reason, f"{type(exc).__name__}: {exc}")

    def at(self, stage: str) -> UtteranceProblem:
        """This problem attributed to ``stage`` (kept when it already names one)."""
        return self if self.stage else replace(self, stage=stage)

    def __str__(self) -> str:
        return f"{self.path}: {self.detail} — utterance {self.utt} left out (reason: {self.reason})"


def failures_name(stage: str) -> str:
    """``failed_<stage>.tsv``: the failures file a CLI stage writes into its output directory."""
    return f"failed_{stage}.tsv"


def failures_next_to(url: str) -> str:
    """``<name>.failed.tsv`` beside a per-shard output file ``<name>.<ext>`` (the pipeline's form)."""
    folder, _, name = url.rpartition("/") if "/" in url else ("", "", url)
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return f"{folder}/{stem}.failed.tsv" if folder else f"{stem}.failed.tsv"


def _cell(value: str) -> str:
    return " ".join(str(value).split())  # one line, no tabs: a message may contain either


def format_failures(problems: Iterable[UtteranceProblem]) -> str:
    from cosyvoice.corpus.kaldi import format_tsv

    rows = sorted(problems, key=lambda p: p.utt)
    return format_tsv(((_cell(p.utt), _cell(p.path), _cell(p.stage), _cell(p.reason), _cell(p.detail)) for p in rows),
                      header=FAILURE_COLUMNS)


def parse_failures(content: str, *, source: str = "<text>") -> list[UtteranceProblem]:
    from cosyvoice.corpus.kaldi import parse_tsv

    rows = parse_tsv(content)
    if not rows or tuple(rows[0][:4]) != FAILURE_COLUMNS[:4]:
        raise ValueError(f"{source}: not a failures file (the first line must be the header "
                         f"{' '.join(FAILURE_COLUMNS)})")
    problems = []
    for lineno, row in enumerate(rows[1:], 2):
        if len(row) < 4:
            raise ValueError(f"{source}: line {lineno} has {len(row)} column(s), expected utt path stage reason [detail]")
        utt, path, stage, reason, *rest = row
        problems.append(UtteranceProblem(utt, path, reason, rest[0] if rest else "", stage=stage))
    return problems


def write_failures(url: str, problems: Iterable[UtteranceProblem]):
    """Store the failures file at ``url`` atomically (local or ``s3://``), replacing an older one."""
    from cosyvoice import storage

    return storage.write_text(url, format_failures(problems))


def read_failures(url: str) -> list[UtteranceProblem] | None:
    """The problems listed at ``url``; None when there is no such file."""
    from cosyvoice import storage

    if not storage.exists(url):
        return None
    return parse_failures(storage.read_text(url), source=url)


@dataclass(frozen=True)
class ShardAccount:
    """Where every planned utterance of one shard went: ``present`` in the output, ``quarantined``
    (listed with a reason in the failures file), or neither (``unaccounted``: a defect)."""

    total: int
    present: int
    quarantined: int
    unaccounted: list[str]

    @property
    def failed(self) -> int:
        """Planned utterances that are not in the output, with or without a reason."""
        return self.total - self.present

    @property
    def failed_fraction(self) -> float:
        return self.failed / self.total if self.total else 0.0

    def within_budget(self, max_failed_fraction: float) -> bool:
        return self.failed_fraction <= max_failed_fraction

    def as_metadata(self) -> dict:
        return {"total": self.total, "present": self.present, "quarantined": self.quarantined,
                "failed": self.failed, "failed_fraction": round(self.failed_fraction, 6)}


def account(planned: Iterable[str], present: Iterable[str], problems: Iterable[UtteranceProblem]) -> ShardAccount:
    planned = list(planned)
    have = set(present) & set(planned)
    quarantined = {p.utt for p in problems} & set(planned) - have
    return ShardAccount(total=len(planned), present=len(have), quarantined=len(quarantined),
                        unaccounted=sorted(set(planned) - have - quarantined))
