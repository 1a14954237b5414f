"""Token2Wav's protocol on the tiny reference models: rates, streaming, state, options, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cosyvoice.acoustic.token2wav import SOURCE_CACHE_SAMPLES, Token2Wav, stream_hops

N, P = 60, 10


@pytest.fixture(scope="module")
def runtime(tiny_models):
    return Token2Wav(tiny_models, device="cpu", seed=7)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.RandomState(3)
    return (rng.randint(0, 6561, N), rng.randint(0, 6561, P), rng.randn(2 * P, 80).astype(np.float32),
            rng.randn(192).astype(np.float32))


def test_offline_rate_length_and_range(runtime, inputs):
    tokens, prompt, feat, emb = inputs
    wav = runtime.synthesize(tokens, prompt, feat, emb)
    assert runtime.sample_rate == 24000
    assert wav.dtype == np.float32 and wav.shape == (N * 2 * 480,)
    assert np.isfinite(wav).all() and np.abs(wav).max() <= 0.99 and np.sqrt((wav ** 2).mean()) > 1e-3
    # no prompt and no speaker: the upstream default (an empty embedding) crashes; here it is "no speaker"
    assert runtime.synthesize(tokens[:20]).shape == (20 * 960,)


def test_seed_makes_the_vocoder_noise_reproducible(tiny_models, runtime, inputs):
    tokens, prompt, feat, emb = inputs
    assert np.array_equal(runtime.synthesize(tokens, prompt, feat, emb), runtime.synthesize(tokens, prompt, feat, emb))
    unseeded = Token2Wav(tiny_models, device="cpu")
    torch.manual_seed(1)
    a = unseeded.synthesize(tokens, prompt, feat, emb)
    torch.manual_seed(1)
    assert np.array_equal(a, unseeded.synthesize(tokens, prompt, feat, emb))  # global generator, like upstream
    b = unseeded.synthesize(tokens, prompt, feat, emb, generator=torch.Generator().manual_seed(2))
    assert not np.array_equal(a, b)


def test_stream_hops_follow_upstream_without_mutating():
    assert stream_hops(200, 0) == [25, 75, 175]  # 25, then 50, then 100 (the max)
    assert stream_hops(200, 0) == [25, 75, 175]  # a second stream starts at 25 again (upstream: 100)
    assert stream_hops(100, 10) == [40, 90]  # prompt + first hop padded to a multiple of 25, then 50
    assert stream_hops(92, 10) == [40]  # the second hop needs 50 + 3 pending tokens
    assert stream_hops(27, 0) == []  # fewer than hop + look-ahead tokens: offline-like single chunk
    assert stream_hops(28, 0) == [25]


def test_streaming_chunks_cover_the_utterance(runtime, inputs):
    tokens, prompt, feat, emb = inputs
    ends = [15, 40]
    chunks = list(runtime.stream(tokens, prompt, feat, emb, request_id="r1", ends=ends))
    # a non-final chunk gives its tokens' audio minus the held-back cross-fade tail, the final one the rest
    assert [len(c) for c in chunks] == [15 * 960 - SOURCE_CACHE_SAMPLES, 25 * 960, 20 * 960 + SOURCE_CACHE_SAMPLES]
    stream = np.concatenate(chunks)
    offline = runtime.synthesize(tokens, prompt, feat, emb)
    assert stream.shape == offline.shape and np.isfinite(stream).all()
    rel = np.sqrt(((stream - offline) ** 2).mean()) / np.sqrt((offline ** 2).mean())
    assert rel < 0.25  # chunk-causal chunks + per-chunk noise; documented in docs/benchmarks.md
    assert runtime.live_streams == 0


def test_cached_and_uncached_streams_agree(tiny_models, inputs):
    tokens, prompt, feat, emb = inputs
    cached = Token2Wav(tiny_models, device="cpu", seed=1)
    plain = Token2Wav(tiny_models, device="cpu", seed=1, stream_cache=False)
    tiny_budget = Token2Wav(tiny_models, device="cpu", seed=1, max_stream_cache_bytes=1)
    for ends in ([15, 40, 48], [12, 37]):
        got = [np.concatenate(list(m.stream(tokens, prompt, feat, emb, ends=ends)))
               for m in (cached, plain, tiny_budget)]
        assert np.abs(got[0] - got[1]).max() < 1e-3
        assert np.abs(got[2] - got[1]).max() < 1e-3  # over budget: falls back to recomputing, same audio


def test_chunk_causal_final_mode(tiny_models, inputs):
    tokens, prompt, feat, emb = inputs
    exact = Token2Wav(tiny_models, device="cpu", seed=1)
    causal = Token2Wav(tiny_models, device="cpu", seed=1, chunk_causal_final=True)
    a = np.concatenate(list(exact.stream(tokens, prompt, feat, emb, ends=[15, 40])))
    b = np.concatenate(list(causal.stream(tokens, prompt, feat, emb, ends=[15, 40])))
    assert a.shape == b.shape
    head = 40 * 960 - SOURCE_CACHE_SAMPLES  # the non-final chunks are computed identically
    assert np.abs(a[:head] - b[:head]).max() < 1e-4
    assert np.abs(a[head:] - b[head:]).max() > 1e-6  # the final chunk is not upstream's full pass


def test_reduced_precision_estimator(tiny_models, inputs):
    tokens, prompt, feat, emb = inputs
    fp32 = Token2Wav(tiny_models, device="cpu", seed=1)
    bf16 = Token2Wav(tiny_models, device="cpu", seed=1, estimator_dtype="bf16")
    a, mel_a = fp32.synthesize(tokens, prompt, feat, emb, return_mel=True)
    b, mel_b = bf16.synthesize(tokens, prompt, feat, emb, return_mel=True)
    assert mel_b.dtype == torch.float32 and np.isfinite(b).all()
    diff = (mel_a - mel_b).abs().max().item()
    assert 0 < diff < 0.5 * mel_a.abs().max().item()
    with pytest.raises(ValueError, match="estimator_dtype"):
        Token2Wav(tiny_models, device="cpu", estimator_dtype="int8")


def test_bad_input_is_refused_and_releases_the_stream(runtime, inputs):
    tokens, prompt, feat, emb = inputs
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 6560\]"):
        runtime.synthesize([1, 2, 6561])
    with pytest.raises(ValueError, match="2 frames per token"):
        runtime.synthesize(tokens, prompt, feat[:-1], emb)
    with pytest.raises(ValueError, match="prompt_tokens given without prompt_feat"):
        runtime.synthesize(tokens, prompt, None, emb)
    with pytest.raises(ValueError, match="192 finite values"):
        runtime.synthesize(tokens, prompt, feat, emb[:100])
    with pytest.raises(ValueError, match="no speech tokens"):
        runtime.synthesize([])
    with pytest.raises(ValueError, match="request_id"):
        runtime.synthesize(tokens, token_offset=0, finalize=False)
    with pytest.raises(ValueError, match="always final"):
        runtime.synthesize(tokens, finalize=False)
    runtime.synthesize(tokens[:18], token_offset=0, finalize=False, request_id="bad")
    assert runtime.live_streams == 1
    with pytest.raises(ValueError, match="token_offset 50 outside"):
        runtime.synthesize(tokens[:43], token_offset=50, finalize=False, request_id="bad")
    assert runtime.live_streams == 0  # an error releases the stream's state (upstream leaks it)


def test_missing_model_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="flow.pt"):
        Token2Wav(str(tmp_path), device="cpu")


def test_stream_chunks_must_be_contiguous(runtime, inputs):
    tokens = inputs[0]
    with pytest.raises(ValueError, match="continues at 0"):
        runtime.synthesize(tokens[:20], token_offset=5, finalize=False, request_id="gap")
    runtime.synthesize(tokens[:18], token_offset=0, finalize=False, request_id="gap")
    with pytest.raises(ValueError, match="chunk at token_offset 20, but the stream continues at 15"):
        runtime.synthesize(tokens[:43], token_offset=20, finalize=False, request_id="gap")
    assert runtime.live_streams == 0


def test_speed_stretches_the_mel_offline_as_upstream_and_streams_to_the_same_length(runtime, inputs):
    """Offline: the vocoder gets int(frames / speed) frames interpolated linearly (upstream's formula);
    streamed: each chunk's new frames are stretched with cumulative rounding, so the stream ends with
    as many samples as the offline call; the stream keeps its first chunk's speed; out of range refused."""
    import torch.nn.functional as F

    tokens, prompt, feat, emb = inputs
    plain_wav, plain_mel = runtime.synthesize(tokens, prompt, feat, emb, return_mel=True)
    fast_wav, fast_mel = runtime.synthesize(tokens, prompt, feat, emb, speed=1.5, return_mel=True)
    frames = plain_mel.shape[2]
    assert fast_mel.shape[2] == int(frames / 1.5) == 80
    torch.testing.assert_close(fast_mel, F.interpolate(plain_mel, size=80, mode="linear"))
    assert fast_wav.shape == (80 * 480,) and np.isfinite(fast_wav).all()
    slow = list(runtime.stream(tokens, prompt, feat, emb, request_id="slow", ends=[15, 40], speed=0.75))
    assert sum(len(c) for c in slow) == int(frames / 0.75) * 480 == len(runtime.synthesize(tokens, speed=0.75))
    assert runtime.live_streams == 0
    runtime.synthesize(tokens[:18], prompt, feat, emb, token_offset=0, finalize=False, request_id="mixed", speed=2.0)
    with pytest.raises(ValueError, match="keeps the speed of its first chunk"):
        runtime.synthesize(tokens, prompt, feat, emb, token_offset=15, finalize=True, request_id="mixed")
    assert runtime.live_streams == 0
    for bad in (0.0, 5.0, float("nan")):
        with pytest.raises(ValueError, match="speed must be within 0.25-4.0"):
            runtime.synthesize(tokens, speed=bad)
