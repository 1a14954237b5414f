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
"""

from __future__ import annotations

import dataclasses
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


class FlowMatching(nn.Module):
    """The conditional flow-matching sampler around the estimator (upstream's ``decoder``)."""

    def __init__(self, config: FlowConfig):
        super().__init__()
        self.config = config
        self.estimator = CausalConditionalDecoder(
            in_channels=4 * MEL_BINS, out_channels=MEL_BINS, channels=config.estimator_channels,
            head_dim=config.estimator_head_dim, blocks=config.estimator_blocks,
            mid_blocks=config.estimator_mid_blocks, heads=config.estimator_heads, chunk=config.frame_chunk)

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
            up_blocks=config.up_blocks, chunk=config.token_chunk, lookahead=config.lookahead)
        self.encoder_proj = nn.Linear(config.dim, MEL_BINS)
        self.decoder = FlowMatching(config)

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
    from cosyvoice.acoustic.checkpoint import check_state, read_state_dict

    state, where = read_state_dict(source, "flow")
    model = FlowModel(config)
    check_state(state, model.state_dict(), where)
    model.load_state_dict(state, strict=True)
    return model.eval()
