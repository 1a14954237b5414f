"""Manifest stage at scale: our streaming ``prepare-libritts`` vs the upstream ``prepare_data.py`` algorithm.

Both run as fresh processes (interpreter start-up and imports included, as a user experiences
them) on the same corpus: a LibriTTS-shaped subset of ``N`` utterances whose files are hard links
of 100 real synthetic utterances (``.wav``, ``.normalized.txt``, ``.original.txt``), 100 utterances
per speaker in two chapters, speaker ids 1..N/100 (so ids like ``100_`` and ``1001_`` interleave).
For each size it measures wall time and the peak memory of the whole process tree (our stage
forks header-check workers): the sum of RSS and of PSS over the tree, sampled every 20 ms from
/proc, and the largest single process' ``ru_maxrss``. Upstream reads no audio and keeps everything
in memory; ours validates every header and keeps memory flat. Prints us/utterance at each size,
the ratio between the largest and the smallest size (flat = 1.0) and ours/upstream.

    python bench/manifest.py [--utterances 100000,1000000] [--workers 8] [--corpus_dir DIR] [--json PATH]

The corpus is cached under ``--corpus_dir`` (built once per size; reruns skip it); without it a
temporary folder is used and deleted. Remove a cached corpus with ``--delete_corpus``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The upstream algorithm written plainly (tests/support/upstream.py, shared with the tests), in a fresh process.
UPSTREAM = (
    "import sys; sys.path.insert(0, sys.argv[3]); from tests.support.upstream import upstream_prepare_data;"
    "upstream_prepare_data(sys.argv[1], sys.argv[2])"
)
UTTS_PER_SPEAKER = 100
SUFFIXES = (".wav", ".normalized.txt", ".original.txt")
GOAL_SECONDS, GOAL_MB, GOAL_AT = 120.0, 1024.0, 1_000_000


def build_corpus(corpus_dir: str, utterances: int) -> str:
    """``<corpus_dir>/n<N>/LibriTTS/dev-clean`` (built once; a ``.complete`` marker makes reruns skip it)."""
    root = os.path.join(corpus_dir, f"n{utterances}")
    subset = os.path.join(root, "LibriTTS", "dev-clean")
    marker = os.path.join(root, ".complete")
    if os.path.exists(marker):
        return subset
    if os.path.exists(root):
        shutil.rmtree(root)
    stems = base_stems(corpus_dir)
    started = time.perf_counter()
    link = os.link
    for first in range(0, utterances, UTTS_PER_SPEAKER):
        spk = first // UTTS_PER_SPEAKER + 1
        for i in range(first, min(first + UTTS_PER_SPEAKER, utterances)):
            chapter = 10 * spk + (i - first) % 2  # two chapters per speaker
            folder = os.path.join(subset, str(spk), str(chapter))
            if (i - first) < 2:
                os.makedirs(folder)
            name = os.path.join(folder, f"{spk}_{chapter}_{(i - first) // 10:06d}_{(i - first) % 10:06d}")
            stem = stems[i % len(stems)]
            for suffix in SUFFIXES:
                link(stem + suffix, name + suffix)
    with open(marker, "w") as f:
        f.write(f"{utterances}\n")
    print(f"built {utterances} utterances ({len(SUFFIXES) * utterances} hard links) in "
          f"{time.perf_counter() - started:.1f} s under {subset}", flush=True)
    return subset


def base_stems(corpus_dir: str) -> list[str]:
    """100 real synthetic utterances (10 speakers x 10), the files every corpus size links to."""
    from cosyvoice.corpus.synthetic import make_synthetic_corpus

    base = os.path.join(corpus_dir, "base")
    marker = os.path.join(base, ".complete")
    if not os.path.exists(marker):
        shutil.rmtree(base, ignore_errors=True)
        make_synthetic_corpus(base, subsets=["dev-clean"], speakers=10, utts_per_speaker=10, seed=0)
        with open(marker, "w") as f:
            f.write("ok\n")
    return sorted(os.path.join(d, f[: -len(".wav")]) for d, _, fs in os.walk(base) for f in fs if f.endswith(".wav"))


def _children(pid: int) -> list[int]:
    found = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def _rss_kb(pid: int) -> int:
    """Resident set of one process in KiB from /proc/<pid>/statm (a counter read: does not slow the process)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_KB
    except (OSError, IndexError, ValueError):
        return 0


