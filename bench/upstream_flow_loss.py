"""Record upstream's flow-matching training loss on the tiny reference flow as a test golden.

Builds upstream's ``CausalMaskedDiffWithXvec`` (bench/upstream_acoustic.py) with the settings of
``FlowConfig.tiny()``, loads the seeded tiny reference weights (``flow_state(0, "tiny")``, the same
state dict keys as ours) and runs its training ``forward`` on a padded batch of three utterances
for several seeds (Python ``random`` and torch seeded alike before each call), in eval mode (no
dropout) and in train mode. The inputs, the seeds, which of them drew a chunk-causal ("streaming")
step, the losses and, for the first eval seeds, the estimator's prediction (B, 80, T) go to an npz
that tests/acoustic/test_flow_training.py compares our ``FlowModel.forward`` against, without an
upstream checkout. (The loss alone is dominated by the target's own variance: a wrong look-ahead
at a padded utterance's end moves it by ~1e-6; the prediction shows it.)

It then times one training step (forward + backward, train mode) of ours and upstream's on a
B=8, ~200-token batch on the CPU and prints the ratio.

    python bench/upstream_flow_loss.py --upstream_src ~/src/CosyVoice [--out tests/acoustic/data/upstream_flow_loss.npz]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

#: token lengths of the golden batch, longest first as the pipeline pads them; the mel lengths
#: 122, 94, 60 give prompt limits int(0.3 * len) = 36 (of 36.6), 28 (of 28.2) and 18 (exact)
TOKEN_LENGTHS = (61, 47, 30)
EVAL_SEEDS = tuple(range(8))
PREDICTION_SEEDS = EVAL_SEEDS[:4]  # two chunk-causal draws and two full ones
TRAIN_SEEDS = (100, 101, 102, 103)
TIMING_LENGTHS = (200, 190, 180, 170, 160, 150, 140, 130)


def make_batch(lengths, seed: int = 0) -> dict:
    """A padded batch as the data pipeline gives it (the test rebuilds it from the npz, not from here)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    b, s = len(lengths), max(lengths)
    token = torch.zeros(b, s, dtype=torch.int64)
    feat = torch.zeros(b, 2 * s, 80)
    for i, n in enumerate(lengths):
        token[i, :n] = torch.randint(0, 6561, (n,), generator=g)
        feat[i, :2 * n] = torch.randn(2 * n, 80, generator=g)
    token_len = torch.tensor(lengths, dtype=torch.int32)
    return {"speech_token": token, "speech_token_len": token_len, "speech_feat": feat,
            "speech_feat_len": token_len * 2, "embedding": torch.randn(b, 192, generator=g)}


def seeded_loss(model, batch: dict, seed: int) -> float:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        return float(model(batch, torch.device("cpu"))["loss"])


def recording(method, into: list):
    """``method`` that also appends each result to ``into``."""
    def call(*args, **kwargs):
        into.append(method(*args, **kwargs))
        return into[-1]
    return call


def check_training_settings(upstream, config) -> None:
    """Upstream's module carries the dropout and loss settings of ``config`` (build_flow hard-codes them)."""
    enc, cfm = upstream.encoder, upstream.decoder
    block = cfm.estimator.down_blocks[0][1][0]
    found = {"encoder_dropout": enc.embed.out[2].p, "encoder_positional_dropout": enc.embed.pos_enc.dropout.p,
             "encoder_attention_dropout": enc.encoders[0].self_attn.dropout.p,
             "estimator_dropout": block.attn1.to_out[1].p, "sigma_min": cfm.sigma_min,
             "training_cfg_rate": cfm.training_cfg_rate, "only_mask_loss": upstream.only_mask_loss}
    wrong = {k: (v, getattr(config, k)) for k, v in found.items() if v != getattr(config, k)}
    if wrong:
        raise SystemExit(f"upstream's flow was built with other training settings than FlowConfig.tiny(): {wrong}")


