"""The FastAPI gateway (app.py) over a fake Triton pool, the real speaker registry and a '|'-splitting
text frontend: upstream's endpoints and form fields (GET and POST), the streamed PCM and its rate,
every bad-input case, token and rate limit, readiness, metrics, the speaker endpoints, and over a real
uvicorn: the OpenAI endpoint with the official client, an aborted stream, a cancelled request."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from cosyvoice.serve.app import create_app, wav_header
from cosyvoice.serve.backend import BackendError, NoHealthyReplica
from cosyvoice.serve.registry import PromptCache, SpeakerRegistry
from cosyvoice.serve.settings import GatewaySettings
from tests.serve.app_helpers import FakePool, SplitFrontend, chunk, running, wav_bytes

PROMPT_16K = (0.2 * np.sin(np.arange(32000) / 16000 * 2 * np.pi * 180)).astype(np.float32)
#: the fake pool's default chunks as the gateway must send them
EXPECTED = np.concatenate([np.full(4800, 8191, "<i2"), np.full(2400, -16383, "<i2"), np.full(1200, 32767, "<i2")])


def gateway(settings: GatewaySettings | None = None, **pool_kwargs):
    pool = FakePool(**pool_kwargs)
    registry = SpeakerRegistry(None, pool=pool, cache=PromptCache())
    asyncio.run(registry.register("alice", PROMPT_16K, "the prompt transcript"))
    app = create_app(settings or GatewaySettings(), pool=pool, registry=registry, frontend=SplitFrontend())
    return app, pool


@pytest.fixture
def client_pool():
    app, pool = gateway()
    with TestClient(app) as client:
        yield client, pool


def sent(pool: FakePool, name: str, index: int = -1) -> str:
    return pool.sent[index][0][name][0, 0]


def assert_pcm(response, segments: int = 1):
    assert response.status_code == 200, response.text
    assert response.headers["x-sample-rate"] == "24000"
    assert response.headers["content-type"] == "audio/L16; rate=24000; channels=1"
    assert np.array_equal(np.frombuffer(response.content, "<i2"), np.tile(EXPECTED, segments))


# --- upstream endpoints --------------------------------------------------------------------------------
def test_lifespan_starts_and_closes_the_pool():
    app, pool = gateway()
    with TestClient(app):
        assert pool.started and not pool.closed
    assert pool.closed


def test_sft_post_and_get(client_pool):
    client, pool = client_pool
    assert_pcm(client.post("/inference_sft", data={"tts_text": "One.|Two.", "spk_id": "alice"}), segments=2)
    assert [sent(pool, "target_text", i) for i in (0, 1)] == ["One.", "Two."]
    assert sent(pool, "reference_text") == "the prompt transcript" and sent(pool, "mode") == "zero_shot"
    assert_pcm(client.get("/inference_sft", params={"tts_text": "Three.", "spk_id": "alice"}))
    assert sent(pool, "target_text") == "Three."


def test_zero_shot_post_decodes_the_upload_to_16k_mono(client_pool):
    client, pool = client_pool
    files = {"prompt_wav": ("prompt.wav", wav_bytes(2.0, rate=44100, channels=2), "audio/wav")}
    response = client.post("/inference_zero_shot", data={"tts_text": "Hello.", "prompt_text": "a transcript"},
                           files=files)
    assert_pcm(response)
    assert sent(pool, "reference_text") == "a transcript" and sent(pool, "mode") == "zero_shot"
    assert pool.sent[-1][0]["prompt_speech_tokens"].shape == (1, 50)  # 2 s at 16 kHz -> 25 tokens/s
    assert pool.infers[-2:] and sorted(pool.infers[-2:]) == ["audio_tokenizer", "speaker_embedding"]


def test_get_with_a_multipart_body_as_upstreams_client_sends_it(client_pool):
    """Upstream's client.py sends GET with form fields and the prompt file in the body
    (requests.request("GET", url, data=payload, files=files)): accepted like the POST."""
    client, pool = client_pool
    files = {"prompt_wav": ("prompt.wav", wav_bytes(2.0), "audio/wav")}
    response = client.request("GET", "/inference_zero_shot", data={"tts_text": "Hello.", "prompt_text": "words"},
                              files=files)
    assert_pcm(response)
    assert sent(pool, "reference_text") == "words" and pool.sent[-1][0]["prompt_speech_tokens"].shape == (1, 50)
    assert_pcm(client.request("GET", "/inference_sft", data={"tts_text": "Hi.", "spk_id": "alice"}))
    missing = client.request("GET", "/inference_instruct2", data={"tts_text": "Hi."}, files=files)
    assert missing.status_code == 422 and "instruct_text" in missing.json()["detail"]


def test_zero_shot_with_a_registered_speaker_instead_of_audio(client_pool):
    client, pool = client_pool
    assert_pcm(client.post("/inference_zero_shot", data={"tts_text": "Hi.", "spk_id": "alice"}))
    assert_pcm(client.get("/inference_zero_shot", params={"tts_text": "Hi.", "spk_id": "alice"}))
    assert sent(pool, "reference_text") == "the prompt transcript"


def test_cross_lingual_post_and_get(client_pool):
    client, pool = client_pool
    files = {"prompt_wav": ("p.flac", wav_bytes(1.5, rate=16000, fmt="FLAC"), "audio/flac")}
    assert_pcm(client.post("/inference_cross_lingual", data={"tts_text": "Bonjour."}, files=files))
    assert sent(pool, "mode") == "cross_lingual" and sent(pool, "reference_text") == ""
    assert_pcm(client.get("/inference_cross_lingual", params={"tts_text": "Hi.", "spk_id": "alice"}))


def test_instruct2_post_and_get(client_pool):
    client, pool = client_pool
    files = {"prompt_wav": ("p.wav", wav_bytes(2.0), "audio/wav")}
    assert_pcm(client.post("/inference_instruct2", data={"tts_text": "Hi.", "instruct_text": "Speak softly."},
                           files=files))
    assert sent(pool, "mode") == "instruct2" and sent(pool, "reference_text") == "Speak softly."
    assert_pcm(client.get("/inference_instruct2", params={"tts_text": "Hi.", "instruct_text": "Loud.",
                                                          "spk_id": "alice"}))
    assert sent(pool, "reference_text") == "Loud."


def test_instruct_is_a_clear_400_on_a_cosyvoice2_model(client_pool):
    client, pool = client_pool
    for response in (client.post("/inference_instruct", data={"tts_text": "Hi.", "spk_id": "alice",
                                                              "instruct_text": "Happy."}),
                     client.get("/inference_instruct", params={"tts_text": "Hi.", "spk_id": "alice",
                                                               "instruct_text": "Happy."})):
        assert response.status_code == 400 and "/inference_instruct2" in response.json()["detail"]
    assert pool.sent == []


def test_instruct_on_a_cosyvoice1_gateway():
    app, pool = gateway(GatewaySettings(model="cosyvoice"))
    with TestClient(app) as client:
        assert_pcm(client.post("/inference_instruct", data={"tts_text": "Hi.", "spk_id": "alice",
                                                            "instruct_text": "Happy."}))
    assert sent(pool, "mode") == "instruct" and sent(pool, "reference_text") == "Happy."


def upload(seconds=2.0, **kw):
    return {"prompt_wav": ("p.wav", wav_bytes(seconds, **kw), "audio/wav")}


@pytest.mark.parametrize("path,data,files,status,words", [
    ("/inference_sft", {"tts_text": " ", "spk_id": "alice"}, None, 400, "tts_text is empty"),
    ("/inference_sft", {"tts_text": "x" * 2001, "spk_id": "alice"}, None, 413, "the limit is 2000"),
    ("/inference_sft", {"tts_text": "Hi.", "spk_id": "nobody"}, None, 404, "unknown speaker 'nobody'"),
    ("/inference_sft", {"tts_text": "Hi."}, None, 422, "spk_id"),
    ("/inference_sft", {"tts_text": "Hi.", "spk_id": "alice", "speed": "9"}, None, 400, "outside 0.25-4.0"),
    ("/inference_sft", {"tts_text": "Hi.", "spk_id": "alice", "speed": "1.25"}, None, 400,
     "speed is not supported by this model repository"),
    ("/inference_zero_shot", {"tts_text": "Hi.", "prompt_text": "p"}, None, 400, "needs prompt_wav"),
    ("/inference_zero_shot", {"tts_text": "Hi."}, upload(), 400, "needs prompt_text"),
    ("/inference_zero_shot", {"tts_text": "Hi.", "prompt_text": "p"},
     {"prompt_wav": ("p.wav", b"this is not audio at all", "audio/wav")}, 400, "not a readable audio file"),
    ("/inference_zero_shot", {"tts_text": "Hi.", "prompt_text": "p"}, upload(rate=8000), 400,
     "unsupported sample rate of 8000 Hz"),
    ("/inference_zero_shot", {"tts_text": "Hi.", "prompt_text": "p"}, upload(0.4), 400, "0.40 s long"),
    ("/inference_zero_shot", {"tts_text": "Hi.", "prompt_text": "p"}, upload(31.0, rate=16000), 400, "31.00 s long"),
    ("/inference_cross_lingual", {"tts_text": "Hi.", "spk_id": "alice"}, upload(), 400, "not both"),
    ("/inference_instruct2", {"tts_text": "Hi.", "instruct_text": " "}, upload(), 400, "needs instruct_text"),
])
def test_bad_input_is_a_4xx_with_a_clear_message(client_pool, path, data, files, status, words):
    client, pool = client_pool
    response = client.post(path, data=data, files=files)
    assert response.status_code == status, response.text
    assert words in json.dumps(response.json()["detail"]), response.json()
    assert pool.sent == []


def test_an_oversized_upload_is_413_whether_or_not_its_length_is_declared():
    app, pool = gateway(GatewaySettings(max_upload_bytes=50_000))
    with TestClient(app) as client:
        big = upload(2.0)  # 96 kB at 24 kHz
        response = client.post("/inference_cross_lingual", data={"tts_text": "Hi."}, files=big)
        assert response.status_code == 413 and "50000 bytes" in response.json()["detail"]
        request = httpx.Request("POST", "http://x/", data={"tts_text": "Hi."}, files=upload(3.0))
        body = request.read()

        def chunked():  # no Content-Length: the guard cannot see the size, the upload reader does
            yield body

        response = client.post("/inference_cross_lingual", content=chunked(),
                               headers={"Content-Type": request.headers["content-type"]})
        assert response.status_code == 413, response.text
    assert pool.sent == []


def test_backend_failures_before_audio_are_json_5xx():
    app, pool = gateway(fail_at=0, error=NoHealthyReplica("no healthy replica"))
    with TestClient(app) as client:
        response = client.post("/inference_sft", data={"tts_text": "Hi.", "spk_id": "alice"})
        assert response.status_code == 503 and "no Triton replica" in response.json()["detail"]
        pool.error = BackendError("model error: boom")
        response = client.post("/inference_sft", data={"tts_text": "Hi.", "spk_id": "alice"})
        assert response.status_code == 502 and "boom" in response.json()["detail"]
        pool.error = ZeroDivisionError("bug")
        response = client.post("/inference_sft", data={"tts_text": "Hi.", "spk_id": "alice"})
        assert response.status_code == 500 and "ZeroDivisionError" in response.json()["detail"]
        assert client.get("/healthz").status_code == 200  # the worker lives on


# --- token, rate limit ---------------------------------------------------------------------------------
def test_bearer_token():
    app, _ = gateway(GatewaySettings(api_token="s3cret"))
    with TestClient(app) as client:
        form = {"tts_text": "Hi.", "spk_id": "alice"}
        missing = client.post("/inference_sft", data=form)
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
        wrong = client.post("/inference_sft", data=form, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and 'error="invalid_token"' in wrong.headers["www-authenticate"]
        assert client.get("/speakers").status_code == 401
        assert client.post("/v1/audio/speech", json={}).json()["error"]["code"] == 401
        assert_pcm(client.post("/inference_sft", data=form, headers={"Authorization": "Bearer s3cret"}))
        for open_path in ("/healthz", "/readyz", "/metrics", "/", "/openapi.json"):
            assert client.get(open_path).status_code == 200, open_path


def test_rate_limit_per_client():
    app, _ = gateway(GatewaySettings(rate_limit=2))
    with TestClient(app) as client:
        form = {"tts_text": "Hi.", "spk_id": "alice"}
        assert [client.post("/inference_sft", data=form).status_code for _ in range(2)] == [200, 200]
        refused = client.post("/inference_sft", data=form)
        assert refused.status_code == 429 and 25 <= int(refused.headers["retry-after"]) <= 30
        assert client.get("/healthz").status_code == 200
    other = TestClient(app, client=("10.1.1.1", 1234))
    with other:
        assert other.post("/inference_sft", data=form).status_code == 200


def test_rate_limiter_refills():
    from cosyvoice.serve.ratelimit import RateLimiter

    now = [0.0]
    limiter = RateLimiter(60, clock=lambda: now[0])
    assert all(limiter.take("a") == 0 for _ in range(60))
    assert limiter.take("a") == pytest.approx(1.0)
    now[0] = 2.0
    assert limiter.take("a") == 0 and limiter.take("a") == 0 and limiter.take("a") > 0


# --- operational endpoints ------------------------------------------------------------------------------
def test_readyz_follows_the_pool_and_the_sample_rate():
    app, pool = gateway(ready=False)
    with TestClient(app) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        response = client.get("/readyz")
        assert response.status_code == 503 and response.json()["replicas"][0]["healthy"] is False
        pool.is_ready = True
        assert client.get("/readyz").json()["sample_rate"] == 24000
    app, pool = gateway(sample_rate=None)
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 503  # Triton up, but its token2wav rate unknown


def test_metrics_are_exposed_after_a_request(client_pool):
    client, _ = client_pool
    client.post("/inference_cross_lingual", data={"tts_text": "Hi.", "spk_id": "alice"})
    client.post("/inference_cross_lingual", data={"tts_text": " ", "spk_id": "alice"})
    text = client.get("/metrics").text
    assert 'cosyvoice_gateway_requests_total{endpoint="/inference_cross_lingual",status="ok"}' in text
    assert 'cosyvoice_gateway_rejected_total{endpoint="/inference_cross_lingual",reason="empty_text"}' in text
    assert 'cosyvoice_gateway_first_chunk_seconds_bucket{endpoint="/inference_cross_lingual"' in text


def test_openapi_lists_every_endpoint_with_its_form_fields(client_pool):
    client, _ = client_pool
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for mode in ("sft", "zero_shot", "cross_lingual", "instruct", "instruct2"):
        assert {"get", "post"} <= set(paths[f"/inference_{mode}"]), mode
    assert {"/v1/audio/speech", "/speakers", "/speakers/{speaker_id}", "/healthz", "/readyz", "/metrics"} <= set(paths)
    ref = paths["/inference_zero_shot"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    fields = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"]
    assert {"tts_text", "prompt_text", "prompt_wav", "spk_id", "speed"} <= set(fields)


def test_the_page_is_served(client_pool):
    client, _ = client_pool
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ('id="status"', 'id="result"', 'id="download"', 'id="synthesize"'):
        assert element in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from outside
    assert client.get("/static/app.js").status_code == 200


# --- speakers -------------------------------------------------------------------------------------------
def test_speaker_registry_endpoints(client_pool):
    client, pool = client_pool
    assert client.get("/speakers").json() == {"speakers": ["alice"]}
    files = {"prompt_wav": ("bob.wav", wav_bytes(3.0), "audio/wav")}
    created = client.post("/speakers", data={"speaker_id": "bob", "prompt_text": "Bob speaking."}, files=files)
    assert created.status_code == 201 and created.json() == {"speaker_id": "bob", "prompt_text": "Bob speaking.",
                                                             "speech_tokens": 75}
    files = {"prompt_wav": ("bob.wav", wav_bytes(3.0), "audio/wav")}
    again = client.post("/speakers", data={"speaker_id": "bob", "prompt_text": "x"}, files=files)
    assert again.status_code == 409 and "already registered" in again.json()["detail"]
    bad = client.post("/speakers", data={"speaker_id": "no spaces!", "prompt_text": "x"},
                      files={"prompt_wav": ("b.wav", wav_bytes(2.0), "audio/wav")})
    assert bad.status_code == 400 and "speaker id" in bad.json()["detail"]
    assert client.get("/speakers").json() == {"speakers": ["alice", "bob"]}
    assert_pcm(client.post("/inference_sft", data={"tts_text": "Hi.", "spk_id": "bob"}))
    assert sent(pool, "reference_text") == "Bob speaking."
    assert client.delete("/speakers/bob").status_code == 204
    assert client.delete("/speakers/bob").status_code == 404
    assert client.post("/inference_sft", data={"tts_text": "Hi.", "spk_id": "bob"}).status_code == 404


# --- over a real uvicorn ----------------------------------------------------------------------------------
def test_openai_speech_with_the_official_client():
    from openai import OpenAI

    app, pool = gateway(chunks=[chunk(2400, 0.1 * (i + 1)) for i in range(6)], delay=0.01)
    with running(app) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        pieces = {}
        for fmt in ("pcm", "wav", "mp3"):
            with client.audio.speech.with_streaming_response.create(
                    model="cosyvoice2", voice="alice", input="Hello there.", response_format=fmt) as response:
                assert response.headers["x-sample-rate"] == "24000"
                pieces[fmt] = [piece for piece in response.iter_bytes() if piece]
        assert len(pieces["pcm"]) >= 3, "streamed in several chunks"
        pcm = np.frombuffer(b"".join(pieces["pcm"]), "<i2")
        assert len(pcm) == 6 * 2400 and pcm[0] == int(np.float32(0.1) * 32767)
        wav = b"".join(pieces["wav"])
        assert wav[:44] == wav_header(24000) and wav[44:] == pcm.tobytes()
        mp3 = b"".join(pieces["mp3"])
        assert mp3[:3] == b"ID3" or (mp3[0] == 0xFF and mp3[1] & 0xE0 == 0xE0)
        assert len(pieces["mp3"]) >= 2

        with client.audio.speech.with_streaming_response.create(
                model="cosyvoice2", voice={"id": "alice"}, input="Hi.", response_format="pcm",
                stream_format="sse", instructions="Cheerfully.") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
        assert [e["type"] for e in events] == ["speech.audio.delta"] * 6 + ["speech.audio.done"]
        assert b"".join(base64.b64decode(e["audio"]) for e in events[:-1]) == pcm.tobytes()
        assert sent(pool, "mode") == "instruct2" and sent(pool, "reference_text") == "Cheerfully."

        import openai

        with pytest.raises(openai.BadRequestError, match="use one of wav, pcm, mp3"):
            client.audio.speech.create(model="m", voice="alice", input="Hi.", response_format="opus")
        with pytest.raises(openai.NotFoundError, match="unknown speaker 'nova'"):
            client.audio.speech.create(model="m", voice="nova", input="Hi.", response_format="wav")


def test_a_backend_failure_mid_stream_aborts_the_response():
    app, pool = gateway(fail_at=2, error=BackendError("replica died mid-stream"))
    with running(app) as url:
        received = b""
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            with httpx.stream("POST", f"{url}/inference_sft", data={"tts_text": "Hi.", "spk_id": "alice"}) as response:
                assert response.status_code == 200
                for piece in response.iter_bytes():
                    received += piece
        assert 0 < len(received) < EXPECTED.nbytes  # what came before the failure, then an error, never a "success"
        with httpx.stream("POST", f"{url}/inference_sft", data={"tts_text": "Hi.", "spk_id": "alice"}) as response:
            pass  # the server is still up
    assert len(pool.finished) == len(pool.sent) == 2


def test_a_client_that_goes_away_cancels_the_triton_request():
    """While the gateway waits for Triton's next chunk (30 s away here), not at the next send."""
    app, pool = gateway(chunks=[chunk(2400, 0.1)] * 3, delay=[0.0, 30.0])
    with running(app) as url:
        with httpx.stream("POST", f"{url}/inference_sft", data={"tts_text": "Hi.", "spk_id": "alice"}) as response:
            next(response.iter_bytes())
        # the client closed the connection after the first chunk
        deadline = time.monotonic() + 3
        while not pool.finished and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pool.finished == [pool.sent[0][1]], "the Triton stream was closed"
        metrics = httpx.get(f"{url}/metrics").text
        assert 'cosyvoice_gateway_in_flight_requests{endpoint="/inference_sft"} 0.0' in metrics
    assert len(pool.sent) == 1
