"""CosyVoice1's flow (MaskedDiffWithXvec at 22.05 kHz): upstream's keys, loss and seeded inference.

Agreement with upstream is checked against oracles recorded by bench/upstream_flow_v1.py (upstream's
classes with the tiny settings and our seeded weights; its full-size flow built from the v1 yaml for
the key table), so no upstream checkout is needed here; the other tests check our own contracts on
a micro config.
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

from cosyvoice.acoustic.flow import FlowConfig, FlowModel
from cosyvoice.acoustic.flow_v1 import FlowV1Config, FlowV1Model, load_flow_v1
from cosyvoice.acoustic.reference import seeded_state_dict

HERE = os.path.dirname(__file__)
ORACLES = os.path.join(HERE, "data", "upstream_flow_v1.npz")
KEYS = os.path.join(HERE, "data", "flow_v1_keys.tsv")
MICRO = dataclasses.replace(FlowV1Config.tiny(), dim=32, encoder_heads=2, encoder_hidden=32, encoder_blocks=1,
                            regulator_layers=1, estimator_channels=(16, 16), estimator_head_dim=8,
                            estimator_blocks=1, estimator_mid_blocks=1)
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def seeded_state(config: FlowV1Config, seed: int = 0) -> dict:
    """The bench's seeded weights: default initialisation + perturbed constants (reference.py's recipe)."""
    return seeded_state_dict(lambda: FlowV1Model(config), seed)


def make_batch(token_lengths, feat_lengths, seed=0, vocab=4096) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, s, t = len(token_lengths), max(token_lengths), max(feat_lengths)
    token, feat = torch.zeros(b, s, dtype=torch.int64), torch.zeros(b, t, 80)
    for i, (n, f) in enumerate(zip(token_lengths, feat_lengths)):
        token[i, :n] = torch.randint(0, vocab, (n,), generator=g)
        feat[i, :f] = torch.randn(f, 80, generator=g)
    return {"speech_token": token, "speech_token_len": torch.tensor(token_lengths, dtype=torch.int32),
            "speech_feat": feat, "speech_feat_len": torch.tensor(feat_lengths, dtype=torch.int32),
            "embedding": torch.randn(b, 192, generator=g)}


def seeded(model, batch, seed):
    random.seed(seed)
    torch.manual_seed(seed)
    return model(batch, CPU)["loss"]


@pytest.fixture(scope="module")
def micro() -> FlowV1Model:
    model = FlowV1Model(MICRO)
    model.load_state_dict(seeded_state(MICRO, seed=3))
    return model.eval()


# -- agreement with upstream -------------------------------------------------------------------------
def test_the_full_flow_has_upstreams_keys_and_shapes_in_its_order():
    """The table is upstream's MaskedDiffWithXvec built from the v1 recipe yaml (bench/upstream_flow_v1.py)."""
    table = {}
    for line in open(KEYS).read().splitlines():
        key, shape = line.split("\t")
        table[key] = tuple(int(n) for n in shape.split(",") if n)
    assert len(table) == 1185 and table["input_embedding.weight"] == (4096, 512)
    assert table["decoder.estimator.down_blocks.0.2.conv.weight"] == (256, 256, 3)  # the stride-2 level
    with torch.device("meta"):
        model = FlowV1Model(FlowV1Config.full())
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert list(ours) == list(table)
    assert {k: v for k, v in ours.items() if table[k] != v} == {}


@pytest.fixture(scope="module")
def recorded() -> dict:
    return dict(np.load(ORACLES))


@pytest.fixture(scope="module")
def tiny(recorded) -> FlowV1Model:
    state = seeded_state(FlowV1Config.tiny())
    buffer = io.BytesIO()
    torch.save(state, buffer)
    assert hashlib.sha256(buffer.getvalue()).hexdigest() == str(recorded["sha256_state"]), (
        "the seeded tiny v1 flow changed since the oracles were recorded; re-run bench/upstream_flow_v1.py")
    return load_flow_v1(state, FlowV1Config.tiny())


