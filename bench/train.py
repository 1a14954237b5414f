"""Training throughput: our step vs the upstream recipe's step, same model, same data, same run.

``--model llm`` (default, below); ``--model flow|hifigan``: bench/train_acoustic.py, against
upstream's own modules from ``--upstream_src`` (a CosyVoice checkout).

Model: the CosyVoice2 LLM (Qwen2-0.5B body, random init; ``--size tiny`` for a CPU run). Data:
synthetic utterances with LibriTTS-like lengths (text 8-60 Qwen tokens, 3.5-6 speech tokens per
text token at 25 Hz). Reported: real (non-padding) LLM tokens per second and MFU =
6 x non-embedding parameters x tokens/s / peak (H100 SXM dense bf16: 989 TFLOP/s; ``--peak``).

(b) upstream's step, written plainly: fp32 weights + bf16 autocast, a GradScaler, DDP with
    ``find_unused_parameters=True`` (world size 1), Adam, dynamic batches of
    ``max_frames_in_batch`` 2000 mel frames (2 frames per token, padded), the decoder and the
    loss over every padded position.
(a) ours at the same batches: the same model code path the trainer runs (decoder and loss on the
    target positions only), fused AdamW, bf16 autocast without a scaler, no DDP search for unused
    parameters; and ours with token-budget batches (``--tokens`` real tokens), packed sequences
    (no padding; varlen attention), optionally ``torch.compile``.

    python bench/train.py --size full --device cuda [--steps 30] [--tokens 16384] [--compile]
    python bench/train.py --size tiny --device cpu   (CPU smoke run)
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cosyvoice.llm import IGNORE_ID, QWEN2_0_5B, Qwen2Encoder, Qwen2LM  # noqa: E402

TINY = dict(QWEN2_0_5B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def utterances(n: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        t = rng.randint(8, 60)
        out.append((t, int(t * rng.uniform(3.5, 6.0))))
    return out


def frame_batches(utts, max_frames: int = 2000):
    """The recipe's dynamic batching on sorted-in-buffers data (mel frames = 2 per speech token)."""
    batches, buf, longest = [], [], 0
    for u in sorted(utts, key=lambda x: x[1]):
        frames = 2 * u[1]
        new_longest = max(longest, frames)
        if buf and new_longest * (len(buf) + 1) > max_frames:
            batches.append(buf)
            buf, new_longest = [], frames
        buf.append(u)
        longest = new_longest
    if buf:
        batches.append(buf)
    return batches


def token_batches(utts, budget: int):
    batches, buf, total = [], [], 0
    for u in utts:
        n = u[0] + u[1] + 3
        if buf and total + n > budget:
            batches.append(buf)
            buf, total = [], 0
        buf.append(u)
        total += n
    if buf:
        batches.append(buf)
    return batches


