"""``Token2WavV1``: the acoustic runtime for CosyVoice1 (CosyVoice-300M) model dirs, 22.05 kHz.

Same protocol as :class:`~cosyvoice.acoustic.token2wav.Token2Wav` (what the Triton ``token2wav``
adapter calls): ``synthesize(tokens, prompt_tokens, prompt_feat, embedding, *, token_offset,
finalize, request_id[, speed])`` -> float32 samples and ``release(request_id)``. ``tokens`` are v1
speech tokens (0-4095, 50 Hz; over Triton, LLM ids 151663 + k as for CosyVoice2), ``prompt_feat`` the prompt's 22.05 kHz mel (any number of frames:
the v1 flow's length regulator interpolates), ``embedding`` the (192,) speaker vector.

The numerics are upstream's ``CosyVoiceModel.token2wav``; a streaming call is one chunk of its
``tts(stream=True)`` loop. That loop cuts chunks of ``hop`` + ``overlap`` = 100 + 20 tokens, each
starting ``hop`` after the previous one, and the final chunk is what is left (20-119 tokens). In this
protocol ``tokens`` is the stream's whole prefix and ``token_offset`` where the chunk starts (the
previous chunk's end minus its 20 overlap tokens): a non-final call runs the flow on
``tokens[token_offset:]`` and holds back its last 20 tokens, so the next chunk starts at
``len(tokens) - 20``. Per chunk: the flow resumes from the stream's flow cache (the noise and ``mu``
of the prompt and of the last 34 frames, so the overlap is drawn from the same noise), the first 34
mel frames are cross-faded (float64 Hamming window) with the 34 held back by the previous chunk, a
non-final chunk holds back its last 34 frames; the vocoder gets the previous chunk's last 20 mel
frames in front and its last 5120 excitation samples as ``cache_source``, 5120 samples are
cross-faded with the previous chunk's held-back audio and a non-final chunk holds back its last
5120 samples.

Randomness: the flow's noise and the vocoder's draws come from torch's global generator, in
upstream's order, so a caller seeding it before each call gets upstream's audio. ``seed`` makes every
call draw from that seed instead (the global generator is forked, so it is left untouched).
``speed`` offline is upstream's (the whole mel interpolated); upstream refuses it when streaming, here
each chunk's new frames are stretched with cumulative rounding, as ``Token2Wav`` does.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cosyvoice.acoustic import CONFIG_FILE_V1, FLOW_FILE, HIFT_FILE
from cosyvoice.acoustic.flow import MEL_BINS, token_tensor
from cosyvoice.acoustic.flow_v1 import FlowV1Config, FlowV1Model, load_flow_v1
from cosyvoice.acoustic.hift import HiFTConfig, HiFTGenerator, load_hift
from cosyvoice.acoustic.token2wav import (
    DTYPES,
    StreamingRuntime,
    StreamStates,
    check_speed,
    fade_in_out,
    runtime_output,
    stretch_chunk,
    vocode_chunk,
)

SAMPLE_RATE = 22050
#: upstream CosyVoiceModel: token_min_hop_len = 2 * 50 (its stream_scale_factor 1 keeps it there)
TOKEN_HOP = 100
TOKEN_OVERLAP = 20
#: the vocoder's cache: mel frames put in front of the next chunk, and their excitation samples
MEL_CACHE_FRAMES = 20


@dataclass
class _StreamV1:
    """Per-request state between chunks."""

    flow_cache: torch.Tensor | None = None  # (1, 80, F, 2): the flow's noise and mu to reuse
    mel_overlap: torch.Tensor | None = None  # the 34 mel frames held back for the cross-fade
    mel: torch.Tensor | None = None  # last MEL_CACHE_FRAMES frames handed to the vocoder
    source: torch.Tensor | None = None  # their excitation
    speech: torch.Tensor | None = None  # held-back last samples of the waveform
    next_offset: int = 0
    speed: float = 1.0
    mel_in: int = 0  # new frames before the speed change
    mel_out: int = 0  # frames after it


def stream_ends_v1(n_tokens: int, hop: int = TOKEN_HOP, overlap: int = TOKEN_OVERLAP) -> list[int]:
    """Where upstream's ``CosyVoiceModel.tts(stream=True)`` ends its non-final chunks (the next
    chunk's ``token_offset``) for ``n_tokens`` generated tokens: a chunk goes out while ``hop +
    overlap`` tokens are pending; the prompt does not shift the cuts (unlike CosyVoice2)."""
    ends, offset = [], 0
    while n_tokens - offset >= hop + overlap:
        offset += hop
        ends.append(offset)
    return ends


def read_configs_v1(model_dir: str) -> tuple[FlowV1Config, HiFTConfig]:
    """The flow and vocoder sizes of a CosyVoice1 model dir, from its ``cosyvoice.yaml``; without
    that file, the released CosyVoice-300M sizes."""
    path = os.path.join(model_dir, CONFIG_FILE_V1)
    if not os.path.isfile(path):
        return FlowV1Config.full(), HiFTConfig.v1()
    from cosyvoice.acoustic.recipe import acoustic_configs_v1

    return acoustic_configs_v1(path)


class Token2WavV1(StreamingRuntime):
    """CosyVoice1 speech tokens -> 22.05 kHz waveform with the flow + HiFT of ``model_dir``.

    ``model_dir`` holds ``flow.pt`` and ``hift.pt`` (loaded strictly) and ``cosyvoice.yaml`` (the
    sizes; ``flow_config`` / ``hift_config`` override it). A stream's chunks must be contiguous
    (upstream does not check; a skipped chunk would silently give wrong audio).
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, model_dir: str, *, device: str | None = None, estimator_dtype: str = "fp32",
                 seed: int | None = None, flow_config: FlowV1Config | None = None,
                 hift_config: HiFTConfig | None = None):
        if estimator_dtype not in DTYPES:
            raise ValueError(f"estimator_dtype must be one of {sorted(DTYPES)}, got {estimator_dtype!r}")
        self.model_dir = model_dir
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if flow_config is None or hift_config is None:
            read_flow, read_hift = read_configs_v1(model_dir)
            flow_config, hift_config = flow_config or read_flow, hift_config or read_hift
        if hift_config.sampling_rate != SAMPLE_RATE or hift_config.samples_per_frame != flow_config.hop:
            raise ValueError(f"{model_dir}: the vocoder makes {hift_config.sampling_rate} Hz audio with "
                             f"{hift_config.samples_per_frame} samples per mel frame; the CosyVoice1 flow's mel is "
                             f"{flow_config.sample_rate} Hz with hop {flow_config.hop}")
        self.flow: FlowV1Model = load_flow_v1(os.path.join(model_dir, FLOW_FILE), flow_config).to(self.device)
        self.hift: HiFTGenerator = load_hift(os.path.join(model_dir, HIFT_FILE), hift_config).to(self.device)
        self.flow.decoder.estimator.to(DTYPES[estimator_dtype])
        self.seed = seed
        self.speech_token_count = flow_config.vocab_size
        self.overlap = flow_config.overlap_tokens
        self.mel_overlap = flow_config.mel_frames(self.overlap)  # 34
        self.source_cache = MEL_CACHE_FRAMES * hift_config.samples_per_frame  # 5120
        self.mel_window = torch.from_numpy(np.hamming(2 * self.mel_overlap)).to(self.device)
        self.speech_window = torch.from_numpy(np.hamming(2 * self.source_cache)).to(self.device)
        self._streams = StreamStates()

    # -- inputs -------------------------------------------------------------------------------------

    def _inputs(self, tokens, prompt_tokens, prompt_feat, embedding):
        vocab = self.speech_token_count
        tokens = token_tensor(tokens, vocab, "tokens")
        if tokens.shape[1] == 0:
            raise ValueError("tokens: no speech tokens to synthesize")
        prompt = token_tensor(prompt_tokens, vocab, "prompt_tokens")
        if prompt_feat is None:
            if prompt.shape[1]:
                raise ValueError("prompt_tokens given without prompt_feat")
            feat = torch.zeros(1, 0, MEL_BINS)
        else:
            feat = torch.as_tensor(np.asarray(prompt_feat, dtype=np.float32))
            if feat.dim() != 2 or feat.shape[1] != MEL_BINS:
                raise ValueError(f"prompt_feat must be (frames, {MEL_BINS}); got {tuple(feat.shape)}")
            if (feat.shape[0] == 0) != (prompt.shape[1] == 0):
                raise ValueError(f"prompt_feat has {feat.shape[0]} frames for {prompt.shape[1]} prompt tokens: give "
                                 "both (a prompt) or neither")
            if not torch.isfinite(feat).all():
                raise ValueError("prompt_feat has non-finite values")
            feat = feat[None]
        dim = self.flow.config.spk_embed_dim
        if embedding is None:
            emb = torch.zeros(1, dim)
        else:
            emb = torch.as_tensor(np.asarray(embedding, dtype=np.float32)).reshape(1, -1)
            if emb.shape[1] != dim or not torch.isfinite(emb).all():
                raise ValueError(f"embedding must be {dim} finite values; got shape {tuple(np.shape(embedding))}")
        dev = self.device
        return tokens.to(dev), prompt.to(dev), feat.to(dev), emb.to(dev)

    @contextlib.contextmanager
    def _draws(self):
        """Every random draw of the call from ``seed`` when one is set (torch's generators restored after)."""
        if self.seed is None:
            yield
            return
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            yield

    # -- the protocol -----------------------------------------------------------------------------

    def synthesize(self, tokens, prompt_tokens=None, prompt_feat=None, embedding=None, *, token_offset=None,
                   finalize: bool = True, request_id: str = "", return_mel: bool = False, speed: float = 1.0):
        """Float32 samples of ``tokens`` (of the chunk from ``token_offset`` on when streaming); see the module doc.

        ``return_mel`` also returns the mel this call hands to the vocoder (1, 80, frames).
        """
        speed = check_speed(speed)
        tokens, prompt, feat, emb = self._inputs(tokens, prompt_tokens, prompt_feat, embedding)
        if token_offset is None:
            if not finalize:
                raise ValueError("an offline call (token_offset None) is always final")
            with torch.inference_mode(), self._draws():
                mel, _ = self.flow.inference(tokens, prompt, feat, emb)
                if speed != 1.0:
                    mel = F.interpolate(mel, size=int(mel.shape[2] / speed), mode="linear")
                wav, _ = self.hift.inference(mel)
            return runtime_output(wav, mel, return_mel)
        if not request_id:
            raise ValueError("a streaming call needs a request_id (it keys the stream's state)")
        stream = self._streams.open(request_id, _StreamV1(speed=speed))
        with self._streams.chunk(request_id, finalize):
            offset = int(token_offset)
            self._check_chunk(stream, request_id, tokens.shape[1], offset, finalize, speed)
            stream.next_offset = tokens.shape[1] - (0 if finalize else self.overlap)
            with torch.inference_mode(), self._draws():
                wav, mel = self._chunk(stream, tokens[:, offset:], prompt, feat, emb, finalize)
        return runtime_output(wav, mel, return_mel)


    # -- internals ----------------------------------------------------------------------------------

    def _check_chunk(self, stream: _StreamV1, request_id: str, n_tokens: int, offset: int, finalize: bool,
                     speed: float) -> None:
        if speed != stream.speed:
            raise ValueError(f"request {request_id!r}: speed {speed} differs from the stream's {stream.speed} "
                             "(a stream keeps the speed of its first chunk)")
        if offset != stream.next_offset:
            raise ValueError(f"request {request_id!r}: chunk at token_offset {offset}, but the stream continues at "
                             f"{stream.next_offset} (chunks must be contiguous; start again at 0)")
        size = n_tokens - offset
        # a non-final chunk: its 20 held-back tokens plus at least as many new ones (its mel must
        # fill the 34-frame overlap and the 20-frame vocoder cache); a later chunk must at least
        # repeat the previous chunk's 20 overlap tokens, whose flow cache and mel it cross-fades
        least = 2 * self.overlap + 1 if not finalize else (self.overlap if offset else 1)
        if size < least:
            what = "a non-final chunk" if not finalize else "the final chunk of a stream"
            raise ValueError(f"request {request_id!r}: {what} at token_offset {offset} has {max(size, 0)} tokens; "
                             f"it needs at least {least} (CosyVoice1 chunks overlap by {self.overlap} tokens)")

    def _chunk(self, stream: _StreamV1, chunk, prompt, feat, emb, finalize: bool):
        mel, stream.flow_cache = self.flow.inference(chunk, prompt, feat, emb, stream.flow_cache)
        if stream.mel_overlap is not None:
            mel = fade_in_out(mel, stream.mel_overlap, self.mel_window)
        if not finalize:
            stream.mel_overlap = mel[:, :, -self.mel_overlap:]
            mel = mel[:, :, :-self.mel_overlap]
        mel = stretch_chunk(stream, mel)
        frames = mel.shape[2] + (0 if stream.mel is None else stream.mel.shape[2])
        if not finalize and frames < MEL_CACHE_FRAMES:
            raise ValueError(f"a non-final chunk gives the vocoder {frames} mel frames at speed {stream.speed}; "
                             f"it needs {MEL_CACHE_FRAMES} for the next chunk's cache (send longer chunks)")
        return vocode_chunk(self.hift, stream, mel, finalize=finalize, mel_cache=MEL_CACHE_FRAMES,
                            source_cache=self.source_cache, window=self.speech_window)

    # -- conveniences -----------------------------------------------------------------------------

    def stream(self, tokens, prompt_tokens=None, prompt_feat=None, embedding=None, *, request_id: str = "stream",
               ends: Sequence[int] | None = None, speed: float = 1.0) -> Iterator[np.ndarray]:
        """Chunks of ``tokens`` as upstream's streaming ``tts`` cuts them (or ending at ``ends``), then the rest."""
        tokens = np.asarray(tokens).reshape(-1)
        ends = list(stream_ends_v1(len(tokens)) if ends is None else ends)
        offset = 0
        try:
            for end in ends:
                yield self.synthesize(tokens[:end + self.overlap], prompt_tokens, prompt_feat, embedding,
                                      token_offset=offset, finalize=False, request_id=request_id, speed=speed)
                offset = end
            yield self.synthesize(tokens, prompt_tokens, prompt_feat, embedding, token_offset=offset, finalize=True,
                                  request_id=request_id, speed=speed)
        finally:
            self.release(request_id)
