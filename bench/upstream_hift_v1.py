"""Record upstream's CosyVoice1 HiFT vocoder (22.05 kHz) as test oracles, and time ours against it.

All from upstream's own classes (``--upstream_src``: a FunAudioLLM/CosyVoice checkout with
third_party/Matcha-TTS; its Python dependencies, e.g. HyperPyYAML, on ``PYTHONPATH``):

1. the key table: upstream's full-size ``HiFTGenerator`` built from the unchanged v1 recipe
   ``examples/libritts/cosyvoice/conf/cosyvoice.yaml`` (its fixed params + ``hift:`` section) ->
   ``tests/acoustic/data/hift_v1_keys.tsv`` (``key<TAB>shape`` in state-dict order), in the naming
   of the released ``hift.pt`` files (``weight_g``/``weight_v``: today's torch names upstream's
   weight-normed tensors ``parametrizations.weight.original0/1`` and maps the released names onto
   them when loading; the script checks that upstream loads the table's naming strictly);
2. the oracle: upstream's classes with the settings of ``HiFTConfig.tiny_v1()``, our seeded tiny
   weights loaded (an F0 head that makes most frames voiced, some not), and, under fixed seeds:
   one inference call, a second call as CosyVoice1's stream makes it (the previous call's last
   20 mel frames prepended, its last 20 * 256 source samples as ``cache_source``), and a batched
   training-path forward (B = 2) -> ``tests/acoustic/data/upstream_hift_v1.npz`` (the weights are
   in the npz, so the test does not depend on how torch initialises modules);
3. inference speed: one full-size call (``--frames`` mel frames, default 200 = 2.3 s of audio),
   upstream vs ours on the same weights, median of ``--repeats`` taking turns; prints ours/upstream.

    PYTHONPATH=/tmp/upsite python bench/upstream_hift_v1.py --upstream_src /tmp/up [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATA = os.path.join(ROOT, "tests", "acoustic", "data")
RECIPE = os.path.join("examples", "libritts", "cosyvoice", "conf", "cosyvoice.yaml")

#: CosyVoice1's hift cache (upstream's CosyVoiceModel): mel frames kept, and their source samples
MEL_CACHE_FRAMES = 20
#: oracle inputs: the first call's frames, the second call's new frames, the batched forward's shape
FIRST_FRAMES, SECOND_FRAMES, BATCH, BATCH_FRAMES = 40, 24, 2, 16
SEEDS = {"first": 11, "second": 12, "forward": 13}


def seeded_weights(seed: int = 0):
    """Our tiny v1 vocoder with seeded weights (the oracle's), in eval mode.

    Default initialisation + the reference files' perturbation of constant parameters, then an F0
    head whose output sits mostly above the voicing threshold (10 Hz), so the sine path is
    exercised, with some unvoiced (noise-only) frames too.
    """
    import torch

    from cosyvoice.acoustic.hift import HiFTConfig, HiFTGenerator
    from cosyvoice.acoustic.reference import seeded_module

    model = seeded_module(lambda: HiFTGenerator(HiFTConfig.tiny_v1()), seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model.f0_predictor.classifier.bias.fill_(30.0)
        model.f0_predictor.classifier.weight.copy_(torch.randn(model.f0_predictor.classifier.weight.shape,
                                                               generator=g) * 60.0)
    return model


def oracle_mels() -> dict:
    import torch

    g = torch.Generator().manual_seed(5)
    return {"first": torch.randn(1, 80, FIRST_FRAMES, generator=g) * 2 - 4,
            "second_new": torch.randn(1, 80, SECOND_FRAMES, generator=g) * 2 - 4,
            "batch": torch.randn(BATCH, BATCH_FRAMES, 80, generator=g) * 2 - 4}


def released_naming(state: dict) -> dict:
    """Torch's weight-norm parametrization names -> the released files' ``weight_g``/``weight_v``."""
    return {k.replace(".parametrizations.weight.original0", ".weight_g")
             .replace(".parametrizations.weight.original1", ".weight_v"): v for k, v in state.items()}


def state_digest(state: dict) -> str:
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def build_full_from_yaml(src: str):
    """Upstream's vocoder exactly as the v1 recipe builds it: its fixed params + ``hift:`` section."""
    from hyperpyyaml import load_hyperpyyaml

    with open(os.path.join(src, RECIPE)) as f:
        lines = f.read().splitlines()
    fixed = lines[lines.index("# fixed params"):lines.index("# model params")]
    start = next(i for i, line in enumerate(lines) if line.startswith("hift:"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i] and not lines[i].startswith((" ", "#")))
    return load_hyperpyyaml("\n".join(fixed + lines[start:end]))["hift"]


def medians(calls: dict, repeats: int) -> dict[str, float]:
    """Median wall seconds per call, the callers taking turns (a shared machine's load hits both
    alike); the first round warms up."""
    times = {name: [] for name in calls}
    for _ in range(repeats + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream_src", required=True)
    ap.add_argument("--out", default=os.path.join(DATA, "upstream_hift_v1.npz"))
    ap.add_argument("--keys", default=os.path.join(DATA, "hift_v1_keys.tsv"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--frames", type=int, default=200, help="mel frames of the timed full-size call")
    ap.add_argument("--json", help="write the timing figures here")
    args = ap.parse_args()

    import torch

    from cosyvoice.acoustic.hift import HiFTConfig, HiFTGenerator, hift_state_dict, load_hift
    from cosyvoice.acoustic.reference import seeded_module

    torch.set_num_threads(args.threads)
    tiny, full = HiFTConfig.tiny_v1(), HiFTConfig.v1()
    ours = seeded_weights()
    state = hift_state_dict(ours)
    ours = load_hift(state, tiny)  # as the test loads it: from the released naming
    ours_full = seeded_module(lambda: HiFTGenerator(full), 0)
    full_state = hift_state_dict(ours_full)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import upstream_acoustic

    upstream_acoustic.import_upstream(args.upstream_src)

    # 1. the released layout: keys and shapes of the yaml-built full-size vocoder
    from_yaml = build_full_from_yaml(args.upstream_src)
    assert from_yaml.m_source.l_sin_gen.__class__.__name__ == "SineGen", "the v1 recipe must select SineGen"
    table_state = released_naming(from_yaml.state_dict())
    from_yaml.load_state_dict(table_state, strict=True)  # upstream loads the released naming strictly
    table = [f"{k}\t{','.join(str(n) for n in v.shape)}" for k, v in table_state.items()]
    with open(args.keys + ".tmp", "w") as f:
        f.write("\n".join(table) + "\n")
    os.replace(args.keys + ".tmp", args.keys)
    print(f"wrote {args.keys} ({len(table)} tensors)")

    # 2. oracles on the tiny config
    upstream = upstream_acoustic.build_hift(tiny.upstream_kwargs())
    upstream.load_state_dict(state, strict=True)
    mels = oracle_mels()
    record = {f"state/{k}": v.numpy() for k, v in state.items()}
    record["sha256_state"] = np.array(state_digest(state))
    record["seeds"] = np.array([SEEDS[k] for k in ("first", "second", "forward")], dtype=np.int64)
    record.update({f"mel/{k}": v.numpy() for k, v in mels.items()})

    def compare(name, theirs, mine):
        diffs = ", ".join(f"{float((a - b).abs().max()):.1e}" for a, b in zip(theirs, mine))
        print(f"{name}: ours vs upstream max |diff| (per output) {diffs}")

    torch.manual_seed(SEEDS["first"])
    wav, source = upstream.inference(mels["first"])
    torch.manual_seed(SEEDS["first"])
    compare("first call", (wav, source), ours.inference(mels["first"]))
    with torch.no_grad():
        f0 = upstream.f0_predictor(mels["first"])
    print(f"oracle F0: {float((f0 > tiny.nsf_voiced_threshold).float().mean()):.0%} of frames voiced, "
          f"range {float(f0.min()):.1f}..{float(f0.max()):.1f} Hz")
    record["first/wav"], record["first/source"] = wav.numpy(), source.numpy()

    cache = source[:, :, -MEL_CACHE_FRAMES * tiny.samples_per_frame:]
    second_mel = torch.cat([mels["first"][:, :, -MEL_CACHE_FRAMES:], mels["second_new"]], dim=2)
    torch.manual_seed(SEEDS["second"])
    wav2, source2 = upstream.inference(second_mel, cache_source=cache)
    torch.manual_seed(SEEDS["second"])
    compare("second call (hift cache)", (wav2, source2), ours.inference(second_mel, cache_source=cache))
    record["second/wav"], record["second/source"] = wav2.numpy(), source2.numpy()

    torch.manual_seed(SEEDS["forward"])
    with torch.no_grad():
        wav3, f03 = upstream({"speech_feat": mels["batch"]}, torch.device("cpu"))
    torch.manual_seed(SEEDS["forward"])
    with torch.no_grad():
        compare("batched forward (B=2)", (wav3, f03), ours(mels["batch"].transpose(1, 2)))
    record["forward/wav"], record["forward/f0"] = wav3.numpy(), f03.numpy()

    tmp = args.out + ".tmp.npz"
    np.savez_compressed(tmp, **record)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e3:.0f} kB)")

    # 3. full-size inference speed, same weights in both
    upstream_full = upstream_acoustic.build_hift(full.upstream_kwargs())
    upstream_full.load_state_dict(full_state, strict=True)
    ours_full = load_hift(full_state, full)
    mel = torch.randn(1, 80, args.frames, generator=torch.Generator().manual_seed(6)) * 2 - 4

    def infer(model):
        def call():
            torch.manual_seed(0)
            model.inference(mel)
        return call

    seconds = medians({"upstream": infer(upstream_full), "ours": infer(ours_full)}, args.repeats)
    ratio = seconds["ours"] / seconds["upstream"]
    audio_s = args.frames * full.samples_per_frame / full.sampling_rate
    print(f"inference, full-size v1 HiFT, {args.frames} frames ({audio_s:.2f} s of 22.05 kHz audio), "
          f"{args.threads} CPU threads, median of {args.repeats}: upstream {seconds['upstream']:.3f} s, "
          f"ours {seconds['ours']:.3f} s, ours/upstream = {ratio:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "upstream_hift_v1", "date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(),
                       "threads": args.threads, "repeats": args.repeats, "frames": args.frames, "audio_s": audio_s,
                       "upstream_s": seconds["upstream"], "ours_s": seconds["ours"], "ours_over_upstream": ratio},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