def make_batch(utts, device, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([a for a, _ in utts])
    s = torch.tensor([b for _, b in utts])
    return {"text_token": torch.randint(1, 150000, (len(utts), int(t.max())), generator=g).to(device),
            "text_token_len": t.to(device),
            "speech_token": torch.randint(0, 6561, (len(utts), int(s.max())), generator=g).to(device),
            "speech_token_len": s.to(device)}


def real_tokens(utts) -> int:
    return sum(a + b + 3 for a, b in utts)


def build(size: str, device):
    torch.manual_seed(0)
    cfg = QWEN2_0_5B if size == "full" else TINY
    model = Qwen2LM(cfg["hidden_size"], cfg["hidden_size"], 6561, Qwen2Encoder(config=cfg))
    return model.to(device)


def non_embedding(model) -> int:
    skip = {id(model.llm.model.model.embed_tokens.weight), id(model.speech_embedding.weight),
            id(model.llm_embedding.weight), id(model.llm.model.lm_head.weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def upstream_loss(model, batch):
    """Upstream's forward: padded inputs, decoder over every position, masked CE / valid count."""
    targets, inputs, lengths = model.prepare_lm_input_target(batch["text_token"], batch["text_token_len"],
                                                            batch["speech_token"], batch["speech_token_len"])
    hidden, _ = model.llm(inputs.to(batch["text_token"].device), lengths.to(batch["text_token"].device))
    logits = model.llm_decoder(hidden)
    targets = targets.to(logits.device)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                                             ignore_index=IGNORE_ID, reduction="sum")
    return loss / (targets != IGNORE_ID).sum()


def timed(step, batches, device, warmup: int, steps: int) -> tuple[float, int]:
    for i in range(warmup):
        step(batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, tokens = time.perf_counter(), 0
    for i in range(steps):
        b = batches[(warmup + i) % len(batches)]
        step(b)
        tokens += b["_real"]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, tokens


def prepare(groups, device):
    out = []
    for i, g in enumerate(groups):
        b = make_batch(g, device, i)
        b["_real"] = real_tokens(g)
        out.append(b)
    return out


def run_upstream(args, device, batches):
    from bench.train_acoustic import upstream_ddp

    model = build(args.size, device)
    ddp = upstream_ddp(model, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")

    def step(batch):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = _ddp_loss(ddp, batch)
        scaler.scale(loss / 2).backward()  # accum_grad 2 in the recipe: the scaled loss, a step every call here
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()

    result = timed(step, batches, device, args.warmup, args.steps)
    return result


def _ddp_loss(ddp, batch):
    module = ddp.module
    original = module.forward
    module.forward = lambda b: upstream_loss(module, b)
    try:
        return ddp(batch)
    finally:
        module.forward = original


def run_ours(args, device, batches, packed: bool, compile_body: bool):
    model = build(args.size, device)
    model.packed = packed
    qwen = model.llm.model
    if qwen.lm_head.weight is not qwen.model.embed_tokens.weight:
        qwen.lm_head.weight.requires_grad_(False)
    if compile_body:
        model.llm.model.model = torch.compile(model.llm.model.model, dynamic=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                            fused=device.type == "cuda")

    def step(batch):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(batch, device)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    result = timed(step, batches, device, args.warmup, args.steps)
    flops = 6 * non_embedding(model)
    return result, flops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["full", "tiny"], default="full")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--tokens", type=int, default=16384, help="real tokens per step for the token-budget run")
    p.add_argument("--utterances", type=int, default=3000)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--peak", type=float, default=989e12, help="peak FLOP/s for MFU (H100 SXM dense bf16)")
    p.add_argument("--model", choices=["llm", "flow", "hifigan"], default="llm")
    p.add_argument("--upstream_src", help="flow/hifigan: CosyVoice checkout whose own modules are the baseline")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="flow/hifigan: bf16 autocast on both sides (default: on with CUDA, as --use_amp)")
    p.add_argument("--gan_batch", type=int, default=None, help="hifigan crops per step (default 38 on CUDA: "
                   "the recipe's 2000 frames / 52; 4 on CPU)")
    p.add_argument("--truncate_length", type=int, default=24960, help="hifigan crop in samples (24480 padded to 960s)")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.model != "llm":
        from bench.train_acoustic import run_flow, run_hifigan

        if args.amp is None:
            args.amp = device.type == "cuda"
        if args.gan_batch is None:
            args.gan_batch = 38 if device.type == "cuda" else 4
        if args.model == "flow" and args.utterances == 3000 and device.type != "cuda":
            args.utterances = 300
        rows = (run_flow if args.model == "flow" else run_hifigan)(args, device)
        base = rows[0][1]
        for name, fps in rows:
            print(f"{name:65s} {fps:10.0f} frames/s  x{fps / base:5.2f}")
        return
    random.seed(0)
    utts = utterances(args.utterances)
    recipe = prepare(frame_batches(utts), device)
    random.Random(1).shuffle(recipe)
    budget = prepare(token_batches(sorted(utts, key=lambda u: u[1]), args.tokens), device)
    random.Random(2).shuffle(budget)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), size {args.size}, "
          f"recipe batches: {sum(b['_real'] for b in recipe) / len(recipe):.0f} real tokens/step, "
          f"token batches: {sum(b['_real'] for b in budget) / len(budget):.0f} real tokens/step")
    (t_up, n_up) = run_upstream(args, device, recipe)
    (t_ours, n_ours), flops = run_ours(args, device, recipe, packed=False, compile_body=False)
    (t_tok, n_tok), _ = run_ours(args, device, budget, packed=True, compile_body=args.compile)
    rows = [("(b) upstream step, recipe batches", n_up / t_up), ("(a) ours, recipe batches", n_ours / t_ours),
            (f"(a) ours, {args.tokens}-token packed batches" + (" + compile" if args.compile else ""), n_tok / t_tok)]
    base = rows[0][1]
    for name, tps in rows:
        mfu = flops * tps / args.peak
        print(f"{name:55s} {tps:10.0f} tokens/s  MFU {100 * mfu:6.2f} %  x{tps / base:5.2f}")


if __name__ == "__main__":
    main()
