"""The project's Definitions with another backfill batch size, for ``bench/control_plane.py --batch``.

``COSYVOICE_BENCH_SHARDS_PER_RUN`` replaces ``assets._per_shard.BACKFILL`` before the per-shard assets are
defined, so the code location is ``pipelines.definitions:defs`` in every other respect. Without the
variable this module is exactly ``pipelines.definitions``.
"""

import os
import sys

import dagster as dg

import assets._per_shard as per_shard

if "assets.features" in sys.modules:
    raise RuntimeError("bench.control_plane_defs must be imported before the asset modules to change their batch")
_batch = int(os.environ.get("COSYVOICE_BENCH_SHARDS_PER_RUN", per_shard.SHARDS_PER_RUN))
per_shard.SHARDS_PER_RUN, per_shard.BACKFILL = _batch, dg.BackfillPolicy.multi_run(_batch)

from pipelines.definitions import defs  # noqa: E402  (after the batch is set)

__all__ = ["defs"]
