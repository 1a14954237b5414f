"""The ``flow`` and ``hift`` sections of a CosyVoice2 recipe, read as settings, never as modules.

A released model dir's ``cosyvoice2.yaml`` (and upstream's ``examples/libritts/cosyvoice2`` recipe)
describes the acoustic models as HyperPyYAML ``!new:`` nodes of upstream classes. They are read
through the project's safe loader (:func:`cosyvoice.config.load_recipe`): every tag is checked,
and the upstream class paths are mapped (``cosyvoice.config.ALIASES``) to the small record classes
below, which keep the keyword settings they are given and build nothing. Every other top-level
key of the file (``llm``, ``hifigan``, the data processors, the seed calls, ...) is overridden with
``None``, so it is neither checked nor built nor run; only the plain values the two sections
``!ref`` (``sample_rate``, ``chunk_size``, ...) are kept.

A CosyVoice1 recipe (upstream's ``examples/libritts/cosyvoice``, a CosyVoice-300M model dir's
``cosyvoice.yaml``) is read the same way by :func:`acoustic_configs_v1` into
:class:`~cosyvoice.acoustic.flow_v1.FlowV1Config` and the 22.05 kHz ``HiFTConfig``; its flow
encoder (``cosyvoice.transformer.encoder.ConformerEncoder``) shares its upstream class path with
the v1 LLM's text encoder, which the alias table maps to a module, so that one node is retagged to
:class:`EncoderV1Record` in the text before loading (:func:`flow_generation` tells the two apart).

The records are then turned into :class:`~cosyvoice.acoustic.flow.FlowConfig` and
:class:`~cosyvoice.acoustic.hift.HiFTConfig`. A setting our implementation would not honour
(another flow or vocoder class, solver, time schedule, input layer, a convolution module ...)
raises ``ValueError`` naming it. The flow's training settings (the encoder's and estimator's
dropout, ``sigma_min``, ``training_cfg_rate``, ``only_mask_loss``) go into the FlowConfig for its
training forward; ``reg_loss_type`` is accepted and ignored, as upstream's flow ignores it (its
loss is always the masked MSE). Upstream's constructor defaults apply to settings a file leaves out, as
they would upstream (so a section that omits ``macaron_style`` asks for upstream's ``True``).

:func:`gan_config` reads the ``hifigan`` section (the GAN that trains the vocoder: its generator,
discriminators and ``mel_spec_transform``) the same way, into a
:class:`~cosyvoice.acoustic.gan.GanConfig`.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import yaml

from cosyvoice.acoustic.flow import MEL_BINS, FlowConfig
from cosyvoice.acoustic.flow_v1 import FlowV1Config
from cosyvoice.acoustic.hift import HiFTConfig

__all__ = ["acoustic_configs", "acoustic_configs_v1", "flow_generation", "gan_config", "RECORDS"]

_REQUIRED = object()  # marks an upstream constructor argument without a default

#: top-level classes of other model generations, named in the error that refuses them
_OTHER_GENERATIONS = {
    "cosyvoice.flow.flow.MaskedDiffWithXvec": "the CosyVoice 1 flow (non-causal, length regulator)",
    "cosyvoice.flow.flow.CausalMaskedDiffWithDiT": "the CosyVoice 3 flow (DiT estimator)",
    "cosyvoice.hifigan.generator.CausalHiFTGenerator": "the CosyVoice 3 causal vocoder",
}
_FLOW_CLASS = "cosyvoice.flow.flow.CausalMaskedDiffWithXvec"
_FLOW_V1_CLASS = "cosyvoice.flow.flow.MaskedDiffWithXvec"
_ENCODER_V1_CLASS = "cosyvoice.transformer.encoder.ConformerEncoder"
_HIFT_CLASS = "cosyvoice.hifigan.generator.HiFTGenerator"
_HIFIGAN_CLASS = "cosyvoice.hifigan.hifigan.HiFiGan"


class _Record:
    """Keeps the keyword settings of one upstream constructor call (upstream's defaults filled in)."""

    upstream: ClassVar[str]
    signature: ClassVar[dict[str, Any]]  # upstream's keyword arguments and their defaults

    def __init__(self, *args, **settings):
        if args:
            raise ValueError(f"{self.upstream}: give its settings as a mapping of keywords, not a list {list(args)!r}")
        unknown = sorted(set(settings) - set(self.signature))
        if unknown:
            raise ValueError(f"{self.upstream}: unknown setting(s) {unknown}; it takes {sorted(self.signature)}")
        missing = sorted(k for k, v in self.signature.items() if v is _REQUIRED and k not in settings)
        if missing:
            raise ValueError(f"{self.upstream}: required setting(s) {missing} missing")
        self.settings: dict[str, Any] = {**self.signature, **settings}

    def __getitem__(self, key: str) -> Any:
        return self.settings[key]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings!r})"


class FlowRecord(_Record):
    upstream = _FLOW_CLASS
    signature = {"input_size": 512, "output_size": 80, "spk_embed_dim": 192, "output_type": "mel",
                 "vocab_size": 4096, "input_frame_rate": 50, "only_mask_loss": True, "token_mel_ratio": 2,
                 "pre_lookahead_len": 3, "encoder": None, "decoder": None, "decoder_conf": None}


