"""Parquet shards: our ``make-parquet`` vs the upstream ``make_parquet_list.py`` algorithm.

Same data dir (N utterances, every audio file with unique bytes so parquet cannot deduplicate),
same number of processes. Each tool runs in a fresh process; we report wall time and the peak
memory of its whole process tree, sampled every 20 ms from ``/proc``: the sum of PSS (shared pages
split between the processes sharing them, so forked children are not double-counted) and the
largest single-process RSS.

Upstream's algorithm, written plainly: every ``.pt`` dict loaded in the parent, a forked
``multiprocessing.Pool``; per shard, all audio bytes read into a list, one table built and written
with pyarrow's defaults (what ``DataFrame.to_parquet`` does underneath).

    python bench/shards.py [--utterances 10000] [--processes 2] [--json bench/results/shards.json]

``--json PATH`` writes the figures (seconds, peak memory, bytes, audio hours) for ``bench/capacity.py``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.figures import write_figures  # noqa: E402

UPSTREAM = r'''
import json, multiprocessing, os, sys
import pyarrow as pa, pyarrow.parquet as pq, torch
src, des, n, procs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

def read(name):
    out = {}
    for line in open(os.path.join(src, name)):
        parts = line.replace("\n", "").split()
        out[parts[0]] = " ".join(parts[1:])
    return out

utt2wav, utt2text, utt2spk = read("wav.scp"), read("text"), read("utt2spk")
utt2embedding = torch.load(os.path.join(src, "utt2embedding.pt"), weights_only=True)
spk2embedding = torch.load(os.path.join(src, "spk2embedding.pt"), weights_only=True)
utt2speech_token = torch.load(os.path.join(src, "utt2speech_token.pt"), weights_only=True)

def job(utts, parquet_file, utt2parquet_file, spk2parquet_file):
    data = [open(utt2wav[u], "rb").read() for u in utts]
    table = pa.table({"utt": utts, "audio_data": data, "wav": [utt2wav[u] for u in utts],
                      "text": [utt2text[u] for u in utts], "spk": [utt2spk[u] for u in utts],
                      "utt_embedding": [utt2embedding[u] for u in utts],
                      "spk_embedding": [spk2embedding[utt2spk[u]] for u in utts],
                      "speech_token": [utt2speech_token[u] for u in utts]})
    pq.write_table(table, parquet_file)
    json.dump({k: parquet_file for k in utts}, open(utt2parquet_file, "w"), ensure_ascii=False, indent=2)

if __name__ == "__main__":
    multiprocessing.set_start_method("fork")
    os.makedirs(des, exist_ok=True)
    utts = list(utt2wav)
    pool = multiprocessing.Pool(processes=procs)
    names = []
    for i, j in enumerate(range(0, len(utts), n)):
        p = os.path.join(des, f"parquet_{i:09d}.tar")
        names.append(p)
        pool.apply_async(job, (utts[j:j + n], p, os.path.join(des, f"utt2parquet_{i:09d}.json"),
                               os.path.join(des, f"spk2parquet_{i:09d}.json")))
    pool.close(); pool.join()
    open(os.path.join(des, "data.list"), "w").write("".join(x + "\n" for x in names))
'''

OURS = r'''
import sys
sys.path.insert(0, sys.argv[5])
from cosyvoice.shards.make_parquet import make_parquet
if __name__ == "__main__":
    make_parquet(sys.argv[1], sys.argv[2], num_utts_per_parquet=int(sys.argv[3]), num_processes=int(sys.argv[4]))
'''


def build_data_dir(root: str, utterances: int, seed: int = 0) -> tuple[str, float, int]:
    """A data dir whose wavs all differ (base speech + seeded noise), with upstream-format features."""
    import numpy as np
    import soundfile as sf
    import torch

    from cosyvoice.corpus.synthetic import make_synthetic_corpus, wav_bytes

    base = make_synthetic_corpus(os.path.join(root, "base"), speakers=10, utts_per_speaker=10, seed=seed)
    sources = [sf.read(os.path.join(root, "base", s + ".wav"), dtype="float32")[0] for s in base.files]
    rng = np.random.default_rng(seed)
    wav_dir, data = os.path.join(root, "wavs"), os.path.join(root, "data")
    os.makedirs(wav_dir)
    os.makedirs(data)
    lines = {"wav.scp": [], "text": [], "utt2spk": []}
    utt2embedding, utt2token, seconds, total_bytes = {}, {}, 0.0, 0
    for i in range(utterances):
        spk = f"{1000 + i // 100}"
        utt = f"{spk}_{i % 100:04d}_000000_000001"
        audio = sources[i % len(sources)] + rng.normal(0, 1e-3, len(sources[i % len(sources)])).astype(np.float32)
        path = os.path.join(wav_dir, utt + ".wav")
        blob = wav_bytes(audio)
        with open(path, "wb") as f:
            f.write(blob)
        total_bytes += len(blob)
        seconds += len(audio) / 24000
        lines["wav.scp"].append(f"{utt} {path}")
        lines["text"].append(f"{utt} synthetic utterance number {i}")
        lines["utt2spk"].append(f"{utt} {spk}")
        utt2embedding[utt] = rng.normal(size=192).astype(np.float32).tolist()
        utt2token[utt] = rng.integers(0, 6561, int(25 * len(audio) / 24000)).tolist()
    for name, rows in lines.items():
        with open(os.path.join(data, name), "w") as f:
            f.write("\n".join(sorted(rows)) + "\n")
    spks = sorted({u.split("_")[0] for u in utt2embedding})
    torch.save(utt2embedding, os.path.join(data, "utt2embedding.pt"))
    torch.save({s: rng.normal(size=192).astype(np.float32).tolist() for s in spks}, os.path.join(data, "spk2embedding.pt"))
    torch.save(utt2token, os.path.join(data, "utt2speech_token.pt"))
    return data, seconds, total_bytes


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, []))
    return out


def _memory_kb(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in kB, 0 if it is gone."""
    values = {"Pss:": 0, "Rss:": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key = line.split()[0]
                if key in values:
                    values[key] = int(line.split()[1])
    except OSError:
        pass
    return values["Pss:"], values["Rss:"]


def run(code: str, args: list[str]) -> tuple[float, dict]:
    """Wall time, peak summed PSS and peak single-process RSS (MB) of the tool's process tree, and the
    machine's load average when it started (other jobs on the machine slow it down)."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_pss = peak_rss = 0
    while proc.poll() is None:
        samples = [_memory_kb(pid) for pid in _tree(proc.pid)]
        peak_pss = max(peak_pss, sum(p for p, _ in samples))
        peak_rss = max([peak_rss] + [r for _, r in samples])
        time.sleep(0.02)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(proc.stderr.read().decode()[-2000:])
    return wall, {"pss_mb": peak_pss / 1024, "rss_mb": peak_rss / 1024, "load": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=10000)
    parser.add_argument("--per_shard", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="where to build the corpus (default: a temp dir)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON (bench/capacity.py)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        data, seconds, audio_bytes = build_data_dir(tmp, args.utterances)
        print(f"corpus: {args.utterances} utterances, {seconds / 3600:.2f} h, {audio_bytes / 1e9:.2f} GB of wav, "
              f"{args.processes} processes, {args.per_shard} per shard")
        common = [str(args.per_shard), str(args.processes)]
        t_up, mem_up = run(UPSTREAM, [data, os.path.join(tmp, "up"), *common])
        t_ours, mem_ours = run(OURS, [data, os.path.join(tmp, "ours"), *common, REPO])
        import pyarrow.parquet as pq

        first = os.path.join(tmp, "{}", "parquet_000000000.tar")
        assert pq.read_table(first.format("ours")).column("audio_data").equals(
            pq.read_table(first.format("up")).column("audio_data"))
        size = sum(os.path.getsize(os.path.join(tmp, "ours", f)) for f in os.listdir(os.path.join(tmp, "ours")))
        parquet_files = sum(f.endswith(".tar") for f in os.listdir(os.path.join(tmp, "ours")))
    for name, wall, mem in (("upstream", t_up, mem_up), ("ours", t_ours, mem_ours)):
        print(f"{name:9s} {wall:7.2f} s, peak memory of the process tree: {mem['pss_mb']:.0f} MB PSS "
              f"(largest process RSS {mem['rss_mb']:.0f} MB)")
    print(f"parquet written: {size / 1e9:.2f} GB")
    print(f"speed-up {t_up / t_ours:.2f}x, peak memory ours/upstream {mem_ours['pss_mb'] / mem_up['pss_mb']:.2f}")
    if args.json:
        tools = {name: {"seconds": round(wall, 3), "peak_pss_mb": round(mem["pss_mb"], 1),
                        "peak_rss_mb": round(mem["rss_mb"], 1), "load_average_at_start": round(mem["load"], 2)}
                 for name, wall, mem in (("upstream", t_up, mem_up), ("ours", t_ours, mem_ours))}
        write_figures(args.json, {
            "benchmark": "shards", "command": " ".join(["python", *sys.argv]), "date": datetime.date.today().isoformat(),
            "cores": os.cpu_count(), "processes": args.processes, "utterances": args.utterances,
            "per_shard": args.per_shard, "audio_seconds": round(seconds, 3), "audio_bytes": audio_bytes,
            "output_bytes": size, "parquet_files": parquet_files, **tools,
            "speed_up": round(t_up / t_ours, 3)})


if __name__ == "__main__":
    main()
