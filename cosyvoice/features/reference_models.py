"""Seeded random-weight stand-ins for the released ONNX models, with the upstream signatures.

The released ``campplus.onnx`` / ``speech_tokenizer_v{1,2}.onnx`` cannot be downloaded here, so
tests, the demo and benchmarks run the *published reference architectures* (CAM++ from
``speakerlab``, S3Tokenizer v1/v2 from the ``s3tokenizer`` package) with seeded random weights:
realistic compute cost and the real code paths. A user points the pipeline at the released files
and nothing else changes.

==========================  ========================================  ================================
file                        inputs                                    output
==========================  ========================================  ================================
campplus.onnx               input float32 (1, T, 80)                  embedding float32 (1, 192)
speech_tokenizer_v1.onnx    feats float32 (1, 128, T), feats_length   indices int32 (1, T/2), < 4096
                            int32 (1,)                                (50 tokens per second)
speech_tokenizer_v2.onnx    same                                      indices int32 (1, T/4), < 6561
                                                                      (25 tokens per second)
speech_tokenizer_v2.        feats float32 (B, 128, T) zero-padded,    indices int32 (B, T/4),
batch.onnx                  feats_length int32 (B,)                   indices_length int32 (B,)
==========================  ========================================  ================================

The ``.batch`` model has the v2 model's weights (same seed) and masks the padding, so each row's
valid tokens equal the single-utterance model's; upstream uses such a file for online training
features (``speech_tokenizer_v2.batch.onnx``) and it enables batched GPU extraction.

``flow`` and ``hift`` are the acoustic models of a CosyVoice2 model dir (``flow.pt``, ``hift.pt`` in
the released layout, written by :func:`cosyvoice.acoustic.reference.write_acoustic_models`); with
either, the dir also gets the matching ``cosyvoice2.yaml``, so ``out`` is the model dir the Triton
repository expects (``cosyvoice2.yaml``, ``flow.pt``, ``hift.pt``, ``campplus.onnx``,
``speech_tokenizer_v2.onnx``).

``family="cosyvoice1"`` makes a CosyVoice-300M-layout dir instead: ``campplus.onnx``,
``speech_tokenizer_v1.onnx`` and the torch files of :func:`cosyvoice.acoustic.reference.write_v1_model_files`
(``llm.pt``, ``flow.pt``, ``hift.pt``, ``cosyvoice.yaml``, ``spk2info.pt``), the files of upstream's
released dir, so the pipeline runs the CosyVoice1 recipe against it as against the released one.

Needs the ``dev`` extra (torch, onnx, onnxscript, s3tokenizer, speakerlab-slim).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass

from cosyvoice import storage

ONNX_MODELS = ("campplus", "speech_tokenizer_v1", "speech_tokenizer_v2", "speech_tokenizer_v2.batch")
ACOUSTIC_MODELS = ("flow", "hift")
MODEL_NAMES = ONNX_MODELS + ACOUSTIC_MODELS
ACOUSTIC_CONFIG = "cosyvoice2.yaml"  # written (and recorded) with the acoustic models
#: CosyVoice1 (CosyVoice-300M): its front-end ONNX models and its torch files (cosyvoice.acoustic.reference.V1_PARTS)
V1_ONNX_MODELS = ("campplus", "speech_tokenizer_v1")
V1_TORCH_MODELS = ("llm", "flow", "hift", "spk2info")
FAMILIES = ("cosyvoice2", "cosyvoice1")
SPEC_FILE = "reference_models.json"
FORMAT_VERSION = 1  # bump when the export recipe changes, so stale models are rebuilt
ACOUSTIC_FORMAT_VERSION = 1  # the same for flow.pt / hift.pt / cosyvoice2.yaml


@dataclass(frozen=True)
class TokenizerSpec:
    codebook_size: int
    tokens_per_second: int


TOKENIZERS = {
    "speech_tokenizer_v1": TokenizerSpec(codebook_size=4096, tokens_per_second=50),
    "speech_tokenizer_v2": TokenizerSpec(codebook_size=6561, tokens_per_second=25),
    "speech_tokenizer_v2.batch": TokenizerSpec(codebook_size=6561, tokens_per_second=25),
}


def _tokenizer_config(size: str):
    from s3tokenizer.model import ModelConfig

    config = ModelConfig()  # always a fresh instance: S3TokenizerV2 mutates the one it is given
    if size == "tiny":
        config.n_audio_state, config.n_audio_head, config.n_audio_layer = 256, 4, 1  # head dim 64 (rotary)
    return config


def _build_v1(size: str):
    import torch
    from s3tokenizer.model import S3Tokenizer

    model = S3Tokenizer("speech_tokenizer_v1", _tokenizer_config(size)).eval()
    with torch.no_grad():  # the package initialises the codebook to zeros; use unit-norm random rows
        embed = torch.nn.functional.normalize(torch.randn_like(model.quantizer._codebook.embed), dim=-1)
        model.quantizer._codebook.embed.copy_(embed)

    class Export(torch.nn.Module):
        """Encoder + nearest-codeword search, written without the inference-mode decorators."""

        def __init__(self):
            super().__init__()
            self.encoder = model.encoder
            self.register_buffer("codebook", model.quantizer._codebook.embed.clone())

        def forward(self, feats, feats_length):
            hidden, _ = self.encoder(feats, feats_length)
            x = torch.nn.functional.normalize(hidden, p=2.0, dim=-1)
            scores = 2 * x @ self.codebook.t() - self.codebook.pow(2).sum(-1)
            return scores.argmax(dim=-1).to(torch.int32)

    return Export().eval()


def _build_v2(size: str, batched: bool = False):
    import torch
    from s3tokenizer.model_v2 import S3TokenizerV2

    model = S3TokenizerV2("speech_tokenizer_v2_25hz", _tokenizer_config(size)).eval()
    project = model.quantizer._codebook.project_down
    with torch.no_grad():  # random weights leave tanh() near 0 -> few codes; widen its range
        project.weight.mul_(30.0)

    class Export(torch.nn.Module):
        """Encoder + FSQ (8 ternary digits -> index < 3**8), written without inference-mode."""

        def __init__(self):
            super().__init__()
            self.encoder = model.encoder
            self.project_down = project
            self.register_buffer("powers", 3.0 ** torch.arange(8, dtype=torch.float32))

        def forward(self, feats, feats_length):
            hidden, lengths = self.encoder(feats, feats_length)
            digits = (self.project_down(hidden).float().tanh() * 0.999).round() + 1
            indices = (digits * self.powers).sum(-1).to(torch.int32)
            return (indices, lengths.to(torch.int32)) if batched else indices

    return Export().eval()


def _build_v2_batch(size: str):
    return _build_v2(size, batched=True)


def _build_campplus(size: str):
    from speakerlab.models.campplus.DTDNN import CAMPPlus

    del size  # CAM++ is small (6.9 M parameters); one size
    return CAMPPlus(feat_dim=80, embedding_size=192).eval()


def _export(name: str, model, path: str) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "campplus":
            example = (torch.randn(1, 200, 80),)
            torch.onnx.export(model, example, path, dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["embedding"],
                              dynamic_axes={"input": {1: "T"}})
        elif name.endswith(".batch"):
            feats = torch.randn(3, 128, 400)
            length = torch.tensor([400, 321, 157], dtype=torch.int32)
            b_dim, t_dim = torch.export.Dim("B", min=1, max=1024), torch.export.Dim("T", min=8, max=3000)
            torch.onnx.export(model, (feats, length), path, dynamo=True, external_data=False,
                              opset_version=18, input_names=["feats", "feats_length"],
                              output_names=["indices", "indices_length"],
                              dynamic_shapes={"feats": {0: b_dim, 2: t_dim}, "feats_length": {0: b_dim}})
        else:
            feats = torch.randn(1, 128, 400)
            length = torch.tensor([400], dtype=torch.int32)
            t_dim = torch.export.Dim("T", min=8, max=3000)
            torch.onnx.export(model, (feats, length), path, dynamo=True, external_data=False,
                              opset_version=18, input_names=["feats", "feats_length"],
                              output_names=["indices"],
                              dynamic_shapes={"feats": {2: t_dim}, "feats_length": None})


_BUILDERS = {"campplus": _build_campplus, "speech_tokenizer_v1": _build_v1, "speech_tokenizer_v2": _build_v2,
             "speech_tokenizer_v2.batch": _build_v2_batch}


def _file_of(name: str) -> str:
    from cosyvoice.acoustic.reference import FILES

    if name == ACOUSTIC_CONFIG:
        return FILES["config"]
    return FILES[name] if name in ACOUSTIC_MODELS else f"{name}.onnx"


def _up_to_date(out: str, name: str, wanted: dict, previous: dict) -> bool:
    url = storage.join(out, _file_of(name))
    if {k: previous.get(k) for k in wanted} != wanted or not storage.exists(url):
        return False
    return hashlib.sha256(storage.read_bytes(url)).hexdigest() == previous.get("sha256")


def _build_onnx(name: str, size: str, seed: int) -> bytes:
    import torch

    torch.manual_seed(seed)
    model = _BUILDERS[name](size)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.onnx")
        _export(name, model, path)
        with open(path, "rb") as f:
            return f.read()


def make_reference_models(out: str, *, seed: int = 0, size: str = "full",
                          models: list[str] | tuple[str, ...] | None = None, force: bool = False,
                          family: str = "cosyvoice2") -> dict:
    """Write ``<name>.onnx`` files (and ``flow.pt`` / ``hift.pt`` / ``cosyvoice2.yaml``) to ``out``;
    skip a file whose recorded spec and bytes match. ``models``: default every model of ``family``'s dir.

    Deterministic: the same seed and size give the same weights (and the same outputs).
    """
    if family == "cosyvoice1":
        return _make_v1_dir(out, seed=seed, size=size, models=models, force=force)
    if family != "cosyvoice2":
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    from cosyvoice.acoustic.reference import part_bytes

    models = MODEL_NAMES if models is None else models
    unknown = sorted(set(models) - set(MODEL_NAMES))
    if unknown:
        raise ValueError(f"unknown reference model(s) {unknown}; choose from {list(MODEL_NAMES)}")
    if size not in ("full", "tiny"):
        raise ValueError(f"size must be 'full' or 'tiny', got {size!r}")
    spec_url = storage.join(out, SPEC_FILE)
    recorded = json.loads(storage.read_text(spec_url)) if storage.exists(spec_url) else {}
    report: dict[str, dict] = {}
    names = list(models) + ([ACOUSTIC_CONFIG] if set(models) & set(ACOUSTIC_MODELS) else [])
    for name in names:
        if name in ONNX_MODELS:
            wanted = {"seed": seed, "size": size, "format": FORMAT_VERSION}
        elif name == ACOUSTIC_CONFIG:  # depends on the size only
            wanted = {"size": size, "format": ACOUSTIC_FORMAT_VERSION}
        else:
            wanted = {"seed": seed, "size": size, "format": ACOUSTIC_FORMAT_VERSION}
        previous = recorded.get(name, {})
        if not force and _up_to_date(out, name, wanted, previous):
            report[name] = {**previous, "status": "up to date"}
            continue
        if name in ONNX_MODELS:
            data = _build_onnx(name, size, seed)
        else:
            data = part_bytes("config" if name == ACOUSTIC_CONFIG else name, seed=seed, size=size)
        storage.write_bytes(storage.join(out, _file_of(name)), data)
        recorded[name] = {**wanted, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        report[name] = {**recorded[name], "status": "built"}
        storage.write_text(spec_url, json.dumps(recorded, indent=2, sort_keys=True) + "\n")
    return report


def _make_v1_dir(out: str, *, seed: int, size: str, models, force: bool) -> dict:
    """The CosyVoice1 dir: its ONNX models as above, then its torch files, each recorded in the same spec
    file and rebuilt only when its spec (seed, size, format, family) or bytes changed."""
    from cosyvoice.acoustic.reference import V1_FILES, v1_part_bytes

    models = V1_ONNX_MODELS + V1_TORCH_MODELS if models is None else tuple(models)
    unknown = sorted(set(models) - set(V1_ONNX_MODELS + V1_TORCH_MODELS))
    if unknown:
        raise ValueError(f"unknown CosyVoice1 reference model(s) {unknown}; choose from "
                         f"{list(V1_ONNX_MODELS + V1_TORCH_MODELS)}")
    onnx = [m for m in models if m in V1_ONNX_MODELS]
    report = make_reference_models(out, seed=seed, size=size, models=onnx, force=force) if onnx else {}
    spec_url = storage.join(out, SPEC_FILE)
    recorded = json.loads(storage.read_text(spec_url)) if storage.exists(spec_url) else {}
    torch_parts = [m for m in models if m in V1_TORCH_MODELS]
    for part in torch_parts + (["config"] if set(torch_parts) & {"llm", "flow", "hift"} else []):
        wanted = {"size": size, "format": ACOUSTIC_FORMAT_VERSION, "family": "cosyvoice1"}
        if part != "config":  # the recipe text depends on the size only
            wanted["seed"] = seed
        name = V1_FILES[part]
        url = storage.join(out, name)
        previous = recorded.get(name, {})
        if (not force and {k: previous.get(k) for k in wanted} == wanted and storage.exists(url)
                and hashlib.sha256(storage.read_bytes(url)).hexdigest() == previous.get("sha256")):
            report[name] = {**previous, "status": "up to date"}
            continue
        data = v1_part_bytes(part, seed=seed, size=size)
        storage.write_bytes(url, data)
        recorded[name] = {**wanted, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        report[name] = {**recorded[name], "status": "built"}
        storage.write_text(spec_url, json.dumps(recorded, indent=2, sort_keys=True) + "\n")
    return report