def step_seconds(models: dict, batch: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall, process CPU) seconds of one training step per model, the models taking turns (a
    shared machine's load then hits both alike); the first round warms up."""
    import torch

    times = {name: [] for name in models}
    for i in range(repeats + 1):
        for name, model in models.items():
            model.zero_grad(set_to_none=True)
            random.seed(i)
            torch.manual_seed(i)
            wall, cpu = time.perf_counter(), time.process_time()
            model(batch, torch.device("cpu"))["loss"].backward()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {name: tuple(statistics.median(column) for column in zip(*t[1:])) for name, t in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream_src", required=True)
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "acoustic", "data", "upstream_flow_loss.npz"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed training steps per model (median)")
    args = ap.parse_args()

    import torch

    from cosyvoice.acoustic.flow import FlowConfig, FlowModel
    from cosyvoice.acoustic.reference import flow_state, part_bytes

    torch.set_num_threads(args.threads)
    config = FlowConfig.tiny()
    state = flow_state(0, "tiny")
    ours = FlowModel(config)
    ours.load_state_dict(state, strict=True)
    digest = hashlib.sha256(part_bytes("flow", seed=0, size="tiny")).hexdigest()

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import upstream_acoustic

    upstream_acoustic.import_upstream(args.upstream_src)
    upstream = upstream_acoustic.build_flow(config.to_dict())
    upstream.load_state_dict(state, strict=True)
    check_training_settings(upstream, config)

    batch = make_batch(TOKEN_LENGTHS)
    record = {f"batch/{k}": v.numpy() for k, v in batch.items()}
    record["sha256_flow_pt"] = np.array(digest)
    predictions, ours_predictions = [], []
    hook = upstream.decoder.estimator.register_forward_hook(lambda module, inputs, output: predictions.append(output))
    ours.decoder.estimator.padded = recording(ours.decoder.estimator.padded, ours_predictions)
    for mode, seeds in (("eval", EVAL_SEEDS), ("train", TRAIN_SEEDS)):
        upstream.train(mode == "train")
        ours.train(mode == "train")
        losses, streaming = [], []
        for seed in seeds:
            random.seed(seed)
            streaming.append(random.random() < 0.5)  # upstream's first draw of the step
            losses.append(seeded_loss(upstream, batch, seed))
            ours_loss = seeded_loss(ours, batch, seed)
            pred_diff = float((predictions[-1] - ours_predictions[-1]).abs().max())
            print(f"{mode} seed {seed}: streaming {streaming[-1]!s:5}  upstream loss {losses[-1]:.6f}  "
                  f"ours: loss rel. diff {abs(ours_loss / losses[-1] - 1):.1e}, prediction max diff {pred_diff:.1e}")
            if mode == "eval" and seed in PREDICTION_SEEDS:
                record[f"eval/prediction/{seed}"] = predictions[-1].detach().numpy().astype(np.float32)
        if mode == "eval" and len(set(streaming)) != 2:
            raise SystemExit(f"the eval seeds {seeds} drew only streaming={streaming[0]}; pick seeds that draw both")
        record[f"{mode}/seeds"] = np.array(seeds, dtype=np.int64)
        record[f"{mode}/streaming"] = np.array(streaming)
        record[f"{mode}/loss"] = np.array(losses, dtype=np.float64)

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp.npz"
    np.savez_compressed(tmp, **record)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e3:.0f} kB)")

    timing = make_batch(TIMING_LENGTHS, seed=1)
    hook.remove()
    del ours.decoder.estimator.padded  # back to the class's method
    upstream.train()
    ours.train()
    seconds = step_seconds({"upstream": upstream, "ours": ours}, timing, args.repeats)
    (wall_up, cpu_up), (wall_ours, cpu_ours) = seconds["upstream"], seconds["ours"]
    print(f"training step (forward + backward, train mode) on B={len(TIMING_LENGTHS)}, {max(TIMING_LENGTHS)} tokens "
          f"({sum(TIMING_LENGTHS)} real), tiny config, {args.threads} CPU threads, median of {args.repeats}:\n"
          f"  wall: upstream {wall_up:.3f} s, ours {wall_ours:.3f} s, ours/upstream = {wall_ours / wall_up:.2f}\n"
          f"  CPU:  upstream {cpu_up:.3f} s, ours {cpu_ours:.3f} s, ours/upstream = {cpu_ours / cpu_up:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
