"""Shared fixtures: synthetic corpora, reference models and a real S3-compatible server (moto)."""

from __future__ import annotations

import os

import pytest

from cosyvoice.corpus.synthetic import make_synthetic_corpus


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def broken_corpus(tmp_path_factory) -> str:
    """Two subsets, 3 speakers x 4 utterances each, plus every broken case in each subset."""
    root = str(tmp_path_factory.mktemp("corpus") / "LibriTTS")
    make_synthetic_corpus(root, subsets=["dev-clean", "train-clean-100"], speakers=3, utts_per_speaker=4,
                          seed=7, with_broken=True)
    return root


@pytest.fixture(scope="session")
def clean_corpus(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("clean") / "LibriTTS")
    make_synthetic_corpus(root, subsets=["dev-clean"], speakers=3, utts_per_speaker=5, seed=3)
    return root


@pytest.fixture(scope="session")
def s3_server():
    """moto's threaded S3 server on 127.0.0.1 (random port); env points cosyvoice.storage at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "COSYVOICE_S3_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", COSYVOICE_S3_ENDPOINT_URL=endpoint)
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture()
def s3_bucket(s3_server, request) -> str:
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    fs.mkdir(name)
    return name
