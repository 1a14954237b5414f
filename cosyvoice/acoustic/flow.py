"""CosyVoice2's flow model: speech tokens + speaker embedding + prompt mel -> 80-bin mel at 50 Hz.

``FlowModel`` has the state-dict layout of upstream's ``CausalMaskedDiffWithXvec`` (token embedding,
speaker projection 192 -> 80, :mod:`~cosyvoice.acoustic.encoder`, ``encoder_proj`` and the
conditional flow matching decoder whose vector field is :mod:`~cosyvoice.acoustic.estimator`).
Sampling is upstream's: 10 Euler steps on a cosine time schedule from a fixed noise table (seed 0,
1 x 80 x 15000, sliced by frame position, so outputs are deterministic), with classifier-free
guidance 0.7 computed as one batch of two.

Streaming: a non-final call holds back the last ``lookahead`` tokens (they only condition the
pre-lookahead layer) and runs chunk-causal; the final call runs without chunk masks, as upstream
does, unless ``chunk_causal_final`` asks to keep it chunk-causal (then a stream costs about one
offline pass). A :class:`FlowStream` carries what earlier calls of a stream computed, so each call
computes only the chunks after the last complete one (upstream re-runs the whole prefix).

Training: ``FlowModel(batch, device)`` returns upstream's conditional flow-matching loss on a padded
batch of the data pipeline (``CausalMaskedDiffWithXvec.forward`` + ``ConditionalCFM.compute_loss``),
with the same Python ``random`` and torch draws in the same order, so a seeded step gives upstream's
loss: half the batches chunk-causal, a random prefix of the target mel as prompt for half the
utterances, ``t`` uniform, classifier-free-guidance dropout of the conditions, MSE over real frames.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice.acoustic.chunks import PLAIN, ChunkState, Pass
from cosyvoice.acoustic.encoder import UpsampleConformerEncoder
from cosyvoice.acoustic.estimator import CausalConditionalDecoder

MEL_BINS = 80


@dataclass(frozen=True)
class FlowConfig:
    """The recipe's ``flow`` section (cosyvoice2.yaml); ``tiny()`` keeps what upstream hard-codes."""

    vocab_size: int = 6561
    dim: int = 512
    spk_embed_dim: int = 192
    token_mel_ratio: int = 2
    lookahead: int = 3
    encoder_heads: int = 8
    encoder_hidden: int = 2048
    encoder_blocks: int = 6
    up_blocks: int = 4
    token_chunk: int = 25
    estimator_channels: int = 256
    estimator_head_dim: int = 64
    estimator_heads: int = 8
    estimator_blocks: int = 4
    estimator_mid_blocks: int = 12
    n_timesteps: int = 10
    cfg_rate: float = 0.7
    noise_frames: int = 50 * 300
    noise_seed: int = 0
    # training only (inference ignores them): the recipe's dropout and flow-matching loss settings
    encoder_dropout: float = 0.1  # encoder dropout_rate
    encoder_positional_dropout: float = 0.1  # encoder positional_dropout_rate
    encoder_attention_dropout: float = 0.1  # encoder attention_dropout_rate
    estimator_dropout: float = 0.0
    sigma_min: float = 1e-6
    training_cfg_rate: float = 0.2  # share of utterances trained without mu, speaker and prompt
    only_mask_loss: bool = True

    def __post_init__(self):
        for name in ("encoder_dropout", "encoder_positional_dropout", "encoder_attention_dropout",
                     "estimator_dropout", "sigma_min"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"FlowConfig.{name} = {value!r}: it must lie in [0, 1)")
        if not 0.0 <= self.training_cfg_rate <= 1.0:
            raise ValueError(f"FlowConfig.training_cfg_rate = {self.training_cfg_rate!r}: it must lie in [0, 1]")
        if self.only_mask_loss is not True:
            raise ValueError(f"FlowConfig.only_mask_loss = {self.only_mask_loss!r}: only True is supported "
                             "(upstream's CausalMaskedDiffWithXvec stores the flag but always averages its loss "
                             "over the real frames; it has no unmasked loss)")

    @classmethod
    def full(cls) -> FlowConfig:
        return cls()

    @classmethod
    def tiny(cls) -> FlowConfig:
        # dim 512 and 4 up-blocks stay: upstream's pre-lookahead and upsampling layers hard-code them
        return cls(encoder_heads=4, encoder_hidden=256, encoder_blocks=2, estimator_channels=64,
                   estimator_head_dim=16, estimator_heads=2, estimator_blocks=1, estimator_mid_blocks=2)

    @property
    def frame_chunk(self) -> int:
        return self.token_chunk * self.token_mel_ratio

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_NOISE: dict[tuple[int, int], torch.Tensor] = {}


