"""Record upstream's CosyVoice1 streaming token2wav (``CosyVoiceModel``) as a test oracle, and time ours against it.

Upstream's own ``CosyVoiceModel.tts`` loop (``--upstream_src``: a FunAudioLLM/CosyVoice checkout with
third_party/Matcha-TTS; its Python extras on PYTHONPATH) runs on the tiny v1 flow (``FlowV1Config.tiny()``,
seeded weights: ``reference.seeded_state_dict``) and the tiny v1 HiFT of bench/upstream_hift_v1.py (its
seeded weights, mostly voiced). The speech tokens go in as ``source_speech_token`` (its voice-conversion
path: all tokens known, no LLM), so the chunking is the loop's own: 100 + 20 tokens per chunk, hop 100,
the rest in the final chunk. torch's global generator is seeded with ``SEED`` before every chunk (the
flow's noise and the vocoder's draws), which is what ``Token2WavV1(seed=SEED)`` does per call. Recorded
into tests/acoustic/data/upstream_token2wav_v1.npz: the inputs (prompt mel and embedding rounded to
fp16, as Triton's token2wav inputs carry them), an offline call, an offline call at speed 1.5 and the
stream's chunks (``N_TOKENS`` = 235: two 120-token chunks, then a 35-token final one, shorter than the
flow regulator's two 20-token edges).

Then times upstream's loop and ours (``Token2WavV1.stream`` / offline) on the same inputs, median of
--repeats taking turns, wall and process CPU seconds, and prints ours/upstream; ``--timing_size full``
times seeded CosyVoice-300M-size models instead of the tiny ones.

    PYTHONPATH=/tmp/upsite python bench/upstream_token2wav_v1.py --upstream_src /tmp/up [--json out.json]
        [--timing_size full]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "acoustic", "data")

SEED = 4321
N_TOKENS, PROMPT_TOKENS, PROMPT_FRAMES = 235, 13, 23
SPEED = 1.5


def oracle_inputs(vocab: int = 4096) -> dict[str, np.ndarray]:
    """Tokens, prompt and embedding; the float inputs fp16-representable (Triton sends them as FP16)."""
    rng = np.random.default_rng(3)
    return {"tokens": rng.integers(0, vocab, N_TOKENS).astype(np.int64),
            "prompt_tokens": rng.integers(0, vocab, PROMPT_TOKENS).astype(np.int64),
            "prompt_feat": (rng.normal(size=(PROMPT_FRAMES, 80)) * 2 - 4).astype(np.float16).astype(np.float32),
            "embedding": rng.normal(size=192).astype(np.float16).astype(np.float32)}


def tiny_model_dir(out: str) -> tuple[str, dict]:
    """flow.pt and hift.pt of the tiny seeded v1 models in ``out``; returns it and the two state dicts."""
    import torch
    from upstream_flow_v1 import seeded_state
    from upstream_hift_v1 import seeded_weights

    from cosyvoice.acoustic.flow_v1 import FlowV1Config
    from cosyvoice.acoustic.hift import hift_state_dict

    states = {"flow": seeded_state(FlowV1Config.tiny()), "hift": dict(hift_state_dict(seeded_weights()))}
    for name, state in states.items():
        torch.save(state, os.path.join(out, f"{name}.pt"))
    return out, states


def full_model_dir(out: str) -> str:
    """Seeded CosyVoice-300M-size flow.pt and hift.pt (for timing only)."""
    import torch
    from upstream_flow_v1 import seeded_state

    from cosyvoice.acoustic.flow_v1 import FlowV1Config
    from cosyvoice.acoustic.hift import HiFTConfig, HiFTGenerator, hift_state_dict
    from cosyvoice.acoustic.reference import seeded_module

    os.makedirs(out, exist_ok=True)
    torch.save(seeded_state(FlowV1Config.full()), os.path.join(out, "flow.pt"))
    torch.save(dict(hift_state_dict(seeded_module(lambda: HiFTGenerator(HiFTConfig.v1()), 0))),
               os.path.join(out, "hift.pt"))
    return out


class UpstreamV1:
    """Upstream's ``CosyVoiceModel`` (no LLM) on the tiny models' files."""

    def __init__(self, model_dir: str, flow_config: dict, hift_kwargs: dict):
        import torch
        import upstream_acoustic
        from cosyvoice.cli.model import CosyVoiceModel  # upstream's, after import_upstream
        from upstream_flow_v1 import build_upstream

        flow, hift = build_upstream(flow_config), upstream_acoustic.build_hift(hift_kwargs)
        flow.load_state_dict(torch.load(os.path.join(model_dir, "flow.pt"), weights_only=True), strict=True)
        hift.load_state_dict(torch.load(os.path.join(model_dir, "hift.pt"), weights_only=True), strict=True)
        self.model = CosyVoiceModel(None, flow, hift, fp16=False)

    def run(self, inputs: dict, *, stream: bool, speed: float = 1.0) -> list[np.ndarray]:
        """The waveforms ``tts`` yields, torch's generator seeded with SEED before each."""
        import torch

        as_int = {k: torch.as_tensor(inputs[k]).int()[None] for k in ("tokens", "prompt_tokens")}
        chunks = self.model.tts(source_speech_token=as_int["tokens"], flow_embedding=torch.as_tensor(inputs["embedding"])[None],
                                flow_prompt_speech_token=as_int["prompt_tokens"],
                                prompt_speech_feat=torch.as_tensor(inputs["prompt_feat"])[None], stream=stream, speed=speed)
        out = []
        while True:
            torch.manual_seed(SEED)
            try:
                with torch.inference_mode():
                    out.append(next(chunks)["tts_speech"].reshape(-1).numpy())
            except StopIteration:
                return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream_src", required=True)
    ap.add_argument("--out", default=os.path.join(DATA, "upstream_token2wav_v1.npz"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the test runs with one)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the timing figures here")
    ap.add_argument("--timing_size", choices=("tiny", "full"), default="tiny",
                    help="models timed: the oracle's tiny ones, or seeded CosyVoice-300M-size ones")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="token2wav_v1_") as work:  # the model files (full size: ~0.5 GB)
        return run(args, work)


