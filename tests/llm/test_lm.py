"""The LLM against the contract: state-dict keys, sequence layout and targets, losses, DPO, decoding."""

from __future__ import annotations

import math
import random

import pytest
import torch

from cosyvoice.llm import (
    IGNORE_ID,
    CosyVoice3LM,
    Qwen2Encoder,
    Qwen2LM,
    greedy_sampling,
    label_smoothing_loss,
)

TINY = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True)


def tiny(cls=Qwen2LM, **kw):
    torch.manual_seed(0)
    return cls(32, 32, 6561, Qwen2Encoder(config=TINY), sampling=greedy_sampling, **kw)


def test_state_dict_keys_are_upstreams():
    keys = set(tiny().state_dict())
    assert {"llm_embedding.weight", "speech_embedding.weight", "llm_decoder.weight", "llm_decoder.bias",
            "llm.model.lm_head.weight", "llm.model.model.embed_tokens.weight", "llm.model.model.norm.weight",
            "llm.model.model.layers.1.self_attn.q_proj.bias", "llm.model.model.layers.0.mlp.gate_proj.weight"} <= keys
    assert all(k.startswith(("llm_embedding.", "speech_embedding.", "llm_decoder.", "llm.model.model.", "llm.model.lm_head."))
               for k in keys)
    sd = tiny().state_dict()
    assert sd["speech_embedding.weight"].shape == (6564, 32) and sd["llm_decoder.weight"].shape == (6564, 32)
    v3 = tiny(CosyVoice3LM).state_dict()
    assert "llm_embedding.weight" not in v3 and "llm_decoder.bias" not in v3
    assert v3["speech_embedding.weight"].shape == (6761, 32) and v3["llm_decoder.weight"].shape == (6761, 32)
    # strict round trip through a plain state dict (what llm.pt is)
    tiny().load_state_dict(sd, strict=True)


def reference_layout(text, speech, instruct_len, bistream, eos, fill, mix=(5, 15)):
    """Contract 7.2 written out plainly: the list of input symbols and the targets."""
    a, b = mix
    inputs = ["sos"] + [f"i{k}" for k in range(instruct_len)]
    targets = [IGNORE_ID] * (1 + instruct_len)
    if not bistream:
        inputs += [f"t{k}" for k in range(len(text))] + ["task"] + [f"s{k}" for k in range(len(speech))]
        targets += [IGNORE_ID] * len(text) + list(speech) + [eos]
        return inputs, targets
    for j in range(math.ceil((len(text) + 1) / a)):
        chunk = list(range(j * a, min((j + 1) * a, len(text))))
        inputs += [f"t{k}" for k in chunk]
        if len(chunk) == a:
            inputs += [f"s{k}" for k in range(j * b, (j + 1) * b)]
            targets += [IGNORE_ID] * (a - 1) + list(speech[j * b:(j + 1) * b]) + [fill]
        else:
            inputs += ["task"] + [f"s{k}" for k in range(j * b, len(speech))]
            targets += [IGNORE_ID] * len(chunk) + list(speech[j * b:]) + [eos]
    return inputs, targets


def symbol_rows(model, text, speech, instruct=None):
    special = model.special_embeddings()
    rows = {"sos": special[0], "task": special[1]}
    rows.update({f"t{k}": model.llm.embed_tokens.weight[t] for k, t in enumerate(text)})
    rows.update({f"s{k}": model.speech_embedding.weight[s] for k, s in enumerate(speech)})
    rows.update({f"i{k}": model.llm.embed_tokens.weight[t] for k, t in enumerate(instruct or [])})
    return rows