def noise_table(frames: int, seed: int) -> torch.Tensor:
    """Upstream's fixed flow noise: ``torch.randn(1, 80, frames)`` right after seeding ``seed``.

    Drawn from a private generator, so building a model does not reset torch's global RNG.
    """
    key = (frames, seed)
    if key not in _NOISE:
        _NOISE[key] = torch.randn(1, MEL_BINS, frames, generator=torch.Generator().manual_seed(seed))
    return _NOISE[key]


def flow_matching_loss(x1: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor,
                       sigma_min: float, cfg_rate: float, estimate) -> torch.Tensor:
    """Upstream's conditional flow-matching loss (both flows): ``t`` uniform, noise, then the guidance dropout
    of the conditions, drawn from torch's global RNG in that order; MSE of ``estimate(y, mu, t, spks, cond)``
    against the straight-path velocity over the real frames (``mask`` (B, 1, T))."""
    b = mu.shape[0]
    t = torch.rand([b, 1, 1], device=mu.device, dtype=mu.dtype)
    z = torch.randn_like(x1)
    y = (1 - (1 - sigma_min) * t) * z + t * x1
    u = x1 - (1 - sigma_min) * z
    if cfg_rate > 0:
        keep = torch.rand(b, device=x1.device) > cfg_rate
        mu, spks, cond = mu * keep.view(-1, 1, 1), spks * keep.view(-1, 1), cond * keep.view(-1, 1, 1)
    pred = estimate(y, mu, t.view(b), spks, cond)
    return F.mse_loss(pred * mask, u * mask, reduction="sum") / (torch.sum(mask) * u.shape[1])


