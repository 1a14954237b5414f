"""Acoustic-model training throughput (``bench/train.py --model flow|hifigan``): our step vs upstream's.

Both sides run in this process on the same batches and the same initial weights (ours copied into
upstream's modules, which have the same state-dict keys). Upstream is its own code from a CosyVoice
checkout (``--upstream_src``, built by bench/upstream_acoustic.py), driven the way its recipe trains:

* flow: ``CausalMaskedDiffWithXvec.forward`` under DDP with ``find_unused_parameters=True`` (world
  size 1), Adam, clipping at 5, bf16 autocast + GradScaler with ``--amp`` (upstream's ``--use_amp``);
  ours: ``FlowModel.forward`` as the trainer runs it (no DDP search, fused Adam on CUDA, no scaler).
* hifigan: upstream's ``HiFiGan`` in ``train_one_epoc_gan`` order (discriminator turn: forward,
  backward, clip over all parameters, step D; generator turn: the same for G, the discriminator's
  weight gradients computed and thrown away); ours: the trainer's turns (the discriminator frozen in
  the generator turn, each optimizer clipping its own parameters).

The step functions take turns on every batch (``round_robin``), so load drift on a shared machine
slows both alike. Batches: flow, the recipe's dynamic batches of 2000 mel frames over synthetic utterances with
LibriTTS-like lengths (56-720 frames); hifigan, crops of ``truncate_length`` samples (24480, padded
to 24960 = 52 frames), ``--gan_batch`` per step (the recipe's 2000 frames make 38). Reported: real
mel frames per second and the ratio to upstream's.
"""

from __future__ import annotations

import os
import random
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_robin(steps: dict, batches: list[dict], device: torch.device, warmup: int, n: int) -> dict[str, float]:
    """Real mel frames per second of each named step function, the functions taking turns on every
    batch (so a machine whose load drifts slows them alike); ``warmup`` untimed rounds first."""
    seconds = dict.fromkeys(steps, 0.0)
    frames = 0
    for i in range(warmup + n):
        batch = batches[i % len(batches)]
        for name, step in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            step(batch)
            _sync(device)
            if i >= warmup:
                seconds[name] += time.perf_counter() - t0
        if i >= warmup:
            frames += int(batch["speech_feat_len"].sum())
    return {name: frames / s for name, s in seconds.items()}


