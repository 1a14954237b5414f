"""Upstream's own token2wav code, built from a CosyVoice source checkout, for benchmarks and goldens.

``--upstream_src DIR`` points at a FunAudioLLM/CosyVoice checkout with Matcha-TTS under
``third_party/Matcha-TTS`` (or on ``PYTHONPATH``); its extra packages are the ``upstream-bench``
extra of pyproject.toml. Nothing here re-implements upstream: the modules are upstream's classes,
instantiated with the same settings as our configs and loaded with the same state dicts.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch


def import_upstream(src: str) -> None:
    src = os.path.abspath(src)
    if not os.path.isfile(os.path.join(src, "cosyvoice", "cli", "model.py")):
        raise SystemExit(f"{src}: not a CosyVoice source checkout (cosyvoice/cli/model.py missing)")
    for path in (os.path.join(src, "third_party", "Matcha-TTS"), src):
        if path not in sys.path:
            sys.path.insert(0, path)
    # our package is also called cosyvoice: upstream's must win inside this process
    for name in [m for m in sys.modules if m == "cosyvoice" or m.startswith("cosyvoice.")]:
        del sys.modules[name]


def build_flow(config: dict):
    """Upstream CausalMaskedDiffWithXvec with the settings of our ``FlowConfig.to_dict()``."""
    from cosyvoice.flow.decoder import CausalConditionalDecoder
    from cosyvoice.flow.flow import CausalMaskedDiffWithXvec
    from cosyvoice.flow.flow_matching import CausalConditionalCFM
    from cosyvoice.transformer.upsample_encoder import UpsampleConformerEncoder
    from omegaconf import DictConfig

    c = config
    encoder = UpsampleConformerEncoder(
        input_size=c["dim"], output_size=c["dim"], attention_heads=c["encoder_heads"],
        linear_units=c["encoder_hidden"], num_blocks=c["encoder_blocks"], dropout_rate=0.1,
        positional_dropout_rate=0.1, attention_dropout_rate=0.1, normalize_before=True, input_layer="linear",
        pos_enc_layer_type="rel_pos_espnet", selfattention_layer_type="rel_selfattn", use_cnn_module=False,
        macaron_style=False, static_chunk_size=c["token_chunk"])
    estimator = CausalConditionalDecoder(
        in_channels=320, out_channels=80, channels=[c["estimator_channels"]], dropout=0.0,
        attention_head_dim=c["estimator_head_dim"], n_blocks=c["estimator_blocks"],
        num_mid_blocks=c["estimator_mid_blocks"], num_heads=c["estimator_heads"], act_fn="gelu",
        static_chunk_size=c["token_chunk"] * c["token_mel_ratio"], num_decoding_left_chunks=-1)
    cfm = CausalConditionalCFM(in_channels=240, n_spks=1, spk_emb_dim=80, estimator=estimator, cfm_params=DictConfig(
        {"sigma_min": 1e-06, "solver": "euler", "t_scheduler": "cosine", "training_cfg_rate": 0.2,
         "inference_cfg_rate": c["cfg_rate"], "reg_loss_type": "l1"}))
    return CausalMaskedDiffWithXvec(
        input_size=c["dim"], output_size=80, spk_embed_dim=c["spk_embed_dim"], output_type="mel",
        vocab_size=c["vocab_size"], input_frame_rate=25, only_mask_loss=True, token_mel_ratio=c["token_mel_ratio"],
        pre_lookahead_len=c["lookahead"], encoder=encoder, decoder=cfm).eval()


def build_hift(kwargs: dict):
    """Upstream HiFTGenerator from ``HiFTConfig.upstream_kwargs()``."""
    from cosyvoice.hifigan.f0_predictor import ConvRNNF0Predictor
    from cosyvoice.hifigan.generator import HiFTGenerator

    kwargs = dict(kwargs)
    f0 = ConvRNNF0Predictor(**kwargs.pop("f0_predictor"))
    return HiFTGenerator(f0_predictor=f0, **kwargs).eval()


class UpstreamToken2Wav:
    """Upstream's ``CosyVoice2Model.token2wav`` (the flow + HiFT + hift cache logic) on our model files."""

    def __init__(self, flow_config: dict, hift_kwargs: dict, flow_pt: str, hift_pt: str):
        from cosyvoice.cli.model import CosyVoice2Model

        flow, hift = build_flow(flow_config), build_hift(hift_kwargs)
        flow.load_state_dict(torch.load(flow_pt, map_location="cpu", weights_only=True), strict=True)
        hift_state = torch.load(hift_pt, map_location="cpu", weights_only=True)
        hift.load_state_dict({k.replace("generator.", ""): v for k, v in hift_state.items()}, strict=True)
        self.model = CosyVoice2Model(None, flow, hift, fp16=False)

    @staticmethod
    def _inputs(tokens, prompt_tokens, prompt_feat, embedding):
        tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.int32)[None]
        prompt_tokens = torch.as_tensor(np.asarray(prompt_tokens if prompt_tokens is not None else []),
                                        dtype=torch.int32).reshape(1, -1)
        prompt_feat = torch.as_tensor(np.asarray(prompt_feat if prompt_feat is not None else np.zeros((0, 80))),
                                      dtype=torch.float32)[None]
        embedding = torch.as_tensor(np.asarray(embedding), dtype=torch.float32).reshape(1, -1)
        return tokens, prompt_tokens, prompt_feat, embedding

    def synthesize(self, tokens, prompt_tokens, prompt_feat, embedding, *, token_offset, finalize, request_id,
                   return_mel=False):
        """Same protocol as ours (``return_mel``: the mel handed to the vocoder)."""
        m = self.model
        tokens, prompt_tokens, prompt_feat, embedding = self._inputs(tokens, prompt_tokens, prompt_feat, embedding)
        if request_id not in m.hift_cache_dict:
            m.hift_cache_dict[request_id] = None
        stream = token_offset is not None
        mels = []
        if return_mel:  # the mel upstream hands to its vocoder (hift cache frames included)
            original = m.hift.inference

            def capture(speech_feat, *args, **kwargs):
                mels.append(speech_feat.clone())
                return original(speech_feat, *args, **kwargs)
            m.hift.inference = capture
        try:
            with torch.inference_mode():
                wav = m.token2wav(tokens, prompt_tokens, prompt_feat, embedding, token_offset or 0, request_id,
                                  stream=stream and not finalize, finalize=finalize)
        finally:
            if return_mel:
                m.hift.inference = original
        if finalize:
            m.hift_cache_dict.pop(request_id, None)
        wav = wav.reshape(-1).numpy()
        return (wav, mels[0]) if return_mel else wav

    def release(self, request_id):
        self.model.hift_cache_dict.pop(request_id, None)
