"""Record upstream's CosyVoice1 flow (``MaskedDiffWithXvec``) as test oracles, and time ours against it.

1. Builds upstream's FULL-size v1 flow from the recipe yaml itself (the fixed params and the
   ``flow:`` section of ``examples/libritts/cosyvoice/conf/cosyvoice.yaml``, loaded with
   HyperPyYAML) and writes its state-dict keys and shapes to tests/acoustic/data/flow_v1_keys.tsv.
2. Builds upstream's classes with the settings of ``FlowV1Config.tiny()``, loads our seeded tiny
   weights into them (same keys) and records, into tests/acoustic/data/upstream_flow_v1.npz: the
   training loss on a padded 3-utterance batch (mel lengths not a multiple of the token lengths) for
   several seeds in eval mode (plus the estimator's prediction for some) and in train mode (dropout
   draws), and two seeded inference calls with a prompt, the second fed the first's flow cache (a
   stream's next chunk), the first long enough for the regulator's head / middle / tail split.
3. Times ours and upstream's on the same inputs (median of --repeats, taking turns, wall and process
   CPU seconds: on a shared machine the CPU figure is the steadier one): a training step (forward +
   backward, tiny config, B=8) and one full-size inference call (prompt 60 + 150 tokens), printing
   ours/upstream.

    PYTHONPATH=/tmp/upsite python bench/upstream_flow_v1.py --upstream_src /tmp/up [--json out.json] [--timing_only]

(``--upstream_src``: a FunAudioLLM/CosyVoice checkout with third_party/Matcha-TTS; its Python extras,
e.g. HyperPyYAML, diffusers, omegaconf, on PYTHONPATH.)
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATA = os.path.join(ROOT, "tests", "acoustic", "data")

#: the golden batch: token lengths and mel lengths (22.05 kHz, hop 256: ~1.72 frames per token, not
#: a whole multiple); int(0.3 * 105) truncates 31.5
TOKEN_LENGTHS = (61, 47, 30)
FEAT_LENGTHS = (105, 83, 51)
EVAL_SEEDS = tuple(range(6))
PREDICTION_SEEDS = EVAL_SEEDS[:2]
TRAIN_SEEDS = (100, 101, 102)
#: inference: prompt tokens / frames (23 frames for 13 tokens: not the regulator's own ratio), the
#: first call's 45 tokens (> 40: head, middle and tail stretched apart), the second call's 30
PROMPT_TOKENS, PROMPT_FRAMES, FIRST_TOKENS, SECOND_TOKENS = 13, 23, 45, 30
INFERENCE_SEEDS = (7, 8)
TIMING_LENGTHS = (200, 190, 180, 170, 160, 150, 140, 130)


def make_batch(token_lengths, feat_lengths, vocab: int, seed: int = 0) -> dict:
    """A padded batch as the data pipeline gives it (the test rebuilds it from the npz, not from here)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    b, s, t = len(token_lengths), max(token_lengths), max(feat_lengths)
    token = torch.zeros(b, s, dtype=torch.int64)
    feat = torch.zeros(b, t, 80)
    for i, (n, f) in enumerate(zip(token_lengths, feat_lengths)):
        token[i, :n] = torch.randint(0, vocab, (n,), generator=g)
        feat[i, :f] = torch.randn(f, 80, generator=g)
    return {"speech_token": token, "speech_token_len": torch.tensor(token_lengths, dtype=torch.int32),
            "speech_feat": feat, "speech_feat_len": torch.tensor(feat_lengths, dtype=torch.int32),
            "embedding": torch.randn(b, 192, generator=g)}


def inference_inputs(vocab: int, seed: int = 1, prompt=(PROMPT_TOKENS, PROMPT_FRAMES),
                     lengths=(FIRST_TOKENS, SECOND_TOKENS)) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    return {"prompt_tokens": torch.randint(0, vocab, (1, prompt[0]), generator=g),
            "prompt_feat": torch.randn(1, prompt[1], 80, generator=g),
            "embedding": torch.randn(1, 192, generator=g),
            "first": torch.randint(0, vocab, (1, lengths[0]), generator=g),
            "second": torch.randint(0, vocab, (1, lengths[1]), generator=g)}


