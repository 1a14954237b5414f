"""HF export/import of the CosyVoice2/3 LLM: contract layout, exact round trip, speech-only
distribution (non-speech ids impossible), greedy decoding equal to our own inference loop."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from cosyvoice.export.hf import (
    BIAS_FILE,
    EXTRAS_FILE,
    export_hf,
    import_hf,
    load_state_dict,
    speech_logits_processor,
)
from cosyvoice.export.tokenizer import text_tokenizer
from cosyvoice.llm import CosyVoice3LM, Qwen2Encoder, Qwen2LM, greedy_sampling

from .conftest import TINY_QWEN2, save_pt, tiny_state_dict

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


def our_model(variant: str, sd: dict) -> Qwen2LM:
    cls = Qwen2LM if variant == "cosyvoice2" else CosyVoice3LM
    model = cls(64, 64, 6561, Qwen2Encoder(config=dict(TINY_QWEN2)), sampling=greedy_sampling)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def test_blank_en_tokenizer_has_the_contract_vocabulary_sizes(blank_tokenizer):
    tok2 = text_tokenizer(blank_tokenizer, "cosyvoice2")
    assert len(tok2) == 151663
    tok3 = text_tokenizer(blank_tokenizer, "cosyvoice3")
    assert tok3.convert_tokens_to_ids("<|endofprompt|>") == CosyVoice3LM.END_OF_PROMPT
    assert len(tok3) == 151663 + 1 + 260  # <|endofsystem|> + the phoneme tokens


def test_export_has_the_contract_layout(tiny_hf, tiny_llm_pt):
    from transformers import AutoTokenizer

    sd = load_state_dict(tiny_llm_pt)
    tok = AutoTokenizer.from_pretrained(tiny_hf)
    assert len(tok) == 158229
    assert tok.convert_tokens_to_ids(["<|s_0|>", "<|s_6560|>", "<|eos1|>", "<|eos2|>", "<|eos3|>", "<|sos|>", "<|task_id|>"]) == [
        151663, 158223, 158224, 158225, 158226, 158227, 158228]
    cfg = json.load(open(os.path.join(tiny_hf, "config.json")))
    assert (cfg["architectures"], cfg["vocab_size"], cfg["tie_word_embeddings"], cfg["eos_token_id"]) == (
        ["Qwen2ForCausalLM"], 158336, False, 158224)
    assert cfg["rope_theta"] == 1e6 and cfg["torch_dtype"] == "float32"
    gen = json.load(open(os.path.join(tiny_hf, "generation_config.json")))
    assert gen["eos_token_id"] == [158224, 158225, 158226] and (gen["top_p"], gen["top_k"]) == (0.8, 25)
    w = load_file(os.path.join(tiny_hf, "model.safetensors"))
    embed, head = w["model.embed_tokens.weight"], w["lm_head.weight"]
    assert embed.shape == head.shape == (158336, 64)
    assert torch.equal(embed[:151663], sd["llm.model.model.embed_tokens.weight"][:151663])
    assert torch.equal(embed[151663:158227], sd["speech_embedding.weight"])
    assert torch.equal(embed[158227:158229], sd["llm_embedding.weight"])
    assert torch.equal(head[151663:158227], sd["llm_decoder.weight"])
    assert not head[:151663].any() and not head[158227:].any()
    bias = load_file(os.path.join(tiny_hf, BIAS_FILE))["embedding_bias"]
    assert torch.equal(bias[151663:158227], sd["llm_decoder.bias"])
    assert torch.isneginf(bias[:151663]).all() and torch.isneginf(bias[158227:]).all()


def recipe_model(recipe: str) -> Qwen2LM:
    from cosyvoice.config import load_recipe

    return load_recipe(recipe, {"flow": None, "hift": None, "hifigan": None})["llm"].eval()


@pytest.mark.parametrize("variant", ["cosyvoice2", "cosyvoice3"])
def test_round_trip_llm_pt_to_hf_to_llm_pt_is_exact(variant, blank_tokenizer, tmp_path):
    recipe = os.path.join(CONFIGS, f"{variant}-tiny.yaml")
    model = recipe_model(recipe)
    with torch.no_grad():  # distinct values everywhere, also in rows that default init leaves equal
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    src = save_pt(model.state_dict(), str(tmp_path / "llm.pt"))
    report = export_hf(src, str(tmp_path / "hf"), tokenizer_dir=blank_tokenizer, config=recipe)
    assert report.variant == variant and report.padded_vocab_size % 128 == 0
    back = import_hf(str(tmp_path / "hf"), str(tmp_path / "back.pt"))
    assert back.exact
    restored = torch.load(str(tmp_path / "back.pt"), map_location="cpu", weights_only=True)
    fresh = recipe_model(recipe)
    fresh.load_state_dict(restored, strict=True)
    original = model.state_dict()
    assert set(restored) == set(original)
    for key, value in original.items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_cosyvoice3_specials_live_in_the_speech_rows(blank_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    src = save_pt(tiny_state_dict("cosyvoice3"), str(tmp_path / "llm.pt"))
    export_hf(src, str(tmp_path / "hf"), tokenizer_dir=blank_tokenizer, config=dict(TINY_QWEN2))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    v0 = 151663 + 1 + 260
    assert tok.convert_tokens_to_ids(["<|s_0|>", "<|sos|>", "<|eos1|>", "<|task_id|>", "<|fill|>", "<|s_6760|>"]) == [
        v0, v0 + 6561, v0 + 6562, v0 + 6563, v0 + 6564, v0 + 6760]
    gen = json.load(open(tmp_path / "hf" / "generation_config.json"))
    assert gen["eos_token_id"] == list(range(v0 + 6561, v0 + 6761))


def test_an_upstream_style_export_imports_with_the_upstream_fallbacks(tiny_hf, tiny_llm_pt, tmp_path):
    import shutil

    folder = tmp_path / "upstream"
    shutil.copytree(tiny_hf, folder)
    for name in (EXTRAS_FILE, "cosyvoice_export.json"):
        os.unlink(folder / name)
    report = import_hf(str(folder), str(tmp_path / "llm.pt"))
    assert not report.exact
    sd, original = torch.load(str(tmp_path / "llm.pt"), weights_only=True), load_state_dict(tiny_llm_pt)
    assert not sd["llm_decoder.bias"].any()
    assert torch.equal(sd["llm.model.lm_head.weight"], sd["llm.model.model.embed_tokens.weight"])
    for key in ("speech_embedding.weight", "llm_decoder.weight", "llm_embedding.weight"):
        assert torch.equal(sd[key], original[key])


def test_export_rejects_a_config_that_does_not_match_the_weights(tiny_llm_pt, blank_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="num_hidden_layers: config says 3"):
        export_hf(tiny_llm_pt, str(tmp_path), tokenizer_dir=blank_tokenizer, config={**TINY_QWEN2, "num_hidden_layers": 3})


@pytest.fixture(scope="module")
def prompt(blank_tokenizer) -> list[int]:
    return text_tokenizer(blank_tokenizer)(["Hello speech."])["input_ids"][0]


@torch.no_grad()
def test_non_speech_ids_get_no_mass_and_the_speech_distribution_is_ours(tiny_hf, tiny_llm_pt, prompt):
    from transformers import Qwen2ForCausalLM

    model = our_model("cosyvoice2", load_state_dict(tiny_llm_pt))
    special = model.special_embeddings()
    lm_input = torch.cat([special[:1], model.llm.embed_tokens(torch.tensor(prompt)), special[1:2]])[None]
    hidden, _ = model.llm.forward_one_step(lm_input)
    ours = model.llm_decoder(hidden[:, -1]).log_softmax(-1)[0]

    hf = Qwen2ForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32).eval()
    ids = torch.tensor([[158227, *prompt, 158228]])
    out = hf.generate(ids, do_sample=False, max_new_tokens=1, output_scores=True, return_dict_in_generate=True,
                      logits_processor=speech_logits_processor(tiny_hf))
    probs = out.scores[0][0].float().softmax(-1)
    assert probs[:151663].sum() == 0 and probs[158227:].sum() == 0  # text, sos/task and padding rows: no mass
    assert torch.allclose(probs[151663:158227].log(), ours, atol=1e-5)
    raw = hf(input_ids=ids).logits[0, -1].softmax(-1)  # what the upstream export serves: no bias, no mask
    assert raw[:151663].sum() > 0.01 and not torch.allclose(raw[151663:158227].log(), ours, atol=1e-2)


@torch.no_grad()
def test_greedy_hf_generate_yields_our_inference_loop_tokens(tiny_hf, tiny_llm_pt, prompt):
    from transformers import Qwen2ForCausalLM

    model = our_model("cosyvoice2", load_state_dict(tiny_llm_pt))
    text = torch.tensor([prompt])
    empty = torch.zeros(1, 0, dtype=torch.long)
    ours = list(model.inference(text, torch.tensor([len(prompt)]), empty, torch.tensor([0]), empty, torch.tensor([0]),
                                None, sampling=25))
    hf = Qwen2ForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32).eval()
    out = hf.generate(torch.tensor([[158227, *prompt, 158228]]), do_sample=False, min_new_tokens=2 * len(prompt),
                      max_new_tokens=20 * len(prompt), logits_processor=speech_logits_processor(tiny_hf))
    out = out[0, len(prompt) + 2:].tolist()
    if out and out[-1] in (158224, 158225, 158226):
        out = out[:-1]
    assert len(ours) >= 2 * len(prompt)
    assert [t - 151663 for t in out] == ours
