"""``Token2Wav``: the acoustic runtime the Triton ``token2wav`` model serves (and the CLI uses).

Protocol (what the Triton adapter calls): ``synthesize(tokens, prompt_tokens, prompt_feat,
embedding, *, token_offset, finalize, request_id)`` -> float32 samples at 24 kHz, and
``release(request_id)``. ``tokens`` are speech-token ids (0-6560), ``prompt_feat`` is the prompt's
(2 P, 80) mel, ``embedding`` the (192,) CAM++ vector; ``None`` means no prompt / no speaker.
``token_offset=None`` is an offline call; otherwise the call is one chunk of stream ``request_id``
and returns the audio of tokens from ``token_offset`` on.

The numerics are upstream CosyVoice2's (``CosyVoice2Model.token2wav``): 2 mel frames per token,
480 samples per frame; a non-final chunk holds back the 3 look-ahead tokens and runs the flow
chunk-causally, the final one runs it without chunk masks; the vocoder keeps the last 8 mel frames
and 3840 excitation samples of the previous chunk, overwrites the start of the new excitation with
them, cross-fades 3840 samples with a float64 Hamming window and holds back the last 3840 samples of
a non-final chunk. Beyond upstream: a stream's flow resumes at its last complete chunk instead of
re-running the whole prefix (``stream_cache``), and ``chunk_causal_final`` keeps the final chunk
chunk-causal too, so a whole stream costs about one offline pass (its difference to upstream's
final pass is measured in docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cosyvoice.acoustic import CONFIG_FILE, FLOW_FILE, HIFT_FILE
from cosyvoice.acoustic.flow import FlowConfig, FlowModel, FlowStream, load_flow, token_tensor
from cosyvoice.acoustic.hift import HiFTConfig, HiFTGenerator, load_hift
from cosyvoice.acoustic.packing import pack_linears

log = logging.getLogger(__name__)

SAMPLE_RATE = 24000
MEL_CACHE_FRAMES = 8
SOURCE_CACHE_SAMPLES = MEL_CACHE_FRAMES * 480
#: upstream's streaming schedule (CosyVoice2Model.tts): first hop 25 tokens, doubled up to 100
TOKEN_HOP = 25
MAX_TOKEN_HOP = 100
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: flow cache kept per stream before it falls back to recomputing (full size: ~4.6 MB per mel frame)
DEFAULT_STREAM_CACHE_BYTES = 8 << 30


@dataclass
class _Stream:
    """Per-request state between chunks: the flow's reusable chunks and the vocoder's tail."""

    flow: FlowStream = field(default_factory=FlowStream)
    cached: bool = True
    mel: torch.Tensor | None = None  # last MEL_CACHE_FRAMES frames handed to the vocoder
    source: torch.Tensor | None = None  # last SOURCE_CACHE_SAMPLES of the excitation
    speech: torch.Tensor | None = None  # held-back last SOURCE_CACHE_SAMPLES of the waveform
    next_offset: int = 0  # where the next chunk must start
    speed: float = 1.0  # the stream's speed, fixed by its first chunk
    mel_in: int = 0  # new mel frames the flow produced so far (before the speed change)
    mel_out: int = 0  # frames handed on after the speed change


def stream_hops(n_tokens: int, prompt_tokens: int = 0, lookahead: int = 3, hop: int = TOKEN_HOP,
                max_hop: int = MAX_TOKEN_HOP) -> list[int]:
    """Token offsets where upstream's ``tts(stream=True)`` starts a chunk, for ``n_tokens`` generated tokens.

    The first hop is padded so prompt + hop is a multiple of ``hop``; hops then double up to
    ``max_hop``; a chunk is cut only when ``hop + lookahead`` tokens are pending. Returns the ends
    (exclusive, in target tokens) of the non-final chunks; the final chunk covers the rest. Unlike
    upstream, nothing is mutated, so every stream starts at ``hop`` again.
    """
    pad = -prompt_tokens % hop
    ends, offset, this_hop = [], 0, hop + pad
    while n_tokens - offset >= this_hop + lookahead:
        offset += this_hop
        ends.append(offset)
        hop = min(max_hop, hop * 2)
        this_hop = hop
    return ends


#: the speed range accepted (OpenAI's speech endpoint allows 0.25-4.0)
MIN_SPEED, MAX_SPEED = 0.25, 4.0


def check_speed(speed) -> float:
    speed = float(speed)
    if not MIN_SPEED <= speed <= MAX_SPEED:  # also refuses nan
        raise ValueError(f"speed must be within {MIN_SPEED}-{MAX_SPEED}, got {speed}")
    return speed


def fade_in_out(new: torch.Tensor, previous: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Cross-fade the start of ``new`` with the end of ``previous`` (upstream computes it in float64)."""
    n = window.shape[0] // 2
    out = new.clone()
    out[..., :n] = (new[..., :n].double() * window[:n] + previous[..., -n:].double() * window[n:]).to(new.dtype)
    return out


