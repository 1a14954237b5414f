"""The CosyVoice2 LLM data pipeline end to end, as a torch ``IterableDataset``.

``data.list`` (local or s3:// paths) -> shards for this rank/worker -> parquet rows -> decode ->
tokenize -> filter -> resample -> compute_fbank -> parse_embedding -> compute_whisper_fbank ->
shuffle -> sort -> dynamic batch -> padding. Defaults are the ``cosyvoice2.yaml`` recipe's.

With ``gan`` (HiFT GAN training, upstream's ``data_pipeline_gan``) the chain is instead: ... ->
resample -> truncate -> compute_fbank -> compute_f0 -> parse_embedding -> shuffle -> ... ->
padding(gan=True), without whisper features. compute_fbank keeps its 960-sample padding (upstream's
gan Dataset binds a keyword compute_fbank no longer takes, defect D5), so a 24480-sample crop
becomes 24960 samples = 52 mel frames x 480, the HiFT generator's samples per frame.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import torch

from cosyvoice import storage
from cosyvoice.dataset import processors as P
from cosyvoice.dataset.mel import MelConfig
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
    tokenizer_version: str = "cosyvoice2"  # cosyvoice3 adds <|endofsystem|> and the phoneme tokens
    batch_type: str = "dynamic"  # dynamic (frame budget, upstream) | token (real LLM tokens, for packing) | static
    batch_size: int = 16
    max_tokens_in_batch: int = 16384
    mel: MelConfig = field(default_factory=MelConfig)
    samples_per_token: int = 960
    campplus_onnx: str | None = None  # online CAM++ for rows without embeddings (--onnx_path)
    skip_unreadable_shards: bool = False  # log + count (stats["unreadable_shards"]) instead of failing the epoch
    gan: bool = False  # HiFT GAN batches: truncate + compute_f0, speech/pitch_feat, no whisper_feat
    token_mel_ratio: int = 0  # flow batches: tokens and mel cut to this many frames per token (0: off)
    token_rate: float = 0.0  # CosyVoice1 flow: speech tokens per second, checked against the mel's duration (0: off)
    truncate_length: int = 24480  # gan: samples per training crop (recipe's truncate)
    f0_hop: int = 480  # gan: WORLD frame period in samples (recipe's compute_f0 hop_size)

    @classmethod
    def from_recipe(cls, configs: dict, qwen_pretrain_path: str = "", **changes) -> PipelineConfig:
        """Read the processor settings of a loaded recipe (ours or upstream's ``data_pipeline``
        partials) into a config; ``changes`` win (e.g. the trainer's ``batch_type``)."""
        def kw(name: str) -> dict:
            stage = configs.get(name)
            return dict(getattr(stage, "keywords", {}) or {})

        f, batching, fbank, f0 = kw("filter"), kw("batch"), kw("compute_fbank"), kw("compute_f0")
        mel_kw = dict(getattr(fbank.get("feat_extractor"), "keywords", {}) or kw("feat_extractor"))
        tok = kw("get_tokenizer")
        names = {getattr(getattr(stage, "func", None), "__name__", "") for stage in configs.get("data_pipeline") or []}
        text_tokenizer = _text_tokenizer(configs)
        values = dict(
            qwen_pretrain_path=qwen_pretrain_path or tok.get("token_path", ""),
            text_tokenizer=text_tokenizer,
            tokenizer_version=tok.get("version", "cosyvoice2"),
            resample_rate=kw("resample").get("resample_rate", configs.get("sample_rate", 24000)),
            max_length=f.get("max_length", 10240), min_length=f.get("min_length", 10),
            token_max_length=f.get("token_max_length", 200), token_min_length=f.get("token_min_length", 1),
            filter_extra={k: v for k, v in f.items() if k in ("min_output_input_ratio", "max_output_input_ratio")},
            shuffle_size=kw("shuffle").get("shuffle_size", 1000), sort_size=kw("sort").get("sort_size", 500),
            batch_type=batching.get("batch_type", "dynamic"), batch_size=batching.get("batch_size", 16),
            max_frames_in_batch=batching.get("max_frames_in_batch", 2000),
            max_tokens_in_batch=batching.get("max_tokens_in_batch", 16384),
            use_spk_embedding=kw("padding").get("use_spk_embedding", False),
            # CosyVoice1 (whisper text) has no online speech-token path, so no whisper features (D4)
            whisper_feat="compute_whisper_fbank" in names if names else text_tokenizer != "whisper",
            # upstream's compute_fbank pads nothing unless the recipe gives num_frames (v2/v3: 960; v1: none)
            samples_per_token=max(int(fbank.get("num_frames", -1)), 0) if fbank else 960,
            truncate_length=kw("truncate").get("truncate_length", 24480),
            f0_hop=f0.get("hop_size", 480),
        )
        if f0.get("sample_rate", values["resample_rate"]) != values["resample_rate"]:
            raise ValueError(f"the recipe's compute_f0 sample_rate {f0['sample_rate']} differs from the resample rate "
                             f"{values['resample_rate']}: F0 is extracted from the resampled speech")
        if mel_kw:
            values["mel"] = MelConfig(sample_rate=mel_kw.get("sampling_rate", 24000), n_fft=mel_kw.get("n_fft", 1920),
                                      hop=mel_kw.get("hop_size", 480), win=mel_kw.get("win_size", 1920),
                                      n_mels=mel_kw.get("num_mels", 80), fmin=mel_kw.get("fmin", 0),
                                      fmax=mel_kw.get("fmax", 8000))
        values.update(changes)
        return cls(**values)


def _text_tokenizer(configs: dict) -> str:
    """``whisper`` for a recipe whose ``get_tokenizer`` is CosyVoice1's, else ``qwen``. The recipe's whisper
    settings are checked here (the pipeline builds its own tokenizer, so they would otherwise go unread), and
    so is ``allowed_special``: the v1 ids are ``encode(text, allowed_special='all')``, nothing else is built."""
    from cosyvoice.dataset.text import get_whisper_tokenizer

    stage = configs.get("get_tokenizer")
    if getattr(stage, "func", None) is not get_whisper_tokenizer:
        return "qwen"
    get_whisper_tokenizer(**dict(getattr(stage, "keywords", {}) or {}))  # raises on unsupported settings
    tokenize = dict(getattr(configs.get("tokenize"), "keywords", {}) or {})
    allowed = tokenize.get("allowed_special", configs.get("allowed_special", "all"))
    if allowed != "all":
        raise ValueError(f"allowed_special = {allowed!r}: the whisper text tokenizer encodes with "
                         "allowed_special='all' (CosyVoice1's recipe); other settings are not supported")
    return "whisper"


#: key of the counter deltas a ``report_stats`` dataset attaches to its batches
STATS_KEY = "data_stats"


def read_data_list(url: str) -> list[str]:
    return [line.strip() for line in storage.read_text(url).splitlines() if line.strip()]


class TrainingDataset(torch.utils.data.IterableDataset):
    """Batches for one rank; DataLoader workers split this rank's shards (``batch_size=None``).

    ``stats`` counts what the processors dropped or filtered, by reason. It lives in the process
    that iterates (each DataLoader worker has its own copy), so with ``report_stats=True`` every
    batch carries, under ``STATS_KEY``, the counts added since the previous batch of that worker,
    and a worker's last counts follow its last batch as an item holding only ``STATS_KEY``; the
    consumer sums them (the trainer does, per epoch, over workers and ranks)."""

    def __init__(self, data_list: str | list[str], config: PipelineConfig, *, train: bool = True, seed: int = 0,
                 report_stats: bool = False):
        if config.text_tokenizer not in ("qwen", "whisper"):
            raise ValueError(f"text_tokenizer must be 'qwen' or 'whisper', got {config.text_tokenizer!r}")
        if config.text_tokenizer == "qwen" and not config.qwen_pretrain_path:
            raise ValueError("qwen_pretrain_path is required for the Qwen tokenizer (the CosyVoice-BlankEN dir)")
        if config.gan and (config.truncate_length <= 0 or config.f0_hop <= 0):
            raise ValueError(f"gan batches need a positive truncate_length and f0_hop, got {config.truncate_length} "
                             f"and {config.f0_hop}")
        self.shards = read_data_list(data_list) if isinstance(data_list, str) else list(data_list)
        self.config = config
        self.train = train
        self.seed = seed
        self.epoch = -1
        self.stats: Counter = Counter()  # per process; workers report through their own copies
        self.report_stats = report_stats

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        from cosyvoice.dataset.text import WhisperTextTokenizer, qwen_tokenizer

        placement = Placement.current()
        chosen = shard_indices(len(self.shards), placement, epoch=self.epoch, shuffle=self.train, partition=self.train)
        rng = random.Random(hash((self.seed, self.epoch, placement.rank, placement.worker_id)))
        c, stats = self.config, self.stats
        data = P.parquet_opener(({"src": self.shards[i]} for i in chosen), stats=stats,
                                skip_unreadable_shards=c.skip_unreadable_shards)
        data = P.decode_audio(data, stats=stats)
        tokenizer = (WhisperTextTokenizer() if c.text_tokenizer == "whisper"
                     else qwen_tokenizer(c.qwen_pretrain_path, c.tokenizer_version))
        data = P.tokenize(data, tokenizer=tokenizer)
        data = P.filter_samples(data, max_length=c.max_length, min_length=c.min_length,
                                token_max_length=c.token_max_length, token_min_length=c.token_min_length,
                                stats=stats, **c.filter_extra)
        data = P.resample(data, resample_rate=c.resample_rate, stats=stats)
        if c.gan:  # CV crops depend on the utterance only (rng=None): the same every epoch
            crop_rng = random.Random(hash((self.seed, self.epoch, placement.rank, placement.worker_id, 1)))
            data = P.truncate(data, truncate_length=c.truncate_length, rng=crop_rng if self.train else None)
        data = P.compute_fbank(data, mel_config=c.mel, samples_per_token=c.samples_per_token)
        if c.gan:
            data = P.compute_f0(data, sample_rate=c.resample_rate, hop_size=c.f0_hop, stats=stats)
        if c.token_mel_ratio:
            data = P.align_tokens_to_mel(data, token_mel_ratio=c.token_mel_ratio, stats=stats)
        if c.token_rate:
            data = P.check_token_rate(data, tokens_per_second=c.token_rate, frames_per_second=c.mel.sample_rate / c.mel.hop,
                                      stats=stats)
        data = P.parse_embedding(data, stats=stats, campplus_onnx=c.campplus_onnx)
        if c.whisper_feat and not c.gan:
            data = P.compute_whisper_fbank(data, samples_per_token=c.samples_per_token)
        data = P.shuffle(data, shuffle_size=c.shuffle_size, rng=rng)
        data = P.sort(data, sort_size=c.sort_size)
        data = P.batch(data, batch_type=c.batch_type, max_frames_in_batch=c.max_frames_in_batch,
                       batch_size=c.batch_size, max_tokens_in_batch=c.max_tokens_in_batch)
        data = P.padding(data, use_spk_embedding=c.use_spk_embedding, dpo=c.dpo, gan=c.gan)
        return _with_stats(data, stats) if self.report_stats else data


def _with_stats(batches, stats: Counter):
    """Attach to each batch the counter increments since the previous one (see TrainingDataset)."""
    sent = Counter(stats)  # counts of earlier iterations in this process were reported with them

    def delta() -> dict[str, int]:
        new = {k: v - sent[k] for k, v in stats.items() if v != sent[k]}
        sent.update(new)
        return new

    for batch in batches:
        increments = delta()
        if increments:
            batch[STATS_KEY] = increments
        yield batch
    increments = delta()
    if increments:
        yield {STATS_KEY: increments}
