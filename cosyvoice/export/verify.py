"""Numerical verification of a written TensorRT-LLM checkpoint against the HF model it came from.

The baseline is the HF model with its weights rounded to the checkpoint's float dtype and run in
float32, so a float checkpoint must match to float32 round-off (any layout error is far larger),
and a quantized one shows its quantization error alone. Errors are measured on the speech rows of
the vocabulary (the only ids the exported head can produce), relative to the standard deviation of
the baseline logits, on held-out sequences.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch

from cosyvoice.storage import local_dir

#: documented bounds on max |logit error| / std(baseline logits), measured on the tiny random model
#: of the tests and the synthetic data (bench/quantization.md); argmax agreement lower bounds.
ERROR_BOUNDS = {"float32": 1e-4, "float16": 1e-3, "bfloat16": 1e-3, "W8A16": 0.2, "W4A16": 3.0, "SQ": 1.0,
                "INT8_KV": 0.2}
AGREEMENT_BOUNDS = {"W4A16": 0.6}
DEFAULT_AGREEMENT = 0.9


def mode_key(cfg: dict) -> str:
    algo = cfg["quantization"]["quant_algo"]
    if algo is None:
        return "INT8_KV" if cfg["quantization"]["kv_cache_quant_algo"] == "INT8" else cfg["dtype"]
    return "SQ" if algo.startswith("W8A8_SQ") else algo


@dataclass
class VerifyReport:
    mode: str
    sequences: int
    positions: int
    max_abs_error: float
    mean_abs_error: float
    relative_error: float  # max_abs_error / std of the baseline logits
    argmax_agreement: float
    error_bound: float
    agreement_bound: float
    passed: bool

    def as_metadata(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        return (f"{verdict}: {self.mode} on {self.sequences} held-out sequences ({self.positions} positions): max |dlogit| "
                f"{self.max_abs_error:.3g} ({self.relative_error:.3g} of the logit std, bound {self.error_bound:g}), "
                f"argmax agreement {self.argmax_agreement:.3f} (bound {self.agreement_bound:g})")


def baseline_model(hf_dir: str, dtype: str):
    """The HF model with weights rounded to ``dtype``, computing in float32."""
    from cosyvoice.export.hf import load_hf_model

    with local_dir(hf_dir) as folder:
        return load_hf_model(folder, round_to=getattr(torch, dtype))


def output_rows(hf_dir: str) -> range:
    from cosyvoice.export.hf import speech_vocab_of

    with local_dir(hf_dir) as folder:
        return speech_vocab_of(folder).output_ids


@torch.no_grad()
def compare_logits(baseline, reference, sequences: list[list[int]], rows: range) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated ``(baseline, reference)`` logits on ``rows`` over all positions of all sequences."""
    base, ref = [], []
    sl = slice(rows.start, rows.stop)
    for ids in sequences:
        base.append(baseline(input_ids=torch.tensor([ids])).logits[0, :, sl].float())
        ref.append(reference.logits(ids)[:, sl])
    return torch.cat(base), torch.cat(ref)


def verify_checkpoint(hf_dir: str, ckpt_dir: str, sequences: list[list[int]], *, error_bound: float | None = None,
                      agreement_bound: float | None = None, baseline=None) -> VerifyReport:
    """Reference forward of the checkpoint vs the HF model on ``sequences`` (HF ids); ``baseline``:
    an already loaded ``baseline_model(hf_dir, <checkpoint dtype>)`` to reuse."""
    from cosyvoice.export.reference_forward import ReferenceModel

    reference = ReferenceModel(ckpt_dir)
    mode = mode_key(reference.cfg)
    baseline = baseline if baseline is not None else baseline_model(hf_dir, reference.cfg["dtype"])
    base, ref = compare_logits(baseline, reference, sequences, output_rows(hf_dir))
    err = (ref - base).abs()
    rel = float(err.max() / base.std())
    agree = float((ref.argmax(-1) == base.argmax(-1)).float().mean())
    eb = ERROR_BOUNDS[mode] if error_bound is None else error_bound
    ab = AGREEMENT_BOUNDS.get(mode, DEFAULT_AGREEMENT) if agreement_bound is None else agreement_bound
    return VerifyReport(mode=mode, sequences=len(sequences), positions=base.shape[0], max_abs_error=float(err.max()),
                        mean_abs_error=float(err.mean()), relative_error=rel, argmax_agreement=agree, error_bound=eb,
                        agreement_bound=ab, passed=rel <= eb and agree >= ab)


def greedy_decode(logits_fn, prompt: list[int], steps: int, rows: range, bias: torch.Tensor | None = None) -> list[int]:
    """Greedy continuation (full recompute per step) restricted to the speech rows, with the
    exported logits bias when given; stops at nothing (fixed ``steps``) so runs compare position-wise."""
    ids = list(prompt)
    sl = slice(rows.start, rows.stop)
    for _ in range(steps):
        last = logits_fn(ids)[-1, sl]
        if bias is not None:
            last = last + bias[sl]
        ids.append(rows.start + int(last.argmax()))
    return ids[len(prompt):]


def checkpoint_bytes(ckpt_dir: str) -> int:
    with local_dir(ckpt_dir) as folder:
        with open(os.path.join(folder, "config.json")) as f:
            world = json.load(f)["mapping"]["world_size"]
        return sum(os.path.getsize(os.path.join(folder, f"rank{r}.safetensors")) for r in range(world))
