"""Where every stage's data lives below the data root: one object, one method per location.

The assets, sensors and tests ask this object for a location by name (``manifest_dir(subset)``,
``shard_file(stage, shard)``, ``export_dir("engine", variant)`` ...) instead of joining path
strings, so the folder structure is written down once, here::

    <root>/manifest/<subset>/                      kaldi data dir + shards.json (the shard plan)
    <root>/speaker_embeddings/<subset>/<shard>.parquet   (+ <shard>.failed.tsv)
    <root>/speech_tokens/<subset>/<shard>.parquet        (+ <shard>.failed.tsv)
    <root>/speaker_means/<subset>.parquet
    <root>/parquet/<subset>/parquet_<index:09d>.tar      (+ .failed.tsv, utt2/spk2parquet json, data.list)
    <root>/train.data.list, <root>/cv.data.list
    <root>/llm/llm.pt, flow/flow.pt, hift/hift.pt  the averaged models (released file layouts)
    <root>/export/hf/, export/trtllm/<variant>/, export/engine/<variant>/
    <root>/triton/<name>/<version>/, <root>/triton/<name>-spk2info.pt

The root is a local folder or an ``s3://`` URL; locations are joined with ``storage.join`` so both
read the same. Nothing here touches Dagster.
"""

from __future__ import annotations

from dataclasses import dataclass

from cosyvoice import storage
from cosyvoice.acoustic import FLOW_FILE, HIFT_FILE
from cosyvoice.corpus.shard_plan import PLAN_FILE, ShardKey, read_plan
from cosyvoice.problems import failures_next_to
from cosyvoice.shards.make_parquet import parquet_name

#: the per-shard feature stages: ``<root>/<stage>/<subset>/<shard>.parquet``
FEATURE_STAGES = ("speaker_embeddings", "speech_tokens")
#: the per-shard training-shard stage: ``<root>/parquet/<subset>/parquet_<index:09d>.tar``
PARQUET_STAGE = "parquet_shards"
#: what ``export_dir`` knows: the HF export (one folder) and the per-variant TensorRT-LLM outputs
EXPORT_KINDS = {"hf": False, "trtllm": True, "engine": True}  # kind -> has variants
#: the averaged models ``model_file`` knows: name -> ``<root>/<name>/<file>`` (the released file names)
MODEL_FILES = {"llm": "llm.pt", "flow": FLOW_FILE, "hift": HIFT_FILE}


def _key(shard: ShardKey | str) -> ShardKey:
    return shard if isinstance(shard, ShardKey) else ShardKey.parse(shard)


def _name(value: str, what: str) -> str:
    """One path segment from configuration (a subset, variant or repository name): never empty,
    never a folder of its own and never a way out of the data root."""
    if not value or "/" in value or "\\" in value or value in (".", ".."):
        raise ValueError(f"{value!r} is not a name for {what} (one path segment, no '/')")
    return value


@dataclass(frozen=True)
class DataLayout:
    """The locations below one data root (a local folder or an object-store URL)."""

    root: str

    def _at(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    # --- manifest ------------------------------------------------------------------------------

    def manifest_dir(self, subset: str) -> str:
        """The subset's kaldi data dir (wav.scp, text, utt2spk, spk2utt, shards.json, quarantine.tsv)."""
        return self._at("manifest", _name(subset, "a subset"))

    def shard_plan_file(self, subset: str) -> str:
        """``shards.json``: the subset's shard plan, written last by the manifest (= manifest complete)."""
        return storage.join(self.manifest_dir(subset), PLAN_FILE)

    def has_shard_plan(self, subset: str) -> bool:
        return storage.exists(self.shard_plan_file(subset))

    def shard_plan(self, subset: str) -> dict[str, list[str]]:
        """The subset's shard plan ``{shard key: [utt, ...]}``, read and validated."""
        return read_plan(self.shard_plan_file(subset))

    # --- per-shard outputs ---------------------------------------------------------------------

    def shard_file(self, stage: str, shard: ShardKey | str) -> str:
        """The output file of one shard of a per-shard stage (``speaker_embeddings``,
        ``speech_tokens``: ``<shard>.parquet``; ``parquet_shards``: ``parquet_<index:09d>.tar``)."""
        key = _key(shard)
        if stage == PARQUET_STAGE:
            return storage.join(self.parquet_dir(key.subset), parquet_name(key.index))
        if stage not in FEATURE_STAGES:
            raise ValueError(f"{stage!r} is not a per-shard stage (one of {', '.join((*FEATURE_STAGES, PARQUET_STAGE))})")
        return self._at(stage, key.subset, f"{key}.parquet")

    def shard_failures(self, stage: str, shard: ShardKey | str) -> str:
        """The quarantine list of one shard of a per-shard stage: ``<output stem>.failed.tsv`` beside it."""
        return failures_next_to(self.shard_file(stage, shard))

    def speaker_means(self, subset: str) -> str:
        """The subset's per-speaker mean embeddings."""
        return self._at("speaker_means", f"{_name(subset, 'a subset')}.parquet")

    def parquet_dir(self, subset: str) -> str:
        """The subset's training shards with their JSON indexes and its ``data.list``."""
        return self._at("parquet", _name(subset, "a subset"))

    # --- training ------------------------------------------------------------------------------

    def train_list(self) -> str:
        """``train.data.list``: every training shard of the train subsets, one URL a line."""
        return self._at("train.data.list")

    def cv_list(self) -> str:
        """``cv.data.list``: the held-out shards the CV loss (and the CV gate) is measured on."""
        return self._at("cv.data.list")

    def model_file(self, name: str) -> str:
        """``<name>/<file>`` of an averaged model: ``llm/llm.pt``, ``flow/flow.pt``, ``hift/hift.pt``
        (plain state dicts in the released layouts)."""
        if name not in MODEL_FILES:
            raise ValueError(f"{name!r} is not an averaged model (one of {', '.join(MODEL_FILES)})")
        return self._at(name, MODEL_FILES[name])

    def llm_model(self) -> str:
        """``llm/llm.pt``: the averaged LLM (a plain state dict)."""
        return self.model_file("llm")

    # --- export and serving --------------------------------------------------------------------

    def export_dir(self, kind: str, variant: str | None = None) -> str:
        """``export/hf`` (no variant), ``export/trtllm`` / ``export/engine`` (all variants) or
        ``export/<kind>/<variant>`` (one variant)."""
        if kind not in EXPORT_KINDS:
            raise ValueError(f"{kind!r} is not an export kind (one of {', '.join(EXPORT_KINDS)})")
        if variant is None:
            return self._at("export", kind)
        if not EXPORT_KINDS[kind]:
            raise ValueError(f"export kind {kind!r} has no variants (got {variant!r})")
        return self._at("export", kind, _name(variant, "an export variant"))

    def triton_root(self, name: str) -> str:
        """The versioned Triton repository ``name`` (``<version>/``, ``LATEST``, ``LATEST-cpu``)."""
        return self._at("triton", _name(name, "a Triton repository"))

    def spk2info(self, name: str) -> str:
        """The speaker-prompt cache published with the Triton repository ``name``."""
        return self._at("triton", f"{_name(name, 'a Triton repository')}-spk2info.pt")