def run(args, work: str) -> int:
    import torch
    from upstream_flow_v1 import medians, ratio_line, state_digest

    from cosyvoice.acoustic.flow_v1 import FlowV1Config
    from cosyvoice.acoustic.hift import HiFTConfig
    from cosyvoice.acoustic.token2wav_v1 import Token2WavV1, stream_ends_v1

    torch.set_num_threads(args.threads)
    model_dir, states = tiny_model_dir(work)
    ours = Token2WavV1(model_dir, device="cpu", seed=SEED, flow_config=FlowV1Config.tiny(),
                       hift_config=HiFTConfig.tiny_v1())
    inputs = oracle_inputs()
    prompt = (inputs["prompt_tokens"], inputs["prompt_feat"], inputs["embedding"])
    ends = stream_ends_v1(N_TOKENS)
    timed = {"tiny": (ours, model_dir, FlowV1Config.tiny(), HiFTConfig.tiny_v1())}
    if args.timing_size == "full":
        full_dir = full_model_dir(os.path.join(work, "full"))
        timed["full"] = (Token2WavV1(full_dir, device="cpu", seed=SEED, flow_config=FlowV1Config.full(),
                                     hift_config=HiFTConfig.v1()), full_dir, FlowV1Config.full(), HiFTConfig.v1())

    def ours_offline(speed=1.0):
        return [ours.synthesize(inputs["tokens"], *prompt, speed=speed)]

    def ours_stream():
        return list(ours.stream(inputs["tokens"], *prompt))

    import upstream_acoustic

    upstream_acoustic.import_upstream(args.upstream_src)  # our cosyvoice modules leave sys.modules here
    upstream = UpstreamV1(model_dir, FlowV1Config.tiny().to_dict(), HiFTConfig.tiny_v1().upstream_kwargs())

    record = {f"inputs/{k}": v for k, v in inputs.items()}
    record.update({"seed": np.array(SEED), "speed": np.array(SPEED), "stream/ends": np.array(ends, dtype=np.int64),
                   "sha256_flow": np.array(state_digest(states["flow"])),
                   "sha256_hift": np.array(state_digest(states["hift"]))})
    for name, theirs, mine in (("offline", lambda: upstream.run(inputs, stream=False), ours_offline),
                               ("speed", lambda: upstream.run(inputs, stream=False, speed=SPEED),
                                lambda: ours_offline(SPEED)),
                               ("stream", lambda: upstream.run(inputs, stream=True), ours_stream)):
        up, me = theirs(), mine()
        assert [len(c) for c in up] == [len(c) for c in me], (name, [len(c) for c in up], [len(c) for c in me])
        diffs = [float(np.abs(a - b).max()) for a, b in zip(up, me)]
        peak = max(float(np.abs(c).max()) for c in up)
        print(f"{name}: {len(up)} chunk(s) of {[len(c) for c in up]} samples, peak {peak:.3f}; ours vs upstream max "
              f"|diff| per chunk {', '.join(f'{d:.1e}' for d in diffs)}")
        for i, chunk in enumerate(up):
            record[f"{name}/{i}"] = chunk.astype(np.float32)
        record[f"{name}/chunks"] = np.array(len(up))
    tmp = args.out + ".tmp.npz"
    np.savez_compressed(tmp, **record)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e3:.0f} kB)")

    runtime, timed_dir, flow_config, hift_config = timed[args.timing_size]
    timed_upstream = upstream if args.timing_size == "tiny" else UpstreamV1(
        timed_dir, flow_config.to_dict(), hift_config.upstream_kwargs())
    figures = {"threads": args.threads, "repeats": args.repeats, "tokens": N_TOKENS, "size": args.timing_size}
    for name, stream in (("offline", False), ("stream", True)):
        def mine(stream=stream):
            if stream:
                return list(runtime.stream(inputs["tokens"], *prompt))
            return [runtime.synthesize(inputs["tokens"], *prompt)]

        times = medians({"upstream": lambda stream=stream: timed_upstream.run(inputs, stream=stream), "ours": mine},
                        args.repeats)
        figures[f"{name}_s"] = times
        figures[f"{name}_ratio"] = {k: times["ours"][k] / times["upstream"][k] for k in ("wall", "cpu")}
        print(ratio_line(f"{name} token2wav ({args.timing_size} v1 models, {N_TOKENS} tokens, prompt {PROMPT_TOKENS}; "
                         f"upstream's stream loop sleeps 0.1 s per chunk, so compare CPU; {args.threads} thread(s), "
                         f"median of {args.repeats})", times))
    if args.json:
        from figures import write_figures

        write_figures(args.json, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
