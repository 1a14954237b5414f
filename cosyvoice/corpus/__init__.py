"""LibriTTS scanning, audio header validation, kaldi-style data dirs and the shard plan."""

from cosyvoice.corpus.audio import AudioInfo, AudioProblem, probe_audio
from cosyvoice.corpus.kaldi import DataDir, read_data_dir
from cosyvoice.corpus.manifest import LIBRITTS_SUBSETS, ManifestReport, prepare_libritts
from cosyvoice.corpus.parts import SubsetPart
from cosyvoice.corpus.scan import QUARANTINE_REASONS, AudioPolicy, SubsetWalk
from cosyvoice.corpus.shard_plan import plan_shards, shard_key

__all__ = [
    "AudioInfo", "AudioPolicy", "AudioProblem", "DataDir", "LIBRITTS_SUBSETS", "ManifestReport",
    "QUARANTINE_REASONS", "SubsetPart", "SubsetWalk", "plan_shards", "prepare_libritts", "probe_audio",
    "read_data_dir", "shard_key",
]