@pytest.fixture(scope="module")
def golden_batch(recorded) -> dict:
    return {k.split("/", 1)[1]: torch.from_numpy(v) for k, v in recorded.items() if k.startswith("batch/")}


def test_the_golden_batch_has_mel_lengths_off_the_token_rate(golden_batch):
    tokens, frames = golden_batch["speech_token_len"], golden_batch["speech_feat_len"]
    assert len(set((frames / tokens).tolist())) == 3  # the regulator interpolates, no fixed ratio
    assert (0.3 * frames != (0.3 * frames).floor()).any()  # int(0.3 * len) truncates for one utterance


def test_eval_loss_and_prediction_equal_upstreams(tiny, recorded, golden_batch):
    predictions = []
    hook = tiny.decoder.estimator.register_forward_hook(lambda module, inputs, output: predictions.append(output))
    try:
        with torch.no_grad():
            losses = [float(seeded(tiny.eval(), golden_batch, int(s))) for s in recorded["eval/seeds"]]
    finally:
        hook.remove()
    np.testing.assert_allclose(losses, recorded["eval/loss"], rtol=1e-5)
    compared = 0
    for seed, pred in zip(recorded["eval/seeds"].tolist(), predictions):
        if f"eval/prediction/{seed}" in recorded:
            np.testing.assert_allclose(pred.numpy(), recorded[f"eval/prediction/{seed}"], atol=1e-5)
            compared += 1
    assert compared == 2


def test_train_mode_loss_equals_upstreams_with_the_same_dropout_draws(tiny, recorded, golden_batch):
    try:
        with torch.no_grad():
            losses = [float(seeded(tiny.train(), golden_batch, int(s))) for s in recorded["train/seeds"]]
    finally:
        tiny.eval()
    np.testing.assert_allclose(losses, recorded["train/loss"], rtol=1e-5)
    with torch.no_grad():
        assert abs(float(seeded(tiny, golden_batch, int(recorded["train/seeds"][0]))) / losses[0] - 1) > 1e-4


def test_seeded_inference_and_its_flow_cache_equal_upstreams(tiny, recorded):
    inputs = {k.split("/", 1)[1]: torch.from_numpy(v) for k, v in recorded.items()
              if k.startswith("inference/") and k.count("/") == 1}
    cache = None
    for name, seed in zip(("first", "second"), recorded["inference/seeds"].tolist()):
        torch.manual_seed(seed)
        mel, cache = tiny.inference(inputs[name], inputs["prompt_tokens"], inputs["prompt_feat"],
                                    inputs["embedding"], cache)
        np.testing.assert_allclose(mel.numpy(), recorded[f"inference/{name}/mel"], atol=1e-5, err_msg=name)
        np.testing.assert_allclose(cache.numpy(), recorded[f"inference/{name}/cache"], atol=1e-5, err_msg=name)
    assert recorded["inference/first/mel"].shape[2] == 77  # int(45 / 50 * 22050 / 256)


# -- our contracts -----------------------------------------------------------------------------------
def test_mel_frames_follow_upstreams_arithmetic():
    config = FlowV1Config.full()
    assert [config.mel_frames(n) for n in (1, 20, 45, 50, 100)] == [1, 34, 77, 86, 172]
    assert config.mel_frames(config.overlap_tokens) == config.cache_frames


