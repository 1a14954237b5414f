"""Manifest stage: our ``prepare-libritts`` vs the upstream ``prepare_data.py`` algorithm, 10k utterances.

Both run as fresh processes (interpreter start-up and imports included, as a user experiences
them) on the same corpus: a synthetic subset whose files are hard-linked under 10,000 distinct
utterance ids. Upstream reads no audio; ours validates every header, so the ratio is the price of
that validation. Prints the median of ``--repeats`` runs for each and the ratio.

    python bench/manifest.py [--utterances 10000] [--repeats 3] [--workers 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The upstream algorithm written plainly (tests/support/upstream.py, shared with the tests), in a fresh process.
UPSTREAM = (
    "import sys; sys.path.insert(0, sys.argv[3]); from tests.support.upstream import upstream_prepare_data;"
    "upstream_prepare_data(sys.argv[1], sys.argv[2])"
)


def build_corpus(root: str, utterances: int) -> str:
    """A base synthetic subset, hard-linked under distinct speaker ids until ``utterances`` exist."""
    from cosyvoice.corpus.synthetic import make_synthetic_corpus

    base = os.path.join(root, "base")
    report = make_synthetic_corpus(base, subsets=["dev-clean"], speakers=10, utts_per_speaker=10, seed=0)
    stems = [os.path.join(base, s) for s in report.files]
    subset = os.path.join(root, "LibriTTS", "dev-clean")
    for i in range(utterances):
        stem = stems[i % len(stems)]
        spk, chapter, name = stem.split(os.sep)[-3:]
        copy = i // len(stems)
        new_spk = f"{int(spk) * 1000 + copy}"
        new_name = new_spk + name[len(spk):]
        folder = os.path.join(subset, new_spk, chapter)
        os.makedirs(folder, exist_ok=True)
        for suffix in (".wav", ".normalized.txt"):
            os.link(stem + suffix, os.path.join(folder, new_name + suffix))
    return subset


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    cli = os.path.join(os.path.dirname(sys.executable), "cosyvoice-pipeline")
    with tempfile.TemporaryDirectory() as tmp:
        src = build_corpus(tmp, args.utterances)
        ours_cmd = [cli, "prepare-libritts", "--src_dir", src,
                    "--num_workers", str(args.workers)]
        up_cmd = [sys.executable, "-c", UPSTREAM, src, os.path.join(tmp, "upstream"), REPO]
        timed(up_cmd)  # warm the page cache for both
        ours, upstream = [], []
        for _ in range(args.repeats):
            upstream.append(timed(up_cmd))
            ours.append(timed(ours_cmd + ["--des_dir", os.path.join(tmp, f"ours{len(ours)}")]))
        with open(os.path.join(tmp, "upstream", "wav.scp")) as f:
            up_lines = sorted(f.read().splitlines())
        with open(os.path.join(tmp, "ours0", "wav.scp")) as f:
            our_lines = f.read().splitlines()
        assert our_lines == up_lines, "wav.scp differs from upstream"
    o, u = statistics.median(ours), statistics.median(upstream)
    print(f"utterances: {args.utterances}  cores: {os.cpu_count()}  workers: {args.workers}")
    print(f"upstream prepare_data.py (no audio read): {u:.3f} s  (runs: {', '.join(f'{t:.3f}' for t in upstream)})")
    print(f"ours prepare-libritts (headers checked):  {o:.3f} s  (runs: {', '.join(f'{t:.3f}' for t in ours)})")
    print(f"ratio ours/upstream: {o / u:.2f}x time  (goal: ours <= 3.0 s)")


if __name__ == "__main__":
    main()