def seeded_state(config, seed: int = 0) -> dict:
    """Our model's seeded reference weights (default init + perturbed constants, as reference.py does)."""
    from cosyvoice.acoustic.flow_v1 import FlowV1Model
    from cosyvoice.acoustic.reference import seeded_state_dict

    return seeded_state_dict(lambda: FlowV1Model(config), seed)


def state_digest(state: dict) -> str:
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def import_upstream(src: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import upstream_acoustic

    upstream_acoustic.import_upstream(src)


def build_full_from_yaml(src: str):
    """Upstream's flow exactly as the v1 recipe builds it: its fixed params + ``flow:`` section."""
    from hyperpyyaml import load_hyperpyyaml

    with open(os.path.join(src, "examples", "libritts", "cosyvoice", "conf", "cosyvoice.yaml")) as f:
        lines = f.read().splitlines()
    fixed = lines[lines.index("# fixed params"):lines.index("# model params")]
    start = next(i for i, line in enumerate(lines) if line.startswith("flow:"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i] and not lines[i].startswith((" ", "#")))
    return load_hyperpyyaml("\n".join(fixed + lines[start:end]))["flow"]


def build_upstream(c: dict):
    """Upstream's classes with the settings of our ``FlowV1Config.to_dict()``."""
    from cosyvoice.flow.decoder import ConditionalDecoder
    from cosyvoice.flow.flow import MaskedDiffWithXvec
    from cosyvoice.flow.flow_matching import ConditionalCFM
    from cosyvoice.flow.length_regulator import InterpolateRegulator
    from cosyvoice.transformer.encoder import ConformerEncoder
    from omegaconf import DictConfig

    encoder = ConformerEncoder(
        input_size=c["dim"], output_size=c["dim"], attention_heads=c["encoder_heads"],
        linear_units=c["encoder_hidden"], num_blocks=c["encoder_blocks"], dropout_rate=c["encoder_dropout"],
        positional_dropout_rate=c["encoder_positional_dropout"], attention_dropout_rate=c["encoder_attention_dropout"],
        normalize_before=True, input_layer="linear", pos_enc_layer_type="rel_pos_espnet",
        selfattention_layer_type="rel_selfattn", use_cnn_module=False, macaron_style=False)
    regulator = InterpolateRegulator(channels=80, sampling_ratios=[1] * c["regulator_layers"])
    estimator = ConditionalDecoder(
        in_channels=320, out_channels=80, channels=list(c["estimator_channels"]), dropout=c["estimator_dropout"],
        attention_head_dim=c["estimator_head_dim"], n_blocks=c["estimator_blocks"],
        num_mid_blocks=c["estimator_mid_blocks"], num_heads=c["estimator_heads"], act_fn="gelu")
    cfm = ConditionalCFM(in_channels=240, n_spks=1, spk_emb_dim=80, estimator=estimator, cfm_params=DictConfig(
        {"sigma_min": c["sigma_min"], "solver": "euler", "t_scheduler": "cosine",
         "training_cfg_rate": c["training_cfg_rate"], "inference_cfg_rate": c["cfg_rate"], "reg_loss_type": "l1"}))
    return MaskedDiffWithXvec(
        input_size=c["dim"], output_size=80, spk_embed_dim=c["spk_embed_dim"], output_type="mel",
        vocab_size=c["vocab_size"], input_frame_rate=c["input_frame_rate"], only_mask_loss=True, encoder=encoder,
        length_regulator=regulator, decoder=cfm).eval()


def upstream_inference(model, tokens, prompt_tokens, prompt_feat, embedding, cache):
    import torch

    return model.inference(tokens, torch.tensor([tokens.shape[1]]), prompt_tokens,
                           torch.tensor([prompt_tokens.shape[1]]), prompt_feat, torch.tensor([prompt_feat.shape[1]]),
                           embedding, cache)


def seeded_loss(model, batch: dict, seed: int) -> float:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        return float(model(batch, torch.device("cpu"))["loss"])


def medians(calls: dict, repeats: int) -> dict[str, dict[str, float]]:
    """Median wall and process-CPU seconds per call, the callers taking turns (a shared machine's load
    hits both alike); the first round warms up."""
    times = {name: [] for name in calls}
    for _ in range(repeats + 1):
        for name, call in calls.items():
            wall, cpu = time.perf_counter(), time.process_time()
            call()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {name: {"wall": statistics.median(w for w, _ in t[1:]), "cpu": statistics.median(c for _, c in t[1:])}
            for name, t in times.items()}


def ratio_line(what: str, figures: dict[str, dict[str, float]]) -> str:
    up, ours = figures["upstream"], figures["ours"]
    return (f"{what}:\n  wall: upstream {up['wall']:.3f} s, ours {ours['wall']:.3f} s, ours/upstream = "
            f"{ours['wall'] / up['wall']:.2f}\n  CPU:  upstream {up['cpu']:.3f} s, ours {ours['cpu']:.3f} s, "
            f"ours/upstream = {ours['cpu'] / up['cpu']:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream_src", required=True)
    ap.add_argument("--out", default=os.path.join(DATA, "upstream_flow_v1.npz"))
    ap.add_argument("--keys", default=os.path.join(DATA, "flow_v1_keys.tsv"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the timing figures here")
    ap.add_argument("--timing_only", action="store_true", help="skip recording the key table and the oracles")
    args = ap.parse_args()

    import torch

    from cosyvoice.acoustic.flow_v1 import FlowV1Config, FlowV1Model

    torch.set_num_threads(args.threads)
    tiny, full = FlowV1Config.tiny(), FlowV1Config.full()
    state = seeded_state(tiny)
    ours = FlowV1Model(tiny)
    ours.load_state_dict(state, strict=True)
    ours.eval()
    full_state = seeded_state(full)
    ours_full = FlowV1Model(full)
    ours_full.load_state_dict(full_state, strict=True)
    ours_full.eval()

    import_upstream(args.upstream_src)

    if not args.timing_only:
        record_oracles(args, tiny, state, ours)
    timing(args, tiny, full, state, full_state, ours_full)
    return 0


def record_oracles(args, tiny, state: dict, ours) -> None:
    import torch

    # 1. the released layout: keys and shapes of the yaml-built full-size flow
    from_yaml = build_full_from_yaml(args.upstream_src)
    table = [f"{k}\t{','.join(str(n) for n in v.shape)}" for k, v in from_yaml.state_dict().items()]
    with open(args.keys + ".tmp", "w") as f:
        f.write("\n".join(table) + "\n")
    os.replace(args.keys + ".tmp", args.keys)
    print(f"wrote {args.keys} ({len(table)} tensors)")

    # 2. oracles on the tiny config
    upstream = build_upstream(tiny.to_dict())
    upstream.load_state_dict(state, strict=True)
    batch = make_batch(TOKEN_LENGTHS, FEAT_LENGTHS, tiny.vocab_size)
    record = {f"batch/{k}": v.numpy() for k, v in batch.items()}
    record["sha256_state"] = np.array(state_digest(state))
    predictions, ours_predictions = [], []
    upstream.decoder.estimator.register_forward_hook(lambda module, inputs, output: predictions.append(output))
    ours.decoder.estimator.register_forward_hook(lambda module, inputs, output: ours_predictions.append(output))
    for mode, seeds in (("eval", EVAL_SEEDS), ("train", TRAIN_SEEDS)):
        upstream.train(mode == "train")
        ours.train(mode == "train")
        losses = []
        for seed in seeds:
            losses.append(seeded_loss(upstream, batch, seed))
            ours_loss = seeded_loss(ours, batch, seed)
            diff = float((predictions[-1] - ours_predictions[-1]).abs().max())
            print(f"{mode} seed {seed}: upstream loss {losses[-1]:.6f}, ours rel. diff "
                  f"{abs(ours_loss / losses[-1] - 1):.1e}, prediction max diff {diff:.1e}")
            if mode == "eval" and seed in PREDICTION_SEEDS:
                record[f"eval/prediction/{seed}"] = predictions[-1].detach().numpy().astype(np.float32)
        record[f"{mode}/seeds"] = np.array(seeds, dtype=np.int64)
        record[f"{mode}/loss"] = np.array(losses, dtype=np.float64)
    upstream.eval()
    ours.eval()

    inputs = inference_inputs(tiny.vocab_size)
    record.update({f"inference/{k}": v.numpy() for k, v in inputs.items()})
    record["inference/seeds"] = np.array(INFERENCE_SEEDS, dtype=np.int64)
    p, feat, emb = inputs["prompt_tokens"], inputs["prompt_feat"], inputs["embedding"]
    cache_up, cache_ours = torch.zeros(1, 80, 0, 2), None
    for name, seed in zip(("first", "second"), INFERENCE_SEEDS):
        torch.manual_seed(seed)
        mel_up, cache_up = upstream_inference(upstream, inputs[name].int(), p.int(), feat, emb, cache_up)
        torch.manual_seed(seed)
        mel_ours, cache_ours = ours.inference(inputs[name], p, feat, emb, cache_ours)
        print(f"inference {name} ({inputs[name].shape[1]} tokens -> {mel_up.shape[2]} frames): mel max diff "
              f"{float((mel_up - mel_ours).abs().max()):.1e}, cache {tuple(cache_up.shape)} max diff "
              f"{float((cache_up - cache_ours).abs().max()):.1e}")
        record[f"inference/{name}/mel"] = mel_up.numpy()
        record[f"inference/{name}/cache"] = cache_up.numpy()

    tmp = args.out + ".tmp.npz"
    np.savez_compressed(tmp, **record)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e3:.0f} kB)")



def timing(args, tiny, full, state: dict, full_state: dict, ours_full) -> None:
    import torch

    from cosyvoice.acoustic.flow_v1 import FlowV1Model

    timing = make_batch(TIMING_LENGTHS, [int(n * 1.72) for n in TIMING_LENGTHS], tiny.vocab_size, seed=1)
    upstream_train = build_upstream(tiny.to_dict())
    upstream_train.load_state_dict(state, strict=True)
    ours_train = FlowV1Model(tiny)
    ours_train.load_state_dict(state, strict=True)

    def step(model):
        def call():
            model.train()
            model.zero_grad(set_to_none=True)
            random.seed(0)
            torch.manual_seed(0)
            model(timing, torch.device("cpu"))["loss"].backward()
        return call

    train = medians({"upstream": step(upstream_train), "ours": step(ours_train)}, args.repeats)
    upstream_full = build_upstream(full.to_dict())
    upstream_full.load_state_dict(full_state, strict=True)
    long = inference_inputs(full.vocab_size, seed=2, prompt=(60, 103), lengths=(150, 1))

    def infer(model, is_upstream):
        def call():
            torch.manual_seed(0)
            if is_upstream:
                upstream_inference(model, long["first"].int(), long["prompt_tokens"].int(), long["prompt_feat"],
                                   long["embedding"], torch.zeros(1, 80, 0, 2))
            else:
                model.inference(long["first"], long["prompt_tokens"], long["prompt_feat"], long["embedding"])
        return call

    infer_s = medians({"upstream": infer(upstream_full, True), "ours": infer(ours_full, False)}, args.repeats)
    figures = {
        "threads": args.threads, "repeats": args.repeats,
        "train_step_tiny_b8_s": train,
        "train_step_ratio": {k: train["ours"][k] / train["upstream"][k] for k in ("wall", "cpu")},
        "inference_full_prompt60_tokens150_s": infer_s,
        "inference_ratio": {k: infer_s["ours"][k] / infer_s["upstream"][k] for k in ("wall", "cpu")},
    }
    print(ratio_line(f"training step (tiny, B={len(TIMING_LENGTHS)}, {max(TIMING_LENGTHS)} tokens, forward + "
                     f"backward, {args.threads} threads, median of {args.repeats})", train))
    print(ratio_line(f"inference (full size, prompt 60 + 150 tokens = 361 frames, 10 Euler steps, CFG batch of 2, "
                     f"{args.threads} threads, median of {args.repeats})", infer_s))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    raise SystemExit(main())
