"""Resources, chosen per deployment by ``COSYVOICE_DEPLOYMENT`` (configuration, never code edits).

* ``embedded`` (default): corpus in ``./data/LibriTTS``, outputs in ``./data`` (both overridable
  with ``COSYVOICE_CORPUS_ROOT`` / ``COSYVOICE_DATA_ROOT``).
* ``distributed``: both roots must come from the environment (typically ``s3://`` URLs; the S3
  endpoint and credentials are read by ``cosyvoice.storage`` from the environment too).
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from cosyvoice import storage

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class CorpusResource(dg.ConfigurableResource):
    """Where the raw LibriTTS-shaped corpus lives: ``<root>/<subset>/<spk>/<chapter>/*.wav``."""

    root: str

    def subset_url(self, subset: str) -> str:
        return storage.join(self.root, subset)


class DataStore(dg.ConfigurableResource):
    """The data root every stage writes below: ``<root>/<stage>/<partition>/...``."""

    root: str

    def url(self, *parts: str) -> str:
        return storage.join(self.root, *parts)


class ModelStore(dg.ConfigurableResource):
    """Where the ONNX models live (the released files, or the reference models of ``make demo``)."""

    root: str
    campplus: str = "campplus.onnx"
    speech_tokenizer: str = "speech_tokenizer_v2.onnx"
    tokenizer_version: str = "v2"  # v1: 50 Hz, < 4096; v2/v3: 25 Hz, < 6561 (used by the checks)

    def url(self, name: str) -> str:
        return storage.join(self.root, name)


def deployment() -> str:
    name = os.environ.get("COSYVOICE_DEPLOYMENT", "embedded")
    if name not in ("embedded", "distributed"):
        raise ValueError(f"COSYVOICE_DEPLOYMENT must be 'embedded' or 'distributed', got {name!r}")
    return name


def resources_for(name: str) -> dict:
    if name == "distributed":
        return {
            "corpus": CorpusResource(root=dg.EnvVar("COSYVOICE_CORPUS_ROOT")),
            "store": DataStore(root=dg.EnvVar("COSYVOICE_DATA_ROOT")),
            "models": ModelStore(root=dg.EnvVar("COSYVOICE_MODEL_ROOT")),
        }
    data_root = os.environ.get("COSYVOICE_DATA_ROOT", str(PROJECT_ROOT / "data"))
    return {
        "corpus": CorpusResource(root=os.environ.get("COSYVOICE_CORPUS_ROOT", storage.join(data_root, "LibriTTS"))),
        "store": DataStore(root=data_root),
        "models": ModelStore(root=os.environ.get("COSYVOICE_MODEL_ROOT", storage.join(data_root, "models"))),
    }
