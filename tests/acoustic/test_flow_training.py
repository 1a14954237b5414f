"""The flow's training forward: upstream's flow-matching loss on padded batches, its masks and dropout.

Agreement with upstream is checked against goldens recorded by bench/upstream_flow_loss.py (upstream's
``CausalMaskedDiffWithXvec.forward`` on the tiny reference weights, seeded); the other tests check
our own invariants on a micro config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import random
import re

import numpy as np
import pytest
import torch

from cosyvoice.acoustic.flow import FlowConfig, FlowModel, _attention_mask, load_flow
from cosyvoice.acoustic.recipe import acoustic_configs
from cosyvoice.acoustic.reference import flow_state, part_bytes

HERE = os.path.dirname(__file__)
GOLDENS = os.path.join(HERE, "data", "upstream_flow_loss.npz")
UPSTREAM_YAML = os.path.join(HERE, "data", "upstream_cosyvoice2.yaml")
MICRO = FlowConfig(dim=64, encoder_heads=2, encoder_hidden=64, encoder_blocks=1, up_blocks=1,
                   estimator_channels=32, estimator_head_dim=8, estimator_heads=2, estimator_blocks=1,
                   estimator_mid_blocks=1)
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_batch(lengths, seed=0, vocab=6561) -> dict:
    """A padded batch as the data pipeline gives it (longest first, zeros after each utterance)."""
    g = torch.Generator().manual_seed(seed)
    b, s = len(lengths), max(lengths)
    token = torch.zeros(b, s, dtype=torch.int64)
    feat = torch.zeros(b, 2 * s, 80)
    for i, n in enumerate(lengths):
        token[i, :n] = torch.randint(0, vocab, (n,), generator=g)
        feat[i, :2 * n] = torch.randn(2 * n, 80, generator=g)
    token_len = torch.tensor(lengths, dtype=torch.int32)
    return {"speech_token": token, "speech_token_len": token_len, "speech_feat": feat,
            "speech_feat_len": token_len * 2, "embedding": torch.randn(b, 192, generator=g)}


def seeded(model, batch, seed):
    random.seed(seed)
    torch.manual_seed(seed)
    return model(batch, CPU)["loss"]


def micro_model(config=MICRO, seed=3):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = FlowModel(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1 or "pos_bias" in name:
                    p.add_(torch.randn_like(p) * 0.1)
    return model


# -- agreement with upstream -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recorded():
    return dict(np.load(GOLDENS))


@pytest.fixture(scope="module")
def tiny(recorded):
    digest = hashlib.sha256(part_bytes("flow", seed=0, size="tiny")).hexdigest()
    assert digest == str(recorded["sha256_flow_pt"]), (
        "the tiny reference flow changed since the goldens were recorded; re-run bench/upstream_flow_loss.py")
    model = FlowModel(FlowConfig.tiny())
    model.load_state_dict(flow_state(0, "tiny"), strict=True)
    return model


@pytest.fixture(scope="module")
def golden_batch(recorded):
    return {k.split("/", 1)[1]: torch.from_numpy(v) for k, v in recorded.items() if k.startswith("batch/")}


def test_goldens_cover_both_draws_and_a_truncated_prompt_limit(recorded, golden_batch):
    assert set(recorded["eval/streaming"].tolist()) == {True, False}
    limits = 0.3 * golden_batch["speech_feat_len"]
    assert (limits != limits.floor()).any()  # int(0.3 * len) truncates for at least one utterance
    assert len(set(golden_batch["speech_token_len"].tolist())) == 3


def test_eval_loss_and_prediction_equal_upstreams(tiny, recorded, golden_batch):
    tiny.eval()
    predictions = []
    padded = tiny.decoder.estimator.padded

    def recording(*args):
        predictions.append(padded(*args))
        return predictions[-1]

    tiny.decoder.estimator.padded = recording
    try:
        with torch.no_grad():
            losses = [float(seeded(tiny, golden_batch, int(s))) for s in recorded["eval/seeds"]]
    finally:
        del tiny.decoder.estimator.padded
    np.testing.assert_allclose(losses, recorded["eval/loss"], rtol=1e-5)
    compared = 0
    for seed, pred in zip(recorded["eval/seeds"].tolist(), predictions):
        key = f"eval/prediction/{seed}"
        if key in recorded:
            assert pred.shape == recorded[key].shape
            assert np.abs(pred.numpy() - recorded[key]).max() < 1e-5, f"seed {seed}"
            compared += 1
    assert compared >= 2


def test_train_mode_loss_equals_upstreams_with_the_same_dropout_draws(tiny, recorded, golden_batch):
    tiny.train()
    try:
        with torch.no_grad():
            losses = [float(seeded(tiny, golden_batch, int(s))) for s in recorded["train/seeds"]]
    finally:
        tiny.eval()
    np.testing.assert_allclose(losses, recorded["train/loss"], rtol=1e-5)


# -- training behaviour ----------------------------------------------------------------------------
def test_backward_reaches_every_parameter_with_finite_gradients():
    model = micro_model().train()
    seeded(model, make_batch([40, 33, 21], seed=1), seed=2).backward()
    names = [name for name, p in model.named_parameters()]
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    zero = [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0]
    assert not zero, zero
    assert len(names) == len(model.state_dict())  # every tensor of the state dict is trained


def test_a_few_adam_steps_reduce_the_loss_of_a_fixed_batch():
    model = micro_model().train()
    batch = make_batch([30, 24], seed=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    with torch.no_grad():
        before = float(seeded(model.eval(), batch, 7))
    model.train()
    for _ in range(6):
        optimizer.zero_grad()
        seeded(model, batch, 7).backward()
        optimizer.step()
    with torch.no_grad():
        after = float(seeded(model.eval(), batch, 7))
    # the same t, noise and prompt draws before and after; u = x1 - z keeps most of the loss (about 2)
    assert after < 0.95 * before, (before, after)


@pytest.mark.parametrize("streaming", [False, True])
def test_the_estimator_ignores_what_follows_an_utterance_in_its_batch(streaming):
    """Conv inputs and outputs are masked and padded keys are never attended: A's velocity is the same
    alone and padded with garbage beside a longer utterance."""
    est = micro_model().decoder.estimator.eval()
    g = torch.Generator().manual_seed(0)
    n, long = 70, 130
    x, mu, cond = (torch.randn(2, 80, long, generator=g) for _ in range(3))  # garbage after A's end
    t, spks = torch.rand(2, generator=g), torch.randn(2, 80, generator=g)
    lengths = torch.tensor([long, n])
    chunk = MICRO.frame_chunk if streaming else 0
    mask = (torch.arange(long)[None] < lengths[:, None]).float()[:, None]
    with torch.no_grad():
        batched = est.padded(x, mu, t, spks, cond, mask, _attention_mask(lengths, long, chunk))
        alone = est.padded(x[1:, :, :n], mu[1:, :, :n], t[1:], spks[1:], cond[1:, :, :n], torch.ones(1, 1, n),
                           _attention_mask(lengths[1:], n, chunk))
    assert torch.allclose(batched[1:, :, :n], alone, atol=1e-5)
    assert torch.equal(batched[1:, :, n:], torch.zeros_like(batched[1:, :, n:]))  # masked output


def _encoded(encoder, tokens, lengths, streaming):
    s = tokens.shape[1]
    x = tokens * (torch.arange(s)[None] < lengths[:, None]).float()[..., None]
    return encoder.padded(x, _attention_mask(lengths, s, MICRO.token_chunk if streaming else 0),
                          _attention_mask(2 * lengths, 2 * s, MICRO.frame_chunk if streaming else 0))


def test_the_encoder_sees_padding_only_through_upstreams_lookahead():
    """As upstream: a padded utterance's last 3 tokens look ahead into the embedded padding (not zeros),
    so in full attention every frame differs from the unpadded run; chunk-causal, only the chunk holding
    those tokens and later ones do. Batch mates themselves never matter."""
    encoder = micro_model().encoder.eval()
    g = torch.Generator().manual_seed(1)
    n, long = 60, 90
    tokens = torch.randn(2, long, MICRO.dim, generator=g)
    lengths = torch.tensor([long, n])
    with torch.no_grad():
        for streaming in (False, True):
            batched = _encoded(encoder, tokens, lengths, streaming)[1]
            # the same padded row without its batch mate: identical
            alone_padded = _encoded(encoder, tokens[1:], lengths[1:], streaming)[0]
            assert torch.allclose(batched, alone_padded, atol=1e-5)
            unpadded = _encoded(encoder, tokens[1:, :n], lengths[1:], streaming)[0]
            first_touched = 2 * ((n - 3) // MICRO.token_chunk) * MICRO.token_chunk if streaming else 0
            assert torch.allclose(batched[:first_touched], unpadded[:first_touched], atol=1e-5)
            assert not torch.allclose(batched[first_touched:2 * n], unpadded[first_touched:], atol=1e-4)
    assert first_touched == 100  # chunk-causal: the first 2 of the 3 token chunks are untouched


def test_dropout_acts_in_train_mode_only():
    model = micro_model()
    x = torch.randn(2, 40, MICRO.dim)
    lengths = torch.tensor([40, 31])
    with torch.no_grad():
        model.train()
        assert not torch.equal(_encoded(model.encoder, x, lengths, True), _encoded(model.encoder, x, lengths, True))
        model.eval()
        assert torch.equal(_encoded(model.encoder, x, lengths, True), _encoded(model.encoder, x, lengths, True))
        batch = make_batch([40, 31], seed=5)
        assert float(seeded(model, batch, 1)) == float(seeded(model, batch, 1))
        # without dropout the mode changes nothing: the same seeds give the same loss
        quiet = micro_model(dataclasses.replace(MICRO, encoder_dropout=0.0, encoder_positional_dropout=0.0,
                                                encoder_attention_dropout=0.0))
        assert float(seeded(quiet.train(), batch, 1)) == float(seeded(quiet.eval(), batch, 1))


def test_a_trained_state_dict_keeps_the_released_keys_and_loads_strictly():
    model = micro_model().train()
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    seeded(model, make_batch([26, 20], seed=6), 0).backward()
    optimizer.step()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    loaded = load_flow(buffer.getvalue(), MICRO)
    assert not loaded.training
    tokens, prompt = torch.randint(0, 6561, (1, 30)), torch.randint(0, 6561, (1, 5))
    feat, emb = torch.randn(1, 10, 80), torch.randn(1, 192)
    mel = loaded.inference(tokens, prompt, feat, emb, finalize=True, chunked=False)
    assert torch.equal(mel, model.eval().inference(tokens, prompt, feat, emb, finalize=True, chunked=False))


def test_the_tiny_config_keeps_the_released_flow_keys():
    with open(os.path.join(HERE, "data", "flow_keys.tsv")) as f:
        released = [line.split("\t")[0] for line in f.read().splitlines() if line]
    assert set(FlowModel(FlowConfig.tiny()).state_dict()) <= set(released)


@pytest.mark.parametrize("change,named", [
    (lambda b: b.pop("embedding"), "lacks ['embedding']"),
    (lambda b: b.update(speech_feat_len=b["speech_feat_len"] - torch.tensor([0, 1], dtype=torch.int32)),
     "utterance 1 has 39 mel frames for 20 speech tokens"),
    (lambda b: b.update(speech_feat=b["speech_feat"][:, :-2], speech_feat_len=b["speech_feat_len"].clamp(max=50)),
     "exactly 2 mel frames per token"),
    (lambda b: b.update(speech_token_len=torch.tensor([26, 0], dtype=torch.int32)), "at least one speech token"),
    (lambda b: b["speech_token"].__setitem__((0, 3), 6561), "speech token id 6561"),
    (lambda b: b.update(embedding=b["embedding"][:, :80]), "expected (B, S), (B,), (B, T, 80), (B,), (B, 192)"),
])
def test_bad_batches_are_refused_by_name(change, named):
    batch = make_batch([26, 20])
    change(batch)
    with pytest.raises(ValueError, match=re.escape(named)):
        micro_model()(batch, CPU)


# -- configuration ---------------------------------------------------------------------------------
def _recipe(*edits) -> str:
    with open(UPSTREAM_YAML) as f:
        text = f.read()
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def test_the_recipe_carries_the_training_settings():
    full, _ = acoustic_configs(UPSTREAM_YAML)
    assert (full.encoder_dropout, full.encoder_positional_dropout, full.encoder_attention_dropout,
            full.estimator_dropout, full.sigma_min, full.training_cfg_rate, full.only_mask_loss) == \
        (0.1, 0.1, 0.1, 0.0, 1e-6, 0.2, True)
    flow, _ = acoustic_configs(_recipe(("dropout_rate: 0.1\n        positional", "dropout_rate: 0.2\n        positional"),
                                       ("attention_dropout_rate: 0.1", "attention_dropout_rate: 0.05"),
                                       ("dropout: 0.0", "dropout: 0.1"),
                                       ("training_cfg_rate: 0.2", "training_cfg_rate: 0.3"),
                                       ("                sigma_min: 1e-06\n", "")))
    assert (flow.encoder_dropout, flow.encoder_attention_dropout, flow.estimator_dropout, flow.training_cfg_rate,
            flow.sigma_min) == (0.2, 0.05, 0.1, 0.3, 1e-4)  # upstream's default sigma_min when omitted
    model = FlowModel(dataclasses.replace(MICRO, encoder_dropout=0.2, estimator_dropout=0.1))
    assert model.encoder.encoders[0].dropout == 0.2 and model.decoder.estimator.mid_blocks[0][1][0].dropout == 0.1


@pytest.mark.parametrize("old,new,named", [
    ("only_mask_loss: True", "only_mask_loss: False", "flow.only_mask_loss"),
    ("                training_cfg_rate: 0.2\n", "", "training_cfg_rate is missing"),
    ("attention_dropout_rate: 0.1", "attention_dropout_rate: 1.5", "encoder_attention_dropout = 1.5"),
])
def test_unsupported_training_settings_are_refused_by_name(old, new, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        acoustic_configs(_recipe((old, new)))


def test_flow_config_round_trips_and_refuses_an_unmasked_loss():
    for config in (FlowConfig.tiny(), FlowConfig.full(), MICRO):
        assert FlowConfig(**config.to_dict()) == config
    with pytest.raises(ValueError, match="only_mask_loss"):
        FlowConfig(only_mask_loss=False)
    with pytest.raises(ValueError, match="training_cfg_rate"):
        FlowConfig(training_cfg_rate=-0.1)
