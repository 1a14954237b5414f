"""Kaldi-style data directories as the CosyVoice recipe writes and reads them.

Files are ``"<key> <value>\\n"`` lines (``wav.scp``, ``text``, ``utt2spk``, ``spk2utt``, optional
``instruct``), read upstream with ``line.split()``. We write them sorted (utterances by id,
speakers by id, the kaldi convention), so re-runs are byte-identical whatever the listing order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cosyvoice import storage

REQUIRED_FILES = ("wav.scp", "text", "utt2spk", "spk2utt")


def format_lines(pairs: Iterable[tuple[str, str]]) -> str:
    return "".join(f"{key} {value}\n" for key, value in pairs)


def parse_pairs(content: str) -> list[tuple[str, str]]:
    """``key value...`` lines as (key, value) pairs, duplicates kept; the value keeps its spacing."""
    pairs = []
    for line in content.splitlines():
        if line.strip():
            key, *rest = line.split(None, 1)
            pairs.append((key, rest[0] if rest else ""))
    return pairs


def parse_lines(content: str, *, source: str = "<text>") -> dict[str, str]:
    """``key value...`` lines into a dict (duplicate keys are an error)."""
    out: dict[str, str] = {}
    for lineno, (key, value) in enumerate(parse_pairs(content), 1):
        if key in out:
            raise ValueError(f"{source}: duplicate key {key!r} (entry {lineno})")
        out[key] = value
    return out


def format_tsv(rows: Iterable[Iterable[object]], header: Iterable[str] | None = None) -> str:
    """Tab-separated lines (``quarantine.tsv``, ``failed_<stage>.tsv``), an optional header line first."""
    lines = [header] if header is not None else []
    return "".join("\t".join(str(c) for c in row) + "\n" for row in [*lines, *rows])


def parse_tsv(content: str) -> list[list[str]]:
    """The rows of ``format_tsv`` output (blank lines ignored)."""
    return [line.split("\t") for line in content.splitlines() if line.strip()]


def read_table(data_dir: str, name: str, *, joined: bool = False, required: bool = True) -> dict[str, str] | None:
    """One file of a data dir as a dict. ``joined``: whitespace runs collapsed to one space, as
    upstream's readers see values (``" ".join(line.split()[1:])``). A missing optional file is None."""
    url = storage.join(data_dir, name)
    if not storage.exists(url):
        if required:
            raise FileNotFoundError(f"{url} does not exist (is {data_dir} a data directory?)")
        return None
    table = parse_lines(storage.read_text(url), source=url)
    return {k: " ".join(v.split()) for k, v in table.items()} if joined else table


@dataclass
class DataDir:
    """The in-memory form of one data directory."""

    wav: dict[str, str]
    text: dict[str, str]
    utt2spk: dict[str, str]
    spk2utt: dict[str, list[str]] = field(default_factory=dict)
    instruct: dict[str, str] | None = None
    utt2dur: dict[str, float] | None = None

    def files(self) -> dict[str, str]:
        """File name -> content, exactly what ``write`` stores."""
        utts = sorted(self.wav)
        out = {
            "wav.scp": format_lines((u, self.wav[u]) for u in utts),
            "text": format_lines((u, self.text[u]) for u in utts),
            "utt2spk": format_lines((u, self.utt2spk[u]) for u in utts),
            "spk2utt": format_lines((s, " ".join(sorted(us))) for s, us in sorted(self.spk2utt.items())),
        }
        if self.instruct is not None:
            out["instruct"] = format_lines((u, self.instruct[u]) for u in utts)
        if self.utt2dur is not None:
            out["utt2dur"] = format_lines((u, f"{self.utt2dur[u]:.4f}") for u in utts)
        return out


def spk2utt_of(utt2spk: Mapping[str, str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for utt in sorted(utt2spk):
        grouped.setdefault(utt2spk[utt], []).append(utt)
    return grouped


def read_data_dir(url: str) -> DataDir:
    """Read a data directory written by us or by upstream ``prepare_data.py``."""
    parts = {name: read_table(url, name, required=False) for name in (*REQUIRED_FILES, "instruct", "utt2dur")}
    missing = [name for name in REQUIRED_FILES if parts[name] is None]
    if missing:
        raise FileNotFoundError(f"{url}: not a data directory, missing {', '.join(missing)}")
    return DataDir(
        wav=parts["wav.scp"], text=parts["text"], utt2spk=parts["utt2spk"],
        spk2utt={s: v.split() for s, v in parts["spk2utt"].items()},
        instruct=parts["instruct"],
        utt2dur={u: float(d) for u, d in parts["utt2dur"].items()} if parts["utt2dur"] is not None else None,
    )
