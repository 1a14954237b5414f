"""Seeded random-weight acoustic models in the released model-dir layout.

The released ``flow.pt`` / ``hift.pt`` cannot be downloaded here, so tests, the demo and the
benchmarks use files with the same keys, shapes and format (plain state dicts written with
``torch.save``; HiFT's weight-normed convolutions as ``weight_g`` / ``weight_v``) and seeded random
values, plus the ``cosyvoice2.yaml`` that describes them (a copy of ``configs/cosyvoice2.yaml`` or
``configs/cosyvoice2-tiny.yaml``). A user points the pipeline at a released model dir and nothing
else changes.

CosyVoice1 (CosyVoice-300M): :func:`write_v1_model_files` writes the torch files of upstream's released
dir -- ``llm.pt`` (TransformerLM), ``flow.pt`` (``MaskedDiffWithXvec``), ``hift.pt`` (22.05 kHz), the
``cosyvoice.yaml`` that sizes them (``configs/cosyvoice.yaml`` or ``configs/cosyvoice-tiny.yaml``) and an
SFT-style ``spk2info.pt``; the modules are built from that yaml (LLM through the recipe loader, flow and
HiFT from :func:`~cosyvoice.acoustic.recipe.acoustic_configs_v1`), so the files load strictly with the
real loaders of the released ones (``load_flow_v1``, ``load_hift``, ``TransformerLM.load_state_dict``).
``cosyvoice.features.reference_models.make_reference_models(family="cosyvoice1")`` adds the ONNX files.

Weights: PyTorch's default initialisation drawn from ``seed`` (in a forked RNG, so the caller's
global generator is untouched), then every parameter that initialisation leaves constant (norm
gains and biases, Snake ``alpha``, the attention position biases) is moved by a small seeded
perturbation, so no tensor of a reference file is trivially uniform. Same seed and size, same
bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable

from cosyvoice import storage
from cosyvoice.acoustic import CONFIG_FILE, CONFIG_FILE_V1, FLOW_FILE, HIFT_FILE

SIZES = ("full", "tiny")
PARTS = ("flow", "hift", "config")
FILES = {"flow": FLOW_FILE, "hift": HIFT_FILE, "config": CONFIG_FILE}
CONFIG_FILES = {"full": "cosyvoice2.yaml", "tiny": "cosyvoice2-tiny.yaml"}
#: CosyVoice1: the torch parts of a released CosyVoice-300M dir, their files and the recipes that size them
V1_PARTS = ("llm", "flow", "hift", "config", "spk2info")
V1_FILES = {"llm": "llm.pt", "flow": FLOW_FILE, "hift": HIFT_FILE, "config": CONFIG_FILE_V1, "spk2info": "spk2info.pt"}
V1_CONFIG_FILES = {"full": "cosyvoice.yaml", "tiny": "cosyvoice-tiny.yaml"}
#: the speaker an SFT-style spk2info.pt of a reference dir holds (the key the BLS falls back to)
REFERENCE_SPEAKER = "001"
PERTURBATION = 0.1  # std of the noise added to parameters the default initialisation leaves constant


def configs_dir() -> str:
    """The project's ``configs/`` folder: next to the package in a checkout, else in the working
    directory (the images copy it to their WORKDIR)."""
    beside = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
    for folder in (beside, os.path.abspath("configs")):
        if os.path.isfile(os.path.join(folder, CONFIG_FILES["full"])):
            return folder
    raise FileNotFoundError(f"no configs/{CONFIG_FILES['full']} in {beside} or the working directory "
                            f"{os.getcwd()}; run from the project checkout (or its image's WORKDIR)")


def config_text(size: str) -> str:
    """The recipe text a ``size`` model dir carries as its ``cosyvoice2.yaml``."""
    _check_size(size)
    with open(os.path.join(configs_dir(), CONFIG_FILES[size]), encoding="utf-8") as f:
        return f.read()


def v1_config_text(size: str) -> str:
    """The recipe text a ``size`` CosyVoice1 model dir carries as its ``cosyvoice.yaml``."""
    _check_size(size)
    path = os.path.join(configs_dir(), V1_CONFIG_FILES[size])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the CosyVoice1 recipe that sizes a {size} reference dir is missing")
    with open(path, encoding="utf-8") as f:
        return f.read()


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")


def _perturb_constant_parameters(model, torch) -> None:
    with torch.no_grad():
        for param in model.parameters():
            flat = param.detach().reshape(-1)
            if flat.numel() and bool((flat == flat[0]).all()):
                param.add_(torch.randn_like(param) * PERTURBATION)


def seeded_module(build, seed: int):
    """``build()`` under torch seeded with ``seed`` (the global RNG restored afterwards), constant
    parameters (norm gains, biases) perturbed so a swapped key shows; in eval mode. Shared by the
    reference models and the CosyVoice1 oracles (bench/upstream_*_v1.py)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
        _perturb_constant_parameters(model, torch)
    return model.eval()


def seeded_state_dict(build, seed: int) -> dict:
    """The state dict of :func:`seeded_module` as plain contiguous tensors (what a released file holds)."""
    return {key: value.detach().contiguous() for key, value in seeded_module(build, seed).state_dict().items()}


def flow_state(seed: int, size: str) -> dict:
    """The seeded random flow's state dict, in the released ``flow.pt`` layout (a plain dict)."""
    from cosyvoice.acoustic.flow import FlowConfig, FlowModel

    _check_size(size)
    config = FlowConfig.full() if size == "full" else FlowConfig.tiny()
    return seeded_state_dict(lambda: FlowModel(config), seed)