class StreamStates:
    """The live streams of a token2wav runtime by request id (both generations): a stream's state is made
    by its first chunk and forgotten after its final chunk, on an error and on ``release`` (a cancellation)."""

    def __init__(self) -> None:
        self._states: dict[str, Any] = {}
        self._lock = threading.Lock()

    def open(self, request_id: str, new: Any) -> Any:
        """The stream's state; ``new`` when the stream has none yet."""
        with self._lock:
            return self._states.setdefault(request_id, new)

    def release(self, request_id: str) -> None:
        with self._lock:
            self._states.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._states)

    @contextlib.contextmanager
    def chunk(self, request_id: str, finalize: bool) -> Iterator[None]:
        """Around one chunk's work: the stream is forgotten when the chunk fails or is the final one."""
        try:
            yield
        except BaseException:
            self.release(request_id)
            raise
        if finalize:
            self.release(request_id)


def stretch_chunk(stream, mel: torch.Tensor) -> torch.Tensor:
    """A streamed chunk's new mel frames at the stream's speed (``stream`` has ``speed``, ``mel_in``,
    ``mel_out``; both generations' runtimes). The rounding is cumulative, so the stream ends with
    int(frames / speed) frames like an offline call, and a one-chunk stream is exactly its interpolation."""
    if stream.speed == 1.0:
        return mel
    stream.mel_in += mel.shape[2]
    size = int(stream.mel_in / stream.speed) - stream.mel_out
    stream.mel_out += size
    if size <= 0:
        return mel[:, :, :0]
    return F.interpolate(mel, size=size, mode="linear")


