"""CosyVoice1's flow model (CosyVoice-300M): 50 Hz speech tokens + speaker embedding + prompt mel ->
80-bin mel at 22.05 kHz / hop 256 (86.13 frames per second).

``FlowV1Model`` has the state-dict layout of upstream's ``MaskedDiffWithXvec`` built from the v1
recipe (``examples/libritts/cosyvoice/conf/cosyvoice.yaml``): token embedding (4096 x 512), speaker
projection 192 -> 80, a 6-block Conformer encoder (linear input layer, espnet relative positions, no
convolution module, full attention), ``encoder_proj`` 512 -> 80, an interpolating length regulator
(the mel rate is not a whole multiple of the token rate) and the conditional flow-matching decoder
whose vector field is the non-causal U-Net of :mod:`~cosyvoice.acoustic.estimator_v1`.

Sampling is upstream's ``ConditionalCFM``: the noise is ``randn_like(mu)`` on torch's global RNG (so
outputs are random unless the caller seeds; a seeded call equals upstream's), 10 Euler steps on a
cosine schedule, classifier-free guidance 0.7 as one batch of two. ``flow_cache`` is upstream's
streaming cache (1, 80, F, 2): the noise and ``mu`` of the prompt frames and of the last 34 frames,
which the next chunk of a stream (whose first 20 tokens overlap this chunk's last 20) reuses for its
first F frames, so the overlapping mel is drawn from the same noise.

Training: ``FlowV1Model(batch, device)`` returns upstream's loss (``MaskedDiffWithXvec.forward`` +
``ConditionalCFM.compute_loss``) with the same Python ``random`` and torch draws in the same order:
the encoder's dropout masks, per utterance ``random.random()`` and, when >= 0.5,
``random.randint(0, int(0.3 * feat_len))`` prompt frames, then ``t``, the noise and the guidance
dropout. Upstream quirk kept: the regulator stretches the whole padded token sequence to the longest
utterance's frames, so a shorter utterance's encoder features are spread over more frames than its
own mel has (then masked). The v1 recipe has no streaming (chunk-causal) training.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice.acoustic.encoder import ConformerBlock, LinearEmbed, relative_positions
from cosyvoice.acoustic.estimator_v1 import ConditionalDecoder
from cosyvoice.acoustic.flow import MEL_BINS, flow_batch_tensors, flow_matching_loss, token_tensor


@dataclass(frozen=True)
class FlowV1Config:
    """The v1 recipe's ``flow`` section; ``tiny()`` for tests. What upstream hard-codes is a field too."""

    vocab_size: int = 4096
    dim: int = 512
    spk_embed_dim: int = 192
    input_frame_rate: int = 50
    sample_rate: int = 22050  # the mel's sample rate and hop: upstream hard-codes 22050 / 256
    hop: int = 256
    encoder_heads: int = 8
    encoder_hidden: int = 2048
    encoder_blocks: int = 6
    regulator_layers: int = 4  # len(sampling_ratios): conv + GroupNorm + Mish layers before the 1x1 conv
    estimator_channels: tuple[int, ...] = (256, 256)
    estimator_head_dim: int = 64
    estimator_heads: int = 8
    estimator_blocks: int = 4
    estimator_mid_blocks: int = 12
    n_timesteps: int = 10
    cfg_rate: float = 0.7
    overlap_tokens: int = 20  # the regulator stretches the first / last 20 target tokens on their own
    cache_frames: int = 34  # the flow cache keeps the noise and mu of the last 34 frames (ConditionalCFM)
    # training only (inference ignores them): the recipe's dropout and flow-matching loss settings
    encoder_dropout: float = 0.1
    encoder_positional_dropout: float = 0.1
    encoder_attention_dropout: float = 0.1
    estimator_dropout: float = 0.0
    sigma_min: float = 1e-6
    training_cfg_rate: float = 0.2
    only_mask_loss: bool = True

    def __post_init__(self):
        object.__setattr__(self, "estimator_channels", tuple(self.estimator_channels))
        for name in ("encoder_dropout", "encoder_positional_dropout", "encoder_attention_dropout",
                     "estimator_dropout", "sigma_min"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"FlowV1Config.{name} = {value!r}: it must lie in [0, 1)")
        if not 0.0 <= self.training_cfg_rate <= 1.0:
            raise ValueError(f"FlowV1Config.training_cfg_rate = {self.training_cfg_rate!r}: it must lie in [0, 1]")
        if self.only_mask_loss is not True:
            raise ValueError(f"FlowV1Config.only_mask_loss = {self.only_mask_loss!r}: only True is supported "
                             "(upstream's MaskedDiffWithXvec always averages its loss over the real frames)")
        if not self.estimator_channels or any(c % 8 for c in self.estimator_channels):
            raise ValueError(f"FlowV1Config.estimator_channels = {self.estimator_channels!r}: one or more levels, "
                             "each a multiple of 8 (the U-Net's GroupNorm has 8 groups)")

    @classmethod
    def full(cls) -> FlowV1Config:
        return cls()

    @classmethod
    def tiny(cls) -> FlowV1Config:
        return cls(dim=64, encoder_heads=4, encoder_hidden=128, encoder_blocks=2, regulator_layers=2,
                   estimator_channels=(32, 32), estimator_head_dim=16, estimator_heads=2, estimator_blocks=1,
                   estimator_mid_blocks=2)

    def mel_frames(self, tokens: int) -> int:
        """Mel frames of ``tokens`` target tokens, upstream's ``int(n / rate * 22050 / 256)``."""
        return int(tokens / self.input_frame_rate * self.sample_rate / self.hop)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConformerEncoder(nn.Module):
    """Linear embedding + relative positions, Conformer blocks (full attention over real tokens), final norm."""

    def __init__(self, dim: int, heads: int, hidden: int, blocks: int, dropout: float = 0.0,
                 positional_dropout: float = 0.0, attention_dropout: float = 0.0):
        super().__init__()
        self.dropout, self.positional_dropout = dropout, positional_dropout
        self.embed = LinearEmbed(dim, dim)
        self.after_norm = nn.LayerNorm(dim, eps=1e-5)  # registered before the blocks: upstream's key order
        self.encoders = nn.ModuleList(ConformerBlock(dim, heads, hidden, dropout, attention_dropout)
                                      for _ in range(blocks))

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Features (B, S, D) of embedded tokens (B, S, D); keys after each length are not attended to.

        Dropout (training) in upstream's order: after the input norm, after the positional scaling,
        on the position codes, then inside each block.
        """
        size = tokens.shape[1]
        keys = (torch.arange(size, device=tokens.device)[None, :] < lengths[:, None])[:, None, None, :]
        x = self.embed.padded(tokens, self.dropout, self.positional_dropout)
        pos = relative_positions(-(size - 1), size - 1, x.shape[-1], x.device, x.dtype)
        pos = F.dropout(pos, self.positional_dropout, self.training)
        for block in self.encoders:
            x = block.padded(x, pos, keys)
        return self.after_norm(x)


class LengthRegulator(nn.Module):
    """Linear interpolation of the encoder features to the mel frames, then convolutions (``model.N``)."""

    def __init__(self, channels: int, layers: int):
        super().__init__()
        parts: list[nn.Module] = []
        for _ in range(layers):
            parts += [nn.Conv1d(channels, channels, 3, padding=1), nn.GroupNorm(1, channels), nn.Mish()]
        parts.append(nn.Conv1d(channels, channels, 1))
        self.model = nn.Sequential(*parts)

    def forward(self, h: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Training: (B, S, C) -> (B, max(frames), C), zero after each utterance's ``frames``."""
        size = int(frames.max())
        mask = (torch.arange(size, device=h.device)[None, :] < frames[:, None]).to(h).unsqueeze(-1)
        x = F.interpolate(h.transpose(1, 2).contiguous(), size=size, mode="linear")
        return self.model(x).transpose(1, 2) * mask

    def inference(self, prompt: torch.Tensor, target: torch.Tensor, prompt_frames: int, target_frames: int,
                  edge_tokens: int, edge_frames: int) -> torch.Tensor:
        """(1, P + N, C) features -> (1, prompt_frames + target_frames, C).

        Prompt and target are stretched separately, so the prompt's mel ends exactly at frame
        ``prompt_frames``; a target longer than two edges stretches its first and last
        ``edge_tokens`` tokens to ``edge_frames`` frames each (the overlap a stream cross-fades)
        and its middle to the rest.
        """
        def stretch(x: torch.Tensor, frames: int) -> torch.Tensor:
            return F.interpolate(x.transpose(1, 2).contiguous(), size=frames, mode="linear")

        n = target.shape[1]
        if n > 2 * edge_tokens:
            head = stretch(target[:, :edge_tokens], edge_frames)
            middle = stretch(target[:, edge_tokens:n - edge_tokens], target_frames - 2 * edge_frames)
            tail = stretch(target[:, n - edge_tokens:], edge_frames)
            x = torch.cat([head, middle, tail], dim=2)
        else:
            x = stretch(target, target_frames)
        if prompt.shape[1]:
            x = torch.cat([stretch(prompt, prompt_frames), x], dim=2)
        return self.model(x).transpose(1, 2)


