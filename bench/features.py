"""Feature extraction: ours vs the upstream recipe tools' algorithm, same model, corpus, cores, runtime.

Upstream (``tools/extract_embedding.py`` / ``extract_speech_token.py``): one ONNX session with one
intra-op thread, a ``ThreadPoolExecutor(8)`` submitting one utterance at a time, a resampler built
per utterance. Ours: ``cosyvoice.features.extract.run_extraction`` (worker processes, one session
each). The floor is the pure model time: the same sessions run on precomputed inputs, one thread
per core. Outputs are compared (embeddings to 1e-4, tokens exactly).

Kind ``speech_token_torch`` measures the torch runtime on ``--device`` (the GPU goal): a batch-1
fp32 run as the baseline, length-sorted batches of ``--batch_size`` in fp32 (tokens must be
identical to the upstream tool's) and the same batches in bf16 (speed and token agreement).

    python bench/features.py [--models data/models] [--utterances 400] [--kinds embedding,speech_token]
    python bench/features.py --kinds speech_token --onnx_batch_size 8
    python bench/features.py --kinds speech_token_torch --device cuda --batch_size 64
    python bench/features.py --utterances 200 --json bench/results/features.json

``--json PATH`` writes the figures (seconds, audio seconds per second, workers) for ``bench/capacity.py``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.figures import write_figures  # noqa: E402
from cosyvoice.features.extract import run_extraction  # noqa: E402
from cosyvoice.features.options import OPTIONS_BY_KIND, SpeechTokenOptions  # noqa: E402
from tests.support.upstream import upstream_embedding, upstream_session, upstream_speech_token  # noqa: E402

MODELS = {"embedding": "campplus.onnx", "speech_token": "speech_tokenizer_v2.onnx",
          "speech_token_torch": "speech_tokenizer_v2.onnx"}


def torch_runtime(items: list[tuple[str, str]], model: str, audio: float, args) -> list[dict]:
    """Batch-1 fp32 vs batched fp32 vs batched bf16 on the torch runtime, one device, same run."""
    from cosyvoice.features.torch_tokenizer import agreement

    reference = upstream_run("speech_token", items, model)
    runs = [("batch 1 fp32", 1, "fp32"), (f"batch {args.batch_size} fp32", args.batch_size, "fp32"),
            (f"batch {args.batch_size} bf16", args.batch_size, "bf16")]
    run_extraction(items[:8], model, SpeechTokenOptions(num_workers=args.workers, runtime="torch", device=args.device,
                                                        batch_size=args.batch_size))  # warm-up: kernels, forkserver
    base, figures = None, []
    for label, batch, precision in runs:
        start = time.perf_counter()
        report = run_extraction(items, model, SpeechTokenOptions(
            num_workers=args.workers, runtime="torch", device=args.device, batch_size=batch, precision=precision,
            agreement_sample=0))  # timed alone; compared with upstream below
        wall = time.perf_counter() - start
        base = base or wall
        same = sum(report.results[u] == v for u, v in reference.items())
        match = agreement([report.results[u] for u in reference], list(reference.values()))
        print(f"speech_token torch {args.device} {label}: {wall:.2f} s ({audio / wall:.1f} s/s, "
              f"model {report.model_seconds:.2f} s) | x{base / wall:.2f} vs batch 1 fp32 | identical token "
              f"lists {same}/{len(reference)} | tokens equal to upstream {100 * match:.2f} %")
        figures.append({"label": label, "batch_size": batch, "precision": precision, "seconds": round(wall, 3),
                        "model_seconds": round(report.model_seconds, 3), "audio_s_per_s": round(audio / wall, 3),
                        "speed_up_vs_batch1_fp32": round(base / wall, 3), "identical_token_lists": same,
                        "token_agreement": round(match, 5)})
    return figures


def upstream_run(kind: str, items: list[tuple[str, str]], model: str) -> dict:
    session = upstream_session(model)
    one = upstream_embedding if kind == "embedding" else upstream_speech_token
    out = {}
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = {pool.submit(one, path, session): utt for utt, path in items}
        for future in as_completed(futures):
            out[futures[future]] = future.result()
    return out


def model_floor(kind: str, items: list[tuple[str, str]], model: str, cores: int) -> float:
    import numpy as np

    from cosyvoice.features import frontend
    from cosyvoice.features.onnx import make_session

    inputs = []
    for _, path in items:
        audio, rate = frontend.load_audio(path)
        if kind == "embedding":
            inputs.append([frontend.campplus_input(audio, rate)])
        else:
            windows = frontend.tokenizer_windows(frontend.mono_16k(audio, rate), "skip")
            inputs.append([frontend.whisper_input(w) for w in windows])
    session = make_session(model, threads=1)
    names = [i.name for i in session.get_inputs()]

    def run(feats):
        for feat in feats:
            feed = {names[0]: feat}
            if kind == "speech_token":
                feed[names[1]] = np.array([feat.shape[2]], dtype=np.int32)
            session.run(None, feed)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=cores) as pool:
        list(pool.map(run, inputs))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="data/models")
    parser.add_argument("--utterances", type=int, default=400)
    parser.add_argument("--kinds", default="embedding,speech_token")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cpu", help="speech_token_torch: cpu | cuda")
    parser.add_argument("--batch_size", type=int, default=64, help="speech_token_torch: batch size")
    parser.add_argument("--onnx_batch_size", type=int, default=1,
                        help="speech_token: ours in length-sorted batches through speech_tokenizer_v2.batch.onnx")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON (bench/capacity.py)")
    args = parser.parse_args()
    import numpy as np

    from cosyvoice.corpus.synthetic import make_synthetic_corpus

    with tempfile.TemporaryDirectory() as tmp:
        speakers = max(1, args.utterances // 20)
        report = make_synthetic_corpus(tmp, subsets=["dev-clean"], speakers=speakers, utts_per_speaker=20, seed=0)
        items = sorted((os.path.basename(s), os.path.join(tmp, s + ".wav")) for s in report.files)[: args.utterances]
        audio = report.audio_seconds * len(items) / report.utterances
        print(f"corpus: {len(items)} utterances, {audio / 3600:.3f} h, cores: {os.cpu_count()}, workers: {args.workers}")
        results = {"benchmark": "features", "command": " ".join(["python", *sys.argv]),
                   "date": datetime.date.today().isoformat(), "cores": os.cpu_count(), "workers": args.workers,
                   "utterances": len(items), "audio_seconds": round(audio, 3), "kinds": {}}
        for kind in args.kinds.split(","):
            model = os.path.join(args.models, MODELS[kind])
            if kind == "speech_token_torch":
                results["kinds"][kind] = {"device": args.device, "runs": torch_runtime(items, model, audio, args)}
                continue
            ours_model, sizes = model, {}
            if kind == "speech_token" and args.onnx_batch_size > 1:  # ours through the batch-capable file
                ours_model, sizes = model.replace(".onnx", ".batch.onnx"), {"batch_size": args.onnx_batch_size}
            run_extraction(items[:4], ours_model, OPTIONS_BY_KIND[kind](num_workers=args.workers, **sizes))  # warm-up
            start, load = time.perf_counter(), os.getloadavg()[0]  # other jobs on the machine slow every figure
            ours = run_extraction(items, ours_model, OPTIONS_BY_KIND[kind](num_workers=args.workers, **sizes))
            t_ours = time.perf_counter() - start
            start = time.perf_counter()
            theirs = upstream_run(kind, items, model)
            t_up = time.perf_counter() - start
            t_floor = model_floor(kind, items, model, args.workers)
            if kind == "embedding":
                worst = max(float(np.max(np.abs(np.array(ours.results[u]) - np.array(v)))) for u, v in theirs.items())
                agree = f"max |diff| {worst:.2e}"
            else:
                same = sum(ours.results[u] == v for u, v in theirs.items())
                agree = f"identical token lists {same}/{len(theirs)}"
            print(f"{kind}: upstream {t_up:.2f} s ({audio / t_up:.1f} s/s) | ours {t_ours:.2f} s ({audio / t_ours:.1f} s/s)"
                  f" | pure model {t_floor:.2f} s ({audio / t_floor:.1f} s/s) | speed-up {t_up / t_ours:.2f}x"
                  f" (ceiling {t_up / t_floor:.2f}x) | {agree}")
            results["kinds"][kind] = {
                "device": "cpu", "onnx_batch_size": args.onnx_batch_size, "upstream_seconds": round(t_up, 3),
                "ours_seconds": round(t_ours, 3), "load_average_at_start": round(load, 2),
                "model_floor_seconds": round(t_floor, 3),
                "ours_audio_s_per_s": round(audio / t_ours, 3), "speed_up": round(t_up / t_ours, 3),
                "failed_utterances": len(ours.failures), "agreement": agree}
    if args.json:
        write_figures(args.json, results)


if __name__ == "__main__":
    main()