def hift_state(seed: int, size: str) -> dict:
    """The seeded random vocoder's tensors in the released ``hift.pt`` naming (``weight_g``/``weight_v``)."""
    from cosyvoice.acoustic.hift import HiFTConfig, HiFTGenerator, hift_state_dict

    _check_size(size)
    config = HiFTConfig.full() if size == "full" else HiFTConfig.tiny()
    return dict(hift_state_dict(seeded_module(lambda: HiFTGenerator(config), seed)))


def llm_v1_state(seed: int, size: str) -> dict:
    """The seeded random TransformerLM of the ``size`` CosyVoice1 recipe, in the released ``llm.pt`` layout.
    Built through the recipe loader with the recipe's own ``__set_seed*`` calls left out, so ``seed`` decides."""
    from cosyvoice.config import load_recipe, training_overrides

    text = v1_config_text(size)
    overrides = {**training_overrides("llm"), **{f"__set_seed{i}": None for i in range(1, 5)}}
    return seeded_state_dict(lambda: load_recipe(text, overrides)["llm"], seed)


def flow_v1_state(seed: int, size: str) -> dict:
    """The seeded random CosyVoice1 flow (``MaskedDiffWithXvec`` layout) sized by the ``size`` recipe."""
    from cosyvoice.acoustic.flow_v1 import FlowV1Model
    from cosyvoice.acoustic.recipe import acoustic_configs_v1

    flow, _ = acoustic_configs_v1(v1_config_text(size))
    return seeded_state_dict(lambda: FlowV1Model(flow), seed)


def hift_v1_state(seed: int, size: str) -> dict:
    """The seeded random 22.05 kHz vocoder sized by the ``size`` CosyVoice1 recipe (``weight_g``/``weight_v``)."""
    from cosyvoice.acoustic.hift import HiFTGenerator, hift_state_dict
    from cosyvoice.acoustic.recipe import acoustic_configs_v1

    _, hift = acoustic_configs_v1(v1_config_text(size))
    return dict(hift_state_dict(seeded_module(lambda: HiFTGenerator(hift), seed)))


def spk2info_v1(seed: int) -> dict:
    """An SFT-style ``spk2info.pt`` table (upstream ``frontend_sft`` reads ``[spk]["embedding"]``, (1, 192)):
    one seeded speaker, :data:`REFERENCE_SPEAKER`."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return {REFERENCE_SPEAKER: {"embedding": torch.randn(1, 192, generator=generator)}}


def v1_part_bytes(part: str, *, seed: int, size: str) -> bytes:
    """The bytes of one CosyVoice1 model-dir file (one of :data:`V1_PARTS`)."""
    builders = {"llm": llm_v1_state, "flow": flow_v1_state, "hift": hift_v1_state}
    if part in builders:
        return _tensor_bytes(builders[part](seed, size))
    if part == "spk2info":
        return _tensor_bytes(spk2info_v1(seed))
    if part == "config":
        return v1_config_text(size).encode("utf-8")
    raise ValueError(f"unknown CosyVoice1 model part {part!r}; choose from {V1_PARTS}")


def write_v1_model_files(out: str, *, seed: int = 0, size: str = "full",
                         parts: tuple[str, ...] | list[str] = V1_PARTS) -> dict[str, dict]:
    """Write the CosyVoice1 torch files (``llm.pt``, ``flow.pt``, ``hift.pt``, ``cosyvoice.yaml``,
    ``spk2info.pt``, or the ``parts`` asked for) into ``out``, atomically and only when the bytes differ.
    Returns, per part, ``{"file", "sha256", "bytes", "changed"}``."""
    return _write_parts(out, parts, V1_FILES, lambda part: v1_part_bytes(part, seed=seed, size=size),
                        size=size, what="CosyVoice1 model")


def _tensor_bytes(state: dict) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def part_bytes(part: str, *, seed: int, size: str) -> bytes:
    """The bytes of one model-dir file (``flow``, ``hift`` or ``config``)."""
    if part == "flow":
        return _tensor_bytes(flow_state(seed, size))
    if part == "hift":
        return _tensor_bytes(hift_state(seed, size))
    if part == "config":
        return config_text(size).encode("utf-8")
    raise ValueError(f"unknown acoustic model part {part!r}; choose from {PARTS}")


def write_acoustic_models(out: str, *, seed: int = 0, size: str = "full",
                          parts: tuple[str, ...] | list[str] = PARTS) -> dict[str, dict]:
    """Write ``flow.pt``, ``hift.pt`` and ``cosyvoice2.yaml`` (or the ``parts`` asked for) into ``out``.

    Each file is written atomically (and left alone when identical bytes are there). Returns, per
    part, ``{"file", "sha256", "bytes", "changed"}``.
    """
    return _write_parts(out, parts, FILES, lambda part: part_bytes(part, seed=seed, size=size),
                        size=size, what="acoustic model")


def _write_parts(out: str, parts, files: dict[str, str], build: Callable[[str], bytes], *, size: str,
                 what: str) -> dict[str, dict]:
    """Write each part's bytes to its file of ``files`` in ``out`` (both generations' writers: one
    atomic, compare-before-write loop and one report shape)."""
    _check_size(size)
    unknown = sorted(set(parts) - set(files))
    if unknown:
        raise ValueError(f"unknown {what} part(s) {unknown}; choose from {list(files)}")
    report: dict[str, dict] = {}
    for part in parts:
        data = build(part)
        written = storage.write_bytes(storage.join(out, files[part]), data)
        report[part] = {"file": files[part], "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                        "changed": written.changed}
    return report
