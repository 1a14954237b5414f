"""``trtllm-build`` launcher: TensorRT-LLM checkpoint -> engine folder (``config.json`` + ``rank{r}.engine``).

TensorRT-LLM is not installable outside NVIDIA's images, so the build runs where ``trtllm-build``
exists (the TRT-LLM container on a GPU node: ``k8s/trtllm-engine-job.yaml`` or the ``trtllm_engine``
asset of the distributed deployment). Anywhere else it fails at once, naming the image.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass

from cosyvoice.export.trtllm import CONTAINER_IMAGE
from cosyvoice.storage import local_dir, upload_dir


class EngineBuildUnavailable(RuntimeError):
    """``trtllm-build`` is not on this machine."""


@dataclass
class EngineReport:
    output_dir: str
    command: list[str]
    engines: int
    bytes: int
    seconds: float

    def as_metadata(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return f"{self.engines} engine(s), {self.bytes / 1e6:.1f} MB at {self.output_dir} in {self.seconds:.1f} s"


def build_command(trtllm_build: str, checkpoint: str, output: str, *, max_batch_size: int, max_num_tokens: int,
                  gemm_plugin: str, extra_args: tuple[str, ...] = ()) -> list[str]:
    return [trtllm_build, "--checkpoint_dir", checkpoint, "--output_dir", output, "--max_batch_size", str(max_batch_size),
            "--max_num_tokens", str(max_num_tokens), "--gemm_plugin", gemm_plugin, *extra_args]


def build_engine(checkpoint_dir: str, output_dir: str, *, max_batch_size: int = 16, max_num_tokens: int = 32768,
                 gemm_plugin: str = "bfloat16", trtllm_build: str = "trtllm-build",
                 extra_args: tuple[str, ...] = ()) -> EngineReport:
    """Run ``trtllm-build`` (CosyVoice run.sh flags by default) and publish the engine folder."""
    exe = shutil.which(trtllm_build)
    if exe is None:
        raise EngineBuildUnavailable(
            f"{trtllm_build!r} is not on PATH: TensorRT-LLM engines are built inside the TensorRT-LLM container "
            f"({CONTAINER_IMAGE}) on a GPU node - run k8s/trtllm-engine-job.yaml, or materialize trtllm_engine in the "
            "distributed deployment")
    t0 = time.perf_counter()
    with local_dir(checkpoint_dir) as ckpt:
        config_path = os.path.join(ckpt, "config.json")
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"{checkpoint_dir}: no config.json - not a TensorRT-LLM checkpoint")
        with open(config_path) as f:
            world = json.load(f)["mapping"]["world_size"]
        missing = [f"rank{r}.safetensors" for r in range(world) if not os.path.exists(os.path.join(ckpt, f"rank{r}.safetensors"))]
        if missing:
            raise FileNotFoundError(f"{checkpoint_dir}: missing {missing} for world size {world}")
        with tempfile.TemporaryDirectory(prefix="trtllm-engine-") as out:
            cmd = build_command(exe, ckpt, out, max_batch_size=max_batch_size, max_num_tokens=max_num_tokens,
                                gemm_plugin=gemm_plugin, extra_args=extra_args)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"trtllm-build failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
            engines = [f"rank{r}.engine" for r in range(world)]
            absent = [e for e in ["config.json", *engines] if not os.path.exists(os.path.join(out, e))]
            if absent:
                raise RuntimeError(f"trtllm-build exited 0 but did not write {absent} in its output folder")
            sizes = upload_dir(out, output_dir)
    return EngineReport(output_dir=output_dir, command=cmd, engines=world, bytes=sum(sizes.values()),
                        seconds=time.perf_counter() - t0)