@pytest.mark.parametrize("cls", [Qwen2LM, CosyVoice3LM])
@pytest.mark.parametrize("t_len,s_len", [(7, 40), (10, 45), (3, 9), (4, 30), (1, 2)])
def test_sequences_match_the_contract_layout_for_both_streams(cls, t_len, s_len):
    model = tiny(cls)
    g = torch.Generator().manual_seed(t_len * 100 + s_len)
    text = torch.randint(0, 151000, (1, t_len), generator=g)
    speech = torch.randint(0, 6561, (1, s_len), generator=g)
    instruct = torch.randint(0, 151000, (1, 3), generator=g) if cls is CosyVoice3LM else None
    seen = set()
    for seed in range(12):
        random.seed(seed)
        draw = random.random() < 0.5
        random.seed(seed)
        seq = model.prepare_sequences(text, torch.tensor([t_len]), speech, torch.tensor([s_len]),
                                      instruct, torch.tensor([3]) if instruct is not None else None)
        bistream = draw and s_len / t_len > 3
        seen.add(bistream)
        symbols, targets = reference_layout(text[0].tolist(), speech[0].tolist(), 3 if instruct is not None else 0,
                                            bistream, model.eos_token, model.fill_token)
        assert seq.targets[0].tolist() == targets
        rows = symbol_rows(model, text[0].tolist(), speech[0].tolist(), instruct[0].tolist() if instruct is not None else None)
        expected = torch.stack([rows[s] for s in symbols])
        assert torch.equal(seq.inputs[0], expected)
    assert seen == ({True, False} if s_len / t_len > 3 else {False})


def test_special_ids_of_both_versions():
    v2, v3 = tiny(), tiny(CosyVoice3LM)
    assert (v2.sos, v2.task_id, v2.eos_token, v2.fill_token, v2.stop_token_ids) == (0, 1, 6561, 6563, [6561, 6562, 6563])
    assert (v3.sos, v3.eos_token, v3.task_id, v3.fill_token) == (6561, 6562, 6563, 6564)
    assert v3.stop_token_ids == list(range(6561, 6761))
    assert torch.equal(v3.special_embeddings(), v3.speech_embedding.weight[[6561, 6563]])


def batch_of(lengths, seed=0, speech_max=6561):
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([a for a, _ in lengths])
    s = torch.tensor([b for _, b in lengths])
    return {"text_token": torch.randint(1, 150000, (len(lengths), int(t.max())), generator=g), "text_token_len": t,
            "speech_token": torch.randint(0, speech_max, (len(lengths), int(s.max())), generator=g), "speech_token_len": s}


def reference_loss(model, batch, smoothing=0.0):
    """Upstream's path: pad inputs, run the whole padded batch, KLDiv-smoothed CE over non-ignored targets."""
    targets, inputs, lengths = model.prepare_lm_input_target(batch["text_token"], batch["text_token_len"],
                                                            batch["speech_token"], batch["speech_token_len"])
    hidden, _ = model.llm(inputs, lengths)
    logits = model.llm_decoder(hidden)
    v = logits.size(-1)
    flat, tgt = logits.reshape(-1, v), targets.reshape(-1)
    keep = tgt != IGNORE_ID
    true = torch.full_like(flat, smoothing / (v - 1))
    true.scatter_(1, tgt.clamp(min=0)[:, None], 1 - smoothing)
    kl = torch.nn.functional.kl_div(flat.log_softmax(-1), true, reduction="none").sum(1)
    return kl[keep].sum() / keep.sum()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_equals_the_padded_upstream_computation_packed_or_not(smoothing):
    model = tiny(lsm_weight=smoothing).eval()
    batch = batch_of([(7, 40), (3, 9), (5, 31), (12, 20)])
    random.seed(5)
    expected = reference_loss(model, batch, smoothing)
    for packed in (False, True):
        model.packed = packed
        random.seed(5)
        got = model(batch)["loss"]
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (packed, got, expected)


def test_packing_removes_padding_compute():
    model = tiny().eval()
    batch = batch_of([(20, 200), (2, 5), (3, 6)])
    model.packed = False
    model(batch)
    padded = model.last_stats
    model.packed = True
    model(batch)
    assert model.last_stats["padded_tokens"] == model.last_stats["tokens"] == padded["tokens"]
    assert padded["padded_tokens"] > 2 * padded["tokens"]


def test_label_smoothing_zero_is_cross_entropy():
    logits = torch.randn(9, 50)
    target = torch.randint(0, 50, (9,))
    assert torch.allclose(label_smoothing_loss(logits, target, 0.0),
                          torch.nn.functional.cross_entropy(logits, target, reduction="sum"))


