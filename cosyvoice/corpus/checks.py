"""Integrity checks on a written data directory (what the pipeline's asset checks report).

They read the files as stored, not the in-memory result, so they also catch a directory that was
edited or half-copied after the fact.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from cosyvoice import storage
from cosyvoice.corpus.kaldi import parse_pairs
from cosyvoice.problems import UtteranceProblem, account

#: the share of a shard's utterances that may fail (each listed with a reason) before its budget check fails
DEFAULT_MAX_FAILED_FRACTION = 0.01


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    detail: str
    examples: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)  # what the check measured (counts), for reports


def _existing(paths: list[str]) -> set[str]:
    """The paths that exist: one stat each locally, one listing per subset root on object stores."""
    if all(storage.is_local(p) for p in paths):
        return {p for p in paths if os.path.isfile(p)}
    listed: set[str] = set()
    for root in sorted({p.rsplit("/", 3)[0] for p in paths}):  # <subset>/<spk>/<chapter>/<file>
        listed.update(url for url, _ in storage.list_files(root))
    return {p for p in paths if p in listed}


def check_data_dir(url: str) -> dict[str, CheckOutcome]:
    """``unique_utt_ids``, ``wavs_exist`` and ``text_non_empty`` for the data dir at ``url``."""
    wav = parse_pairs(storage.read_text(storage.join(url, "wav.scp")))
    text = parse_pairs(storage.read_text(storage.join(url, "text")))
    dupes = sorted(k for k, n in Counter(k for k, _ in wav).items() if n > 1)
    paths = [v for _, v in wav]
    present = _existing(paths)
    missing = [p for p in paths if p not in present]
    empty = sorted(k for k, v in text if not v.strip())
    return {
        "unique_utt_ids": CheckOutcome(not dupes, f"{len(dupes)} duplicated utterance id(s) in wav.scp", dupes[:10]),
        "wavs_exist": CheckOutcome(not missing, f"{len(missing)} of {len(paths)} wav.scp paths missing", missing[:10]),
        "text_non_empty": CheckOutcome(not empty and len(text) == len(wav),
                                       f"{len(empty)} empty text line(s); {len(text)} text vs {len(wav)} wav.scp lines",
                                       empty[:10]),
    }


def failure_checks(planned: Iterable[str], present: Iterable[str], problems: Iterable[UtteranceProblem],
                   max_failed_fraction: float = DEFAULT_MAX_FAILED_FRACTION) -> dict[str, CheckOutcome]:
    """``all_utterances_present`` and ``failure_budget`` of one shard.

    Every planned utterance must be present in the output or quarantined (listed with a reason in
    the shard's failures file); and at most ``max_failed_fraction`` of them may be missing from the
    output. A permanently bad clip in a large shard passes both; a model that fails every utterance
    fails the budget, however well each failure is explained.
    """
    if not 0.0 <= max_failed_fraction <= 1.0:
        raise ValueError(f"max_failed_fraction must be within [0, 1], got {max_failed_fraction}")
    planned, present, problems = list(planned), set(present), list(problems)
    tally = account(planned, present, problems)
    wanted = set(planned) - present
    quarantined = {p.utt: p for p in sorted(problems, key=lambda p: p.utt) if p.utt in wanted}
    by_reason = dict(sorted(Counter(p.reason for p in quarantined.values()).items()))
    counts = {**tally.as_metadata(), "max_failed_fraction": max_failed_fraction, "quarantined_by_reason": by_reason}
    return {
        "all_utterances_present": CheckOutcome(
            not tally.unaccounted,
            f"{tally.present} present + {tally.quarantined} quarantined of {tally.total} planned; "
            f"{len(tally.unaccounted)} neither present nor listed with a reason",
            tally.unaccounted[:10], counts),
        "failure_budget": CheckOutcome(
            tally.within_budget(max_failed_fraction),
            f"{tally.failed} of {tally.total} utterance(s) failed ({100 * tally.failed_fraction:.2f} %, "
            f"budget {100 * max_failed_fraction:.2f} %)",
            [f"{p.utt}: {p.stage + ' ' if p.stage else ''}{p.reason}" for p in quarantined.values()][:10]
            + tally.unaccounted[:10], counts),
    }
