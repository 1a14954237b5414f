"""The code location: ``dagster dev -w workspace.yaml`` / ``dagster ... -m pipelines.definitions``."""

import dagster as dg

from assets.manifest import manifest
from pipelines.resources import deployment, resources_for

manifest_job = dg.define_asset_job("manifest_job", selection=[manifest])

defs = dg.Definitions(
    assets=[manifest],
    jobs=[manifest_job],
    resources=resources_for(deployment()),
)
