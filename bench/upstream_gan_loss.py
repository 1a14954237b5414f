"""Record upstream's HiFi-GAN training losses as test goldens, and time a G + D turn against upstream's.

Builds upstream's own ``HiFiGan`` (``cosyvoice/hifigan/hifigan.py``: its HiFTGenerator with
``HiFTConfig.tiny()`` settings, ``MultipleDiscriminator(MultiPeriodDiscriminator(),
MultiResSpecDiscriminator())`` and Matcha's ``mel_spectrogram`` with the recipe's
``mel_spec_transform1`` values) from a source checkout, loads OUR seeded weights into it
(``hift_state_dict`` of our generator, our discriminator's state dict: both strict), runs its
``forward_generator`` and ``forward_discriminator`` on a padded batch of two utterances (9600
samples = 20 frames, the second 16 frames long) under fixed seeds, and writes every loss plus the
gradients' norms (and the generator's flat gradient), with upstream's HiFiGan state-dict keys and
shapes, to an npz that tests/acoustic/test_gan.py compares ours against without upstream.

It also checks what must hold between the two implementations: our discriminator and upstream's
load each other's state dicts strictly, as do the whole GANs (``generator.*`` /
``discriminator.*``), and a generator trained by a few of our steps, written by
``hift_state_dict``, loads strictly into upstream's HiFTGenerator and vocodes as ours does.
Finally it times one generator turn and one discriminator turn (forward + backward) on the tiny
generator and a 2 x 24480-sample batch (the recipe's truncate length): upstream's, ours as
upstream (discriminator weights trainable in the generator turn) and ours with a frozen
discriminator in the generator turn (how the trainer runs it).

    python bench/upstream_gan_loss.py --upstream_src ~/src/CosyVoice [--out tests/acoustic/data/upstream_gan_loss.npz]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SAMPLE_RATE, HOP = 24000, 480
FRAMES = (20, 16)  # the two utterances; the batch is padded to the first
WEIGHT_SEED, GENERATOR_TURN_SEED, DISCRIMINATOR_TURN_SEED = 0, 11, 12
MEL_LOSS = {"n_fft": 1920, "num_mels": 80, "sampling_rate": SAMPLE_RATE, "hop_size": 480, "win_size": 1920,
            "fmin": 0, "fmax": None, "center": False}  # the recipe's mel_spec_transform1
TIMING_SAMPLES = 24480


def build_ours(seed: int = WEIGHT_SEED):
    """Our HiFiGan with the tiny generator and the full discriminators, seeded.

    The generator's biases, Snake alphas and F0 head are set so the predicted F0 is mostly voiced
    (the harmonic source is exercised, not only the noise).
    """
    import torch

    from cosyvoice.acoustic.gan import GanConfig, HiFiGan
    from cosyvoice.acoustic.hift import HiFTConfig

    torch.manual_seed(seed)
    gan = HiFiGan.from_config(GanConfig(hift=HiFTConfig.tiny()))
    with torch.no_grad():
        for name, p in gan.generator.named_parameters():
            if name.endswith("alpha"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.05)
        head = gan.generator.f0_predictor.classifier
        head.bias.fill_(150.0)
        head.weight.normal_(0, 20.0)
    return gan.train()


def weights_digest(gan) -> str:
    """sha256 of the GAN's state dict (names, shapes and bytes), to tell a weight drift from a loss drift."""
    h = hashlib.sha256()
    for key, value in gan.state_dict().items():
        h.update(key.encode())
        h.update(str(tuple(value.shape)).encode())
        h.update(value.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def make_batch(seed: int = 0, frames: tuple[int, ...] = FRAMES) -> dict[str, np.ndarray]:
    """A padded batch as the hifigan data pipeline gives it: harmonic speech-like audio, its log-mel
    (fmax 8000, the flow feature), per-frame pitch with unvoiced frames, zero padding."""
    import torch

    from cosyvoice.dataset.mel import MelConfig, mel_spectrogram

    rng = np.random.RandomState(seed)
    n, longest = len(frames), max(frames)
    speech = np.zeros((n, longest * HOP), np.float32)
    feat = np.zeros((n, longest, 80), np.float32)
    pitch = np.zeros((n, longest), np.float32)
    for i, t in enumerate(frames):
        f0 = rng.uniform(90, 250, t).astype(np.float32)
        f0[rng.rand(t) < 0.25] = 0  # unvoiced frames
        f0_samples = np.repeat(f0, HOP)
        phase = 2 * np.pi * np.cumsum(f0_samples) / SAMPLE_RATE
        wav = sum(0.3 / k * np.sin(k * phase) for k in range(1, 6)) * (f0_samples > 0)
        wav = wav + 0.02 * rng.randn(t * HOP)
        speech[i, : t * HOP] = wav
        mel = mel_spectrogram(torch.from_numpy(speech[i : i + 1, : t * HOP]), MelConfig())
        feat[i, :t] = mel[0].T.numpy()
        pitch[i, :t] = f0
    lengths = np.asarray(frames, np.int32)
    return {"speech": speech, "speech_len": lengths * HOP, "speech_feat": feat, "speech_feat_len": lengths,
            "pitch_feat": pitch, "pitch_feat_len": lengths}


def torch_batch(arrays: dict[str, np.ndarray]) -> dict:
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


def grad_norm(params) -> float:
    import torch

    grads = [p.grad.detach().reshape(-1) for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.cat(grads)).item()) if grads else 0.0


