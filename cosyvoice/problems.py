"""One record for "this utterance was not used, and why", shared by every stage's report."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UtteranceProblem:
    utt: str
    path: str
    reason: str  # a stable code, e.g. "truncated_audio"
    detail: str  # what a person needs to act on it

    @classmethod
    def from_exception(cls, utt: str, path: str, reason: str, exc: BaseException) -> UtteranceProblem:
        return cls(utt, path, reason, f"{type(exc).__name__}: {exc}")

    def __str__(self) -> str:
        return f"{self.path}: {self.detail} — utterance {self.utt} left out (reason: {self.reason})"
