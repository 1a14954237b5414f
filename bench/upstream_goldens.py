"""Record upstream token2wav outputs on the tiny reference models as test goldens.

Runs upstream's own CosyVoice2 token2wav (flow + HiFT + its streaming cache logic, see
bench/upstream_acoustic.py) on ``write_acoustic_models(size="tiny", seed=0)`` for a few offline and
streaming scenarios and writes inputs + per-chunk waveforms and vocoder mels to an npz that
tests/acoustic/test_upstream_goldens.py compares ours against (mel 1e-4, waveform 1e-3), so CI checks
agreement with upstream without an upstream checkout.

    python bench/upstream_goldens.py --upstream_src ~/src/CosyVoice [--out tests/acoustic/data/upstream_tiny.npz]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

#: name -> (target tokens, prompt tokens, ends of the non-final chunks; None = offline)
SCENARIOS = {
    "offline_prompt": (48, 10, None),
    "stream_upstream_hops": (70, 10, [40]),
    "stream_triton_hops_no_prompt": (60, 0, [15, 40]),
    "stream_unaligned_prompt": (60, 7, [15, 40, 48]),
}
LOOKAHEAD = 3


def scenario_inputs(name: str, seed: int = 0) -> dict:
    """The seeded inputs of a scenario (the test rebuilds them the same way)."""
    n, p, _ = SCENARIOS[name]
    rng = np.random.RandomState(seed + sorted(SCENARIOS).index(name))
    tokens = rng.randint(0, 6561, n).astype(np.int64)
    prompt = rng.randint(0, 6561, p).astype(np.int64)
    feat = rng.randn(2 * p, 80).astype(np.float32)
    embedding = rng.randn(192).astype(np.float32) if p else None
    return {"tokens": tokens, "prompt_tokens": prompt if p else None, "prompt_feat": feat if p else None,
            "embedding": embedding}


def calls(name: str) -> list[tuple[int, int | None, bool]]:
    """(tokens in the call, token_offset, finalize) of each call of a scenario."""
    n, _, ends = SCENARIOS[name]
    if ends is None:
        return [(n, None, True)]
    out, offset = [], 0
    for end in ends:
        out.append((end + LOOKAHEAD, offset, False))
        offset = end
    return out + [(n, offset, True)]


def vocoder_seed(name: str, call: int) -> int:
    return 1000 * (1 + sorted(SCENARIOS).index(name)) + call


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream_src", required=True)
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "acoustic", "data", "upstream_tiny.npz"))
    args = ap.parse_args()

    import torch

    from cosyvoice.acoustic.flow import FlowConfig
    from cosyvoice.acoustic.hift import HiFTConfig
    from cosyvoice.acoustic.reference import write_acoustic_models

    torch.set_num_threads(2)
    flow_config, hift_config = FlowConfig.tiny().to_dict(), HiFTConfig.tiny().upstream_kwargs()
    with tempfile.TemporaryDirectory() as model_dir:
        write_acoustic_models(model_dir, seed=0, size="tiny")
        digests = {f: hashlib.sha256(open(os.path.join(model_dir, f), "rb").read()).hexdigest()
                   for f in ("flow.pt", "hift.pt")}
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import upstream_acoustic

        upstream_acoustic.import_upstream(args.upstream_src)
        upstream = upstream_acoustic.UpstreamToken2Wav(flow_config, hift_config, os.path.join(model_dir, "flow.pt"),
                                                       os.path.join(model_dir, "hift.pt"))
        record = {f"sha256_{k.replace('.', '_')}": np.array(v) for k, v in digests.items()}
        for name in SCENARIOS:
            x = scenario_inputs(name)
            for i, (n, offset, finalize) in enumerate(calls(name)):
                torch.manual_seed(vocoder_seed(name, i))
                wav, mel = upstream.synthesize(x["tokens"][:n], x["prompt_tokens"], x["prompt_feat"],
                                               x["embedding"] if x["embedding"] is not None else np.zeros(192),
                                               token_offset=offset, finalize=finalize, request_id=name,
                                               return_mel=True)
                record[f"{name}/{i}/wav"] = wav.astype(np.float32)
                record[f"{name}/{i}/mel"] = mel.numpy().astype(np.float32)
                print(f"{name} call {i}: {n} tokens, offset {offset}, final {finalize}: {wav.shape[0]} samples")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp.npz"
    np.savez_compressed(tmp, **record)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
