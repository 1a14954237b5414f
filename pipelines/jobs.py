"""Jobs: named selections of the asset graph that schedules, sensors and people launch.

* ``prepare_subset`` (partitioned by subset): the manifest of one subset. Its shard keys only exist
  once the manifest ran, so the per-shard work (features -> speaker means -> parquet shards) is
  launched right after a successful ``prepare_subset`` run by ``prepare_subset_shards``
  (pipelines/sensors.py) as one asset backfill over exactly that subset's shards.
* ``retrain``: the training data lists plus every asset of the ``training`` group: the LLM, flow
  and HiFT checkpoints and their averages (and whatever groups are added to ``RETRAIN_GROUPS``
  later, e.g. export/publish). Selecting by group keeps this valid whether or not the training
  assets are loaded. What is trained is the ``training`` resource's recipe (``COSYVOICE_TRAIN_RECIPE``:
  CosyVoice2 by default, ``configs/cosyvoice.yaml`` for CosyVoice1); each checkpoint refuses to launch on
  speech tokens of another generation, and its CV gate compares only within the recipe's family.
"""

import dagster as dg

from assets.features import speaker_embeddings, speaker_means, speech_tokens, upstream_feature_files
from assets.manifest import manifest
from assets.shards import parquet_shards, training_data_lists

#: asset groups that a retraining run rebuilds after the data lists
RETRAIN_GROUPS = ("training",)

#: what ``prepare_subset_shards`` backfills for the shards of a freshly prepared subset (per shard)
SHARD_ASSETS = (speaker_embeddings, speech_tokens, parquet_shards)
#: ... and per subset
SUBSET_ASSETS = (speaker_means, upstream_feature_files)

prepare_subset = dg.define_asset_job(
    "prepare_subset",
    selection=[manifest],  # partitioned by subset, like the manifest
    description="Manifest of one corpus subset; on success its shards' features and parquet shards are "
                "backfilled (sensor prepare_subset_shards).",
    tags={"cosyvoice/stage": "data_prep"},
)

retrain_selection = dg.AssetSelection.assets(training_data_lists) | dg.AssetSelection.groups(*RETRAIN_GROUPS)

retrain = dg.define_asset_job(
    "retrain",
    selection=retrain_selection,
    description="Training data lists over every prepared subset, then training (LLM, flow, HiFT) and checkpoint "
                "averaging.",
    tags={"cosyvoice/stage": "training"},
)