def test_a_stream_chunk_reuses_the_previous_chunks_noise_over_the_overlap(micro):
    """With the cache, the first frames of the next call start from the noise the last call ended with."""
    g = torch.Generator().manual_seed(5)
    prompt, feat, emb = torch.randint(0, 4096, (1, 6), generator=g), torch.randn(1, 11, 80, generator=g), \
        torch.randn(1, 192, generator=g)
    tokens = torch.randint(0, 4096, (1, 60), generator=g)
    _, cache = micro.inference(tokens[:, :40], prompt, feat, emb)
    assert cache.shape == (1, 80, 11 + 34, 2)
    _, again = micro.inference(tokens[:, 20:], prompt, feat, emb, cache)
    assert torch.equal(again[:, :, :11], cache[:, :, :11])  # the prompt's noise and mu carry over
    _, fresh = micro.inference(tokens[:, 20:], prompt, feat, emb)
    assert not torch.equal(fresh[:, :, :11, 0], cache[:, :, :11, 0])  # without it the noise is new
    with pytest.raises(ValueError, match="flow_cache holds 45 frames but this call has only 12"):
        micro.inference(tokens[:, :1], prompt[:, :1], feat[:, :11], emb, cache)


@pytest.mark.parametrize("call,named", [
    (lambda m, t, p, f, e: m.inference(t, p, f[:, :0], e), "give both (a prompt) or neither"),
    (lambda m, t, p, f, e: m.inference(t[:, :0], p, f, e), "tokens is empty"),
    (lambda m, t, p, f, e: m.inference(t + 4096, p, f, e), "ids must lie in [0, 4095]"),
    (lambda m, t, p, f, e: m.inference(t, p, f, e[:, :80]), "expected (1, 192)"),
    (lambda m, t, p, f, e: m.inference(t, p, f, e, torch.zeros(1, 80, 3)), "expected (1, 80, frames, 2)"),
])
def test_bad_inference_inputs_are_refused_by_name(micro, call, named):
    tokens, prompt = torch.randint(0, 4096, (1, 10)), torch.randint(0, 4096, (1, 4))
    with pytest.raises(ValueError, match=re.escape(named)):
        call(micro, tokens, prompt, torch.randn(1, 7, 80), torch.randn(1, 192))


@pytest.mark.parametrize("change,named", [
    (lambda b: b.pop("embedding"), "lacks ['embedding']"),
    (lambda b: b.update(speech_feat=b["speech_feat"][:, :-1]), "padded to the longest utterance"),
    (lambda b: b.update(speech_token_len=torch.tensor([12, 0], dtype=torch.int32)), "at least one speech token"),
    (lambda b: b["speech_token"].__setitem__((0, 3), 4096), "speech token id 4096"),
    (lambda b: b.update(embedding=b["embedding"][:, :80]), "expected (B, S), (B,), (B, T, 80), (B,), (B, 192)"),
])
def test_bad_batches_are_refused_by_name(micro, change, named):
    batch = make_batch([12, 9], [21, 15])
    change(batch)
    with pytest.raises(ValueError, match=re.escape(named)):
        micro(batch, CPU)


def test_backward_reaches_every_parameter():
    model = FlowV1Model(MICRO)
    model.load_state_dict(seeded_state(MICRO, seed=4))
    seeded(model.train(), make_batch([14, 11, 6], [25, 18, 11], seed=1), seed=1).backward()
    untouched = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert untouched == []
    assert len(list(model.parameters())) == len(model.state_dict())  # every tensor of the file is trained


def test_load_flow_v1_is_strict_and_round_trips(micro):
    buffer = io.BytesIO()
    torch.save(micro.state_dict(), buffer)
    loaded = load_flow_v1(buffer.getvalue(), MICRO)
    assert not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), micro.state_dict().values()))
    tiny_v2 = FlowConfig.tiny()
    with torch.device("meta"):
        v2 = FlowModel(tiny_v2).state_dict()
    # a CosyVoice2 flow.pt: GroupNorm (block.1) vs LayerNorm (block.2) keys, other sizes: named, nothing loaded
    with pytest.raises(ValueError, match=r"does not match the model: missing keys \d+: decoder\.estimator\.down_blocks"
                                         r"\.0\.0\.block1\.block\.1\.bias.*unexpected keys.*shape mismatches"):
        load_flow_v1(v2, MICRO)