def upstream_ddp(module: torch.nn.Module, device: torch.device):
    """Upstream's wrapper: DDP with ``find_unused_parameters=True`` (a one-process group)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    return torch.nn.parallel.DistributedDataParallel(module, find_unused_parameters=True,
                                                     device_ids=[device.index] if device.type == "cuda" else None)


def _autocast(device: torch.device, amp: bool):
    import contextlib

    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def _adam(params, device: torch.device, lr: float, fused: bool):
    return torch.optim.Adam(list(params), lr=lr, **({"fused": True} if fused and device.type == "cuda" else {}))


# -- flow ----------------------------------------------------------------------------------------------
def flow_batches(n_utts: int, device: torch.device, max_frames: int = 2000, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    tokens = sorted(int(rng.randint(8, 60) * rng.uniform(3.5, 6.0)) for _ in range(n_utts))
    groups, buf, longest = [], [], 0
    for n in tokens:  # the recipe's dynamic batching (2 mel frames per token)
        new_longest = max(longest, 2 * n)
        if buf and new_longest * (len(buf) + 1) > max_frames:
            groups.append(buf)
            buf, new_longest = [], 2 * n
        buf.append(n)
        longest = new_longest
    if buf:
        groups.append(buf)
    g = torch.Generator().manual_seed(seed)
    out = []
    for group in groups:
        group = sorted(group, reverse=True)
        lens = torch.tensor(group, dtype=torch.int32)
        out.append({"speech_token": torch.randint(0, 6561, (len(group), max(group)), generator=g).to(device),
                    "speech_token_len": lens.to(device),
                    "speech_feat": (torch.randn(len(group), 2 * max(group), 80, generator=g) - 6).to(device),
                    "speech_feat_len": (2 * lens).to(device),
                    "embedding": torch.randn(len(group), 192, generator=g).to(device)})
    random.Random(seed + 1).shuffle(out)
    return out


def run_flow(args, device: torch.device) -> list[tuple[str, float]]:
    from bench.upstream_acoustic import build_flow, import_upstream
    from cosyvoice.acoustic.flow import FlowConfig, FlowModel

    config = FlowConfig.full() if args.size == "full" else FlowConfig.tiny()
    torch.manual_seed(0)
    ours = FlowModel(config).to(device).train()
    initial = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    batches = flow_batches(args.utterances, device)
    print(f"flow {args.size}: {len(batches)} recipe batches, "
          f"{sum(int(b['speech_feat_len'].sum()) for b in batches) / len(batches):.0f} real frames/step")
    steps = {}
    if args.upstream_src:
        import_upstream(args.upstream_src)
        upstream = build_flow(config.to_dict()).to(device).train()
        upstream.load_state_dict(initial, strict=True)
        ddp = upstream_ddp(upstream, device)
        opt_up = _adam(upstream.parameters(), device, 1e-5, fused=False)
        scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")

        def upstream_step(batch):
            with _autocast(device, args.amp):
                loss = ddp(batch, device)["loss"]
            scaler.scale(loss / 2).backward()  # accum_grad 2: the scaled loss (a step every call here)
            scaler.unscale_(opt_up)
            torch.nn.utils.clip_grad_norm_(upstream.parameters(), 5.0)
            scaler.step(opt_up)
            scaler.update()
            opt_up.zero_grad()

        steps["(b) upstream step (its own modules), recipe batches"] = upstream_step
    opt = _adam(ours.parameters(), device, 1e-5, fused=True)

    def our_step(batch):
        with _autocast(device, args.amp):
            loss = ours(batch, device)["loss"]
        (loss / 2).backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    steps["(a) ours, recipe batches"] = our_step
    return list(round_robin(steps, batches, device, args.warmup, args.steps).items())


# -- hifigan --------------------------------------------------------------------------------------------
def gan_batches(n: int, batch: int, samples: int, device: torch.device, seed: int = 0) -> list[dict]:
    frames = samples // 480
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = torch.arange(samples) / 24000
        f0 = 100 + 150 * torch.rand(batch, 1, generator=g)
        speech = 0.3 * torch.sin(2 * torch.pi * f0 * t) + 0.01 * torch.randn(batch, samples, generator=g)
        out.append({"speech": speech.float().to(device),
                    "speech_len": torch.full((batch,), samples, dtype=torch.int32, device=device),
                    "speech_feat": (torch.randn(batch, frames, 80, generator=g) - 6).to(device),
                    "speech_feat_len": torch.full((batch,), frames, dtype=torch.int32, device=device),
                    "pitch_feat": f0.expand(batch, frames).contiguous().float().to(device),
                    "pitch_feat_len": torch.full((batch,), frames, dtype=torch.int32, device=device)})
    return out


def _upstream_hifigan(gan_config, device: torch.device):
    """Upstream's HiFiGan (generator, MultipleDiscriminator, matcha mel loss transform) as the recipe builds it."""
    import functools

    from cosyvoice.hifigan.discriminator import MultipleDiscriminator, MultiResSpecDiscriminator
    from cosyvoice.hifigan.hifigan import HiFiGan
    from matcha.hifigan.models import MultiPeriodDiscriminator
    from matcha.utils.audio import mel_spectrogram

    from bench.upstream_acoustic import build_hift

    mel = gan_config.mel
    transform = functools.partial(mel_spectrogram, n_fft=mel.n_fft, num_mels=mel.n_mels, sampling_rate=mel.sample_rate,
                                  hop_size=mel.hop, win_size=mel.win, fmin=mel.fmin, fmax=mel.fmax, center=False)
    return HiFiGan(build_hift(gan_config.hift.upstream_kwargs()).train(),
                   MultipleDiscriminator(MultiPeriodDiscriminator(), MultiResSpecDiscriminator()),
                   [transform]).to(device)


def run_hifigan(args, device: torch.device) -> list[tuple[str, float]]:
    from bench.upstream_acoustic import import_upstream
    from cosyvoice.acoustic.gan import GanConfig, HiFiGan, frozen
    from cosyvoice.acoustic.hift import HiFTConfig

    config = GanConfig(hift=HiFTConfig.full() if args.size == "full" else HiFTConfig.tiny())
    torch.manual_seed(0)
    ours = HiFiGan.from_config(config).to(device).train()
    initial = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    batches = gan_batches(4, args.gan_batch, args.truncate_length, device)
    print(f"hifigan {args.size}: {args.gan_batch} crops of {args.truncate_length} samples per step")
    steps = {}
    if args.upstream_src:
        import_upstream(args.upstream_src)
        upstream = _upstream_hifigan(config, device).train()
        upstream.load_state_dict(initial, strict=True)
        ddp = upstream_ddp(upstream, device)
        up_g = _adam(upstream.generator.parameters(), device, 2e-4, fused=False)
        up_d = _adam(upstream.discriminator.parameters(), device, 2e-4, fused=False)
        scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")

        def upstream_step(batch):
            for turn, opt, other in (("discriminator", up_d, up_g), ("generator", up_g, up_d)):
                with _autocast(device, args.amp):
                    loss = ddp({**batch, "turn": turn}, device)["loss"]
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(upstream.parameters(), 5.0)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad()
                other.zero_grad()

        steps["(b) upstream GAN step (its own modules)"] = upstream_step
    opt_g = _adam(ours.generator.parameters(), device, 2e-4, fused=True)
    opt_d = _adam(ours.discriminator.parameters(), device, 2e-4, fused=True)

    def our_step(batch):
        with _autocast(device, args.amp):
            loss = ours.discriminator_turn(batch, device)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ours.discriminator.parameters(), 5.0)
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        with frozen(ours.discriminator), _autocast(device, args.amp):
            loss = ours.generator_turn(batch, device)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ours.generator.parameters(), 5.0)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)

    steps["(a) ours (trainer's turns, discriminator frozen in the G turn)"] = our_step
    return list(round_robin(steps, batches, device, args.warmup, args.steps).items())
