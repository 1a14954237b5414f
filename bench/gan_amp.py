"""Is bf16 autocast safe for the HiFT GAN? The tiny GAN trained the same alternating steps on the same
crops in fp32 and under bf16 autocast, from the same initial weights; per step: discriminator loss,
generator loss, mel loss and the generator's grad norm, and the bf16/fp32 ratio of the last mel loss.

    python bench/gan_amp.py [--steps 8] [--device cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.train_acoustic import gan_batches  # noqa: E402
from cosyvoice.acoustic.gan import GanConfig, HiFiGan, frozen  # noqa: E402


def run(amp: bool, steps: int, device: torch.device) -> list[tuple[float, float, float, float]]:
    torch.manual_seed(0)
    gan = HiFiGan.from_config(GanConfig.tiny()).to(device).train()
    opt_g = torch.optim.Adam(gan.generator.parameters(), lr=2e-4)
    opt_d = torch.optim.Adam(gan.discriminator.parameters(), lr=2e-4)
    batches = gan_batches(2, 2, 9600, device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    rows = []
    for i in range(steps):
        batch = batches[i % len(batches)]
        with autocast():
            d = gan.discriminator_turn(batch, device)
        d["loss"].backward()
        torch.nn.utils.clip_grad_norm_(gan.discriminator.parameters(), 5.0)
        opt_d.step()
        opt_d.zero_grad()
        with frozen(gan.discriminator), autocast():
            g = gan.generator_turn(batch, device)
        g["loss"].backward()
        norm = torch.nn.utils.clip_grad_norm_(gan.generator.parameters(), 5.0)
        opt_g.step()
        opt_g.zero_grad()
        rows.append((float(d["loss"].detach()), float(g["loss"].detach()), float(g["loss_mel"].detach()), float(norm)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    fp32, bf16 = run(False, args.steps, device), run(True, args.steps, device)
    print("step  d_loss fp32/bf16    loss fp32/bf16      mel fp32/bf16     grad norm fp32/bf16")
    for i, (a, b) in enumerate(zip(fp32, bf16), 1):
        print(f"{i:4d}  {a[0]:7.3f} {b[0]:7.3f}  {a[1]:8.2f} {b[1]:8.2f}  {a[2]:7.3f} {b[2]:7.3f}  {a[3]:8.1f} {b[3]:8.1f}")
    print(f"last mel loss bf16 / fp32: x{bf16[-1][2] / fp32[-1][2]:.3f}")


if __name__ == "__main__":
    main()
