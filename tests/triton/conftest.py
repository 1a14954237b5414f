"""Fixtures for the Triton tests: the CPU tritonserver environment, a tiny HF LLM, a serving model dir, and one
tiny CosyVoice1 dir with its served repository (a tritonserver shared by the v1 tests)."""

from __future__ import annotations

import os
import shutil
import time

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


#: the tritonserver's environment additions for the shared v1 server (its python backends' torch thread pools)
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="package")
def v1_oracle() -> dict:
    """Upstream's CosyVoice1 token2wav record (tests/acoustic/test_token2wav_v1.py): inputs, seed and audio."""
    from tests.acoustic.test_token2wav_v1 import oracle

    return oracle()


@pytest.fixture(scope="package")
def v1_model_dir(v1_oracle, tiny_models, tmp_path_factory) -> str:
    """One tiny CosyVoice1 dir for every v1 serving test: the reference dir (cosyvoice.yaml, llm.pt, campplus.onnx,
    speech_tokenizer_v1.onnx, spk2info.pt with an SFT-style speaker 001: embedding only) with the token2wav
    oracle's flow.pt / hift.pt (same tiny sizes), so upstream's recorded audio holds for it; its llm.pt changed
    so that eos never wins: a request then yields 20 tokens per target text token, enough for 100 + 20 chunking.
    Its ONNX models are the session's ``tiny_models`` ones (same seed and size), copied with their spec entries,
    so only the torch files are built here."""
    import json

    import torch

    from cosyvoice.features.reference_models import SPEC_FILE, V1_ONNX_MODELS, make_reference_models
    from cosyvoice.triton.runtime_v1 import LLM_FILE
    from tests.acoustic.test_token2wav_v1 import write_tiny_v1_model_dir

    out = str(tmp_path_factory.mktemp("v1") / "CosyVoice-300M-tiny")
    os.makedirs(out)
    with open(os.path.join(tiny_models, SPEC_FILE)) as f:
        spec = json.load(f)
    for name in V1_ONNX_MODELS:
        shutil.copyfile(os.path.join(tiny_models, f"{name}.onnx"), os.path.join(out, f"{name}.onnx"))
    with open(os.path.join(out, SPEC_FILE), "w") as f:
        json.dump({name: spec[name] for name in V1_ONNX_MODELS}, f)
    # the ONNX files are up to date; flow.pt / hift.pt come from the oracle below
    make_reference_models(out, seed=0, size="tiny", family="cosyvoice1", models=[*V1_ONNX_MODELS, "llm", "spk2info"])
    with open(os.path.join(out, "cosyvoice.yaml"), "rb") as f:
        recipe = f.read()
    write_tiny_v1_model_dir(out)
    with open(os.path.join(out, "cosyvoice.yaml"), "rb") as f:
        assert f.read() == recipe, "the oracle's acoustic models are sized by another recipe than the reference dir's"
    state = torch.load(os.path.join(out, LLM_FILE), weights_only=True)
    state["llm_decoder.bias"][4096] = -1e4
    torch.save(state, os.path.join(out, LLM_FILE))
    return out


@pytest.fixture(scope="package")
def v1_server(triton_env, v1_model_dir, v1_oracle, tmp_path_factory):
    """One CPU tritonserver (127.0.0.1) serving the CosyVoice1 repository of ``v1_model_dir`` -- ``cosyvoice`` BLS,
    ``transformer_llm`` (python backend) and the real v1 ``token2wav`` seeded with the oracle's seed -- shared by
    test_token2wav_v1 and test_llm_v1 (one server start for both)."""
    from cosyvoice.triton.render import V1_MODELS, render_repo, repo_values_v1
    from cosyvoice.triton.server import TritonServer
    from tests.support.tritonserver import stop_servers

    repo = str(tmp_path_factory.mktemp("v1_served") / "model_repo")
    values = repo_values_v1(model_dir=v1_model_dir, bls_instances=1, overrides={
        "token2wav_seed": str(int(v1_oracle["seed"])), "token2wav_device": "cpu", "transformer_llm_device": "cpu"})
    report = render_repo(repo, values, models=V1_MODELS)
    assert sorted(os.listdir(repo)) == sorted(V1_MODELS) and report.models == list(V1_MODELS)
    assert report.values["token2wav_sample_rate"] == "22050"
    assert os.listdir(os.path.join(repo, "transformer_llm", "1")) == ["model.py"]
    # one torch thread per python model (as the in-process side runs): on a small shared machine, several
    # models' OpenMP pools spinning on the same cores made each request many times slower
    srv = TritonServer(repo, env=triton_env, explicit=False, extra_env=ONE_THREAD).start()  # models load side by side
    try:
        deadline = time.monotonic() + 300
        while not srv.ready():
            assert srv.process.poll() is None and time.monotonic() < deadline, srv.log_tail()
            time.sleep(0.2)
        yield srv
    finally:
        stop_servers([srv])
