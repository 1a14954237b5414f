"""CosyVoice1's TransformerLM against upstream: recipe, state-dict keys, layout, loss, generation.

The oracles (``data/upstream_transformer_lm.npz``, ``data/transformer_lm_keys.tsv``) were recorded
from upstream's own classes by ``bench/upstream_transformer_lm.py``; these tests need no upstream
checkout.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cosyvoice.config import UnsafeConfigError, load_recipe, training_overrides
from cosyvoice.dataset.text import get_whisper_tokenizer
from cosyvoice.llm import (
    IGNORE_ID,
    ConformerEncoder,
    TransformerEncoder,
    TransformerLM,
    greedy_sampling,
    ras_sampling,
)
from cosyvoice.llm.transformer import padding_and_chunk_mask

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DATA = os.path.join(os.path.dirname(__file__), "data")
ORACLE = os.path.join(DATA, "upstream_transformer_lm.npz")


@pytest.fixture(scope="module")
def oracle() -> dict:
    with np.load(ORACLE) as f:
        return {k: f[k] for k in f.files}


def build(settings: dict, sampling=greedy_sampling) -> TransformerLM:
    return TransformerLM(text_encoder=ConformerEncoder(**settings["text_encoder"]),
                         llm=TransformerEncoder(**settings["llm"]), sampling=sampling, **settings["lm"])


@pytest.fixture(scope="module")
def model(oracle) -> TransformerLM:
    """Ours, loaded strictly from the weights upstream's oracle ran with."""
    lm = build(json.loads(str(oracle["settings"])))
    state = {k[len("weight/"):]: torch.from_numpy(v) for k, v in oracle.items() if k.startswith("weight/")}
    lm.load_state_dict(state, strict=True)
    return lm.eval()


def batch_of(oracle: dict) -> dict:
    return {k[len("batch/"):]: torch.from_numpy(v) for k, v in oracle.items() if k.startswith("batch/")}


