"""Fixtures for the Triton tests: the CPU tritonserver environment, a tiny HF LLM, a serving model dir."""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture(scope="session")
def triton_env():
    """The tritonserver environment, built here explicitly by the test set-up when ``make triton-server``
    has not built it ahead (library code only looks it up and never installs anything)."""
    from cosyvoice.triton.server import build_server_env

    return build_server_env()


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory) -> str:
    """The HF export (issue 7's ``export_hf``) of a tiny random CosyVoice2 LLM: ``Qwen2ForCausalLM``,
    <|s_k|> = 151663 + k, <|eos1|> 158224, <|sos|> 158227, <|task_id|> 158228, vocab 158336."""
    from cosyvoice.export.hf import export_hf
    from cosyvoice.export.tokenizer import blank_en_tokenizer_dir
    from tests.export.conftest import TINY_QWEN2, save_pt, tiny_state_dict

    root = tmp_path_factory.mktemp("hf")
    llm_pt = save_pt(tiny_state_dict("cosyvoice2", seed=1), str(root / "llm.pt"))
    out = str(root / "cosyvoice2_llm")
    export_hf(llm_pt, out, tokenizer_dir=blank_en_tokenizer_dir(str(root / "blank_en")), config=dict(TINY_QWEN2))
    return out


@pytest.fixture(scope="session")
def data_dir(clean_corpus, tmp_path_factory) -> str:
    """The manifest (kaldi data dir) of the clean synthetic corpus."""
    from cosyvoice.corpus.manifest import prepare_libritts

    out = str(tmp_path_factory.mktemp("manifest") / "dev-clean")
    prepare_libritts(os.path.join(clean_corpus, "dev-clean"), out, utts_per_shard=100, num_workers=1)
    return out


@pytest.fixture(scope="session")
def model_dir(tiny_models, data_dir, tmp_path_factory) -> str:
    """The reference ONNX models + a spk2info.pt built from the corpus' first speaker."""
    from cosyvoice.corpus.kaldi import read_table
    from cosyvoice.triton.spk2info import build_spk2info

    out = str(tmp_path_factory.mktemp("serving") / "cosyvoice2_model")
    shutil.copytree(tiny_models, out)
    first = sorted(set(read_table(data_dir, "utt2spk").values()))[0]
    build_spk2info(data_dir, out, os.path.join(out, "spk2info.pt"), speakers=[first])
    return out