class FlowMatching(nn.Module):
    """The conditional flow-matching sampler around the estimator (upstream's ``decoder``)."""

    def __init__(self, config: FlowConfig):
        super().__init__()
        self.config = config
        self.estimator = CausalConditionalDecoder(
            in_channels=4 * MEL_BINS, out_channels=MEL_BINS, channels=config.estimator_channels,
            head_dim=config.estimator_head_dim, blocks=config.estimator_blocks,
            mid_blocks=config.estimator_mid_blocks, heads=config.estimator_heads, chunk=config.frame_chunk,
            dropout=config.estimator_dropout)

        self._compiled = None

    def compile_estimator(self) -> None:
        """Run plain passes (offline calls, upstream-exact final chunks) through ``torch.compile``.

        Chunked passes stay eager: their positions and caches change every call. Compiling takes
        minutes on a CPU (once per process and shape family, ``dynamic=True``), then the fused
        kernels run several times faster.
        """
        self._compiled = torch.compile(self.estimator, dynamic=True)

    def time_steps(self) -> torch.Tensor:
        span = torch.linspace(0, 1, self.config.n_timesteps + 1, dtype=torch.float32)
        return 1 - torch.cos(span * 0.5 * torch.pi)

    def sample(self, mu: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor, run: Pass, chunked: bool) -> torch.Tensor:
        """Mel of frames ``[run.start, run.end)`` from their encoder output ``mu`` (1, 80, n) and ``cond``.

        The time ``t`` and step ``dt`` are advanced exactly as upstream's solver does (t += dt, then
        dt = t_k+1 - t), so the float rounding of the schedule is the same.
        """
        dtype = next(self.estimator.parameters()).dtype
        steps = self.time_steps().to(mu.device)
        noise = noise_table(self.config.noise_frames, self.config.noise_seed)
        x = noise[:, :, run.start:run.end].to(mu.device, torch.float32)
        zeros = torch.zeros_like
        mu_in = torch.cat([mu, zeros(mu)]).to(dtype)
        spks_in = torch.cat([spks, zeros(spks)]).to(dtype)
        cond_in = torch.cat([cond, zeros(cond)]).to(dtype)
        t, dt = steps[0:1], steps[1] - steps[0]
        rate = self.config.cfg_rate
        compiled = self._compiled is not None and run.state is None and not chunked
        estimator = self._compiled if compiled else self.estimator
        for step in range(1, len(steps)):
            v = estimator(torch.cat([x, x]).to(dtype), mu_in, t.expand(2).to(dtype), spks_in, cond_in,
                          PLAIN if compiled else run.at_step(step), chunked).float()
            x = x + dt * ((1.0 + rate) * v[:1] - rate * v[1:])
            t = t + dt
            if step < len(steps) - 1:
                dt = steps[step + 1] - t
        return x

    def compute_loss(self, x1: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, spks: torch.Tensor,
                     cond: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """Upstream's conditional flow-matching loss of the target mel ``x1`` (B, 80, T).

        ``mask`` (B, 1, T) marks real frames, ``attn_mask`` is the estimator's boolean attention
        mask. Draws ``t`` (uniform), the noise and the guidance dropout from torch's global RNG in
        upstream's order.
        """
        return flow_matching_loss(x1, mask, mu, spks, cond, self.config.sigma_min, self.config.training_cfg_rate,
                                  lambda y, mu, t, spks, cond: self.estimator.padded(y, mu, t, spks, cond, mask, attn_mask))


@dataclass
class FlowStream:
    """A stream's flow state: the tokens seen so far and what their complete chunks computed."""

    cache: ChunkState = field(default_factory=ChunkState)
    tokens: torch.Tensor | None = None  # prompt + target tokens of the last call
    conditioning: tuple = ()  # (prompt_feat, embedding) the cache was computed with
    mel: torch.Tensor | None = None  # (1, 80, 2 * done tokens) final mel of the complete chunks

    @property
    def done(self) -> int:
        return self.cache.done

    def nbytes(self) -> int:
        return self.cache.nbytes() + (0 if self.mel is None else self.mel.numel() * 4)

    def reset(self) -> None:
        self.cache, self.tokens, self.conditioning, self.mel = ChunkState(), None, (), None


class FlowModel(nn.Module):
    def __init__(self, config: FlowConfig | None = None):
        super().__init__()
        self.config = config = config or FlowConfig.full()
        self.input_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.spk_embed_affine_layer = nn.Linear(config.spk_embed_dim, MEL_BINS)
        self.encoder = UpsampleConformerEncoder(
            dim=config.dim, heads=config.encoder_heads, hidden=config.encoder_hidden, blocks=config.encoder_blocks,
            up_blocks=config.up_blocks, chunk=config.token_chunk, lookahead=config.lookahead,
            dropout=config.encoder_dropout, positional_dropout=config.encoder_positional_dropout,
            attention_dropout=config.encoder_attention_dropout)
        self.encoder_proj = nn.Linear(config.dim, MEL_BINS)
        self.decoder = FlowMatching(config)

    def forward(self, batch: dict, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """``{"loss": ...}``: upstream's flow-matching loss on a padded training batch.

        ``batch`` holds ``speech_token`` (B, S) int + ``speech_token_len`` (B,), ``speech_feat``
        (B, T, 80) + ``speech_feat_len`` (B,) with T = token_mel_ratio x S, and ``embedding``
        (B, 192). Draws, in upstream's order: ``random.random()`` (chunk-causal when < 0.5), the
        dropout masks (training mode), per utterance ``random.random()`` and, when >= 0.5,
        ``random.randint(0, int(0.3 * feat_len))`` prompt frames, then torch's ``t``, noise and
        guidance dropout.
        """
        cfg = self.config
        token, token_len, feat, feat_len, embedding = _training_batch(batch, cfg)
        # upstream's int(0.3 * feat_len[i]): a float32 product of the length tensor, truncated
        prompt_limits = [int(v) for v in (0.3 * feat_len.cpu()).tolist()]
        token, token_len, feat, embedding = (v.to(device) for v in (token, token_len, feat, embedding))
        streaming = random.random() < 0.5

        spks = self.spk_embed_affine_layer(F.normalize(embedding, dim=1))
        n_tokens, n_frames = token.shape[1], feat.shape[1]
        real_tokens = torch.arange(n_tokens, device=token.device)[None, :] < token_len[:, None]
        x = self.input_embedding(torch.clamp(token, min=0)) * real_tokens.float().unsqueeze(-1)
        frame_len = token_len * cfg.token_mel_ratio
        token_attn = _attention_mask(token_len, n_tokens, cfg.token_chunk if streaming else 0)
        frame_attn = _attention_mask(frame_len, n_frames, cfg.frame_chunk if streaming else 0)
        h = self.encoder_proj(self.encoder.padded(x, token_attn, frame_attn))

        cond = torch.zeros(feat.shape, device=feat.device)
        for i, limit in enumerate(prompt_limits):
            if random.random() < 0.5:
                continue
            index = random.randint(0, limit)
            cond[i, :index] = feat[i, :index]
        mask = (torch.arange(n_frames, device=feat.device)[None, :] < frame_len[:, None]).to(h)
        loss = self.decoder.compute_loss(feat.transpose(1, 2).contiguous(), mask.unsqueeze(1),
                                         h.transpose(1, 2).contiguous(), spks, cond.transpose(1, 2), frame_attn)
        return {"loss": loss}

    @torch.inference_mode()
    def inference(self, tokens: torch.Tensor, prompt_tokens: torch.Tensor, prompt_feat: torch.Tensor,
                  embedding: torch.Tensor, *, finalize: bool, chunked: bool,
                  stream: FlowStream | None = None) -> torch.Tensor:
        """Mel (1, 80, frames) of ``tokens`` after the prompt.

        ``tokens`` (1, N) and ``prompt_tokens`` (1, P) int64 ids, ``prompt_feat`` (1, 2P, 80),
        ``embedding`` (1, 192). A non-final call (``finalize`` False) holds back the last
        ``lookahead`` tokens. ``chunked`` runs chunk-causal attention (upstream's ``streaming``).
        With a ``stream`` (chunked calls only) the complete chunks of earlier calls are reused.
        """
        cfg = self.config
        n_context = 0 if finalize else cfg.lookahead
        everything = torch.cat([prompt_tokens, tokens], dim=1)
        length = everything.shape[1] - n_context
        if length <= 0:
            raise ValueError(f"{tokens.shape[1]} tokens leave nothing to synthesize before the {n_context} "
                             "look-ahead tokens")
        if length * cfg.token_mel_ratio > cfg.noise_frames:
            raise ValueError(f"{length * cfg.token_mel_ratio} mel frames exceed the flow's noise table of "
                             f"{cfg.noise_frames} frames ({cfg.noise_frames // 50} s including the prompt)")
        prompt_frames = prompt_feat.shape[1]
        if prompt_frames != prompt_tokens.shape[1] * cfg.token_mel_ratio:
            raise ValueError(f"prompt_feat has {prompt_frames} frames for {prompt_tokens.shape[1]} prompt tokens; "
                             f"the flow needs exactly {cfg.token_mel_ratio} frames per token")
        if stream is not None and not chunked:
            raise ValueError("a flow stream cache needs chunk-causal (chunked) calls")
        start = self._resume_point(stream, everything, prompt_feat, embedding) if stream is not None else 0
        commit = (length // cfg.token_chunk) * cfg.token_chunk if stream is not None else length
        commit = max(commit, start)
        state = stream.cache if stream is not None else None
        ratio = cfg.token_mel_ratio
        token_run = Pass(state, start, length, commit, step="encoder")
        frame_run = Pass(state, ratio * start, ratio * length, ratio * commit, step="encoder")

        spks = self.spk_embed_affine_layer(F.normalize(embedding, dim=1))
        h = self.encoder(self.input_embedding(everything), n_context, chunked, token_run, frame_run)
        mu = self.encoder_proj(h).transpose(1, 2)
        cond = torch.zeros_like(mu)
        first, last = frame_run.start, frame_run.end
        if first < prompt_frames:
            n = min(prompt_frames, last) - first
            cond[:, :, :n] = prompt_feat[:, first:first + n].transpose(1, 2)
        mel = self.decoder.sample(mu, spks, cond, frame_run, chunked)
        if stream is not None:
            if start:
                mel = torch.cat([stream.mel, mel], dim=2)
            stream.mel = mel[:, :, :ratio * commit].clone()
            stream.cache.done = commit
            stream.tokens = everything
            stream.conditioning = (prompt_feat, embedding)
        return mel[:, :, prompt_frames:]

    def _resume_point(self, stream: FlowStream, everything: torch.Tensor, prompt_feat: torch.Tensor,
                      embedding: torch.Tensor) -> int:
        """Tokens whose chunks the stream can reuse; 0 (after a reset) when the call does not extend it."""
        done = stream.done
        if done == 0:
            return 0
        seen = done + self.config.lookahead  # the committed chunks looked this far ahead
        same = (stream.tokens is not None and everything.shape[1] >= seen and stream.tokens.shape[1] >= seen
                and torch.equal(stream.tokens[:, :seen], everything[:, :seen])
                and len(stream.conditioning) == 2
                and torch.equal(stream.conditioning[0], prompt_feat)
                and torch.equal(stream.conditioning[1], embedding))
        if not same:
            stream.reset()
            return 0
        return done


def _attention_mask(lengths: torch.Tensor, size: int, chunk: int) -> torch.Tensor:
    """Boolean attention mask of a padded batch: keys before each length, and with ``chunk`` > 0 only
    keys before the end of the query's chunk. (B, 1, 1, size) without chunks, else (B, 1, size, size)."""
    positions = torch.arange(size, device=lengths.device)
    keys = (positions[None, :] < lengths[:, None])[:, None, None, :]
    if chunk <= 0:
        return keys
    return keys & (positions[None, :] < (torch.div(positions, chunk, rounding_mode="floor") + 1)[:, None] * chunk)


_BATCH_KEYS = ("speech_token", "speech_token_len", "speech_feat", "speech_feat_len", "embedding")


def flow_batch_tensors(batch: dict, spk_embed_dim: int) -> tuple[torch.Tensor, ...]:
    """The five tensors of a flow training batch (both flows), with their presence and shapes checked."""
    missing = [k for k in _BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"flow training batch lacks {missing} (it needs {list(_BATCH_KEYS)}: the speech tokens, "
                         "mel and speaker embedding of each utterance)")
    token, token_len, feat, feat_len, embedding = (batch[k] for k in _BATCH_KEYS)
    b = token.shape[0] if token.dim() == 2 else -1
    if (token.dim() != 2 or token_len.shape != (b,) or feat.dim() != 3 or feat.shape[0] != b
            or feat.shape[2] != MEL_BINS or feat_len.shape != (b,) or embedding.shape != (b, spk_embed_dim)):
        raise ValueError(f"flow training batch shapes: speech_token {tuple(token.shape)}, speech_token_len "
                         f"{tuple(token_len.shape)}, speech_feat {tuple(feat.shape)}, speech_feat_len "
                         f"{tuple(feat_len.shape)}, embedding {tuple(embedding.shape)}; expected (B, S), (B,), "
                         f"(B, T, {MEL_BINS}), (B,), (B, {spk_embed_dim})")
    return token, token_len, feat, feat_len, embedding


def _training_batch(batch: dict, cfg: FlowConfig):
    """The flow's five batch tensors, checked against what upstream's forward silently assumes."""
    token, token_len, feat, feat_len, embedding = flow_batch_tensors(batch, cfg.spk_embed_dim)
    b = token.shape[0]
    lengths = token_len.cpu().long()
    if b == 0 or int(lengths.min()) < 1:
        raise ValueError(f"flow training batch: every utterance needs at least one speech token; speech_token_len = "
                         f"{lengths.tolist()}")
    ids = token.cpu()
    if int(ids.max()) >= cfg.vocab_size:
        raise ValueError(f"flow training batch: speech token id {int(ids.max())} is outside the flow's vocabulary of "
                         f"{cfg.vocab_size} (a CosyVoice2 tokenizer gives ids below 6561)")
    ratio = cfg.token_mel_ratio
    if int(lengths.max()) != token.shape[1] or feat.shape[1] != ratio * token.shape[1]:
        raise ValueError(f"flow training batch: speech_token is padded to {token.shape[1]} tokens and speech_feat to "
                         f"{feat.shape[1]} frames; the flow needs the longest utterance's {int(lengths.max())} tokens "
                         f"and exactly {ratio} mel frames per token ({ratio * int(lengths.max())})")
    bad = torch.nonzero(feat_len.cpu().long() != ratio * lengths).flatten().tolist()
    if bad:
        i = bad[0]
        raise ValueError(f"flow training batch: utterance {i} has {int(feat_len[i])} mel frames for "
                         f"{int(lengths[i])} speech tokens; the flow needs exactly {ratio} frames per token (pad the "
                         "audio to a multiple of 960 samples at 24 kHz, as compute_fbank does)")
    return token, token_len, feat, feat_len, embedding


def token_tensor(tokens, vocab_size: int, name: str) -> torch.Tensor:
    """(1, N) int64 tensor of speech-token ids, every id in ``[0, vocab_size)``."""
    array = np.asarray(tokens).reshape(-1) if tokens is not None else np.zeros(0, dtype=np.int64)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.mod(array, 1) == 0):
            raise ValueError(f"{name}: speech-token ids must be integers")
    array = array.astype(np.int64)
    bad = (array < 0) | (array >= vocab_size)
    if bad.any():
        raise ValueError(f"{name}: ids must lie in [0, {vocab_size - 1}]; got {int(array[bad][0])} at position "
                         f"{int(np.flatnonzero(bad)[0])}")
    return torch.from_numpy(array)[None]


def load_flow(source, config: FlowConfig | None = None) -> FlowModel:
    """A :class:`FlowModel` from a released ``flow.pt`` (path, bytes or state dict), strictly, in eval mode.

    The file is upstream's plain state dict (no ``flow.`` prefix); every key and shape must match.
    """
    from cosyvoice.acoustic.checkpoint import load_released

    return load_released(FlowModel(config), source, "flow")