def tiny(speech_token_size: int = 4096, text_chunk: int = 1, seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    common = dict(attention_heads=2, linear_units=16, num_blocks=1, input_layer="linear",
                  pos_enc_layer_type="rel_pos_espnet", selfattention_layer_type="rel_selfattn")
    return TransformerLM(8, 16, 16, 50, speech_token_size,
                         ConformerEncoder(8, 12, use_cnn_module=False, macaron_style=False,
                                          static_chunk_size=text_chunk, **common),
                         TransformerEncoder(16, 16, static_chunk_size=1, **{**common, "input_layer": "linear_legacy"}),
                         sampling=greedy_sampling, spk_embed_dim=6).eval()


def test_the_v1_recipe_loads_unchanged_and_builds_upstreams_keys_and_shapes():
    """The upstream yaml as published, through the safe loader; the full 300M model is built on the meta
    device (shapes without memory) and compared with the table recorded from upstream's model."""
    with torch.device("meta"):
        configs = load_recipe(os.path.join(DATA, "upstream_cosyvoice.yaml"), training_overrides("llm"))
    lm = configs["llm"]
    assert type(lm) is TransformerLM and type(lm.llm) is TransformerEncoder and type(lm.text_encoder) is ConformerEncoder
    assert configs["flow"] is None and configs["hift"] is None and configs["hifigan"] is None
    assert configs["get_tokenizer"].func is get_whisper_tokenizer and lm.sampling.func is ras_sampling
    assert lm.eos_token == 4096 and (lm.text_encoder.static_chunk_size, lm.llm.static_chunk_size) == (1, 1)
    with open(os.path.join(DATA, "transformer_lm_keys.tsv")) as f:
        table = [tuple(line.rstrip("\n").split("\t")) for line in f]
    ours = [(k, ",".join(map(str, v.shape))) for k, v in lm.state_dict().items()]
    assert len(table) == 401 and ("llm_decoder.weight", "4097,1024") in table
    assert ours == table  # same keys, shapes and order
    assert [k for k, _ in lm.named_parameters()] == [k for k, _ in ours]  # no buffers


def test_other_upstream_classes_in_a_v1_recipe_are_still_refused(tmp_path):
    text = open(os.path.join(DATA, "upstream_cosyvoice.yaml")).read()
    path = tmp_path / "cosyvoice.yaml"
    path.write_text(text.replace("cosyvoice.transformer.encoder.TransformerEncoder",
                                 "cosyvoice.transformer.encoder.SqueezeformerEncoder"))
    with pytest.raises(UnsafeConfigError, match="SqueezeformerEncoder"):
        load_recipe(str(path), training_overrides("llm"))


def test_eval_loss_acc_and_logits_equal_upstreams(model, oracle):
    captured = []
    hook = model.llm_decoder.register_forward_hook(lambda m, i, out: captured.append(out))
    try:
        with torch.no_grad():
            out = model(batch_of(oracle))
    finally:
        hook.remove()
    np.testing.assert_allclose(captured[0].numpy(), oracle["eval/target_logits"], atol=1e-5, rtol=0)
    assert float(out["loss"]) == pytest.approx(float(oracle["eval/loss"][0]), abs=1e-5)
    assert float(out["acc"]) == pytest.approx(float(oracle["eval/acc"][0]), abs=1e-6)
    assert model.last_stats == {"tokens": 22 + 16 + 21, "padded_tokens": 3 * 22, "target_tokens": 13 + 5 + 16}


def test_train_mode_loss_equals_upstreams_with_the_same_seeds(model, oracle):
    """Same padded shapes and dropout calls in upstream's order: a seeded step draws the same masks."""
    batch = batch_of(oracle)
    model.train()
    try:
        for seed, expected in zip(oracle["train/seeds"], oracle["train/loss"]):
            random.seed(int(seed))
            torch.manual_seed(int(seed))
            with torch.no_grad():
                loss = float(model(batch)["loss"])
            assert loss == pytest.approx(float(expected), abs=1e-5)
        assert loss != pytest.approx(float(oracle["eval/loss"][0]), abs=1e-3)  # dropout did act
    finally:
        model.eval()


@pytest.mark.parametrize("case", ["prompted", "bare"])
def test_greedy_generation_equals_upstreams(model, oracle, case):
    """``prompted``: speaker vector, prompt text and prompt speech, ends at eos midway; ``bare``: neither."""
    inputs = {k.split("/")[-1]: torch.from_numpy(v) for k, v in oracle.items() if k.startswith(f"infer/{case}/")}
    expected = inputs.pop("ids").tolist()
    text_len = inputs["text_len"].clone()
    ids = list(model.inference(**inputs))
    assert ids == expected
    assert torch.equal(inputs["text_len"], text_len)  # (upstream adds the prompt length into it in place)
    assert 2 * int(text_len[0]) <= len(ids) < 20 * int(text_len[0])


def test_layout_and_targets_follow_contract_7_1():
    lm = tiny()
    text = torch.tensor([[5, 6, 7], [8, 9, 0]])
    text_len = torch.tensor([3, 2], dtype=torch.int32)
    speech = torch.tensor([[10, 4095], [11, 0]])
    speech_len = torch.tensor([2, 1], dtype=torch.int32)
    embedding = torch.randn(2, 6)
    with torch.no_grad():
        target, inputs, lengths = lm.prepare_lm_input_target(text, text_len, speech, speech_len, embedding)
        encoded = lm.encode(text, text_len)
        speaker = lm.spk_embed_affine_layer(F.normalize(embedding, dim=1))
    assert target.tolist() == [[-1, -1, -1, -1, -1, 10, 4095, 4096], [-1, -1, -1, -1, 11, 4096, -1, -1]]
    assert lengths.tolist() == [8, 6]
    sos, task = lm.llm_embedding.weight[0], lm.llm_embedding.weight[1]
    for i, (t, s) in enumerate([(3, 2), (2, 1)]):
        expected = torch.cat([sos[None], speaker[i:i + 1], encoded[i, :t], task[None], lm.speech_embedding(speech[i, :s])])
        assert torch.equal(inputs[i, :2 + t + 1 + s], expected)
    assert bool((inputs[1, 6:] == IGNORE_ID).all())  # padding rows are -1.0, masked by length


def test_the_text_encoder_is_causal_and_ignores_padding():
    lm = tiny()
    text = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        full = lm.encode(text, torch.tensor([4]))
        prefix = lm.encode(text[:, :2], torch.tensor([2]))
        padded = lm.encode(torch.tensor([[5, 6, 0, 0]]), torch.tensor([2]))
    torch.testing.assert_close(full[:, :2], prefix, atol=1e-6, rtol=0)
    torch.testing.assert_close(padded[:, :2], prefix, atol=1e-6, rtol=0)
    assert not torch.allclose(full[:, 1], full[:, 2])


def test_cached_generation_equals_one_causal_pass_over_the_sequence():
    """Prefix, single steps and a multi-row chunk after the cache, past the first buffer growth (64)."""
    llm = tiny().llm
    x = torch.randn(1, 150, 16)
    with torch.no_grad():
        full, _ = llm(x, torch.tensor([150]))
        state = llm.decode_state()
        pieces = [llm.extend(x[:, :40], state)] + [llm.extend(x[:, i:i + 1], state) for i in range(40, 70)]
        pieces.append(llm.extend(x[:, 70:150], state))
    assert state.length == 150
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_generation_stops_at_eos_only_after_the_minimum_and_never_past_the_maximum():
    lm = tiny(speech_token_size=64)
    case = dict(text=torch.tensor([[5, 6, 7]]), text_len=torch.tensor([3]), prompt_text=torch.zeros(1, 0, dtype=torch.long),
                prompt_text_len=torch.tensor([0]), prompt_speech_token=torch.zeros(1, 0, dtype=torch.long),
                prompt_speech_token_len=torch.tensor([0]), embedding=torch.randn(1, 6))
    with torch.no_grad():
        lm.llm_decoder.bias[64] = 1e4  # eos always wins when allowed
        assert len(list(lm.inference(**case))) == 6
        lm.llm_decoder.bias[64] = -1e4  # eos never wins
        assert len(list(lm.inference(**case, max_token_text_ratio=5))) == 15


def test_masks_follow_upstreams_static_chunks_and_padding():
    mask = padding_and_chunk_mask(torch.tensor([3, 1]), 4, chunk=2)
    assert mask[0].int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]]
    assert mask[1].int().tolist() == [[1, 0, 0, 0]] * 4
    full = padding_and_chunk_mask(torch.tensor([2, 0]), 3, chunk=0)
    assert full.int().tolist() == [[[1, 1, 0]], [[1, 1, 1]]]  # no visible key: all (upstream's fix-up)