class FlowMatchingV1(nn.Module):
    """Upstream's ``ConditionalCFM`` around the U-Net estimator (the model's ``decoder``)."""

    def __init__(self, config: FlowV1Config):
        super().__init__()
        self.config = config
        self.estimator = ConditionalDecoder(
            in_channels=4 * MEL_BINS, out_channels=MEL_BINS, channels=config.estimator_channels,
            head_dim=config.estimator_head_dim, blocks=config.estimator_blocks,
            mid_blocks=config.estimator_mid_blocks, heads=config.estimator_heads, dropout=config.estimator_dropout)

    def time_steps(self, device=None) -> torch.Tensor:
        span = torch.linspace(0, 1, self.config.n_timesteps + 1, dtype=torch.float32, device=device)
        return 1 - torch.cos(span * 0.5 * torch.pi)

    def sample(self, mu: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor, prompt_frames: int,
               cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mel (1, 80, T), new cache) from ``mu``/``cond`` (1, 80, T), ``spks`` (1, 80).

        The noise is drawn first (``randn_like(mu)``, torch's global RNG); the first F frames of the
        noise and of ``mu`` are then replaced by the ``cache`` (1, 80, F, 2). The time ``t`` and step
        ``dt`` advance as upstream's solver does (t += dt, then dt = t_k+1 - t).
        """
        z = torch.randn_like(mu)
        if cache.shape[2]:
            n = cache.shape[2]
            mu = mu.clone()
            z[:, :, :n] = cache[:, :, :, 0]
            mu[:, :, :n] = cache[:, :, :, 1]
        last = self.config.cache_frames
        new_cache = torch.stack([torch.cat([z[:, :, :prompt_frames], z[:, :, -last:]], dim=2),
                                 torch.cat([mu[:, :, :prompt_frames], mu[:, :, -last:]], dim=2)], dim=-1)
        dtype = next(self.estimator.parameters()).dtype
        steps = self.time_steps(mu.device)
        zeros = torch.zeros_like
        mask = torch.ones(2, 1, mu.shape[2], device=mu.device, dtype=dtype)
        mu_in = torch.cat([mu, zeros(mu)]).to(dtype)
        spks_in = torch.cat([spks, zeros(spks)]).to(dtype)
        cond_in = torch.cat([cond, zeros(cond)]).to(dtype)
        x, t, dt = z, steps[0:1], steps[1] - steps[0]
        rate = self.config.cfg_rate
        for step in range(1, len(steps)):
            v = self.estimator(torch.cat([x, x]).to(dtype), mask, mu_in, t.expand(2).to(dtype), spks_in,
                               cond_in).float()
            x = x + dt * ((1.0 + rate) * v[:1] - rate * v[1:])
            t = t + dt
            if step < len(steps) - 1:
                dt = steps[step + 1] - t
        return x.float(), new_cache

    def compute_loss(self, x1: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, spks: torch.Tensor,
                     cond: torch.Tensor) -> torch.Tensor:
        """Upstream's conditional flow-matching loss of the target mel ``x1`` (B, 80, T).

        ``mask`` (B, 1, T) marks real frames. Draws ``t`` (uniform), the noise and the guidance
        dropout from torch's global RNG in upstream's order.
        """
        return flow_matching_loss(x1, mask, mu, spks, cond, self.config.sigma_min, self.config.training_cfg_rate,
                                  lambda y, mu, t, spks, cond: self.estimator(y, mask, mu, t, spks, cond))


class FlowV1Model(nn.Module):
    def __init__(self, config: FlowV1Config | None = None):
        super().__init__()
        self.config = config = config or FlowV1Config.full()
        self.input_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.spk_embed_affine_layer = nn.Linear(config.spk_embed_dim, MEL_BINS)
        self.encoder = ConformerEncoder(
            dim=config.dim, heads=config.encoder_heads, hidden=config.encoder_hidden, blocks=config.encoder_blocks,
            dropout=config.encoder_dropout, positional_dropout=config.encoder_positional_dropout,
            attention_dropout=config.encoder_attention_dropout)
        self.encoder_proj = nn.Linear(config.dim, MEL_BINS)
        self.decoder = FlowMatchingV1(config)
        self.length_regulator = LengthRegulator(MEL_BINS, config.regulator_layers)

    def _encode(self, token: torch.Tensor, token_len: torch.Tensor) -> torch.Tensor:
        real = torch.arange(token.shape[1], device=token.device)[None, :] < token_len[:, None]
        x = self.input_embedding(torch.clamp(token, min=0)) * real.unsqueeze(-1).to(self.input_embedding.weight)
        return self.encoder_proj(self.encoder(x, token_len))

    def forward(self, batch: dict, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """``{"loss": ...}``: upstream's flow-matching loss on a padded training batch.

        ``batch`` holds ``speech_token`` (B, S) int + ``speech_token_len`` (B,), ``speech_feat``
        (B, T, 80) 22.05 kHz mel + ``speech_feat_len`` (B,) (any number of frames per utterance: the
        regulator interpolates), and ``embedding`` (B, 192). S and T are the longest lengths.
        """
        token, token_len, feat, feat_len, embedding = _training_batch(batch, self.config)
        # upstream's int(0.3 * feat_len[i]): a float32 product of the length tensor, truncated
        prompt_limits = [int(v) for v in (0.3 * feat_len.cpu()).tolist()]
        token, token_len, feat, feat_len, embedding = (v.to(device) for v in (token, token_len, feat, feat_len,
                                                                               embedding))
        spks = self.spk_embed_affine_layer(F.normalize(embedding, dim=1))
        h = self.length_regulator(self._encode(token, token_len), feat_len)

        cond = torch.zeros(feat.shape, device=feat.device)
        for i, limit in enumerate(prompt_limits):
            if random.random() < 0.5:
                continue
            index = random.randint(0, limit)
            cond[i, :index] = feat[i, :index]
        mask = (torch.arange(feat.shape[1], device=feat.device)[None, :] < feat_len[:, None]).to(h)
        loss = self.decoder.compute_loss(feat.transpose(1, 2).contiguous(), mask.unsqueeze(1),
                                         h.transpose(1, 2).contiguous(), spks, cond.transpose(1, 2))
        return {"loss": loss}

    @torch.inference_mode()
    def inference(self, tokens: torch.Tensor, prompt_tokens: torch.Tensor, prompt_feat: torch.Tensor,
                  embedding: torch.Tensor, flow_cache: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mel (1, 80, frames), flow_cache) of ``tokens`` after the prompt.

        ``tokens`` (1, N) and ``prompt_tokens`` (1, P) int ids, ``prompt_feat`` (1, F, 80) the
        prompt's mel (F need not be a multiple of P; both are empty without a prompt), ``embedding``
        (1, 192). frames = ``int(N / 50 * 22050 / 256)``. ``flow_cache`` is the cache the previous
        chunk of the same stream returned (None or (1, 80, 0, 2) for the first); the returned one
        goes to the next call.
        """
        cfg = self.config
        tokens = _ids(tokens, cfg, "tokens")
        prompt_tokens = _ids(prompt_tokens, cfg, "prompt_tokens")
        if tokens.shape[1] == 0:
            raise ValueError("tokens is empty: the flow needs at least one target speech token")
        if embedding.shape != (1, cfg.spk_embed_dim):
            raise ValueError(f"embedding has shape {tuple(embedding.shape)}; expected (1, {cfg.spk_embed_dim})")
        if prompt_feat.dim() != 3 or prompt_feat.shape[0] != 1 or prompt_feat.shape[2] != MEL_BINS:
            raise ValueError(f"prompt_feat has shape {tuple(prompt_feat.shape)}; expected (1, frames, {MEL_BINS})")
        prompt_frames, n = prompt_feat.shape[1], tokens.shape[1]
        if (prompt_frames == 0) != (prompt_tokens.shape[1] == 0):
            raise ValueError(f"prompt_tokens has {prompt_tokens.shape[1]} tokens and prompt_feat {prompt_frames} "
                             "frames: give both (a prompt) or neither")
        frames = cfg.mel_frames(n)
        edge_frames = cfg.mel_frames(cfg.overlap_tokens)
        if n > 2 * cfg.overlap_tokens and frames - 2 * edge_frames < 1:
            raise ValueError(f"{n} tokens give {frames} mel frames, too few for two {edge_frames}-frame edges")
        device = self.input_embedding.weight.device
        cache = torch.zeros(1, MEL_BINS, 0, 2, device=device) if flow_cache is None else flow_cache.to(device)
        if cache.dim() != 4 or cache.shape[:2] != (1, MEL_BINS) or cache.shape[3] != 2:
            raise ValueError(f"flow_cache has shape {tuple(cache.shape)}; expected (1, {MEL_BINS}, frames, 2) as the "
                             "previous call returned it")
        if cache.shape[2] > prompt_frames + frames:
            raise ValueError(f"flow_cache holds {cache.shape[2]} frames but this call has only {prompt_frames + frames} "
                             "(prompt + target): it belongs to another stream or prompt")

        everything = torch.cat([prompt_tokens, tokens], dim=1).to(device)
        length = torch.tensor([everything.shape[1]], device=device)
        spks = self.spk_embed_affine_layer(F.normalize(embedding.to(device), dim=1))
        h = self._encode(everything, length)
        p = prompt_tokens.shape[1]
        h = self.length_regulator.inference(h[:, :p], h[:, p:], prompt_frames, frames, cfg.overlap_tokens,
                                            edge_frames)
        mu = h.transpose(1, 2).contiguous()
        cond = torch.zeros_like(mu)
        cond[:, :, :prompt_frames] = prompt_feat.to(device, mu.dtype).transpose(1, 2)
        mel, cache = self.decoder.sample(mu, spks, cond, prompt_frames, cache)
        return mel[:, :, prompt_frames:], cache


def _ids(tokens, cfg: FlowV1Config, name: str) -> torch.Tensor:
    """(1, N) int64 ids in the vocabulary (a tensor or array; (N,) accepted)."""
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() == 2 and tokens.shape[0] != 1:
            raise ValueError(f"{name} has shape {tuple(tokens.shape)}: the flow synthesizes one utterance (1, N)")
        tokens = tokens.detach().cpu().numpy()
    array = np.asarray(tokens)
    if array.ndim == 2 and array.shape[0] != 1:
        raise ValueError(f"{name} has shape {array.shape}: the flow synthesizes one utterance (1, N)")
    return token_tensor(array, cfg.vocab_size, name)


def _training_batch(batch: dict, cfg: FlowV1Config):
    """The flow's five batch tensors, checked against what upstream's forward silently assumes."""
    token, token_len, feat, feat_len, embedding = flow_batch_tensors(batch, cfg.spk_embed_dim)
    b = token.shape[0]
    lengths, frames = token_len.cpu().long(), feat_len.cpu().long()
    if b == 0 or int(lengths.min()) < 1 or int(frames.min()) < 1:
        raise ValueError(f"flow training batch: every utterance needs at least one speech token and one mel frame; "
                         f"speech_token_len = {lengths.tolist()}, speech_feat_len = {frames.tolist()}")
    if int(token.max()) >= cfg.vocab_size:
        raise ValueError(f"flow training batch: speech token id {int(token.max())} is outside the flow's vocabulary "
                         f"of {cfg.vocab_size} (a CosyVoice1 tokenizer gives ids below 4096)")
    if int(lengths.max()) != token.shape[1] or int(frames.max()) != feat.shape[1]:
        raise ValueError(f"flow training batch: speech_token is padded to {token.shape[1]} tokens and speech_feat to "
                         f"{feat.shape[1]} frames; they must be padded to the longest utterance "
                         f"({int(lengths.max())} tokens, {int(frames.max())} frames)")
    return token, token_len, feat, feat_len, embedding


def load_flow_v1(source, config: FlowV1Config | None = None) -> FlowV1Model:
    """A :class:`FlowV1Model` from a CosyVoice-300M ``flow.pt`` (path, bytes or state dict), strictly, in eval mode.

    The file is upstream's plain state dict (no ``flow.`` prefix); every key and shape must match.
    """
    from cosyvoice.acoustic.checkpoint import load_released

    return load_released(FlowV1Model(config), source, "flow")