def vocode_chunk(hift: HiFTGenerator, stream, mel: torch.Tensor, *, finalize: bool, mel_cache: int,
                 source_cache: int, window: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(waveform, vocoded mel) of a streamed chunk's mel, as upstream's HiFT streams in both generations:
    the previous chunk's last ``mel_cache`` frames go in front and its last ``source_cache`` excitation
    samples are the vocoder's ``cache_source``; the start is cross-faded with the held-back audio and a
    non-final chunk holds back its last ``source_cache`` samples (``stream``: ``mel``, ``source``, ``speech``)."""
    cache_source = None
    if stream.mel is not None:
        mel = torch.cat([stream.mel, mel], dim=2)
        cache_source = stream.source
    wav, source = hift.inference(mel, cache_source=cache_source, generator=generator)
    if stream.speech is not None:
        wav = fade_in_out(wav, stream.speech, window)
    if not finalize:
        stream.mel = mel[:, :, -mel_cache:]
        stream.source = source[:, :, -source_cache:]
        stream.speech = wav[:, -source_cache:]
        wav = wav[:, :-source_cache]
    return wav, mel


def runtime_output(wav: torch.Tensor, mel: torch.Tensor, return_mel: bool):
    """What ``synthesize`` returns: float32 samples on the CPU (and the mel when asked)."""
    samples = wav.reshape(-1).float().cpu().numpy()
    return (samples, mel.float().cpu()) if return_mel else samples


class StreamingRuntime:
    """What both generations' runtimes expose about their live streams (``self._streams``)."""

    _streams: StreamStates

    def release(self, request_id: str) -> None:
        """Forget a stream's state (after its final chunk, an error or a cancellation)."""
        self._streams.release(request_id)

    @property
    def live_streams(self) -> int:
        return len(self._streams)


class Token2Wav(StreamingRuntime):
    """Speech tokens -> 24 kHz waveform with the CosyVoice2 flow + HiFT of ``model_dir``.

    ``model_dir`` holds ``cosyvoice2.yaml`` (its ``flow``/``hift`` sections say the sizes; the
    released defaults when absent), ``flow.pt`` and ``hift.pt``, loaded strictly.

    ``seed`` makes every call's vocoder noise reproducible (a generator seeded with it per call,
    so every chunk of a stream starts from the seed, unless the call passes its own); by default the
    noise comes from torch's global generator, as upstream's does. ``compile`` runs the estimator's
    plain passes (offline calls and upstream-exact final chunks) through ``torch.compile``: minutes
    of compiling at construction, then several times faster on a CPU.

    A stream's chunks must be contiguous: the first at ``token_offset`` 0, each next one where the
    previous ended (upstream does not check; a skipped chunk would silently give wrong audio).
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, model_dir: str, *, device: str | None = None, stream_cache: bool = True,
                 chunk_causal_final: bool = False, estimator_dtype: str = "fp32",
                 max_stream_cache_bytes: int = DEFAULT_STREAM_CACHE_BYTES, seed: int | None = None,
                 compile: bool = False):
        if estimator_dtype not in DTYPES:
            raise ValueError(f"estimator_dtype must be one of {sorted(DTYPES)}, got {estimator_dtype!r}")
        self.model_dir = model_dir
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        flow_config, hift_config = self._configs(model_dir)
        self.flow: FlowModel = load_flow(os.path.join(model_dir, FLOW_FILE), flow_config).to(self.device)
        self.hift: HiFTGenerator = load_hift(os.path.join(model_dir, HIFT_FILE), hift_config).to(self.device)
        self.flow.decoder.estimator.to(DTYPES[estimator_dtype])
        if self.device.type == "cpu":
            pack_linears(self.flow)
        self.stream_cache, self.chunk_causal_final = stream_cache, chunk_causal_final
        self.max_stream_cache_bytes = max_stream_cache_bytes
        self.seed = seed
        self.window = torch.from_numpy(np.hamming(2 * SOURCE_CACHE_SAMPLES)).to(self.device)
        self._streams = StreamStates()
        if compile:
            self.flow.decoder.compile_estimator()
            self.synthesize(np.zeros(30, dtype=np.int64))  # compile now, not in the first request

    @staticmethod
    def _configs(model_dir: str) -> tuple[FlowConfig, HiFTConfig]:
        path = os.path.join(model_dir, CONFIG_FILE)
        if not os.path.isfile(path):
            return FlowConfig.full(), HiFTConfig.full()
        from cosyvoice.acoustic.recipe import acoustic_configs

        return acoustic_configs(path)

    # -- inputs -------------------------------------------------------------------------------------

    def _inputs(self, tokens, prompt_tokens, prompt_feat, embedding):
        vocab = self.flow.config.vocab_size
        tokens = token_tensor(tokens, vocab, "tokens")
        if tokens.shape[1] == 0:
            raise ValueError("tokens: no speech tokens to synthesize")
        prompt = token_tensor(prompt_tokens, vocab, "prompt_tokens")
        if prompt_feat is None:
            if prompt.shape[1]:
                raise ValueError("prompt_tokens given without prompt_feat")
            feat = torch.zeros(1, 0, 80)
        else:
            feat = torch.as_tensor(np.asarray(prompt_feat, dtype=np.float32))
            if feat.dim() != 2 or feat.shape[1] != 80:
                raise ValueError(f"prompt_feat must be (frames, 80); got {tuple(feat.shape)}")
            if feat.shape[0] != 2 * prompt.shape[1]:
                raise ValueError(f"prompt_feat has {feat.shape[0]} frames for {prompt.shape[1]} prompt tokens; "
                                 "2 frames per token expected")
            if not torch.isfinite(feat).all():
                raise ValueError("prompt_feat has non-finite values")
            feat = feat[None]
        if embedding is None:
            emb = torch.zeros(1, self.flow.config.spk_embed_dim)
        else:
            emb = torch.as_tensor(np.asarray(embedding, dtype=np.float32)).reshape(1, -1)
            if emb.shape[1] != self.flow.config.spk_embed_dim or not torch.isfinite(emb).all():
                raise ValueError(f"embedding must be {self.flow.config.spk_embed_dim} finite values; "
                                 f"got shape {tuple(np.shape(embedding))}")
        dev = self.device
        return tokens.to(dev), prompt.to(dev), feat.to(dev), emb.to(dev)

    # -- the protocol -----------------------------------------------------------------------------

    def synthesize(self, tokens, prompt_tokens=None, prompt_feat=None, embedding=None, *, token_offset=None,
                   finalize: bool = True, request_id: str = "", return_mel: bool = False,
                   generator: torch.Generator | None = None, speed: float = 1.0):
        """Float32 samples of ``tokens`` (from ``token_offset`` on when streaming); see the module doc.

        ``return_mel`` also returns the mel this call hands to the vocoder (1, 80, frames);
        ``generator`` is the vocoder's noise source (torch's global generator when None).
        ``speed`` stretches the mel in time before the vocoder (pitch kept): offline exactly as
        upstream's ``token2wav(speed=...)``; upstream refuses it when streaming, here each chunk's
        new frames are stretched so that the stream's total length follows the offline one.
        """
        speed = check_speed(speed)
        tokens, prompt, feat, emb = self._inputs(tokens, prompt_tokens, prompt_feat, embedding)
        if generator is None and self.seed is not None:
            generator = torch.Generator(self.device).manual_seed(self.seed)
        if token_offset is None:
            if not finalize:
                raise ValueError("an offline call (token_offset None) is always final")
            with torch.inference_mode():
                mel = self.flow.inference(tokens, prompt, feat, emb, finalize=True, chunked=False)
                if speed != 1.0:
                    mel = F.interpolate(mel, size=int(mel.shape[2] / speed), mode="linear")
                wav, _ = self.hift.inference(mel, generator=generator)
            return runtime_output(wav, mel, return_mel)
        if not request_id:
            raise ValueError("a streaming call needs a request_id (it keys the stream's state)")
        stream = self._streams.open(request_id, _Stream(cached=self.stream_cache, speed=speed))
        with self._streams.chunk(request_id, finalize):
            if speed != stream.speed:
                raise ValueError(f"request {request_id!r}: speed {speed} differs from the stream's {stream.speed} "
                                 "(a stream keeps the speed of its first chunk)")
            held = 0 if finalize else self.flow.config.lookahead
            if not 0 <= int(token_offset) <= tokens.shape[1] - held:
                raise ValueError(f"token_offset {token_offset} outside the {tokens.shape[1] - held} tokens this "
                                 "call covers")
            if int(token_offset) != stream.next_offset:
                raise ValueError(f"request {request_id!r}: chunk at token_offset {token_offset}, but the stream "
                                 f"continues at {stream.next_offset} (chunks must be contiguous; start again at 0)")
            stream.next_offset = tokens.shape[1] - held
            with torch.inference_mode():
                wav, mel = self._chunk(stream, tokens, prompt, feat, emb, int(token_offset), finalize, generator)
        return runtime_output(wav, mel, return_mel)

    # -- internals ----------------------------------------------------------------------------------

    def _chunk(self, stream: _Stream, tokens, prompt, feat, emb, offset: int, finalize: bool, generator):
        chunked = not finalize or self.chunk_causal_final
        flow_stream = stream.flow if (stream.cached and chunked) else None
        mel = self.flow.inference(tokens, prompt, feat, emb, finalize=finalize, chunked=chunked, stream=flow_stream)
        if flow_stream is not None and flow_stream.nbytes() > self.max_stream_cache_bytes:
            log.warning("token2wav: a stream's flow cache reached %.1f GB (limit %.1f GB); recomputing its prefix "
                        "from now on", flow_stream.nbytes() / 1e9, self.max_stream_cache_bytes / 1e9)
            stream.flow.reset()
            stream.cached = False
        mel = stretch_chunk(stream, mel[:, :, offset * self.flow.config.token_mel_ratio:])
        return vocode_chunk(self.hift, stream, mel, finalize=finalize, mel_cache=MEL_CACHE_FRAMES,
                            source_cache=SOURCE_CACHE_SAMPLES, window=self.window, generator=generator)

    # -- conveniences -----------------------------------------------------------------------------

    def stream(self, tokens, prompt_tokens=None, prompt_feat=None, embedding=None, *, request_id: str = "stream",
               ends: Sequence[int] | None = None, generator: torch.Generator | None = None,
               speed: float = 1.0) -> Iterator[np.ndarray]:
        """Chunks of ``tokens`` as upstream's streaming ``tts`` cuts them (or at ``ends``), then the rest."""
        tokens = np.asarray(tokens).reshape(-1)
        n_prompt = 0 if prompt_tokens is None else len(np.asarray(prompt_tokens).reshape(-1))
        lookahead = self.flow.config.lookahead
        ends = list(stream_hops(len(tokens), n_prompt, lookahead) if ends is None else ends)
        offset = 0
        try:
            for end in ends:
                yield self.synthesize(tokens[:end + lookahead], prompt_tokens, prompt_feat, embedding,
                                      token_offset=offset, finalize=False, request_id=request_id,
                                      generator=generator, speed=speed)
                offset = end
            yield self.synthesize(tokens, prompt_tokens, prompt_feat, embedding, token_offset=offset, finalize=True,
                                  request_id=request_id, generator=generator, speed=speed)
        finally:
            self.release(request_id)