@pytest.mark.parametrize("cls,kwargs,name", [
    (ConformerEncoder, {}, "input_layer"),  # upstream's default conv2d, not a silent linear
    (ConformerEncoder, {"input_layer": "linear", "pos_enc_layer_type": "rel_pos_espnet"}, "macaron_style"),
    (ConformerEncoder, {"input_layer": "linear", "pos_enc_layer_type": "rel_pos_espnet", "macaron_style": False},
     "use_cnn_module"),
    (TransformerEncoder, {"input_layer": "linear_legacy"}, "pos_enc_layer_type"),
    (TransformerEncoder, {"input_layer": "linear_legacy", "pos_enc_layer_type": "rel_pos_espnet",
                          "selfattention_layer_type": "rel_selfattn", "use_dynamic_chunk": True}, "use_dynamic_chunk"),
    (TransformerEncoder, {"input_layer": "linear_legacy", "pos_enc_layer_type": "rel_pos_espnet",
                          "selfattention_layer_type": "rel_selfattn", "activation_type": "swish"}, "activation_type"),
])
def test_unsupported_encoder_settings_are_refused_by_name(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(8, 8, attention_heads=2, linear_units=8, num_blocks=1, **kwargs)


def test_a_speech_token_outside_the_v1_vocabulary_is_a_clear_error():
    lm = tiny()
    batch = {"text_token": torch.tensor([[5]]), "text_token_len": torch.tensor([1]),
             "speech_token": torch.tensor([[6561, 0]]), "speech_token_len": torch.tensor([1]),
             "embedding": torch.randn(1, 6)}
    with pytest.raises(ValueError, match=r"speech token id 6561 is outside .*\[0, 4096\)"):
        lm(batch)
    batch["speech_token"] = torch.tensor([[3, 6561]])  # in the padding: fine
    assert torch.isfinite(lm(batch)["loss"])
