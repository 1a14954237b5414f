"""Record upstream's CosyVoice1 ``TransformerLM.inference`` with the recipe's sampling as a test oracle.

The v1 recipe samples with ``ras_sampling`` (top_p 0.8, top_k 25, win_size 10, tau_r 0.1): nucleus
sampling, and when the pick repeats within the last 10 tokens, a draw from the full distribution
without it. Both draws use torch's global generator, so after ``torch.manual_seed(seed)`` upstream's
run and ours make the same draws from the same distributions and must yield the same ids.

The weights and the two prompts are those of the greedy oracle (``tests/llm/data/upstream_transformer_lm.npz``,
written by ``bench/upstream_transformer_lm.py``); this script adds, per case and seed, upstream's sampled ids
and how many steps took the repetition-aware resample path -> ``tests/llm/data/upstream_transformer_lm_sampled.npz``.
It also times the sampled generation of both on that tiny model and prints ours/upstream.

    PYTHONPATH=/path/to/upstream-deps python bench/upstream_transformer_lm_sampling.py --upstream_src ~/src/CosyVoice \\
        [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DATA = os.path.join(ROOT, "tests", "llm", "data")
GREEDY_ORACLE = os.path.join(DATA, "upstream_transformer_lm.npz")
SEEDS = (0, 1, 2)
#: the v1 recipe's sampling settings (examples/libritts/cosyvoice/conf/cosyvoice.yaml)
RAS = dict(top_p=0.8, top_k=25, win_size=10, tau_r=0.1)


def load_greedy_oracle(path: str) -> tuple[dict, dict, dict]:
    """(settings, state dict, cases) of the greedy oracle."""
    import torch

    with np.load(path) as f:
        record = {k: f[k] for k in f.files}
    settings = json.loads(str(record["settings"]))
    state = {k[len("weight/"):]: torch.from_numpy(v) for k, v in record.items() if k.startswith("weight/")}
    cases: dict[str, dict] = {}
    for key, value in record.items():
        if key.startswith("infer/") and not key.endswith("/ids"):
            _, name, field = key.split("/")
            cases.setdefault(name, {})[field] = torch.from_numpy(value)
    return settings, state, cases


def sampled_ids(model, case: dict, seed: int) -> list[int]:
    import torch

    torch.manual_seed(seed)
    return [int(t) for t in model.inference(**{k: v.clone() for k, v in case.items()}, sampling=25)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream_src", required=True)
    ap.add_argument("--greedy_oracle", default=GREEDY_ORACLE)
    ap.add_argument("--out", default=os.path.join(DATA, "upstream_transformer_lm_sampled.npz"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="write the timing figures here")
    args = ap.parse_args()

    import torch

    from cosyvoice.llm import sampling as ours_sampling
    from cosyvoice.llm import transformer as ours_transformer
    from cosyvoice.llm import transformer_lm as ours_lm

    torch.set_num_threads(args.threads)
    import upstream_acoustic
    import upstream_transformer_lm as greedy_bench

    upstream_acoustic.import_upstream(args.upstream_src)
    from cosyvoice.llm.llm import TransformerLM
    from cosyvoice.transformer.encoder import ConformerEncoder, TransformerEncoder
    from cosyvoice.utils import common

    resamples = [0]
    upstream_random_sampling = common.random_sampling

    def counting_random_sampling(*a, **kw):  # ras_sampling looks the name up at call time
        resamples[0] += 1
        return upstream_random_sampling(*a, **kw)

    common.random_sampling = counting_random_sampling
    theirs = {"TransformerLM": TransformerLM, "ConformerEncoder": ConformerEncoder,
              "TransformerEncoder": TransformerEncoder}
    ours = {"TransformerLM": ours_lm.TransformerLM, "ConformerEncoder": ours_transformer.ConformerEncoder,
            "TransformerEncoder": ours_transformer.TransformerEncoder}
    settings, state, cases = load_greedy_oracle(args.greedy_oracle)
    upstream = greedy_bench.build(theirs, settings, sampling=functools.partial(common.ras_sampling, **RAS)).eval()
    mine = greedy_bench.build(ours, settings, sampling=functools.partial(ours_sampling.ras_sampling, **RAS)).eval()
    upstream.load_state_dict(state, strict=True)
    mine.load_state_dict(state, strict=True)

    record: dict[str, np.ndarray] = {"seeds": np.array(SEEDS, dtype=np.int64), "ras": np.array(json.dumps(RAS))}
    for name, case in cases.items():
        for seed in SEEDS:
            resamples[0] = 0
            ids = sampled_ids(upstream, case, seed)
            ours_ids = sampled_ids(mine, case, seed)
            n_text = int(case["text_len"][0])
            print(f"sampled {name} seed {seed}: upstream {len(ids)} tokens (min {2 * n_text}, max {20 * n_text}), "
                  f"{resamples[0]} repetition resamples; ours {'the same' if ours_ids == ids else 'DIFFERENT'}")
            record[f"{name}/{seed}/ids"] = np.array(ids, dtype=np.int64)
            record[f"{name}/{seed}/resamples"] = np.array(resamples[0], dtype=np.int64)

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp.npz"
    np.savez_compressed(tmp, **record)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e3:.1f} kB)")

    # timing: the same sampled runs, models taking turns, medians
    times: dict[str, list[float]] = {"upstream": [], "ours": []}
    steps = 0
    for _ in range(args.repeats):
        for label, model in (("upstream", upstream), ("ours", mine)):
            start = time.perf_counter()
            n = sum(len(sampled_ids(model, case, seed)) for case in cases.values() for seed in SEEDS)
            times[label].append(time.perf_counter() - start)
            steps = n
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    ratio = median["ours"] / median["upstream"]
    print(f"sampled generation, tiny model, {steps} tokens per run, {args.threads} thread(s), median of {args.repeats}: "
          f"upstream {median['upstream']:.3f} s, ours {median['ours']:.3f} s, ours/upstream = {ratio:.2f}")
    if args.json:
        from figures import write_figures

        write_figures(args.json, {"benchmark": "upstream_transformer_lm_sampling", "date": time.strftime("%Y-%m-%d"),
                                  "threads": args.threads, "tokens": steps, "upstream_s": median["upstream"],
                                  "ours_s": median["ours"], "ours_over_upstream": ratio})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
