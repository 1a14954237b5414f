"""Record upstream's CosyVoice1 ``TransformerLM`` as test oracles, and time its generation against ours.

Three things, all from upstream's own classes (``--upstream_src``: a FunAudioLLM/CosyVoice checkout;
its Python dependencies, e.g. HyperPyYAML, on ``PYTHONPATH``):

1. the key table: upstream's ``TransformerLM`` built from the unchanged v1 recipe
   ``examples/libritts/cosyvoice/conf/cosyvoice.yaml`` (on the meta device: shapes only) ->
   ``tests/llm/data/transformer_lm_keys.tsv`` (``key<TAB>shape`` in state-dict order);
2. the oracle: a TINY ``TransformerLM`` (2 + 2 blocks) with seeded weights, its eval-mode loss, acc
   and logits at the target positions on a padded batch of 3 utterances, train-mode losses for
   seeded dropout draws, and greedy generation for two prompts (one with a speaker vector and a
   speech prompt stopping at eos, one with neither) -> ``tests/llm/data/upstream_transformer_lm.npz``.
   Ours is loaded strictly from the same weights and compared as it goes;
3. generation speed: greedy steps per second of upstream's ``forward_chunk`` loop and of our
   cached decoding on a medium model (``--timing_size``), eos suppressed so both run the same
   number of steps; prints ours/upstream.

    PYTHONPATH=/path/to/upstream-deps python bench/upstream_transformer_lm.py --upstream_src ~/src/CosyVoice \\
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DATA = os.path.join(ROOT, "tests", "llm", "data")
RECIPE = os.path.join("examples", "libritts", "cosyvoice", "conf", "cosyvoice.yaml")

#: the tiny oracle model: a text encoder wider than the LLM (so the affine layer is not square),
#: a shrunk text vocabulary, a speech vocabulary of 256 (eos 256) to keep the npz small
TINY = dict(text_encoder_input_size=24, llm_input_size=32, llm_output_size=32, text_token_size=300,
            speech_token_size=256, spk_embed_dim=192)
TINY_TEXT_ENCODER = dict(input_size=24, output_size=48, attention_heads=4, linear_units=64, num_blocks=2,
                         dropout_rate=0.1, positional_dropout_rate=0.1, attention_dropout_rate=0.0,
                         normalize_before=True, input_layer="linear", pos_enc_layer_type="rel_pos_espnet",
                         selfattention_layer_type="rel_selfattn", use_cnn_module=False, macaron_style=False,
                         use_dynamic_chunk=False, use_dynamic_left_chunk=False, static_chunk_size=1)
TINY_LLM = dict(input_size=32, output_size=32, attention_heads=4, linear_units=64, num_blocks=2, dropout_rate=0.1,
                positional_dropout_rate=0.1, attention_dropout_rate=0.0, input_layer="linear_legacy",
                pos_enc_layer_type="rel_pos_espnet", selfattention_layer_type="rel_selfattn", static_chunk_size=1)
#: (text, speech) lengths of the padded batch: the longest text is not the longest sequence
LENGTHS = ((7, 12), (9, 4), (3, 15))
TRAIN_SEEDS = (0, 1, 2)
#: greedy generation cases: (text length, prompt text length, prompt speech length, with speaker vector)
CASES = {"prompted": (5, 3, 6, True), "bare": (4, 0, 0, False)}


def greedy(weighted_scores, decoded_tokens, sampling):
    return int(weighted_scores.argmax())


def tiny_settings() -> dict:
    return {"lm": TINY, "text_encoder": TINY_TEXT_ENCODER, "llm": TINY_LLM}


def build(classes: dict, settings: dict, sampling=greedy):
    """A TransformerLM from ``classes`` (upstream's or ours; the same keywords) and ``settings``."""
    return classes["TransformerLM"](text_encoder=classes["ConformerEncoder"](**settings["text_encoder"]),
                                    llm=classes["TransformerEncoder"](**settings["llm"]), sampling=sampling,
                                    **settings["lm"])


def seeded_state(model, seed: int) -> dict:
    """Every tensor random (LayerNorm gains around 1), so a swapped or misnamed weight changes the outputs."""
    import torch

    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if value.ndim == 1 and "norm" in key and key.endswith(".weight"):
            state[key] = 1 + 0.2 * torch.randn(value.shape, generator=g)
        elif value.ndim >= 2 and "embedding" not in key:
            state[key] = torch.randn(value.shape, generator=g) / value.shape[-1] ** 0.5
        else:
            state[key] = 0.5 * torch.randn(value.shape, generator=g)
    return state


def make_batch(seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    b, t_max, s_max = len(LENGTHS), max(t for t, _ in LENGTHS), max(s for _, s in LENGTHS)
    text = torch.zeros(b, t_max, dtype=torch.int64)
    speech = torch.zeros(b, s_max, dtype=torch.int64)
    for i, (t, s) in enumerate(LENGTHS):
        text[i, :t] = torch.randint(1, TINY["text_token_size"], (t,), generator=g)
        speech[i, :s] = torch.randint(0, TINY["speech_token_size"], (s,), generator=g)
    return {"text_token": text, "text_token_len": torch.tensor([t for t, _ in LENGTHS], dtype=torch.int32),
            "speech_token": speech, "speech_token_len": torch.tensor([s for _, s in LENGTHS], dtype=torch.int32),
            "embedding": torch.randn(b, TINY["spk_embed_dim"], generator=g)}


def make_case(name: str, seed: int) -> dict:
    import torch

    n_text, n_prompt_text, n_prompt_speech, with_speaker = CASES[name]
    g = torch.Generator().manual_seed(seed)
    return {"text": torch.randint(1, TINY["text_token_size"], (1, n_text), generator=g),
            "text_len": torch.tensor([n_text], dtype=torch.int32),
            "prompt_text": torch.randint(1, TINY["text_token_size"], (1, n_prompt_text), generator=g),
            "prompt_text_len": torch.tensor([n_prompt_text], dtype=torch.int32),
            "prompt_speech_token": torch.randint(0, TINY["speech_token_size"], (1, n_prompt_speech), generator=g),
            "prompt_speech_token_len": torch.tensor([n_prompt_speech], dtype=torch.int32),
            "embedding": torch.randn(1 if with_speaker else 0, TINY["spk_embed_dim"], generator=g)}


def generate(model, case: dict) -> list[int]:
    # upstream adds prompt_text_len into text_len in place: hand it copies
    return [int(t) for t in model.inference(**{k: v.clone() for k, v in case.items()}, sampling=25)]


def upstream_key_table(src: str) -> list[tuple[str, tuple[int, ...]]]:
    import torch
    from hyperpyyaml import load_hyperpyyaml

    with open(os.path.join(src, RECIPE)) as f, torch.device("meta"):
        configs = load_hyperpyyaml(f, overrides={"flow": None, "hift": None, "hifigan": None})
    return [(k, tuple(v.shape)) for k, v in configs["llm"].state_dict().items()]


def loss_with_logits(model, batch: dict, seed: int, capture: list) -> tuple[float, float]:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    hook = model.llm_decoder.register_forward_hook(lambda module, inputs, output: capture.append(output.detach()))
    try:
        with torch.no_grad():
            out = model(batch, torch.device("cpu"))
    finally:
        hook.remove()
    return float(out["loss"]), float(out["acc"])


def eos_bias_that_stops_midway(model, case: dict) -> float:
    """The smallest eos bias (from a coarse grid) at which upstream's greedy run ends at eos strictly
    between its minimum and maximum length, so the oracle covers a real stop."""
    import torch

    n_text = int(case["text_len"][0])
    eos = model.speech_token_size
    original = float(model.llm_decoder.bias[eos].detach())
    for bias in np.arange(0.0, 12.0, 0.25):
        with torch.no_grad():
            model.llm_decoder.bias[eos] = original + bias
        if 2 * n_text < len(generate(model, case)) < 20 * n_text:
            return original + float(bias)
    raise SystemExit("no eos bias on the grid stops the prompted case between its min and max length")


def decode_run(model, lm_input, steps: int, upstream: bool) -> float:
    """Seconds of ``steps`` greedy steps (eos never chosen) from the prefix rows ``lm_input``."""
    import torch

    start = time.perf_counter()
    with torch.inference_mode():
        if upstream:
            x, offset = lm_input, 0
            att_cache, cnn_cache = torch.zeros(0, 0, 0, 0), torch.zeros(0, 0, 0, 0)
            for _ in range(steps):
                mask = torch.tril(torch.ones(1, x.shape[1], x.shape[1])).bool()
                y, att_cache, cnn_cache = model.llm.forward_chunk(x, offset=offset, required_cache_size=-1,
                                                                  att_cache=att_cache, cnn_cache=cnn_cache,
                                                                  att_mask=mask)
                token = int(model.llm_decoder(y[:, -1])[0, :-1].argmax())
                offset += x.shape[1]
                x = model.speech_embedding.weight[token].reshape(1, 1, -1)
        else:
            state, x = model.llm.decode_state(), lm_input
            for _ in range(steps):
                y = model.llm.extend(x, state)
                token = int(model.llm_decoder(y[:, -1])[0, :-1].argmax())
                x = model.speech_embedding.weight[token].reshape(1, 1, -1)
    return time.perf_counter() - start


def decode_seconds(models: dict, lm_input, steps: int, repeats: int) -> dict[str, float]:
    """Median seconds per model, the models taking turns (a shared machine's load hits both alike)."""
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            times[name].append(decode_run(model, lm_input, steps, upstream=name == "upstream"))
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream_src", required=True)
    ap.add_argument("--out", default=os.path.join(DATA, "upstream_transformer_lm.npz"))
    ap.add_argument("--keys", default=os.path.join(DATA, "transformer_lm_keys.tsv"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timing_size", type=int, nargs=3, default=(512, 8, 6), metavar=("DIM", "HEADS", "BLOCKS"),
                    help="LLM width, heads and blocks of the timed model (the recipe: 1024 16 14)")
    ap.add_argument("--prefix", type=int, default=60, help="LLM input rows before the first generated token")
    ap.add_argument("--steps", type=int, default=300, help="generated tokens per timed run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the timing figures here")
    args = ap.parse_args()

    import torch

    from cosyvoice.llm import transformer as ours_transformer
    from cosyvoice.llm import transformer_lm as ours_lm

    ours = {"TransformerLM": ours_lm.TransformerLM, "ConformerEncoder": ours_transformer.ConformerEncoder,
            "TransformerEncoder": ours_transformer.TransformerEncoder}
    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import upstream_acoustic

    upstream_acoustic.import_upstream(args.upstream_src)
    from cosyvoice.llm.llm import TransformerLM
    from cosyvoice.transformer.encoder import ConformerEncoder, TransformerEncoder

    theirs = {"TransformerLM": TransformerLM, "ConformerEncoder": ConformerEncoder,
              "TransformerEncoder": TransformerEncoder}

    # 1. the key table of the full recipe model
    table = upstream_key_table(args.upstream_src)
    os.makedirs(os.path.dirname(args.keys), exist_ok=True)
    with open(args.keys, "w") as f:
        f.writelines(f"{k}\t{','.join(map(str, shape))}\n" for k, shape in table)
    print(f"wrote {args.keys} ({len(table)} keys, {sum(int(np.prod(s)) for _, s in table) / 1e6:.1f} M parameters)")

    # 2. the tiny oracle
    torch.manual_seed(0)
    upstream = build(theirs, tiny_settings()).eval()
    state = seeded_state(upstream, seed=0)
    mine = build(ours, tiny_settings()).eval()
    prompted = make_case("prompted", seed=1)
    upstream.load_state_dict(state, strict=True)
    state["llm_decoder.bias"][TINY["speech_token_size"]] = eos_bias_that_stops_midway(upstream, prompted)
    upstream.load_state_dict(state, strict=True)
    mine.load_state_dict(state, strict=True)
    record = {f"weight/{k}": v.numpy().astype(np.float32) for k, v in state.items()}
    batch = make_batch(seed=2)
    record.update({f"batch/{k}": v.numpy() for k, v in batch.items()})

    for mode, seeds in (("eval", (0,)), ("train", TRAIN_SEEDS)):
        upstream.train(mode == "train")
        mine.train(mode == "train")
        losses, accs = [], []
        for seed in seeds:
            theirs_logits, ours_logits = [], []
            loss, acc = loss_with_logits(upstream, batch, seed, theirs_logits)
            ours_loss, ours_acc = loss_with_logits(mine, batch, seed, ours_logits)
            losses.append(loss)
            accs.append(acc)
            print(f"{mode} seed {seed}: upstream loss {loss:.6f} acc {acc:.4f}; ours loss diff {ours_loss - loss:.1e}, "
                  f"acc diff {ours_acc - acc:.1e}")
            if mode == "eval":
                target, _, _ = mine.prepare_lm_input_target(batch["text_token"], batch["text_token_len"],
                                                            batch["speech_token"], batch["speech_token_len"],
                                                            batch["embedding"])
                logits = theirs_logits[0][target != -1]
                record["eval/target_logits"] = logits.numpy().astype(np.float32)
                print(f"  target logits {tuple(logits.shape)}: ours max diff {float((ours_logits[0] - logits).abs().max()):.1e}")
        record[f"{mode}/seeds"] = np.array(seeds, dtype=np.int64)
        record[f"{mode}/loss"] = np.array(losses, dtype=np.float64)
        record[f"{mode}/acc"] = np.array(accs, dtype=np.float64)
    upstream.eval()
    mine.eval()

    for seed, name in enumerate(CASES, start=1):
        case = make_case(name, seed)
        ids = generate(upstream, case)
        ours_ids = generate(mine, case)
        n_text = int(case["text_len"][0])
        print(f"greedy {name}: upstream {len(ids)} tokens (min {2 * n_text}, max {20 * n_text}), "
              f"ours {'the same' if ours_ids == ids else f'DIFFERENT ({len(ours_ids)} tokens)'}")
        record.update({f"infer/{name}/{k}": v.numpy() for k, v in case.items()})
        record[f"infer/{name}/ids"] = np.array(ids, dtype=np.int64)
    record["settings"] = np.array(json.dumps(tiny_settings()))

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp.npz"
    np.savez_compressed(tmp, **record)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e3:.0f} kB)")

    # 3. generation speed on a medium model (same weights in both)
    dim, heads, blocks = args.timing_size
    settings = {"lm": dict(TINY, text_encoder_input_size=dim, llm_input_size=dim, llm_output_size=dim,
                           speech_token_size=4096),
                "text_encoder": dict(TINY_TEXT_ENCODER, input_size=dim, output_size=dim, attention_heads=heads,
                                     linear_units=4 * dim, num_blocks=1),
                "llm": dict(TINY_LLM, input_size=dim, output_size=dim, attention_heads=heads, linear_units=4 * dim,
                            num_blocks=blocks)}
    upstream, mine = build(theirs, settings).eval(), build(ours, settings).eval()
    state = seeded_state(upstream, seed=3)
    upstream.load_state_dict(state, strict=True)
    mine.load_state_dict(state, strict=True)
    lm_input = torch.randn(1, args.prefix, dim, generator=torch.Generator().manual_seed(4))
    seconds = decode_seconds({"upstream": upstream, "ours": mine}, lm_input, args.steps, args.repeats)
    ratio = seconds["ours"] / seconds["upstream"]
    print(f"greedy generation, LLM {dim}-d x {blocks} blocks, {args.prefix}-row prefix + {args.steps} steps, "
          f"{args.threads} CPU threads, median of {args.repeats}:\n"
          f"  upstream forward_chunk {seconds['upstream']:.3f} s ({args.steps / seconds['upstream']:.0f} steps/s), "
          f"ours {seconds['ours']:.3f} s ({args.steps / seconds['ours']:.0f} steps/s), ours/upstream = {ratio:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "upstream_transformer_lm", "date": time.strftime("%Y-%m-%d"),
                       "cores": os.cpu_count(), "dim": dim, "heads": heads, "blocks": blocks, "prefix": args.prefix, "steps": args.steps,
                       "threads": args.threads, "upstream_s": seconds["upstream"], "ours_s": seconds["ours"],
                       "ours_over_upstream": ratio}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