def test_dpo_logps_average_target_positions_and_skip_rows_without_rejects():
    model = tiny().eval()
    batch = batch_of([(4, 20), (3, 12), (5, 15)], seed=1)
    batch["reject_speech_token"] = torch.randint(0, 6561, (3, 18))
    batch["reject_speech_token_len"] = torch.tensor([18, 0, 7])
    random.seed(3)
    out = model.forward_dpo(batch)
    assert int(out["dpo_skipped"]) == 1
    assert out["chosen_logps"].shape == (2,) and out["rejected_logps"].shape == (2,)
    # rebuild the five sequences forward_dpo builds (3 chosen, then the 2 rejected with tokens)
    random.seed(3)
    pairs = [0, 2]
    rejected = batch["reject_speech_token"][pairs]
    seqs = model.prepare_sequences(torch.cat([batch["text_token"], batch["text_token"][pairs]]),
                                   torch.cat([batch["text_token_len"], batch["text_token_len"][pairs]]),
                                   torch.cat([batch["speech_token"], torch.nn.functional.pad(rejected, (0, 2))]),
                                   torch.cat([batch["speech_token_len"], batch["reject_speech_token_len"][pairs]]))
    target = seqs.targets[4]
    hidden, _ = model.llm(seqs.inputs[4][None], torch.tensor([len(target)]))
    logp = model.llm_decoder(hidden[0]).log_softmax(-1)
    keep = target != IGNORE_ID
    manual = logp[keep].gather(1, target[keep][:, None]).mean()
    assert keep.sum() == 7 + 1  # 7 speech tokens + the closing eos/fill targets, no IGNORE positions
    assert torch.allclose(out["rejected_logps"][1], manual, atol=1e-5)


def test_dpo_loss_falls_when_the_policy_prefers_the_chosen_sequence():
    from cosyvoice.train.dpo import dpo_loss

    ref_c, ref_r = torch.tensor([-5.0]), torch.tensor([-5.0])
    better, *_ = dpo_loss(torch.tensor([-4.0]), torch.tensor([-6.0]), ref_c, ref_r, beta=0.5)
    worse, *_ = dpo_loss(torch.tensor([-6.0]), torch.tensor([-4.0]), ref_c, ref_r, beta=0.5)
    neutral, cr, rr = dpo_loss(ref_c, ref_r, ref_c, ref_r, beta=0.5)
    assert better < neutral < worse
    assert torch.isclose(neutral, torch.tensor(math.log(2.0)))
    assert float(cr) == float(rr) == 0.0


def test_greedy_decoding_stops_at_a_stop_id_and_respects_min_length():
    model = tiny().eval()
    with torch.no_grad():  # make eos the best token everywhere
        model.llm_decoder.bias.zero_()
        model.llm_decoder.bias[model.eos_token] = 100.0
    text = torch.randint(1, 1000, (1, 4))
    empty = torch.zeros(1, 0, dtype=torch.long)
    out = list(model.inference(text, torch.tensor([4]), empty, torch.tensor([0]), empty, torch.tensor([0])))
    assert len(out) == 8  # min length 2 x 4 text tokens, then eos wins
    assert all(t < 6561 for t in out)


def test_incremental_decoding_equals_full_recomputation():
    model = tiny().eval()
    text = torch.randint(1, 1000, (1, 5))
    empty = torch.zeros(1, 0, dtype=torch.long)
    prompt = torch.randint(0, 6561, (1, 6))
    out = list(model.inference(text, torch.tensor([5]), empty, torch.tensor([0]), prompt, torch.tensor([6])))[:12]
    special = model.special_embeddings()
    seq = torch.cat([special[:1], model.llm.embed_tokens(text[0]), special[1:2], model.speech_embedding(prompt[0])])
    with torch.no_grad():
        for token in out:
            hidden, _ = model.llm(seq[None], torch.tensor([seq.size(0)]))
            logp = model.llm_decoder(hidden[0, -1]).log_softmax(-1)
            logp[model.eos_token] = -float("inf")
            assert int(logp.argmax()) == token
            seq = torch.cat([seq, model.speech_embedding.weight[token][None]])


def test_cosyvoice3_needs_instruct_and_end_of_prompt():
    model = tiny(CosyVoice3LM).eval()
    with pytest.raises(ValueError, match="instruct"):
        model(batch_of([(3, 9)]))
    empty = torch.zeros(1, 0, dtype=torch.long)
    with pytest.raises(ValueError, match="endofprompt"):
        next(model.inference(torch.tensor([[5, 6]]), torch.tensor([2]), empty, torch.tensor([0]), empty, torch.tensor([0])))
