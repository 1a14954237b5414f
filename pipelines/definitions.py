"""The code location: ``dagster dev -w workspace.yaml`` / ``dagster ... -m pipelines.definitions``."""

import dagster as dg

from assets.export import EXPORT_ASSETS
from assets.export import default_selection as export_selection
from assets.features import speaker_embeddings, speaker_means, speech_tokens, upstream_feature_files
from assets.manifest import manifest
from assets.serving import triton_model_repo
from assets.shards import parquet_shards, training_data_lists
from assets.training import TRAINING_ASSETS
from pipelines.executors import executor_for
from pipelines.jobs import prepare_subset, retrain
from pipelines.resources import deployment, resources_for
from pipelines.schedules import retrain_schedule
from pipelines.sensors import corpus_sensor, prepare_subset_shards, report_run_failures

manifest_job = dg.define_asset_job("manifest_job", selection=[manifest])
features_job = dg.define_asset_job("features_job", selection=[speaker_embeddings, speech_tokens, parquet_shards])
export_job = dg.define_asset_job("export_job", selection=export_selection(deployment()))

defs = dg.Definitions(
    assets=[manifest, speaker_embeddings, speech_tokens, speaker_means, upstream_feature_files, parquet_shards,
            training_data_lists, *TRAINING_ASSETS, *EXPORT_ASSETS, triton_model_repo],
    jobs=[manifest_job, features_job, export_job, prepare_subset, retrain],
    schedules=[retrain_schedule],
    sensors=[corpus_sensor, prepare_subset_shards, report_run_failures],
    resources=resources_for(deployment()),
    executor=executor_for(deployment()),
)