class EncoderRecord(_Record):
    upstream = "cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder"
    signature = {"input_size": _REQUIRED, "output_size": 256, "attention_heads": 4, "linear_units": 2048,
                 "num_blocks": 6, "dropout_rate": 0.1, "positional_dropout_rate": 0.1,
                 "attention_dropout_rate": 0.0, "input_layer": "conv2d", "pos_enc_layer_type": "rel_pos",
                 "normalize_before": True, "static_chunk_size": 0, "use_dynamic_chunk": False,
                 "global_cmvn": None, "use_dynamic_left_chunk": False, "positionwise_conv_kernel_size": 1,
                 "macaron_style": True, "selfattention_layer_type": "rel_selfattn", "activation_type": "swish",
                 "use_cnn_module": True, "cnn_module_kernel": 15, "causal": False, "cnn_module_norm": "batch_norm",
                 "key_bias": True, "gradient_checkpointing": False}


class CFMRecord(_Record):
    upstream = "cosyvoice.flow.flow_matching.CausalConditionalCFM"
    signature = {"in_channels": _REQUIRED, "cfm_params": _REQUIRED, "n_spks": 1, "spk_emb_dim": 64,
                 "estimator": None}


class CFMParamsRecord(_Record):
    """``omegaconf.DictConfig(content=...)``: the solver settings of the CFM."""

    upstream = "omegaconf.DictConfig"
    signature = {"content": _REQUIRED}


class EstimatorRecord(_Record):
    upstream = "cosyvoice.flow.decoder.CausalConditionalDecoder"
    signature = {"in_channels": _REQUIRED, "out_channels": _REQUIRED, "channels": (256, 256), "dropout": 0.05,
                 "attention_head_dim": 64, "n_blocks": 1, "num_mid_blocks": 2, "num_heads": 4, "act_fn": "snake",
                 "static_chunk_size": 50, "num_decoding_left_chunks": 2}


class FlowV1Record(_Record):
    upstream = _FLOW_V1_CLASS
    signature = {"input_size": 512, "output_size": 80, "spk_embed_dim": 192, "output_type": "mel",
                 "vocab_size": 4096, "input_frame_rate": 50, "only_mask_loss": True, "encoder": None,
                 "length_regulator": None, "decoder": None, "decoder_conf": None}


class EncoderV1Record(_Record):
    """The v1 flow's ``ConformerEncoder`` (same constructor as the upsampling one). Not in ``RECORDS``:
    the alias table maps that class path to the v1 LLM's text encoder; see :func:`acoustic_configs_v1`."""

    upstream = _ENCODER_V1_CLASS
    signature = EncoderRecord.signature


class RegulatorRecord(_Record):
    upstream = "cosyvoice.flow.length_regulator.InterpolateRegulator"
    signature = {"channels": _REQUIRED, "sampling_ratios": _REQUIRED, "out_channels": None, "groups": 1}


class CFMV1Record(_Record):
    upstream = "cosyvoice.flow.flow_matching.ConditionalCFM"
    signature = CFMRecord.signature


class EstimatorV1Record(_Record):
    upstream = "cosyvoice.flow.decoder.ConditionalDecoder"
    signature = {"in_channels": _REQUIRED, "out_channels": _REQUIRED, "channels": (256, 256), "dropout": 0.05,
                 "attention_head_dim": 64, "n_blocks": 1, "num_mid_blocks": 2, "num_heads": 4, "act_fn": "snake"}


class HiFTRecord(_Record):
    upstream = _HIFT_CLASS
    signature = {"in_channels": 80, "base_channels": 512, "nb_harmonics": 8, "sampling_rate": 22050,
                 "nsf_alpha": 0.1, "nsf_sigma": 0.003, "nsf_voiced_threshold": 10, "upsample_rates": [8, 8],
                 "upsample_kernel_sizes": [16, 16], "istft_params": {"n_fft": 16, "hop_len": 4},
                 "resblock_kernel_sizes": [3, 7, 11], "resblock_dilation_sizes": [[1, 3, 5]] * 3,
                 "source_resblock_kernel_sizes": [7, 11], "source_resblock_dilation_sizes": [[1, 3, 5]] * 2,
                 "lrelu_slope": 0.1, "audio_limit": 0.99, "f0_predictor": None}


class F0PredictorRecord(_Record):
    upstream = "cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor"
    signature = {"num_class": 1, "in_channels": 80, "cond_channels": 512}


class HiFiGanRecord(_Record):
    upstream = _HIFIGAN_CLASS
    signature = {"generator": _REQUIRED, "discriminator": _REQUIRED, "mel_spec_transform": _REQUIRED,
                 "multi_mel_spectral_recon_loss_weight": 45, "feat_match_loss_weight": 2.0, "tpr_loss_weight": 1.0,
                 "tpr_loss_tau": 0.04}


class MultipleDiscriminatorRecord(_Record):
    upstream = "cosyvoice.hifigan.discriminator.MultipleDiscriminator"
    signature = {"mpd": _REQUIRED, "mrd": _REQUIRED}


class MultiPeriodDiscriminatorRecord(_Record):
    upstream = "matcha.hifigan.models.MultiPeriodDiscriminator"
    signature = {}  # upstream's takes no settings: periods 2, 3, 5, 7, 11


