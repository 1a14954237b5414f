"""The CosyVoice2 LLM data pipeline end to end, as a torch ``IterableDataset``.

``data.list`` (local or s3:// paths) -> shards for this rank/worker -> parquet rows -> decode ->
tokenize -> filter -> resample -> compute_fbank -> parse_embedding -> compute_whisper_fbank ->
shuffle -> sort -> dynamic batch -> padding. Defaults are the ``cosyvoice2.yaml`` recipe's.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import torch

from cosyvoice import storage
from cosyvoice.dataset import processors as P
from cosyvoice.dataset.sampler import Placement, shard_indices


@dataclass
class PipelineConfig:
    qwen_pretrain_path: str = ""  # HF tokenizer dir (CosyVoice-BlankEN); required for text_tokenizer="qwen"
    text_tokenizer: str = "qwen"  # qwen (CosyVoice2/3) | whisper (CosyVoice1)
    resample_rate: int = 24000
    max_length: float = 6000  # 10 ms frames (60 s)
    min_length: float = 100  # 1 s
    token_max_length: int = 200
    token_min_length: int = 1
    shuffle_size: int = 1000
    sort_size: int = 500
    max_frames_in_batch: int = 2000
    use_spk_embedding: bool = False
    whisper_feat: bool = True
    dpo: bool = False
    filter_extra: dict = field(default_factory=dict)


def read_data_list(url: str) -> list[str]:
    return [line.strip() for line in storage.read_text(url).splitlines() if line.strip()]


class TrainingDataset(torch.utils.data.IterableDataset):
    """Batches for one rank; DataLoader workers split this rank's shards (``batch_size=None``)."""

    def __init__(self, data_list: str | list[str], config: PipelineConfig, *, train: bool = True, seed: int = 0):
        if config.text_tokenizer not in ("qwen", "whisper"):
            raise ValueError(f"text_tokenizer must be 'qwen' or 'whisper', got {config.text_tokenizer!r}")
        if config.text_tokenizer == "qwen" and not config.qwen_pretrain_path:
            raise ValueError("qwen_pretrain_path is required for the Qwen tokenizer (the CosyVoice-BlankEN dir)")
        self.shards = read_data_list(data_list) if isinstance(data_list, str) else list(data_list)
        self.config = config
        self.train = train
        self.seed = seed
        self.epoch = -1
        self.stats: Counter = Counter()  # per process; workers report through their own copies

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        from cosyvoice.dataset.text import WhisperTextTokenizer, qwen_tokenizer

        placement = Placement.current()
        chosen = shard_indices(len(self.shards), placement, epoch=self.epoch, shuffle=self.train, partition=self.train)
        rng = random.Random(hash((self.seed, self.epoch, placement.rank, placement.worker_id)))
        c, stats = self.config, self.stats
        data = P.parquet_opener(({"src": self.shards[i]} for i in chosen), stats=stats)
        data = P.decode_audio(data, stats=stats)
        tokenizer = WhisperTextTokenizer() if c.text_tokenizer == "whisper" else qwen_tokenizer(c.qwen_pretrain_path)
        data = P.tokenize(data, tokenizer=tokenizer)
        data = P.filter_samples(data, max_length=c.max_length, min_length=c.min_length,
                                token_max_length=c.token_max_length, token_min_length=c.token_min_length,
                                stats=stats, **c.filter_extra)
        data = P.resample(data, resample_rate=c.resample_rate, stats=stats)
        data = P.compute_fbank(data)
        data = P.parse_embedding(data, stats=stats)
        if c.whisper_feat:
            data = P.compute_whisper_fbank(data)
        data = P.shuffle(data, shuffle_size=c.shuffle_size, rng=rng)
        data = P.sort(data, sort_size=c.sort_size)
        data = P.dynamic_batch(data, max_frames_in_batch=c.max_frames_in_batch)
        return P.padding(data, use_spk_embedding=c.use_spk_embedding, dpo=c.dpo)
