"""Training fixtures: the tiny recipe, a tokenizer dir, DPO and feature-less shard lists."""

from __future__ import annotations

import os

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TINY_RECIPE = os.path.join(ROOT, "configs", "cosyvoice2-tiny.yaml")


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory) -> str:
    """A CosyVoice-BlankEN-equivalent tokenizer (151663 ids with the CosyVoice2 tokens), no weights."""
    from cosyvoice.export.tokenizer import blank_en_tokenizer_dir

    return blank_en_tokenizer_dir(str(tmp_path_factory.mktemp("CosyVoice-BlankEN")))


@pytest.fixture(scope="session")
def dpo_list(training_list, tmp_path_factory) -> str:
    """Shards with ``reject_speech_token``: a rejected sequence for every utterance but two."""
    import torch

    from cosyvoice.shards.make_parquet import make_parquet

    data = os.path.join(os.path.dirname(os.path.dirname(training_list)), "data")
    tokens = torch.load(os.path.join(data, "utt2speech_token.pt"), weights_only=True)
    root = tmp_path_factory.mktemp("dpo")
    src = root / "data"
    os.symlink(data, src)
    reject = root / "data_reject"
    reject.mkdir()
    utts = sorted(tokens)
    torch.save({u: [(t + 7) % 6561 for t in tokens[u]][::-1] for u in utts[2:]}, reject / "utt2speech_token.pt")
    make_parquet(str(src), str(root / "parquet"), num_utts_per_parquet=4, dpo=True)
    return str(root / "parquet" / "data.list")


@pytest.fixture(scope="session")
def featureless_list(clean_corpus, tmp_path_factory) -> str:
    """Shards with audio and text only: the trainer must compute tokens and embeddings online."""
    from cosyvoice.corpus.manifest import prepare_libritts
    from cosyvoice.shards.make_parquet import make_parquet

    root = tmp_path_factory.mktemp("online")
    prepare_libritts(os.path.join(clean_corpus, "dev-clean"), str(root / "data"))
    make_parquet(str(root / "data"), str(root / "parquet"), num_utts_per_parquet=8)
    return str(root / "parquet" / "data.list")
