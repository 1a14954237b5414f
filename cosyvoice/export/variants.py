"""TensorRT-LLM checkpoint variants of one HF export: one calibration pass shared by the quantized
ones, each verified by the reference forward on held-out sequences. ``convert_variants`` is the
stage's one entry point: the ``trtllm_checkpoint`` asset runs several named presets,
``cosyvoice-pipeline convert-checkpoint`` one unnamed variant written to ``--output_dir`` itself, and
``bench/quantization.py`` the table of presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from cosyvoice import storage
from cosyvoice.export.trtllm import ConvertOptions, ConvertReport, convert_checkpoint
from cosyvoice.export.verify import VerifyReport, verify_checkpoint
from cosyvoice.storage import local_dir

#: quantization presets by name (combined with a dtype, alpha and tp size)
PRESETS: dict[str, dict] = {
    "none": {},
    "int8_weight_only": {"use_weight_only": True, "weight_only_precision": "int8"},
    "int4_weight_only": {"use_weight_only": True, "weight_only_precision": "int4"},
    "smoothquant": {"smoothquant": 0.5},
    "smoothquant_per_channel": {"smoothquant": 0.5, "per_channel": True},
    "smoothquant_per_token": {"smoothquant": 0.5, "per_token": True},
    "smoothquant_per_channel_per_token": {"smoothquant": 0.5, "per_channel": True, "per_token": True},
    "int8_kv_cache": {"int8_kv_cache": True},
}


def variant_options(preset: str, *, dtype: str = "bfloat16", smoothquant_alpha: float = 0.5, tp_size: int = 1) -> ConvertOptions:
    if preset not in PRESETS:
        raise ValueError(f"unknown quantization preset {preset!r}; choose from {sorted(PRESETS)}")
    opts = ConvertOptions(dtype=dtype, tp_size=tp_size, **PRESETS[preset])
    if opts.smoothquant is not None:
        opts = replace(opts, smoothquant=smoothquant_alpha)
    opts.quant_algo()  # validates
    return opts


def variant_name(preset: str, dtype: str, tp_size: int = 1) -> str:
    return f"{dtype}_{preset}" + (f"_tp{tp_size}" if tp_size > 1 else "")


@dataclass
class VariantResult:
    name: str
    convert: ConvertReport
    verify: VerifyReport | None  # None: no held-out data was given, nothing was verified

    def as_metadata(self) -> dict:
        verified = {k: v for k, v in asdict(self.verify).items() if k != "mode"} if self.verify else {}
        return {"name": self.name, "path": self.convert.output_dir, "quant_algo": self.convert.quant_algo,
                "kv_cache_quant_algo": self.convert.kv_cache_quant_algo, "bytes": self.convert.bytes, **verified}

    def summary(self) -> str:
        lines = [self.convert.summary()]
        if self.verify is not None:
            lines.append(self.verify.summary())
        return "\n".join(lines)


@dataclass
class VariantsReport:
    results: list[VariantResult]
    calibration: dict

    @property
    def passed(self) -> bool:
        """No variant failed its verification (unverified variants do not fail)."""
        return all(r.verify is None or r.verify.passed for r in self.results)

    def summary(self) -> str:
        return "\n".join((f"{r.name}: " if r.name else "") + r.summary().replace("\n", "; ") for r in self.results)


def convert_variants(hf_dir: str, out_root: str, variants: dict[str, ConvertOptions], *,
                     calib_data: str | None = None, verify_data: str | None = None, calib_size: int = 64,
                     verify_size: int = 16, max_len: int = 512) -> VariantsReport:
    """Write ``out_root/<name>`` for every variant (the variant named ``""`` is ``out_root`` itself),
    then, given ``verify_data`` (held out from ``calib_data``), verify each on ``verify_size`` of its
    sequences. ``calib_data`` is needed only when a variant is calibrated (SmoothQuant, int8 KV)."""
    from cosyvoice.export.quantize import calibrate, calibration_sequences
    from cosyvoice.export.verify import baseline_model

    results: list[VariantResult] = []
    with local_dir(hf_dir) as folder:
        calibration = None
        if any(o.needs_calibration for o in variants.values()):
            calibration = calibrate(folder, calib_data, size=calib_size, max_len=max_len)
        held_out = calibration_sequences(folder, verify_data, size=verify_size, max_len=max_len) if verify_data else None
        baselines: dict[str, object] = {}
        for name, opts in variants.items():
            out = storage.join(out_root, name) if name else out_root
            report = convert_checkpoint(folder, out, opts, calibration=calibration if opts.needs_calibration else None)
            verified = None
            if held_out is not None:
                if report.dtype not in baselines:
                    baselines[report.dtype] = baseline_model(folder, report.dtype)
                verified = verify_checkpoint(folder, out, held_out, baseline=baselines[report.dtype])
            results.append(VariantResult(name, report, verified))
    return VariantsReport(results, calibration[1] if calibration else {})
