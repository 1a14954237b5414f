"""token2wav speed: ours vs upstream's own CosyVoice2 token2wav, same weights, inputs, threads, run.

Upstream runs from a CosyVoice source checkout (``--upstream_src``, with Matcha-TTS under
third_party/; extra packages: ``pip install -e '.[upstream-bench]'``) through
bench/upstream_acoustic.py, i.e. ``CosyVoice2Model.token2wav`` with upstream's flow and HiFT modules.
Both load the same random-weight reference files (``write_acoustic_models``; full size by default).

Measured for each length (``--seconds``, default 10 and 30 s of generated audio, no prompt):
* offline: one call over all tokens (real-time factor = seconds of compute per second of audio);
* streaming: the chunk schedule of upstream's ``tts(stream=True)`` (hop 25 tokens, doubled up to
  100, 3 look-ahead tokens), total time and first-chunk latency, for upstream, ours in the
  upstream-exact mode (cached non-final chunks + one full final pass) and ours in the opt-in
  chunk-causal mode (``chunk_causal_final``);
* agreement: the max |mel| and |waveform| difference of our offline and streaming outputs to upstream's.

    python bench/token2wav.py --upstream_src ~/src/CosyVoice [--size full] [--threads 2] [--seconds 10,30]
    python bench/token2wav.py --upstream_src ... --device cuda --estimator_dtype bf16
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def run_offline(model, tokens, seed):
    """((waveform, vocoder mel), seconds) of one offline call."""
    import torch

    torch.manual_seed(seed)
    start = time.perf_counter()
    out = model.synthesize(tokens, None, None, EMBEDDING, token_offset=None, finalize=True, request_id="offline",
                           return_mel=True)
    return out, time.perf_counter() - start


def run_stream(model, tokens, ends, request_id, seed):
    """(chunks, total seconds, first-chunk seconds) of one stream cut at ``ends``."""
    import torch

    chunks, first, start, offset = [], None, time.perf_counter(), 0
    for i, end in enumerate(list(ends) + [len(tokens)]):
        final = end == len(tokens)
        torch.manual_seed(seed + i)
        chunks.append(model.synthesize(tokens if final else tokens[:end + 3], None, None, EMBEDDING,
                                       token_offset=offset, finalize=final, request_id=request_id))
        if first is None:
            first = time.perf_counter() - start
        offset = end
    return chunks, time.perf_counter() - start, first


EMBEDDING = np.random.RandomState(1).randn(192).astype(np.float32)


def relative_rms(x: np.ndarray, reference: np.ndarray) -> float:
    return float(np.sqrt(np.mean((x - reference) ** 2)) / np.sqrt(np.mean(reference ** 2)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream_src", required=True, help="CosyVoice source checkout (with third_party/Matcha-TTS)")
    ap.add_argument("--size", choices=("full", "tiny"), default="full")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", default="10,30")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--estimator_dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--model_dir", help="reuse a model dir with flow.pt/hift.pt/cosyvoice2.yaml (else written)")
    ap.add_argument("--compile", action="store_true",
                    help="then also measure ours with the opt-in torch.compile estimator (offline, exact streaming)")
    args = ap.parse_args()

    import torch

    from cosyvoice.acoustic.flow import FlowConfig
    from cosyvoice.acoustic.hift import HiFTConfig
    from cosyvoice.acoustic.reference import write_acoustic_models
    from cosyvoice.acoustic.token2wav import Token2Wav, stream_hops

    torch.set_num_threads(args.threads)
    tmp = None
    model_dir = args.model_dir
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory()
        model_dir = tmp.name
        write_acoustic_models(model_dir, seed=0, size=args.size)
    configs = (FlowConfig.full(), HiFTConfig.full()) if args.size == "full" else (FlowConfig.tiny(), HiFTConfig.tiny())
    ours = Token2Wav(model_dir, device=args.device, estimator_dtype=args.estimator_dtype)
    causal = Token2Wav(model_dir, device=args.device, estimator_dtype=args.estimator_dtype, chunk_causal_final=True)
    causal.flow, causal.hift = ours.flow, ours.hift  # same modules, only the final-chunk mode differs

    import upstream_acoustic

    upstream_acoustic.import_upstream(args.upstream_src)
    upstream = upstream_acoustic.UpstreamToken2Wav(configs[0].to_dict(), configs[1].upstream_kwargs(),
                                                   os.path.join(model_dir, "flow.pt"),
                                                   os.path.join(model_dir, "hift.pt"))
    import logging

    logging.getLogger().setLevel(logging.WARNING)  # upstream's modules configure DEBUG logging on import
    if args.device != "cpu":
        upstream.model.flow.to(args.device)
        upstream.model.hift.to(args.device)
    print(f"token2wav bench: size {args.size}, {args.threads} threads, device {args.device}, "
          f"estimator {args.estimator_dtype}, torch {torch.__version__}")
    rng = np.random.RandomState(0)
    warm = rng.randint(0, 6561, 30)
    for model in (upstream, ours):  # warm-up (allocator, oneDNN primitives) of both call kinds
        model.synthesize(warm, None, None, EMBEDDING, token_offset=None, finalize=True, request_id="warm")
        run_stream(model, warm, stream_hops(len(warm), 0), "warm", 0)

    offline_times = []
    for seconds in [float(s) for s in args.seconds.split(",")]:
        n = int(round(seconds * 25))
        tokens = rng.randint(0, 6561, n)
        ends = stream_hops(n, 0)
        (up_wav, up_mel), up_off = run_offline(upstream, tokens, 0)
        (our_wav, our_mel), our_off = run_offline(ours, tokens, 0)
        audio = len(up_wav) / 24000
        offline_times.append((seconds, up_off))
        up_chunks, up_total, up_first = run_stream(upstream, tokens, ends, "u", 100)
        our_chunks, our_total, our_first = run_stream(ours, tokens, ends, "e", 100)
        causal_chunks, causal_total, causal_first = run_stream(causal, tokens, ends, "c", 100)
        stream_diff = max(float(np.abs(a - b).max()) for a, b in zip(up_chunks, our_chunks))
        print(f"\n{seconds:g} s of audio ({n} tokens, {len(ends) + 1} stream chunks at {ends})")
        print(f"  offline    upstream {up_off:7.2f} s (RTF {up_off / audio:.2f})   ours {our_off:7.2f} s "
              f"(RTF {our_off / audio:.2f})   speed-up {up_off / our_off:.2f}x")
        print(f"  streaming  upstream {up_total:7.2f} s = {up_total / up_off:.2f}x its offline   "
              f"ours exact {our_total:7.2f} s = {our_total / our_off:.2f}x our offline   "
              f"ours chunk-causal {causal_total:7.2f} s = {causal_total / our_off:.2f}x")
        print(f"  first chunk upstream {up_first:6.2f} s   ours {our_first:6.2f} s ({our_first / up_first:.2f}x)   "
              f"chunk-causal {causal_first:6.2f} s")
        print(f"  agreement  offline mel {float((up_mel - our_mel).abs().max()):.1e}, "
              f"wav {float(np.abs(up_wav - our_wav).max()):.1e}; streaming wav (max over chunks) {stream_diff:.1e}")
        joined_up, joined_causal = np.concatenate(up_chunks), np.concatenate(causal_chunks)
        last = len(up_chunks[-1])
        print(f"  chunk-causal final vs upstream's stream: max |wav| diff {np.abs(joined_up - joined_causal).max():.1e}, "
              f"relative RMS {relative_rms(joined_causal, joined_up):.4f} (final chunk alone "
              f"{relative_rms(causal_chunks[-1], up_chunks[-1]):.4f}, {last / 24000:.1f} s)")
    if args.compile:
        start = time.perf_counter()
        ours.flow.decoder.compile_estimator()
        ours.synthesize(warm, None, None, EMBEDDING)
        print(f"\ncompiled estimator (torch.compile, dynamic shapes): compiling took {time.perf_counter() - start:.0f} s")
        rng = np.random.RandomState(0)
        rng.randint(0, 6561, 30)
        for seconds, up_off in offline_times:
            tokens = rng.randint(0, 6561, int(round(seconds * 25)))
            (_, mel), our_off = run_offline(ours, tokens, 0)
            _, our_total, our_first = run_stream(ours, tokens, stream_hops(len(tokens), 0), "k", 100)
            print(f"  {seconds:g} s: offline {our_off:7.2f} s (RTF {our_off / seconds:.2f}, {up_off / our_off:.2f}x "
                  f"upstream's offline above); exact streaming {our_total:7.2f} s = {our_total / our_off:.2f}x, "
                  f"first chunk {our_first:.2f} s")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