def _pss_kb(pid: int) -> int:
    """Proportional set size in KiB (shared pages split between the processes sharing them); this walks
    the page tables under the process' mmap lock, so it is sampled rarely."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("Pss:")), 0)
    except OSError:
        return 0


#: runs the measured command as its only child, then reports the largest RSS of that subtree
#: (ru_maxrss of a process forked from this small wrapper, not from the big benchmark process)
_WRAPPER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]);"
            "u = resource.getrusage(resource.RUSAGE_CHILDREN);"
            "print(u.ru_maxrss, u.ru_utime + u.ru_stime, file=sys.stderr); sys.exit(rc)")


def run_measured(cmd: list[str]) -> dict:
    """Run ``cmd`` to completion: wall seconds, CPU seconds (user + system, every process of the tree),
    the tree's peak summed RSS (MB, sampled every 20 ms; counts pages shared by forked workers once per
    process, so it over-states), its peak summed PSS (every 0.5 s) and the largest single process'
    peak RSS in the tree (MB, exact)."""
    peak = {"rss": 0, "pss": 0}
    done = threading.Event()
    with tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        wrapper = subprocess.Popen([sys.executable, "-c", _WRAPPER, *cmd], stdout=subprocess.DEVNULL, stderr=err)

        def sample():
            ticks = 0
            while not done.is_set():
                tree, stack = [], _children(wrapper.pid)  # the wrapper itself is not measured
                while stack:
                    pid = stack.pop()
                    tree.append(pid)
                    stack += _children(pid)
                peak["rss"] = max(peak["rss"], sum(_rss_kb(p) for p in tree))
                if ticks % 25 == 0:  # every 0.5 s
                    peak["pss"] = max(peak["pss"], sum(_pss_kb(p) for p in tree))
                ticks += 1
                done.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        wrapper.wait()
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if wrapper.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({wrapper.returncode}): {stderr[-2000:]}")
    max_process_kb, cpu = stderr.strip().splitlines()[-1].split()
    return {"seconds": seconds, "cpu_seconds": float(cpu), "peak_rss_mb": peak["rss"] / 1024,
            "peak_pss_mb": peak["pss"] / 1024, "max_process_rss_mb": int(max_process_kb) / 1024}


def measure(corpus_dir: str, work: str, utterances: int, workers: int, skip_upstream: bool) -> dict:
    src = build_corpus(corpus_dir, utterances)
    cli = os.path.join(os.path.dirname(sys.executable), "cosyvoice-pipeline")
    ours_dest, up_dest = os.path.join(work, f"ours{utterances}"), os.path.join(work, f"up{utterances}")
    up_cmd = [sys.executable, "-c", UPSTREAM, src, up_dest, REPO]
    ours_cmd = [cli, "prepare-libritts", "--src_dir", src, "--des_dir", ours_dest, "--num_workers", str(workers)]
    point: dict = {"utterances": utterances}
    if not skip_upstream:
        subprocess.run(up_cmd, check=True)  # warms the page cache for both
        upstream = run_measured(up_cmd)
        point.update(upstream_seconds=upstream["seconds"], upstream_cpu_seconds=upstream["cpu_seconds"],
                     upstream_peak_rss_mb=upstream["peak_rss_mb"], upstream_peak_pss_mb=upstream["peak_pss_mb"])
    ours = run_measured(ours_cmd)
    point.update(seconds=ours["seconds"], us_per_utt=1e6 * ours["seconds"] / utterances,
                 cpu_seconds=ours["cpu_seconds"], cpu_us_per_utt=1e6 * ours["cpu_seconds"] / utterances,
                 load_average=os.getloadavg()[0], peak_rss_mb=ours["peak_rss_mb"], peak_pss_mb=ours["peak_pss_mb"],
                 max_process_rss_mb=ours["max_process_rss_mb"])
    with open(os.path.join(ours_dest, "wav.scp"), encoding="utf-8") as f:
        our_lines = f.read().splitlines()
    assert len(our_lines) == utterances, f"kept {len(our_lines)} of {utterances}"
    if not skip_upstream:
        with open(os.path.join(up_dest, "wav.scp"), encoding="utf-8") as f:
            assert our_lines == sorted(f.read().splitlines()), "wav.scp differs from upstream"
        shutil.rmtree(up_dest)
    shutil.rmtree(ours_dest)
    return point


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", default="100000,1000000", help="comma-separated corpus sizes")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--corpus_dir", default=None, help="cache the built corpora here (default: a temp dir)")
    parser.add_argument("--delete_corpus", action="store_true", help="delete the corpora under --corpus_dir at the end")
    parser.add_argument("--skip_upstream", action="store_true", help="measure ours only")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.utterances.split(",") if s)
    own_corpus = args.corpus_dir is None
    corpus_dir = args.corpus_dir or tempfile.mkdtemp(prefix="bench-manifest-corpus-")
    os.makedirs(corpus_dir, exist_ok=True)
    points = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-manifest-") as work:
            for n in sizes:
                points.append(measure(corpus_dir, work, n, args.workers, args.skip_upstream))
                print(json.dumps(points[-1]), flush=True)
    finally:
        if own_corpus or args.delete_corpus:
            shutil.rmtree(corpus_dir, ignore_errors=True)
    print(f"\ncores: {os.cpu_count()}  workers: {args.workers}  (wall time depends on what else runs: see load)")
    print(f"{'utterances':>11} {'load':>5} {'ours s':>8} {'us/utt':>7} {'cpu s':>7} {'cpu us/utt':>10} {'tree RSS MB':>11} "
          f"{'tree PSS MB':>11} {'upstream s':>10} {'up cpu s':>8} {'up RSS MB':>9} {'ours/up':>7}")
    for p in points:
        up = p.get("upstream_seconds")
        print(f"{p['utterances']:>11} {p['load_average']:>5.1f} {p['seconds']:>8.2f} {p['us_per_utt']:>7.1f} "
              f"{p['cpu_seconds']:>7.1f} {p['cpu_us_per_utt']:>10.1f} {p['peak_rss_mb']:>11.0f} {p['peak_pss_mb']:>11.0f} "
              + (f"{up:>10.2f} {p['upstream_cpu_seconds']:>8.1f} {p['upstream_peak_rss_mb']:>9.0f} {p['seconds'] / up:>6.2f}x"
                 if up else f"{'-':>10} {'-':>8} {'-':>9} {'-':>7}"))
    summary: dict = {}
    if len(points) > 1:
        lo, hi = points[0], points[-1]
        summary = {"us_per_utt_ratio": hi["us_per_utt"] / lo["us_per_utt"],
                   "cpu_us_per_utt_ratio": hi["cpu_us_per_utt"] / lo["cpu_us_per_utt"],
                   "peak_rss_ratio": hi["peak_rss_mb"] / lo["peak_rss_mb"]}
        print(f"{hi['utterances']} vs {lo['utterances']} utterances (flat = 1.00): time per utterance "
              f"{summary['us_per_utt_ratio']:.2f}x, CPU per utterance {summary['cpu_us_per_utt_ratio']:.2f}x, "
              f"peak tree RSS {summary['peak_rss_ratio']:.2f}x")
    at_goal = [p for p in points if p["utterances"] == GOAL_AT]
    if at_goal:
        p = at_goal[0]
        met = p["seconds"] <= GOAL_SECONDS and p["peak_rss_mb"] <= GOAL_MB
        print(f"goal at {GOAL_AT}: {p['seconds']:.1f} s (<= {GOAL_SECONDS:.0f}; CPU {p['cpu_seconds']:.0f} s over "
              f"{os.cpu_count()} cores) and {p['peak_rss_mb']:.0f} MB (<= {GOAL_MB:.0f}): {'met' if met else 'MISSED'}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"points": points, **summary,
                       "machine": {"cores": os.cpu_count(), "workers": args.workers, "python": platform.python_version(),
                                   "note": "2 cores, shared with other jobs"},
                       "command": " ".join(["python", "bench/manifest.py", *sys.argv[1:]])}, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
