"""Cost of the HiFT GAN data stages per second of audio: compute_f0 (WORLD harvest/dio + stonemask)
against compute_fbank, the other per-sample numeric stage, on the synthetic corpus's speech.

Each stage runs alone over the same truncated samples, one torch thread, one process (a DataLoader
worker's view). Printed: seconds of compute per second of audio for each stage, compute_f0's share
of the two, and the worker count at which f0 keeps up with a given step time.

    python bench/gan_data.py [--utterances 40] [--truncate_length 24480] [--step_s 0.5 --batch_rows 38]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=40)
    parser.add_argument("--truncate_length", type=int, default=24480)
    parser.add_argument("--step_s", type=float, default=0.5, help="a GAN step's time to keep up with")
    parser.add_argument("--batch_rows", type=int, default=38, help="rows per batch (2000 frames / 52)")
    args = parser.parse_args()

    import random

    import torch

    from cosyvoice.corpus.synthetic import make_synthetic_corpus
    from cosyvoice.dataset import processors as P
    from cosyvoice.features.frontend import decode_audio

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "LibriTTS")
        make_synthetic_corpus(root, subsets=["dev-clean"], speakers=4, utts_per_speaker=-(-args.utterances // 4), seed=0)
        wavs = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".wav"))[:args.utterances]
        rows = []
        for path in wavs:
            with open(path, "rb") as handle:
                audio, rate = decode_audio(handle.read(), path)
            rows.append({"utt": path, "speech": audio.mean(0, keepdim=True), "sample_rate": rate})
    rows = list(P.resample(rows, resample_rate=24000))
    full_seconds = sum(r["speech"].shape[1] for r in rows) / 24000
    cropped = list(P.truncate([dict(r) for r in rows], truncate_length=args.truncate_length, rng=random.Random(0)))

    def timed(fn):
        start = time.perf_counter()
        out = list(fn())
        return out, time.perf_counter() - start

    with_feat, fbank_s = timed(lambda: P.compute_fbank([dict(r) for r in cropped]))
    audio_s = sum(r["speech"].shape[1] for r in with_feat) / 24000
    _, f0_s = timed(lambda: P.compute_f0([dict(r) for r in with_feat], sample_rate=24000, hop_size=480))
    whole = list(P.compute_fbank([dict(r) for r in rows]))
    _, f0_full_s = timed(lambda: P.compute_f0(whole, sample_rate=24000, hop_size=480))
    print(f"{len(rows)} utterances, {full_seconds:.1f} s of speech; crops of {args.truncate_length} samples "
          f"(padded to {with_feat[0]['speech'].shape[1]}), {audio_s:.1f} s")
    print(f"compute_fbank  {fbank_s / audio_s * 1000:7.1f} ms per s of audio")
    print(f"compute_f0     {f0_s / audio_s * 1000:7.1f} ms per s of audio (crops), "
          f"{f0_full_s / full_seconds * 1000:.1f} ms per s (whole utterances)")
    print(f"compute_f0 share of f0 + fbank: {f0_s / (f0_s + fbank_s):.0%}; "
          f"per {args.batch_rows}-row batch {f0_s / len(rows) * args.batch_rows:.2f} s of f0 -> "
          f"{f0_s / len(rows) * args.batch_rows / args.step_s:.1f} workers to keep up with {args.step_s} s steps")


if __name__ == "__main__":
    main()