class MultiResSpecDiscriminatorRecord(_Record):
    upstream = "cosyvoice.hifigan.discriminator.MultiResSpecDiscriminator"
    signature = {"fft_sizes": [1024, 2048, 512], "hop_sizes": [120, 240, 50], "win_lengths": [600, 1200, 240],
                 "window": "hann_window"}


#: upstream class path -> the record class that stands in for it (``cosyvoice.config.ALIASES``)
RECORDS: dict[str, type[_Record]] = {cls.upstream: cls for cls in (
    FlowRecord, EncoderRecord, CFMRecord, CFMParamsRecord, EstimatorRecord, HiFTRecord, F0PredictorRecord,
    HiFiGanRecord, MultipleDiscriminatorRecord, MultiPeriodDiscriminatorRecord, MultiResSpecDiscriminatorRecord,
    FlowV1Record, RegulatorRecord, CFMV1Record, EstimatorV1Record)}

_CFM_PARAMS = {"sigma_min", "solver", "t_scheduler", "training_cfg_rate", "inference_cfg_rate", "reg_loss_type"}


class _Checker:
    """Collects every unsupported setting of a section, so one error lists them all."""

    def __init__(self, section: str):
        self.section, self.problems = section, []

    def equal(self, where: str, value: Any, wanted: Any, why: str = "") -> None:
        if value != wanted:
            self.problems.append(f"{where} = {value!r} (only {wanted!r} is supported{': ' + why if why else ''})")

    def record(self, where: str, value: Any, cls: type[_Record]) -> _Record | None:
        if type(value) is not cls:
            got = repr(value) if isinstance(value, (str, int, float, bool, list, dict, type(None))) else \
                f"an instance of {type(value).__module__}.{type(value).__name__}"
            self.problems.append(f"{where} must be `!new:{cls.upstream}`, got {got}")
            return None
        return value

    def fail_if_any(self, source: str) -> None:
        if self.problems:
            raise ValueError(f"{source}: the `{self.section}` section asks for what cosyvoice.acoustic does not "
                             "implement:\n  " + "\n  ".join(self.problems))


