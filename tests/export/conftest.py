"""Fixtures of the export tests: a tiny random CosyVoice2/3 LLM state dict (upstream ``llm.pt`` keys,
Qwen2 body hidden 64 / 2 layers / 4 heads / 2 KV heads / intermediate 128 / vocab 151936), the
CosyVoice-BlankEN-equivalent tokenizer, HF exports of both, and parquet shards for calibration."""

from __future__ import annotations

import io
import os

import pytest
import torch

TINY_QWEN2 = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rope_theta=1000000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, hidden_act="silu", initializer_range=0.1)


def tiny_state_dict(variant: str = "cosyvoice2", seed: int = 0, config: dict | None = None) -> dict[str, torch.Tensor]:
    """Random weights with upstream ``llm.pt`` keys; scales chosen so logits are not flat (std ~2)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = config or TINY_QWEN2
    torch.manual_seed(seed)
    body = Qwen2ForCausalLM(Qwen2Config(**config)).eval()
    hidden = config["hidden_size"]
    rows = 6564 if variant == "cosyvoice2" else 6761
    sd: dict[str, torch.Tensor] = {}
    if variant == "cosyvoice2":
        sd["llm_embedding.weight"] = torch.randn(2, hidden)
    for key, value in body.state_dict().items():
        sd[f"llm.model.{key}"] = value.detach().clone()
    for key in [k for k in sd if k.endswith("_layernorm.weight") or k.endswith("norm.weight")]:
        sd[key] = 1.0 + 0.2 * torch.randn_like(sd[key])  # non-trivial norms: smoothing must fold them right
    sd["llm_decoder.weight"] = torch.randn(rows, hidden) * 2.4 / hidden ** 0.5
    if variant == "cosyvoice2":
        sd["llm_decoder.bias"] = torch.randn(rows) * 0.5
    sd["speech_embedding.weight"] = torch.randn(rows, hidden)
    return sd


def save_pt(sd: dict, path: str) -> str:
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    with open(path, "wb") as f:
        f.write(buffer.getvalue())
    return path


@pytest.fixture(scope="session")
def blank_tokenizer(tmp_path_factory) -> str:
    from cosyvoice.export.tokenizer import blank_en_tokenizer_dir

    return blank_en_tokenizer_dir(str(tmp_path_factory.mktemp("blank_en")))


@pytest.fixture(scope="session")
def tiny_llm_pt(tmp_path_factory) -> str:
    return save_pt(tiny_state_dict("cosyvoice2"), str(tmp_path_factory.mktemp("llm") / "llm.pt"))


@pytest.fixture(scope="session")
def tiny_hf(tiny_llm_pt, blank_tokenizer, tmp_path_factory) -> str:
    """A float32 HF export of the tiny CosyVoice2 LLM."""
    from cosyvoice.export.hf import export_hf

    out = str(tmp_path_factory.mktemp("hf") / "cosyvoice2_llm")
    export_hf(tiny_llm_pt, out, tokenizer_dir=blank_tokenizer, config=dict(TINY_QWEN2))
    return out


@pytest.fixture(scope="session")
def calib_data_list(clean_corpus, tmp_path_factory) -> str:
    """Parquet training shards (our shard writer) of the synthetic corpus with seeded speech tokens,
    split into a calibration ``data.list`` (first shard) and a held-out list (second shard)."""
    import random

    from cosyvoice.corpus.kaldi import read_table
    from cosyvoice.corpus.manifest import prepare_libritts
    from cosyvoice.shards.parquet import Columns, ShardRow, write_shard

    root = tmp_path_factory.mktemp("calib")
    data = str(root / "data")
    prepare_libritts(os.path.join(clean_corpus, "dev-clean"), data)
    wav, text = read_table(data, "wav.scp"), read_table(data, "text", joined=True)
    utts = sorted(wav)
    rng = random.Random(0)
    lists = []
    for index, chunk in enumerate((utts[: len(utts) // 2], utts[len(utts) // 2:])):
        rows = [ShardRow(utt=u, wav=wav[u], text=text[u], spk=u.split("_")[0],
                         speech_token=[rng.randrange(6561) for _ in range(rng.randrange(20, 60))]) for u in chunk]
        url = str(root / f"parquet_{index:09d}.tar")
        write_shard(url, rows, Columns(speech_token=True))
        listing = root / f"shard{index}.list"
        listing.write_text(url + "\n")
        lists.append(str(listing))
    return lists[0]
