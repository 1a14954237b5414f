"""Shared fixtures: synthetic corpora, reference models and a real S3-compatible server (moto)."""

from __future__ import annotations

import os

import pytest

from cosyvoice.corpus.synthetic import make_synthetic_corpus
from tests.support import leftovers


def pytest_sessionstart(session):
    session.config._leftover_cookie = leftovers.mark_session()


def pytest_sessionfinish(session, exitstatus):
    """Fail the session when a process it started is still alive (after every fixture's teardown):
    list each one, then stop it, so nothing keeps running after the suite either way."""
    cookie = getattr(session.config, "_leftover_cookie", None)
    found = leftovers.leftovers(cookie) if cookie else []
    if not found:
        return
    lines = [leftovers.describe(p) for p in found]
    survivors = leftovers.kill(found)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = (f"{len(found)} process(es) started by the test session were still running at its end (now stopped; "
               "a test or fixture does not stop what it starts):\n  " + "\n  ".join(lines))
    if survivors:
        message += "\nstill alive after SIGKILL: " + ", ".join(str(p.pid) for p in survivors)
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_sep("=", "processes left running", red=True)
        reporter.write_line(message)
    else:
        print(message)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


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


@pytest.fixture(autouse=True)
def _no_stale_dagster_state_storage():
    """Dagster keeps the entered instance's defs-state storage in a ContextVar; an instance that a
    test entered and dropped leaves a dead weakref there, and the next ``dg.materialize`` then
    fails with "Attempted to resolve undefined DagsterInstance weakref". Start every test clean."""
    from dagster._core.storage.defs_state.base import _current_storage

    _current_storage.set(None)
    yield


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


@pytest.fixture(scope="module")
def faulty_s3(s3_server):
    """An S3 endpoint in front of moto that answers chosen GETs with 5xx/throttling
    (``tests.support.s3_faults.FaultyS3``), for the transient-fault tests."""
    from tests.support.s3_faults import FaultyS3

    server = FaultyS3()
    yield server
    server.stop()


@pytest.fixture()
def s3_bucket(s3_server, request) -> str:
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    fs.mkdir(name)
    return name


@pytest.fixture()
def one_torch_thread():
    """2 shared cores: one intra-op thread is several times faster than two fighting for them."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> str:
    """Reference models with the upstream signatures but 1-layer tokenizers (fast)."""
    from cosyvoice.features.reference_models import make_reference_models

    out = str(tmp_path_factory.mktemp("tiny_models"))
    make_reference_models(out, seed=0, size="tiny")
    return out


@pytest.fixture(scope="session")
def feature_dir(clean_corpus, tmp_path_factory) -> str:
    """A data dir mixing corpus speech with 8 / 22.05 / 48 kHz, stereo, odd lengths, > 30 s and a
    corrupt file: every input shape the feature stages must handle."""
    import numpy as np
    import soundfile as sf

    from cosyvoice.corpus.manifest import prepare_libritts

    root = tmp_path_factory.mktemp("features")
    prepare_libritts(os.path.join(clean_corpus, "dev-clean"), str(root / "data"), utts_per_shard=4)
    wav_scp = (root / "data" / "wav.scp").read_text().splitlines()[:4]
    utt2spk = [f"{line.split()[0]} {line.split()[0].split('_')[0]}" for line in wav_scp]
    rng = np.random.default_rng(0)
    speech, rate = sf.read(wav_scp[0].split()[1], dtype="float32")
    odd = {
        "9001_1_000000_000001": (speech[::3][:12345], 8000, 1),
        "9001_1_000000_000002": (speech[: 22050 * 2 + 7], 22050, 1),
        "9002_1_000000_000001": (np.stack([speech, rng.normal(0, 0.05, len(speech)).astype(np.float32)], 1), 48000, 2),
        "9002_1_000000_000002": (speech[: 16000 + 33], 16000, 1),
        "9003_1_000000_000001": (np.tile(speech, 12)[: 16000 * 31], 16000, 1),
    }
    for utt, (audio, sr, _) in odd.items():
        path = root / "wavs" / f"{utt}.wav"
        path.parent.mkdir(exist_ok=True)
        sf.write(path, audio, sr, subtype="PCM_16")
        wav_scp.append(f"{utt} {path}")
        utt2spk.append(f"{utt} {utt.split('_')[0]}")
    bad = root / "wavs" / "9004_1_000000_000001.wav"
    bad.write_bytes(b"RIFF....WAVEjunk" * 8)
    wav_scp.append(f"9004_1_000000_000001 {bad}")
    utt2spk.append("9004_1_000000_000001 9004")
    data = root / "mixed"
    data.mkdir()
    (data / "wav.scp").write_text("\n".join(sorted(wav_scp)) + "\n")
    (data / "utt2spk").write_text("\n".join(sorted(utt2spk)) + "\n")
    return str(data)


@pytest.fixture(scope="session")
def training_list(clean_corpus, tiny_models, tmp_path_factory):
    """Shards with embeddings and tokens (tiny reference models) and their data.list."""
    from cosyvoice.corpus.manifest import prepare_libritts
    from cosyvoice.features.stages import extract_embedding, extract_speech_token
    from cosyvoice.shards.make_parquet import make_parquet

    root = tmp_path_factory.mktemp("train")
    data = str(root / "data")
    prepare_libritts(os.path.join(clean_corpus, "dev-clean"), data)
    extract_embedding(data, os.path.join(tiny_models, "campplus.onnx"), num_workers=1)
    extract_speech_token(data, os.path.join(tiny_models, "speech_tokenizer_v2.onnx"), num_workers=1)
    make_parquet(data, str(root / "parquet"), num_utts_per_parquet=4)
    return str(root / "parquet" / "data.list")


@pytest.fixture
def fake_kubernetes(monkeypatch):
    """The kubernetes client's in-cluster config and API classes replaced by one recording fake."""
    import kubernetes

    from tests.support.fake_k8s import FakeKubernetes

    fake = FakeKubernetes()
    monkeypatch.setattr(kubernetes.config, "load_incluster_config", lambda: None)
    monkeypatch.setattr(kubernetes.client, "CoreV1Api", lambda: fake)
    monkeypatch.setattr(kubernetes.client, "BatchV1Api", lambda: fake)
    return fake