def _flow_config(flow: Any, source: str) -> FlowConfig:
    check = _Checker("flow")
    if not isinstance(flow, FlowRecord):
        raise ValueError(f"{source}: `flow` must be `!new:{_FLOW_CLASS}`, got {flow!r}")
    dim = flow["input_size"]
    check.equal("flow.output_size", flow["output_size"], MEL_BINS)
    check.equal("flow.output_type", flow["output_type"], "mel")
    check.equal("flow.only_mask_loss", flow["only_mask_loss"], True, "upstream's CausalMaskedDiffWithXvec stores the "
                "flag but always averages its loss over the real frames")
    check.equal("flow.pre_lookahead_len", flow["pre_lookahead_len"], 3, "upstream's encoder hard-codes a 3-token look-ahead layer")
    check.equal("flow.input_size", dim, 512, "upstream's encoder hard-codes 512 channels in its look-ahead and upsampling layers")
    ratio = flow["token_mel_ratio"]
    if flow["input_frame_rate"] * ratio != 50:
        check.problems.append(f"flow.input_frame_rate {flow['input_frame_rate']} x token_mel_ratio {ratio} must be "
                              "50 mel frames per second (24 kHz, hop 480)")
    enc = check.record("flow.encoder", flow["encoder"], EncoderRecord)
    est, params = _decoder(flow, check, CFMRecord, EstimatorRecord)
    if enc is not None:
        _check_encoder(enc, dim, check)
        if not (isinstance(enc["static_chunk_size"], int) and enc["static_chunk_size"] > 0):
            check.problems.append(f"flow.encoder.static_chunk_size = {enc['static_chunk_size']!r} (a positive "
                                  "token count is needed for streaming)")
    if est is not None:
        _check_estimator(est, check)
        channels = est["channels"]
        if not (isinstance(channels, (list, tuple)) and len(channels) == 1):
            check.problems.append(f"flow.decoder.estimator.channels = {channels!r} (one U-Net level, e.g. [256])")
        if enc is not None:
            check.equal("flow.decoder.estimator.static_chunk_size", est["static_chunk_size"],
                        enc["static_chunk_size"] * ratio if isinstance(enc["static_chunk_size"], int) else None,
                        "the encoder's chunk in mel frames")
        # num_decoding_left_chunks is stored but never used by upstream (its masks keep every left chunk)
    check.fail_if_any(source)
    try:
        return FlowConfig(
            vocab_size=int(flow["vocab_size"]), dim=int(dim), spk_embed_dim=int(flow["spk_embed_dim"]),
            token_mel_ratio=int(ratio), lookahead=int(flow["pre_lookahead_len"]),
            encoder_heads=int(enc["attention_heads"]), encoder_hidden=int(enc["linear_units"]),
            encoder_blocks=int(enc["num_blocks"]), token_chunk=int(enc["static_chunk_size"]),
            estimator_channels=int(est["channels"][0]), estimator_head_dim=int(est["attention_head_dim"]),
            estimator_heads=int(est["num_heads"]), estimator_blocks=int(est["n_blocks"]),
            estimator_mid_blocks=int(est["num_mid_blocks"]), cfg_rate=float(params["inference_cfg_rate"]),
            encoder_dropout=float(enc["dropout_rate"]), encoder_positional_dropout=float(enc["positional_dropout_rate"]),
            encoder_attention_dropout=float(enc["attention_dropout_rate"]), estimator_dropout=float(est["dropout"]),
            sigma_min=float(params.get("sigma_min", 1e-4)),  # upstream's BASECFM default when the file omits it
            training_cfg_rate=float(params["training_cfg_rate"]), only_mask_loss=flow["only_mask_loss"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: the `flow` section: {exc}") from exc


#: the flow encoder settings both generations' Conformer implements (and only these)
_ENCODER_SETTINGS = (("input_layer", "linear"), ("pos_enc_layer_type", "rel_pos_espnet"),
                     ("selfattention_layer_type", "rel_selfattn"), ("activation_type", "swish"),
                     ("normalize_before", True), ("macaron_style", False), ("use_cnn_module", False),
                     ("global_cmvn", None), ("key_bias", True))


def _check_encoder(enc: _Record, dim: Any, check: _Checker, **more: Any) -> None:
    """``flow.encoder``'s sizes against ``flow.input_size`` and its fixed settings (both flows; ``more``: a
    generation's own fixed settings, checked after the common ones)."""
    check.equal("flow.encoder.input_size", enc["input_size"], dim, "it must equal flow.input_size")
    check.equal("flow.encoder.output_size", enc["output_size"], dim, "it must equal flow.input_size")
    for key, wanted in (*_ENCODER_SETTINGS, *more.items()):
        check.equal(f"flow.encoder.{key}", enc[key], wanted)


def _check_estimator(est: _Record, check: _Checker) -> None:
    """``flow.decoder.estimator``'s channels and activation, which both generations' U-Nets fix."""
    check.equal("flow.decoder.estimator.in_channels", est["in_channels"], 4 * MEL_BINS, "x, mu, speaker, prompt")
    check.equal("flow.decoder.estimator.out_channels", est["out_channels"], MEL_BINS)
    check.equal("flow.decoder.estimator.act_fn", est["act_fn"], "gelu")


def _decoder(flow: _Record, check: _Checker, cfm_cls: type[_Record], estimator_cls: type[_Record]
             ) -> tuple[_Record | None, Mapping | None]:
    """(estimator record, cfm_params) of ``flow.decoder``, its CFM settings checked (both flows)."""
    cfm = check.record("flow.decoder", flow["decoder"], cfm_cls)
    if cfm is None:
        return None, None
    check.equal("flow.decoder.n_spks", cfm["n_spks"], 1)
    check.equal("flow.decoder.spk_emb_dim", cfm["spk_emb_dim"], MEL_BINS, "the speaker projection gives 80 channels")
    est = check.record("flow.decoder.estimator", cfm["estimator"], estimator_cls)
    record = check.record("flow.decoder.cfm_params", cfm["cfm_params"], CFMParamsRecord)
    params = None if record is None else record["content"]
    if record is not None and not isinstance(params, Mapping):
        check.problems.append(f"flow.decoder.cfm_params.content must be a mapping, got {params!r}")
        params = None
    if params is not None:
        unknown = sorted(set(params) - _CFM_PARAMS)
        if unknown:
            check.problems.append(f"flow.decoder.cfm_params: unknown setting(s) {unknown}")
        for key in ("solver", "t_scheduler", "inference_cfg_rate", "training_cfg_rate"):
            if key not in params:
                check.problems.append(f"flow.decoder.cfm_params.{key} is missing (upstream requires it)")
        check.equal("flow.decoder.cfm_params.solver", params.get("solver", "euler"), "euler")
        check.equal("flow.decoder.cfm_params.t_scheduler", params.get("t_scheduler", "cosine"), "cosine")
    return est, params


def _flow_v1_config(flow: Any, source: str) -> FlowV1Config:
    """The v1 flow's records as a FlowV1Config; every setting the v1 modules do not honour is named."""
    check = _Checker("flow")
    if type(flow) is not FlowV1Record:
        raise ValueError(f"{source}: `flow` must be `!new:{_FLOW_V1_CLASS}`, got {flow!r}")
    dim = flow["input_size"]
    check.equal("flow.output_size", flow["output_size"], MEL_BINS)
    check.equal("flow.output_type", flow["output_type"], "mel")
    check.equal("flow.only_mask_loss", flow["only_mask_loss"], True, "upstream's MaskedDiffWithXvec stores the flag "
                "but always averages its loss over the real frames")
    for key in ("input_size", "vocab_size", "spk_embed_dim", "input_frame_rate"):
        value = flow[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            check.problems.append(f"flow.{key} = {value!r} (a positive integer)")
    enc = check.record("flow.encoder", flow["encoder"], EncoderV1Record)
    regulator = check.record("flow.length_regulator", flow["length_regulator"], RegulatorRecord)
    est, params = _decoder(flow, check, CFMV1Record, EstimatorV1Record)
    if enc is not None:
        _check_encoder(enc, dim, check, use_dynamic_chunk=False)
        check.equal("flow.encoder.static_chunk_size", enc["static_chunk_size"], 0,
                    "the CosyVoice1 flow's encoder attends to every token")
        heads = enc["attention_heads"]
        if not (isinstance(heads, int) and heads > 0 and isinstance(dim, int) and dim % heads == 0):
            check.problems.append(f"flow.encoder.attention_heads = {heads!r} (a positive divisor of {dim!r})")
    if regulator is not None:
        check.equal("flow.length_regulator.channels", regulator["channels"], MEL_BINS, "the encoder projects to 80")
        check.equal("flow.length_regulator.out_channels", regulator["out_channels"] or MEL_BINS, MEL_BINS)
        check.equal("flow.length_regulator.groups", regulator["groups"], 1)
        if not isinstance(regulator["sampling_ratios"], (list, tuple)):
            check.problems.append(f"flow.length_regulator.sampling_ratios = {regulator['sampling_ratios']!r} (a list: "
                                  "one convolution layer per entry)")
    if est is not None:
        _check_estimator(est, check)
        channels = est["channels"]
        if not (isinstance(channels, (list, tuple)) and channels and all(isinstance(c, int) for c in channels)):
            check.problems.append(f"flow.decoder.estimator.channels = {channels!r} (a list of channel widths, "
                                  "one per U-Net level, e.g. [256, 256])")
    check.fail_if_any(source)
    try:
        return FlowV1Config(
            vocab_size=flow["vocab_size"], dim=dim, spk_embed_dim=flow["spk_embed_dim"],
            input_frame_rate=flow["input_frame_rate"], encoder_heads=int(enc["attention_heads"]),
            encoder_hidden=int(enc["linear_units"]), encoder_blocks=int(enc["num_blocks"]),
            regulator_layers=len(regulator["sampling_ratios"]), estimator_channels=tuple(est["channels"]),
            estimator_head_dim=int(est["attention_head_dim"]), estimator_heads=int(est["num_heads"]),
            estimator_blocks=int(est["n_blocks"]), estimator_mid_blocks=int(est["num_mid_blocks"]),
            cfg_rate=float(params["inference_cfg_rate"]), encoder_dropout=float(enc["dropout_rate"]),
            encoder_positional_dropout=float(enc["positional_dropout_rate"]),
            encoder_attention_dropout=float(enc["attention_dropout_rate"]), estimator_dropout=float(est["dropout"]),
            sigma_min=float(params.get("sigma_min", 1e-4)),  # upstream's BASECFM default when the file omits it
            training_cfg_rate=float(params["training_cfg_rate"]), only_mask_loss=flow["only_mask_loss"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: the `flow` section: {exc}") from exc


def _int_tuple(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{where} must be a list of integers, got {value!r}")
    return tuple(value)


def _hift_config(hift: Any, source: str) -> HiFTConfig:
    if not isinstance(hift, HiFTRecord):
        raise ValueError(f"{source}: `hift` must be `!new:{_HIFT_CLASS}`, got {hift!r}")
    check = _Checker("hift")
    f0 = check.record("hift.f0_predictor", hift["f0_predictor"], F0PredictorRecord)
    istft = hift["istft_params"]
    if not (isinstance(istft, Mapping) and set(istft) == {"n_fft", "hop_len"}):
        check.problems.append(f"hift.istft_params = {istft!r} (a mapping of exactly n_fft and hop_len)")
    if f0 is not None:
        check.equal("hift.f0_predictor.num_class", f0["num_class"], 1)
        check.equal("hift.f0_predictor.in_channels", f0["in_channels"], hift["in_channels"], "it must equal hift.in_channels")
    check.fail_if_any(source)
    try:
        return HiFTConfig(
            in_channels=hift["in_channels"], base_channels=hift["base_channels"], nb_harmonics=hift["nb_harmonics"],
            sampling_rate=hift["sampling_rate"], nsf_alpha=float(hift["nsf_alpha"]), nsf_sigma=float(hift["nsf_sigma"]),
            nsf_voiced_threshold=hift["nsf_voiced_threshold"],
            upsample_rates=_int_tuple(hift["upsample_rates"], "hift.upsample_rates"),
            upsample_kernel_sizes=_int_tuple(hift["upsample_kernel_sizes"], "hift.upsample_kernel_sizes"),
            n_fft=istft["n_fft"], hop_len=istft["hop_len"],
            resblock_kernel_sizes=_int_tuple(hift["resblock_kernel_sizes"], "hift.resblock_kernel_sizes"),
            resblock_dilation_sizes=tuple(_int_tuple(d, "hift.resblock_dilation_sizes[]")
                                          for d in hift["resblock_dilation_sizes"]),
            source_resblock_kernel_sizes=_int_tuple(hift["source_resblock_kernel_sizes"],
                                                    "hift.source_resblock_kernel_sizes"),
            source_resblock_dilation_sizes=tuple(_int_tuple(d, "hift.source_resblock_dilation_sizes[]")
                                                 for d in hift["source_resblock_dilation_sizes"]),
            lrelu_slope=float(hift["lrelu_slope"]), audio_limit=float(hift["audio_limit"]),
            f0_cond_channels=f0["cond_channels"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: the `hift` section: {exc}") from exc


_REF = re.compile(r"<([^<>\[\]]+)")  # the top-level key of each <key> / <key[sub]> of a !ref / !copy


def _kept_keys(root: yaml.MappingNode, roots: tuple[str, ...] = ("flow", "hift")) -> set[str]:
    """``roots`` (``flow`` and ``hift``) and the top-level keys they reference, transitively."""
    nodes = {str(k.value): v for k, v in root.value}

    def refs(node: yaml.Node) -> set[str]:
        found = set()
        if isinstance(node, yaml.ScalarNode) and node.tag in ("!ref", "!copy"):
            found |= {m.strip() for m in _REF.findall(str(node.value))}
        elif isinstance(node, yaml.MappingNode):
            for _, value in node.value:
                found |= refs(value)
        elif isinstance(node, yaml.SequenceNode):
            for value in node.value:
                found |= refs(value)
        return found

    kept, todo = set(), list(roots)
    while todo:
        key = todo.pop()
        if key in kept or key not in nodes:
            continue
        kept.add(key)
        todo.extend(refs(nodes[key]))
    return kept


def _section_class(node: yaml.Node) -> str:
    tag = node.tag or ""
    return tag.split(":", 1)[1] if tag.startswith("!new:") else tag


def _parse(yaml_url_or_text: str) -> tuple[str, str, yaml.MappingNode, dict[str, yaml.Node]]:
    """(name for messages, text, root node, top-level nodes by key) of a recipe path/URL or its text."""
    from cosyvoice import storage

    is_text = "\n" in yaml_url_or_text
    source = "recipe text" if is_text else yaml_url_or_text
    text = yaml_url_or_text if is_text else storage.read_text(yaml_url_or_text)
    root = yaml.compose(io.StringIO(text), Loader=yaml.SafeLoader)
    if not isinstance(root, yaml.MappingNode):
        raise ValueError(f"{source}: a recipe must be a mapping at the top level")
    return source, text, root, {str(k.value): v for k, v in root.value}


def _load_sections(text: str, root: yaml.MappingNode, nodes: dict[str, yaml.Node], source: str,
                   sections: tuple[str, ...]) -> dict:
    """The recipe loaded safely with every top-level key but ``sections`` (and what they reference)
    overridden with None; a record refusing its settings is reported against ``source``."""
    from cosyvoice.config import UnsafeConfigError, load_recipe

    kept = _kept_keys(root, sections)
    try:
        return load_recipe(text, {key: None for key in nodes if key not in kept})
    except UnsafeConfigError:
        raise
    except ValueError as exc:  # a record refusing its settings
        raise ValueError(f"{source}: {exc}") from exc


def _sections(source: str, nodes: dict[str, yaml.Node], generation: int) -> None:
    """Refuse a recipe without ``flow``/``hift`` or with another generation's classes, by name."""
    flow_class = {1: _FLOW_V1_CLASS, 2: _FLOW_CLASS}[generation]
    reader = {1: "acoustic_configs_v1", 2: "acoustic_configs"}
    for section, wanted in (("flow", flow_class), ("hift", _HIFT_CLASS)):
        if section not in nodes:
            raise ValueError(f"{source}: no `{section}` section (a CosyVoice{generation} recipe or model-dir "
                             f"{'cosyvoice.yaml' if generation == 1 else 'cosyvoice2.yaml'} has one)")
        found = _section_class(nodes[section])
        other = {k: v for k, v in {**_OTHER_GENERATIONS, _FLOW_CLASS: "the CosyVoice 2 flow (causal, chunked)"}.items()
                 if k != wanted}
        if found in other:
            hint = {_FLOW_V1_CLASS: reader[1], _FLOW_CLASS: reader[2]}.get(found)
            raise ValueError(f"{source}: `{section}` is {found}, {other[found]}; {reader[generation]} reads "
                             f"CosyVoice{generation}'s {wanted} only" + (f" (read this recipe with {hint})" if hint else ""))


def flow_generation(yaml_url_or_text: str) -> int:
    """1 for a CosyVoice1 recipe (``MaskedDiffWithXvec``: read it with :func:`acoustic_configs_v1`), 2 for a
    CosyVoice2 one (``CausalMaskedDiffWithXvec``: :func:`acoustic_configs`); anything else is refused by name."""
    source, _, _, nodes = _parse(yaml_url_or_text)
    if "flow" not in nodes:
        raise ValueError(f"{source}: no `flow` section (a CosyVoice1/2 recipe or model-dir yaml has one)")
    found = _section_class(nodes["flow"])
    generations = {_FLOW_V1_CLASS: 1, _FLOW_CLASS: 2}
    if found not in generations:
        known = f", {_OTHER_GENERATIONS[found]}" if found in _OTHER_GENERATIONS else ""
        raise ValueError(f"{source}: `flow` is {found!r}{known}; cosyvoice.acoustic reads {_FLOW_V1_CLASS} "
                         f"(CosyVoice1) and {_FLOW_CLASS} (CosyVoice2)")
    return generations[found]


def acoustic_configs(yaml_url_or_text: str) -> tuple[FlowConfig, HiFTConfig]:
    """(FlowConfig, HiFTConfig) of a CosyVoice2 recipe or model-dir yaml (a path/URL or the text itself)."""
    source, text, root, nodes = _parse(yaml_url_or_text)
    _sections(source, nodes, 2)
    configs = _load_sections(text, root, nodes, source, ("flow", "hift"))
    flow, hift = _flow_config(configs["flow"], source), _hift_config(configs["hift"], source)
    if (hift.sampling_rate, hift.samples_per_frame) != (24000, 480):
        raise ValueError(f"{source}: the `hift` section: sampling_rate {hift.sampling_rate} with "
                         f"{hift.samples_per_frame} samples per mel frame; CosyVoice2's flow makes 50 Hz mels for a "
                         "24 kHz vocoder (480 samples per frame); 22.05 kHz is CosyVoice1's vocoder (HiFTConfig.v1())")
    return flow, hift


def _encoder_as_record(text: str, flow: yaml.Node, nodes: dict[str, yaml.Node]) -> str:
    """``text`` with the v1 flow encoder's tag (upstream's ConformerEncoder, or the LLM class it is aliased
    to) replaced, at that node only, by :class:`EncoderV1Record`; a ``!ref <key>`` is followed to ``key``."""
    node = _child(flow, "encoder")
    if isinstance(node, yaml.ScalarNode) and node.tag == "!ref":
        match = re.fullmatch(r"\s*<([^<>\[\]]+)>\s*", str(node.value))
        node = nodes.get(match.group(1).strip()) if match else None
    if node is None or node.tag not in (f"!new:{_ENCODER_V1_CLASS}", "!new:cosyvoice.llm.transformer.ConformerEncoder"):
        return text  # absent or another class: the record check names it
    start = node.start_mark.index
    if not text.startswith(node.tag, start):
        raise ValueError(f"flow.encoder: cannot locate its tag {node.tag} in the text (line {node.start_mark.line + 1});"
                         " write it as `encoder: !new:cosyvoice.transformer.encoder.ConformerEncoder`")
    return text[:start] + f"!new:{__name__}.{EncoderV1Record.__name__}" + text[start + len(node.tag):]


def acoustic_configs_v1(yaml_url_or_text: str) -> tuple[FlowV1Config, HiFTConfig]:
    """(FlowV1Config, HiFTConfig) of a CosyVoice1 recipe or model-dir ``cosyvoice.yaml`` (a path/URL or the text).

    The vocoder must make 22.05 kHz audio at 256 samples per mel frame: upstream's v1 flow hard-codes
    that mel rate."""
    source, text, root, nodes = _parse(yaml_url_or_text)
    _sections(source, nodes, 1)
    try:
        text = _encoder_as_record(text, nodes["flow"], nodes)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from exc
    configs = _load_sections(text, root, nodes, source, ("flow", "hift"))
    flow, hift = _flow_v1_config(configs["flow"], source), _hift_config(configs["hift"], source)
    if (hift.sampling_rate, hift.samples_per_frame) != (flow.sample_rate, flow.hop):
        raise ValueError(f"{source}: the `hift` section: sampling_rate {hift.sampling_rate} with "
                         f"{hift.samples_per_frame} samples per mel frame; CosyVoice1's flow makes mels at "
                         f"{flow.sample_rate} Hz, hop {flow.hop} (upsample_rates x istft hop_len must be {flow.hop})")
    return flow, hift


#: the discriminator classes of upstream's CosyVoice2 recipe: where each sits in `hifigan`, and its record
_GAN_PARTS = (
    (("discriminator",), MultipleDiscriminatorRecord),
    (("discriminator", "mpd"), MultiPeriodDiscriminatorRecord),
    (("discriminator", "mrd"), MultiResSpecDiscriminatorRecord),
)
_MEL_KEYWORDS = ("n_fft", "num_mels", "sampling_rate", "hop_size", "win_size", "fmin", "fmax")


def _child(node: yaml.Node, key: str) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if str(k.value) == key:
                return v
    return None


def _check_gan_classes(nodes: dict[str, yaml.Node], source: str) -> None:
    """Refuse, by name, a discriminator class other than upstream's CosyVoice2 ones (before loading)."""
    from cosyvoice.config import ALIASES

    hift = nodes.get("hift")
    if hift is not None and _section_class(hift) in _OTHER_GENERATIONS:
        found = _section_class(hift)
        raise ValueError(f"{source}: `hift` is {found}, {_OTHER_GENERATIONS[found]}; cosyvoice.acoustic trains "
                         f"CosyVoice2's {_HIFT_CLASS} only")
    for path, record in _GAN_PARTS:
        node = nodes["hifigan"]
        for key in path:
            node = _child(node, key)
        if node is None:
            continue  # a missing setting is reported by the record
        found = _section_class(node)
        if found not in (record.upstream, ALIASES.get(record.upstream)):
            raise ValueError(f"{source}: `hifigan.{'.'.join(path)}` is {found!r}; cosyvoice.acoustic implements "
                             f"`!new:{record.upstream}` there only")


def _mel_config(transforms: Any, check: _Checker):
    """The one mel-loss transform of ``hifigan.mel_spec_transform`` as a MelConfig (None if refused)."""
    from cosyvoice.dataset.mel import MelConfig, mel_spectrogram

    if not (isinstance(transforms, (list, tuple)) and len(transforms) == 1):
        check.problems.append(f"hifigan.mel_spec_transform = {transforms!r} (a list of exactly one "
                              "`!name:matcha.utils.audio.mel_spectrogram` transform is supported)")
        return None
    transform = transforms[0]
    keywords = getattr(transform, "keywords", None)
    if getattr(transform, "func", None) is not mel_spectrogram or not isinstance(keywords, Mapping):
        check.problems.append(f"hifigan.mel_spec_transform[0] = {transform!r} (only "
                              "`!name:matcha.utils.audio.mel_spectrogram` with its settings is supported)")
        return None
    where = "hifigan.mel_spec_transform[0]"
    unknown = sorted(set(keywords) - {*_MEL_KEYWORDS, "center"})
    missing = [k for k in _MEL_KEYWORDS if k not in keywords]
    if unknown:
        check.problems.append(f"{where}: unknown setting(s) {unknown}")
    if missing:
        check.problems.append(f"{where}: setting(s) {missing} missing (upstream's mel_spectrogram requires them)")
    check.equal(f"{where}.center", keywords.get("center", False), False)
    if unknown or missing or keywords.get("center", False) is not False:
        return None
    try:
        return MelConfig(sample_rate=int(keywords["sampling_rate"]), n_fft=int(keywords["n_fft"]),
                         hop=int(keywords["hop_size"]), win=int(keywords["win_size"]),
                         n_mels=int(keywords["num_mels"]), fmin=float(keywords["fmin"]),
                         fmax=None if keywords["fmax"] is None else float(keywords["fmax"]))
    except (TypeError, ValueError) as exc:
        check.problems.append(f"{where}: {exc}")
        return None


def gan_config(yaml_url_or_text: str):
    """The :class:`~cosyvoice.acoustic.gan.GanConfig` of a recipe's ``hifigan`` section (a path/URL or the text).

    The generator (``hifigan.generator``, upstream's ``!ref <hift>``) is read as ``acoustic_configs``
    reads ``hift``; the discriminators must be upstream's CosyVoice2 ones (MultipleDiscriminator of
    the MultiPeriodDiscriminator and MultiResSpecDiscriminator with three resolutions) and the mel
    loss exactly one ``mel_spectrogram`` transform without centring; anything else raises
    ``ValueError`` naming it.
    """
    from cosyvoice.acoustic.gan import GanConfig

    source, text, root, nodes = _parse(yaml_url_or_text)
    if "hifigan" not in nodes:
        raise ValueError(f"{source}: no `hifigan` section (the GAN that trains the vocoder; see upstream's "
                         "examples/libritts/cosyvoice2/conf/cosyvoice2.yaml)")
    _check_gan_classes(nodes, source)
    configs = _load_sections(text, root, nodes, source, ("hifigan",))
    gan = configs["hifigan"]
    if not isinstance(gan, HiFiGanRecord):
        raise ValueError(f"{source}: `hifigan` must be `!new:{_HIFIGAN_CLASS}`, got {gan!r}")
    if not isinstance(gan["generator"], HiFTRecord):
        raise ValueError(f"{source}: `hifigan.generator` must be the vocoder (`!ref <hift>`, a `!new:{_HIFT_CLASS}`), "
                         f"got {gan['generator']!r}")
    hift = _hift_config(gan["generator"], source)

    check = _Checker("hifigan")
    disc = check.record("hifigan.discriminator", gan["discriminator"], MultipleDiscriminatorRecord)
    mrd = None
    if disc is not None:
        check.record("hifigan.discriminator.mpd", disc["mpd"], MultiPeriodDiscriminatorRecord)
        mrd = check.record("hifigan.discriminator.mrd", disc["mrd"], MultiResSpecDiscriminatorRecord)
    spec: dict[str, tuple[int, ...]] = {}
    if mrd is not None:
        for key in ("fft_sizes", "hop_sizes", "win_lengths"):
            value = mrd[key]
            if not (isinstance(value, (list, tuple)) and len(value) == 3
                    and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
                check.problems.append(f"hifigan.discriminator.mrd.{key} = {value!r} (three positive integers: "
                                      "upstream builds exactly three resolutions)")
            else:
                spec[key] = tuple(value)
    mel = _mel_config(gan["mel_spec_transform"], check)
    for key in ("multi_mel_spectral_recon_loss_weight", "feat_match_loss_weight", "tpr_loss_weight", "tpr_loss_tau"):
        value = gan[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            check.problems.append(f"hifigan.{key} = {value!r} (a number >= 0)")
    check.fail_if_any(source)
    try:
        return GanConfig(
            hift=hift, mel=mel, multi_mel_spectral_recon_loss_weight=float(gan["multi_mel_spectral_recon_loss_weight"]),
            feat_match_loss_weight=float(gan["feat_match_loss_weight"]), tpr_loss_weight=float(gan["tpr_loss_weight"]),
            tpr_loss_tau=float(gan["tpr_loss_tau"]), spec_fft_sizes=spec["fft_sizes"],
            spec_hop_sizes=spec["hop_sizes"], spec_win_lengths=spec["win_lengths"], spec_window=mrd["window"])
    except ValueError as exc:
        raise ValueError(f"{source}: the `hifigan` section: {exc}") from exc
