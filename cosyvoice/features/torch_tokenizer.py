"""The S3 tokenizer as a torch module whose weights are read from the ONNX file.

Why a second runtime next to onnxruntime: on a GPU the torch module computes the whisper log-mel
on the device, runs length-sorted padded batches with masks, and can run in bf16 (which
onnxruntime cannot). The architecture is the ``s3tokenizer`` package's (the one upstream's Triton
``audio_tokenizer`` loads the released file into); only the weights come from the ``.onnx``:

* files exported from torch (our reference models) keep the parameter names, except Linear
  weights and deduplicated constants, which are found through the module scope the exporter
  records on each node;
* the released files (legacy exporter, anonymous initializers) are mapped by
  ``s3tokenizer.utils.onnx2torch``, the package's loader written for exactly those files.

fp32 with TF32 disabled gives the onnxruntime tokens; bf16 is opt-in and reports its agreement with
fp32 on a sample, because a few percent of tokens flip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cosyvoice import storage

PRECISIONS = ("fp32", "bf16")
HEAD_DIM = 64  # rotary embeddings of both tokenizer generations use 64-wide heads


@dataclass(frozen=True)
class TokenizerWeights:
    version: str  # "v1" | "v2"
    state_dict: dict[str, torch.Tensor]


def _initializers(model) -> dict[str, torch.Tensor]:
    from onnx import numpy_helper

    return {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}


def _module_scope(node) -> str | None:
    """The torch module a node was exported from (torch.onnx's ``name_scopes`` metadata)."""
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = ast.literal_eval(prop.value)
            return scopes[-2] if len(scopes) >= 2 else None
    return None


def _torch_export_weights(model, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights of a file exported from torch: parameters keep their names, except Linear weights,
    which the exporter folds into anonymous transposed constants of a MatMul, and parameters with
    equal values, which it stores once (e.g. freshly initialised LayerNorms). Both are found
    through the consuming node's module scope."""
    state = {k: v for k, v in named.items() if not k.startswith("val_")}
    for node in model.graph.node:
        if node.op_type == "MatMul":
            for name in node.input:
                if name in named and name.startswith("val_") and named[name].dim() == 2:
                    scope = _module_scope(node)
                    if scope:
                        state[f"{scope}.weight"] = named[name].t().contiguous()
        elif node.op_type == "LayerNormalization" and (scope := _module_scope(node)):
            for role, name in zip(("weight", "bias"), node.input[1:3]):
                if name in named:
                    state[f"{scope}.{role}"] = named[name]
    return state


def read_weights(onnx_path: str) -> TokenizerWeights:
    """The tokenizer's torch state dict from a ``speech_tokenizer_v1/v2[.batch].onnx``."""
    import onnx

    model = onnx.load_from_string(storage.read_bytes(onnx_path))
    if any(t.name == "encoder.conv1.weight" for t in model.graph.initializer):  # exported from torch
        exported = _torch_export_weights(model, _initializers(model))
        state = {k: v for k, v in exported.items() if k.startswith("encoder.") and k != "encoder.freqs_cis"}
        if "project_down.weight" in exported:
            state["quantizer._codebook.project_down.weight"] = exported["project_down.weight"]
            state["quantizer._codebook.project_down.bias"] = exported["project_down.bias"]
            return TokenizerWeights("v2", state)
        if "codebook" in exported:
            state["quantizer._codebook.embed"] = exported["codebook"]
            return TokenizerWeights("v1", state)
        raise ValueError(f"{onnx_path}: neither an FSQ projection (v2) nor a codebook (v1) among its weights")
    import os
    import tempfile

    from s3tokenizer.utils import onnx2torch

    with tempfile.TemporaryDirectory() as tmp:  # onnx2torch wants a local path; the file may be remote
        local = onnx_path
        if not storage.is_local(onnx_path):
            local = os.path.join(tmp, "tokenizer.onnx")
            with open(local, "wb") as f:
                f.write(model.SerializeToString())
        try:
            state = onnx2torch(storage.strip_protocol(local), None, False)
        except (AssertionError, KeyError) as exc:  # the package asserts on names it does not know
            raise ValueError(f"{onnx_path}: not an S3 speech tokenizer ({type(exc).__name__}: {exc})") from exc
    if not any(k.startswith("encoder.conv1.") for k in state):
        raise ValueError(f"{onnx_path}: not an S3 speech tokenizer (no encoder.conv1 weights)")
    return TokenizerWeights("v2" if any("project_down" in k for k in state) else "v1", state)


def build_module(weights: TokenizerWeights, *, use_sdpa: bool = False) -> torch.nn.Module:
    """``S3Tokenizer`` / ``S3TokenizerV2`` sized from the weights, loaded strictly."""
    from s3tokenizer.model import ModelConfig

    state = weights.state_dict
    conv1 = state["encoder.conv1.weight"]
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.blocks."))
    config = ModelConfig()
    config.n_mels, config.n_audio_state = conv1.shape[1], conv1.shape[0]
    config.n_audio_head, config.n_audio_layer = conv1.shape[0] // HEAD_DIM, layers
    config.use_sdpa = use_sdpa
    if weights.version == "v2":
        from s3tokenizer.model_v2 import S3TokenizerV2

        module = S3TokenizerV2("speech_tokenizer_v2_25hz", config)
    else:
        from s3tokenizer.model import S3Tokenizer

        config.n_audio_ctx = state["encoder.positional_embedding"].shape[0]
        config.n_codebook_size = state["quantizer._codebook.embed"].shape[0]
        module = S3Tokenizer("speech_tokenizer_v1", config)
    module.load_state_dict(state, strict=True)
    return module.eval()


class TorchSpeechTokenizer:
    """Mel on ``device``, masked padded batches, fp32 (TF32 off) or bf16 autocast."""

    def __init__(self, onnx_path: str, *, device: str = "cpu", precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' needs a CUDA device and a CUDA build of torch")
        if device == "cuda":  # TF32 flips a fraction of tokens against the fp32 reference
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.device, self.precision = torch.device(device), precision
        weights = read_weights(onnx_path)
        self.version = weights.version
        # the unfused attention is what the ONNX graphs compute; SDPA only where bf16 gives up identity anyway
        self.module = build_module(weights, use_sdpa=precision == "bf16").to(self.device)
        self._fp32_module: torch.nn.Module | None = self.module if precision == "fp32" else None
        self._weights = weights if precision != "fp32" else None

    def log_mel(self, audio_16k: torch.Tensor) -> torch.Tensor:
        """``(128, T)`` whisper log-mel of a ``(1, N)`` 16 kHz signal, computed on the device."""
        import whisper

        return whisper.log_mel_spectrogram(audio_16k[0].to(self.device, non_blocking=True), n_mels=128)

    def tokens(self, mels: list[torch.Tensor], *, precision: str | None = None) -> list[list[int]]:
        """Tokens of each ``(128, T_i)`` mel (T_i <= 3000), batched with zero padding and lengths."""
        if not mels:
            return []
        precision = precision or self.precision
        module = self.module if precision == self.precision else self._reference_module()
        lengths = torch.tensor([m.shape[1] for m in mels], dtype=torch.int32, device=self.device)
        feats = torch.zeros(len(mels), mels[0].shape[0], int(lengths.max()), device=self.device)
        for i, mel in enumerate(mels):
            feats[i, :, :mel.shape[1]] = mel
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        with torch.inference_mode(), autocast:
            codes, code_lengths = module.quantize(feats, lengths)
        codes, code_lengths = codes.cpu(), code_lengths.cpu()
        return [codes[i, :int(code_lengths[i])].tolist() for i in range(len(mels))]

    def release_cached_memory(self) -> None:
        """After a failed batch (typically out of device memory) before retrying smaller ones."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _reference_module(self) -> torch.nn.Module:
        """The fp32 module, built on first use (bf16 runs compare a sample against it)."""
        if self._fp32_module is None:
            self._fp32_module = build_module(self._weights).to(self.device)
        return self._fp32_module


def agreement(candidate: list[list[int]], reference: list[list[int]]) -> float:
    """Fraction of reference tokens reproduced at the same position (a length change counts its tail)."""
    total = sum(len(r) for r in reference)
    same = sum(sum(a == b for a, b in zip(c, r)) for c, r in zip(candidate, reference))
    return same / total if total else 1.0
