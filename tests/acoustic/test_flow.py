"""The flow model on random tiny weights: shapes, determinism, chunk-causal streaming and its cache."""

from __future__ import annotations

import pytest
import torch

from cosyvoice.acoustic.flow import FlowConfig, FlowModel, FlowStream, noise_table, token_tensor

P, N = 13, 67
#: smaller than FlowConfig.tiny() (which keeps upstream's hard-coded 512-d encoder): these tests check
#: our own invariants; agreement with upstream is checked on tiny goldens (test_upstream_goldens.py)
MICRO = FlowConfig(dim=64, encoder_heads=2, encoder_hidden=64, encoder_blocks=1, up_blocks=1,
                   estimator_channels=32, estimator_head_dim=8, estimator_heads=2, estimator_blocks=1,
                   estimator_mid_blocks=1)


@pytest.fixture(scope="module")
def flow():
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = FlowModel(MICRO).eval()
        for name, p in model.named_parameters():
            if p.dim() == 1 or "pos_bias" in name:
                p.data.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(5)
    return (torch.randint(0, 6561, (1, N), generator=g), torch.randint(0, 6561, (1, P), generator=g),
            torch.randn(1, 2 * P, 80, generator=g), torch.randn(1, 192, generator=g))


def _mel(flow, inputs, n, *, finalize, chunked, stream=None):
    tokens, prompt, feat, emb = inputs
    return flow.inference(tokens[:, :n], prompt, feat, emb, finalize=finalize, chunked=chunked, stream=stream)


def test_offline_shape_and_determinism(flow, inputs):
    a = _mel(flow, inputs, N, finalize=True, chunked=False)
    b = _mel(flow, inputs, N, finalize=True, chunked=False)
    assert a.shape == (1, 80, 2 * N)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)  # the noise is a fixed table, not a fresh draw


def test_noise_table_is_upstreams_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    table = noise_table(15000, 0)
    assert torch.equal(torch.get_rng_state(), state)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        assert torch.equal(table, torch.randn(1, 80, 15000))


def test_non_final_call_holds_back_the_lookahead(flow, inputs):
    mel = _mel(flow, inputs, 40, finalize=False, chunked=True)
    assert mel.shape == (1, 80, 2 * (40 - 3))


def test_chunk_causal_prefix_is_stable(flow, inputs):
    """Frames in complete chunks do not change when the sequence grows (what the cache relies on)."""
    short = _mel(flow, inputs, 40 + 3, finalize=False, chunked=True)
    longer = _mel(flow, inputs, 60 + 3, finalize=False, chunked=True)
    complete = 2 * ((P + 40) // 25 * 25) - 2 * P  # frames after the prompt in complete 25-token chunks
    assert complete > 0
    assert torch.allclose(short[:, :, :complete], longer[:, :, :complete], atol=1e-5)
    assert not torch.allclose(short[:, :, complete:], longer[:, :, complete:short.shape[2]], atol=1e-5)


@pytest.mark.parametrize("ends", [[12, 37, 62], [15, 40]])
def test_cached_stream_equals_uncached(flow, inputs, ends):
    stream = FlowStream()
    for end in ends:
        plain = _mel(flow, inputs, end + 3, finalize=False, chunked=True)
        cached = _mel(flow, inputs, end + 3, finalize=False, chunked=True, stream=stream)
        assert cached.shape == plain.shape
        assert (cached - plain).abs().max() < 1e-4
    assert stream.done == (P + ends[-1]) // 25 * 25
    assert stream.nbytes() > 0
    # chunk-causal final call from the cache equals the chunk-causal final pass without it
    final = _mel(flow, inputs, N, finalize=True, chunked=True, stream=stream)
    assert (final - _mel(flow, inputs, N, finalize=True, chunked=True)).abs().max() < 1e-4


def test_changed_prefix_resets_the_stream(flow, inputs):
    tokens, prompt, feat, emb = inputs
    stream = FlowStream()
    flow.inference(tokens[:, :43], prompt, feat, emb, finalize=False, chunked=True, stream=stream)
    assert stream.done > 0
    other = tokens.clone()
    other[0, 2] = (other[0, 2] + 1) % 6561
    got = flow.inference(other[:, :53], prompt, feat, emb, finalize=False, chunked=True, stream=stream)
    want = flow.inference(other[:, :53], prompt, feat, emb, finalize=False, chunked=True)
    assert (got - want).abs().max() < 1e-4
    # another speaker embedding also invalidates what was computed
    got = flow.inference(other[:, :63], prompt, feat, -emb, finalize=False, chunked=True, stream=stream)
    want = flow.inference(other[:, :63], prompt, feat, -emb, finalize=False, chunked=True)
    assert (got - want).abs().max() < 1e-4


def test_final_pass_differs_from_chunk_causal(flow, inputs):
    """Upstream's final call sees the whole sequence; the chunk-causal one does not (the opt-in mode)."""
    full = _mel(flow, inputs, N, finalize=True, chunked=False)
    causal = _mel(flow, inputs, N, finalize=True, chunked=True)
    assert not torch.allclose(full, causal, atol=1e-4)


def test_bad_inputs(flow, inputs):
    tokens, prompt, feat, emb = inputs
    with pytest.raises(ValueError, match="2 frames per token"):
        flow.inference(tokens, prompt, feat[:, :-1], emb, finalize=True, chunked=False)
    with pytest.raises(ValueError, match="nothing to synthesize"):
        flow.inference(tokens[:, :2], prompt[:, :0], feat[:, :0], emb, finalize=False, chunked=True)
    with pytest.raises(ValueError, match="chunk-causal"):
        flow.inference(tokens, prompt, feat, emb, finalize=True, chunked=False, stream=FlowStream())
    with pytest.raises(ValueError, match="noise table"):
        FlowModel.inference(flow, torch.zeros(1, 7600, dtype=torch.long), prompt[:, :0], feat[:, :0], emb,
                            finalize=True, chunked=False)


def test_token_ids_are_checked():
    assert token_tensor([0, 6560], 6561, "t").tolist() == [[0, 6560]]
    with pytest.raises(ValueError, match=r"\[0, 6560\].*6561 at position 1"):
        token_tensor([1, 6561], 6561, "tokens")
    with pytest.raises(ValueError, match="-1 at position 0"):
        token_tensor([-1], 6561, "tokens")
    with pytest.raises(ValueError, match="integers"):
        token_tensor([1.5], 6561, "tokens")


def test_compiled_estimator_matches_eager(inputs):
    """The opt-in torch.compile path (offline / upstream-exact final passes) computes the same mel."""
    with torch.random.fork_rng():
        torch.manual_seed(4)
        model = FlowModel(MICRO).eval()
    eager = _mel(model, inputs, 40, finalize=True, chunked=False)
    chunked = _mel(model, inputs, 40, finalize=False, chunked=True)
    model.decoder.compile_estimator()
    assert (_mel(model, inputs, 40, finalize=True, chunked=False) - eager).abs().max() < 1e-4
    assert model.decoder._compiled is not None
    # chunked passes keep running eagerly (their positions and caches change every call)
    assert (_mel(model, inputs, 40, finalize=False, chunked=True, stream=FlowStream()) - chunked).abs().max() < 1e-5
