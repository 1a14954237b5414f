"""Feature extraction over S3 with injected throttling/5xx answers: transient faults are retried
(outputs equal a fault-free run), a fault that outlasts the retries fails the stage (never becomes
a per-utterance drop), and a missing object is still a per-utterance ``unreadable_file``."""

import os

import pytest
import s3fs

from cosyvoice import storage
from cosyvoice.features import frontend
from cosyvoice.features.extract import run_extraction
from cosyvoice.features.feature_files import load_pt
from cosyvoice.features.options import OPTIONS_BY_KIND
from cosyvoice.features.stages import extract_embedding

MISSING = "1002_9_000000_000009"
BUCKET = "transient-faults"


@pytest.fixture(scope="module")
def s3_wavs(clean_corpus, s3_server):
    """Six corpus wavs on S3 plus one wav.scp entry whose object does not exist."""
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir(BUCKET)
    local = sorted(os.path.join(root, f) for root, _, files in os.walk(os.path.join(clean_corpus, "dev-clean"))
                   for f in files if f.endswith(".wav"))[:6]
    items = []
    for path in local:
        utt = os.path.basename(path)[:-4]
        fs.put(path, f"{BUCKET}/wavs/{utt}.wav")
        items.append((utt, f"s3://{BUCKET}/wavs/{utt}.wav"))
    items.append((MISSING, f"s3://{BUCKET}/wavs/{MISSING}.wav"))
    return sorted(items)


def _data_dir(url: str, items) -> str:
    storage.write_text(f"{url}/wav.scp", "".join(f"{u} {p}\n" for u, p in items))
    storage.write_text(f"{url}/utt2spk", "".join(f"{u} {u.split('_')[0]}\n" for u, _ in items))
    return url


def test_transient_s3_faults_leave_the_embeddings_equal_to_a_fault_free_run(s3_wavs, tiny_models, faulty_s3,
                                                                           monkeypatch):
    model = os.path.join(tiny_models, "campplus.onnx")
    clean = _data_dir(f"s3://{BUCKET}/clean", s3_wavs)
    expected_report = extract_embedding(clean, model, num_workers=1)
    expected = load_pt(f"{clean}/utt2embedding.pt")
    assert [(f.utt, f.reason) for f in expected_report.failures] == [(MISSING, "unreadable_file")]

    faulty_s3.use(monkeypatch)
    (u0, _), (u1, _), (u2, _), (u3, _) = [item for item in s3_wavs if item[0] != MISSING][:4]
    faulty_s3.plan(f"wavs/{u0}.wav", [503, 500])  # two faults, then served
    faulty_s3.plan(f"wavs/{u1}.wav", [502])
    faulty_s3.plan(f"wavs/{u2}.wav", [503, 503, 503])  # uses all three retries
    faulty_s3.plan(f"wavs/{u3}.wav", [500])
    data = _data_dir(f"s3://{BUCKET}/faulty", s3_wavs)  # worker processes get the endpoint via storage.environment()
    report = extract_embedding(data, model, num_workers=2)

    assert load_pt(f"{data}/utt2embedding.pt") == expected
    assert load_pt(f"{data}/spk2embedding.pt") == load_pt(f"{clean}/spk2embedding.pt")
    assert [(f.utt, f.reason) for f in report.failures] == [(MISSING, "unreadable_file")]
    assert faulty_s3.gets == {f"wavs/{u0}.wav": 3, f"wavs/{u1}.wav": 2, f"wavs/{u2}.wav": 4, f"wavs/{u3}.wav": 2}


@pytest.mark.parametrize("kind,runtime,workers", [("embedding", "onnxruntime", 2), ("speech_token", "onnxruntime", 1),
                                                  ("speech_token", "torch", 2)])
def test_a_fault_that_outlasts_the_retries_fails_the_extraction_not_the_utterance(
        s3_wavs, tiny_models, faulty_s3, monkeypatch, kind, runtime, workers):
    model = os.path.join(tiny_models, "campplus.onnx" if kind == "embedding" else "speech_tokenizer_v2.onnx")
    faulty_s3.use(monkeypatch, retries=2)
    utt, _ = [item for item in s3_wavs if item[0] != MISSING][1]
    faulty_s3.plan(f"wavs/{utt}.wav", always=503)
    with pytest.raises(OSError) as raised:  # from the worker process where there is one
        run_extraction(s3_wavs, model, OPTIONS_BY_KIND[kind](num_workers=workers, **(
            {"runtime": runtime} if kind == "speech_token" else {})))
    assert storage.is_transient(raised.value)  # so the asset's RetryPolicy retries the step
    assert faulty_s3.gets[f"wavs/{utt}.wav"] == 3  # the first try and two retries


def test_load_audio_quarantines_only_permanent_errors(monkeypatch):
    def raising(exc):
        def read_bytes(url):
            raise exc
        return read_bytes

    for permanent in (FileNotFoundError("s3://b/x.wav"), PermissionError("Access Denied")):
        monkeypatch.setattr(storage, "read_bytes", raising(permanent))
        with pytest.raises(frontend.AudioDecodeError) as raised:
            frontend.load_audio("s3://b/x.wav")
        assert raised.value.reason == "unreadable_file" and "s3://b/x.wav" in str(raised.value)
    for transient in (ConnectionResetError("reset by peer"), TimeoutError("read timed out"),
                      OSError(16, "Please reduce your request rate.")):
        monkeypatch.setattr(storage, "read_bytes", raising(transient))
        with pytest.raises(type(transient)):
            frontend.load_audio("s3://b/x.wav")
