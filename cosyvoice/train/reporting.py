"""Where training metrics go: stdout, a JSONL log, TensorBoard and (under Dagster) Pipes.

Tags: ``TRAIN`` (per logged step), ``CV`` (per evaluation), ``DATA`` (per epoch: the data
pipeline's counters by name, summed over workers and ranks). Only rank 0 reports. The Pipes client (``dagster-pipes``, a small dependency-free package, not
Dagster itself) is opened only when the launching process set it up, so the trainer runs the
same from a shell, ``torchrun`` or a Dagster asset.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

log = logging.getLogger("cosyvoice.train")

#: dense bf16 peak FLOP/s per GPU model (vendor datasheets, no sparsity), for MFU
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}


def peak_flops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    return None


class Reporter:
    def __init__(self, model_dir: str, tensorboard_dir: str | None, enabled: bool):
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        self.pipes = None
        self._pipes_cm = None
        if not enabled:
            return
        os.makedirs(model_dir, exist_ok=True)
        self.jsonl = open(os.path.join(model_dir, "train_log.jsonl"), "a")
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(tensorboard_dir)
        if os.environ.get("DAGSTER_PIPES_CONTEXT"):
            from dagster_pipes import open_dagster_pipes

            self._pipes_cm = open_dagster_pipes()
            self.pipes = self._pipes_cm.__enter__()

    def log(self, tag: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in values.items() if v is not None}
        record = {"tag": tag, "step": step, "time": time.time(), **clean}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(f"{tag}/{k}", v, step)
        text = " ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}" for k, v in clean.items())
        log.info("%s step %d %s", tag, step, text)
        if self.pipes is not None:
            self.pipes.log.info(f"{tag} step {step} {text}")
            self.pipes.report_custom_message({"tag": tag, "step": step, **clean})

    def report_result(self, metadata: dict) -> None:
        if self.pipes is not None:  # Pipes takes dicts and lists only as typed ("json") metadata values
            self.pipes.report_asset_materialization(metadata={
                k: {"raw_value": v, "type": "json"} if isinstance(v, (dict, list)) else v for k, v in metadata.items()})

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self._pipes_cm is not None:
            self._pipes_cm.__exit__(None, None, None)
