"""Partitions: corpus subsets (static) and shards of the shard plan (dynamic, filled by the manifest).

A manifest partition is a subset, or one part of a subset that ``COSYVOICE_SUBSET_PARTS`` splits by
speaker-folder prefix (``train-other-500~3``, see ``cosyvoice/corpus/parts.py``); the split is read
once, when the code location loads, and a part key is a subset name everywhere downstream.
"""

import dagster as dg

from cosyvoice.corpus.manifest import LIBRITTS_SUBSETS
from cosyvoice.corpus.parts import manifest_partition_keys, parts_from_env

SUBSETS = dg.StaticPartitionsDefinition(manifest_partition_keys(LIBRITTS_SUBSETS, parts_from_env()))
SHARDS = dg.DynamicPartitionsDefinition(name="shards")