def flat_grad(named) -> np.ndarray:
    """The gradients in the released naming order (original0/weight_g, original1/weight_v, ...)."""
    import torch

    return torch.cat([p.grad.detach().reshape(-1) for _, p in named]).numpy()


def released_order(module) -> list:
    """(name, parameter) in the order of ``hift_state_dict``'s keys, whichever weight-norm naming."""
    out = []
    for name, p in module.named_parameters():
        if name.endswith((".original0", ".weight_g")):
            name = name.replace(".parametrizations.weight.original0", ".weight_g")
        elif name.endswith((".original1", ".weight_v")):
            name = name.replace(".parametrizations.weight.original1", ".weight_v")
        out.append((name, p))
    return sorted(out, key=lambda item: item[0])


def _matcha_audio():
    """Matcha's ``utils/audio.py`` loaded by path: its package ``__init__`` needs hydra and lightning."""
    import importlib.util

    import matcha

    path = os.path.join(os.path.dirname(matcha.__file__), "utils", "audio.py")
    spec = importlib.util.spec_from_file_location("matcha_utils_audio", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_turns(gan, batch, *, generator_turn, discriminator_turn) -> dict[str, np.ndarray]:
    """One generator turn then one discriminator turn (each with backward) under the fixed seeds."""
    import torch

    out = {}
    gan.zero_grad(set_to_none=True)
    torch.manual_seed(GENERATOR_TURN_SEED)
    losses = generator_turn(batch)
    losses["loss"].backward()
    out.update({f"g_{k}": np.float64(v.item()) for k, v in losses.items()})
    out["g_grad_norm_generator"] = np.float64(grad_norm(gan.generator.parameters()))
    # the discriminator's gradients from the generator turn: upstream's generator step clips their norm too
    out["g_grad_norm_discriminator"] = np.float64(grad_norm(gan.discriminator.parameters()))
    out["g_grad_generator"] = flat_grad(released_order(gan.generator))
    gan.zero_grad(set_to_none=True)
    torch.manual_seed(DISCRIMINATOR_TURN_SEED)
    losses = discriminator_turn(batch)
    losses["loss"].backward()
    out.update({f"d_{k}": np.float64(v.item()) for k, v in losses.items()})
    out["d_grad_norm_discriminator"] = np.float64(grad_norm(gan.discriminator.parameters()))
    gan.zero_grad(set_to_none=True)
    return out


def timed(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Best (wall seconds, process CPU seconds) of each function, run round-robin after one warm-up each
    (so a busy shared machine slows every variant alike; CPU time is the steadier figure there)."""
    for fn in fns.values():
        fn()
    best = {name: (float("inf"), float("inf")) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream_src", required=True)
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "acoustic", "data", "upstream_gan_loss.npz"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions (best of), after one warm-up")
    ap.add_argument("--skip_timing", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # Matcha's MPD uses torch's old weight_norm

    import functools

    import torch
    from upstream_acoustic import build_hift, import_upstream

    from cosyvoice.acoustic.gan import GanConfig, HiFiGan, frozen
    from cosyvoice.acoustic.hift import HiFTConfig, hift_state_dict, load_hift

    torch.set_num_threads(args.threads)
    # everything of ours is built before upstream's `cosyvoice` package replaces ours in sys.modules
    ours = build_ours()
    digest = weights_digest(ours)
    arrays = make_batch()
    batch = torch_batch(arrays)
    fresh = HiFiGan.from_config(GanConfig(hift=HiFTConfig.tiny()))
    timing = None if args.skip_timing else (build_ours(), torch_batch(make_batch(seed=1, frames=(TIMING_SAMPLES // HOP,) * 2)))
    ours_result = run_turns(ours, batch, generator_turn=lambda b: ours.generator_turn(b, "cpu"),
                            discriminator_turn=lambda b: ours.discriminator_turn(b, "cpu"))

    import_upstream(args.upstream_src)
    from cosyvoice.hifigan.discriminator import MultipleDiscriminator, MultiResSpecDiscriminator
    from cosyvoice.hifigan.generator import HiFTGenerator as UpstreamHiFT
    from cosyvoice.hifigan.hifigan import HiFiGan as UpstreamHiFiGan
    from matcha.hifigan.models import MultiPeriodDiscriminator
    matcha_mel = _matcha_audio().mel_spectrogram

    def upstream_gan(model) -> UpstreamHiFiGan:
        hift = build_hift(HiFTConfig.tiny().upstream_kwargs())
        hift.load_state_dict(hift_state_dict(model.generator), strict=True)  # released naming, compat hook
        disc = MultipleDiscriminator(MultiPeriodDiscriminator(), MultiResSpecDiscriminator())
        disc.load_state_dict(model.discriminator.state_dict(), strict=True)
        gan = UpstreamHiFiGan(hift, disc, [functools.partial(matcha_mel, **MEL_LOSS)])
        return gan.train()

    up = upstream_gan(ours)
    up_result = run_turns(up, batch, generator_turn=lambda b: up.forward_generator(b, "cpu"),
                          discriminator_turn=lambda b: up.forward_discriminator(b, "cpu"))

    print("upstream vs ours (relative difference):")
    worst = 0.0
    for key, value in up_result.items():
        mine = ours_result[key]
        diff = float(np.max(np.abs(mine - value)) / max(np.max(np.abs(value)), 1e-12))
        worst = max(worst, diff)
        shown = f"{float(value):.6g}" if np.ndim(value) == 0 else f"{value.size} values"
        print(f"  {key:28s} {shown:>14s}  {diff:.2e}")
    print(f"  worst {worst:.2e}")

    # state dicts: each loads the other's strictly (discriminator alone and the whole GAN)
    theirs = MultipleDiscriminator(MultiPeriodDiscriminator(), MultiResSpecDiscriminator())
    fresh.discriminator.load_state_dict(theirs.state_dict(), strict=True)
    fresh.load_state_dict(up.state_dict(), strict=True)
    up.load_state_dict(ours.state_dict(), strict=True)
    print("state dicts: upstream's discriminator / GAN load strictly into ours and ours into upstream's")

    # a trained generator, written in the released layout, loads strictly into upstream's HiFTGenerator
    opt_g = torch.optim.Adam(ours.generator.parameters(), lr=2e-4)
    opt_d = torch.optim.Adam(ours.discriminator.parameters(), lr=2e-4)
    for _ in range(2):
        opt_d.zero_grad()
        ours.discriminator_turn(batch, "cpu")["loss"].backward()
        opt_d.step()
        opt_g.zero_grad()
        with frozen(ours.discriminator):
            ours.generator_turn(batch, "cpu")["loss"].backward()
        opt_g.step()
    state = hift_state_dict(ours.generator)
    assert not any(k.startswith("generator.") or ".parametrizations." in k for k in state)
    upstream_hift = build_hift(HiFTConfig.tiny().upstream_kwargs())
    upstream_hift.load_state_dict(state, strict=True)
    mel = batch["speech_feat"][:1].transpose(1, 2).contiguous()
    torch.manual_seed(5)
    wav_up, _ = upstream_hift.inference(mel)
    wav_ours, _ = load_hift(state, HiFTConfig.tiny()).inference(mel, generator=torch.Generator().manual_seed(5))
    vocoded = float((wav_up - wav_ours).abs().max())
    print(f"trained generator: hift_state_dict loads strictly into upstream's HiFTGenerator; "
          f"vocoded max |diff| {vocoded:.2e}")
    assert vocoded < 1e-3, vocoded
    assert isinstance(upstream_hift, UpstreamHiFT)

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    key_table = np.asarray([f"{k}\t{tuple(v.shape)}" for k, v in up.state_dict().items()])
    np.savez_compressed(args.out, weights_sha256=np.str_(digest), upstream_state_keys=key_table,
                        **{f"batch_{k}": v for k, v in arrays.items()}, **up_result)
    print(f"wrote {args.out}")

    if timing is not None:
        time_turns(*timing, upstream_gan(timing[0]), frozen, args)
    return 0


def time_turns(fresh, batch, up, frozen, args) -> None:
    def step(forward, model):
        def run():
            model.zero_grad(set_to_none=True)
            forward(batch, "cpu")["loss"].backward()
        return run

    def frozen_generator_turn(b, device):
        with frozen(fresh.discriminator):
            return fresh.generator_turn(b, device)

    turns = {
        ("upstream", "D"): step(up.forward_discriminator, up),
        ("upstream", "G"): step(up.forward_generator, up),
        ("ours", "D"): step(fresh.discriminator_turn, fresh),
        ("ours, discriminator trainable in G turn", "G"): step(fresh.generator_turn, fresh),
        ("ours, frozen discriminator in G turn", "G"): step(frozen_generator_turn, fresh),
    }
    best = timed(turns, args.repeats)
    print(f"\none D turn + one G turn, forward + backward, tiny generator, batch 2 x {TIMING_SAMPLES} samples, "
          f"CPU, {args.threads} thread(s), best of {args.repeats}, wall / process CPU seconds:")
    d_up, d_ours = best[("upstream", "D")], best[("ours", "D")]
    rows = [("upstream", d_up, best[("upstream", "G")])]
    for name in ("ours, discriminator trainable in G turn", "ours, frozen discriminator in G turn"):
        rows.append((name, d_ours, best[(name, "G")]))
    up_total = [d + g for d, g in zip(rows[0][1], rows[0][2])]
    for name, d, g in rows:
        total = [a + b for a, b in zip(d, g)]
        ratio = "" if name == "upstream" else (f"  {up_total[0] / total[0]:.2f}x / {up_total[1] / total[1]:.2f}x "
                                               "upstream's speed")
        print(f"  {name:40s} D {d[0]:5.2f} / {d[1]:5.2f}  G {g[0]:5.2f} / {g[1]:5.2f}  "
              f"D+G {total[0]:5.2f} / {total[1]:5.2f}{ratio}")

if __name__ == "__main__":
    raise SystemExit(main())
