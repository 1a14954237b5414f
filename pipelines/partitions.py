"""Partitions: corpus subsets (static) and shards of the shard plan (dynamic, filled by the manifest)."""

import dagster as dg

from cosyvoice.corpus.manifest import LIBRITTS_SUBSETS

SUBSETS = dg.StaticPartitionsDefinition(list(LIBRITTS_SUBSETS))
SHARDS = dg.DynamicPartitionsDefinition(name="shards")
