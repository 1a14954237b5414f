"""ONNX Runtime sessions configured like the upstream tools (ENABLE_ALL, explicit providers)."""

from __future__ import annotations

import onnxruntime as ort


def providers_for(device: str) -> list:
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("device 'cuda' needs onnxruntime-gpu (pip install '.[gpu]') and a CUDA device")
        # TF32 off: with it, a fraction of tokens flips against the fp32 reference
        return [("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"]
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


def make_session(path: str, *, device: str = "cpu", threads: int = 1) -> ort.InferenceSession:
    """One session; ``threads`` intra-op threads (upstream uses 1 and parallelises outside)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    from cosyvoice import storage

    model = path if storage.is_local(path) else storage.read_bytes(path)
    return ort.InferenceSession(model, sess_options=options, providers=providers_for(device))
