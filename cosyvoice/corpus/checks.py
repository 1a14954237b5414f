"""Integrity checks on a written data directory (what the pipeline's asset checks report).

They read the files as stored, not the in-memory result, so they also catch a directory that was
edited or half-copied after the fact.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

from cosyvoice import storage
from cosyvoice.corpus.kaldi import parse_pairs


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    detail: str
    examples: list[str] = field(default_factory=list)


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
