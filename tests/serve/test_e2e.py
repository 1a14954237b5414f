"""The gateway end to end over two real tritonservers (CPU, python backend, tiny reference models):
each upstream endpoint, the gRPC frontend and the OpenAI endpoint (official client) stream int16 PCM
at the model's 24 kHz, losslessly equal to the BLS' own stream; a replica killed under load loses no
request that had not started streaming, a request cut mid-stream fails visibly, and the replica
comes back when a replacement answers on its address; /metrics shows what happened.

Requests cost 1-3 CPU seconds each (see conftest: the LLM stand-in stops after tens of tokens), so
the file sends about twenty. Each test makes the traffic it asserts on: any one runs alone.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import time

import httpx
import numpy as np
import pytest

from cosyvoice.triton.server import TritonServer
from tests.serve.conftest import (
    REPLICA_ENV,
    SAMPLE_RATE,
    SAMPLES_PER_TOKEN,
    start_replica,
    triton_stream,
    wait_until,
)
from tests.support.tritonserver import remove_files, shm_regions

pytestmark = pytest.mark.slow

SPEAKER = "e2e-speaker"
#: the texts are chosen for the (seeded, deterministic) replies of the LLM stand-in: 28-45 tokens
#: (2 chunks) for sft / zero_shot / cross_lingual with TEXT, 38 for instruct2 with INSTRUCT_TEXT, and
#: 64 (3 chunks, ~2.7 s of audio) for sft with LONG_TEXT
TEXT = "a short test."
INSTRUCTION = "speak slowly and calmly."
INSTRUCT_TEXT = "it is a sunny day."
#: the failure test's text: a reply of several chunks, so that streams are in progress when a replica dies
LONG_TEXT = "it is a sunny day."
#: int16 PCM: |gateway / 32767 - float| <= one step, the float clipped to [-1, 1] first
PCM_STEP = 1.0 / 32767 + 1e-6


def _pcm(body: bytes) -> np.ndarray:
    assert len(body) % 2 == 0, "int16 PCM has an even number of bytes"
    return np.frombuffer(body, dtype="<i2")


def _wav_bytes(samples_int16: np.ndarray, rate: int = 16000) -> bytes:
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, samples_int16, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _assert_whole_tokens(samples: np.ndarray) -> None:
    assert len(samples) > 0 and len(samples) % SAMPLES_PER_TOKEN == 0, \
        f"{len(samples)} samples is not a whole number of speech tokens ({SAMPLES_PER_TOKEN} samples each)"


@pytest.fixture(scope="module")
def prompt(corpus_utterances):
    """Prompt audio as 16 kHz int16 (what gRPC clients send; the same samples go up as a PCM_16 WAV,
    so every path decodes int16 / 32768) and its transcript: an utterance of another speaker than "001"."""
    utt, wav, text = corpus_utterances[-1]
    return np.clip(np.round(wav * 32768), -32768, 32767).astype(np.int16), text


@pytest.fixture(scope="module")
def http(gateway):
    with httpx.Client(base_url=gateway, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def speaker(http, corpus_utterances):
    """A speaker registered through POST /speakers from a corpus utterance (of the first speaker)."""
    utt, wav, text = corpus_utterances[0]
    q16 = np.clip(np.round(wav * 32768), -32768, 32767).astype(np.int16)
    response = http.post("/speakers", data={"speaker_id": SPEAKER, "prompt_text": text, "overwrite": "true"},
                         files={"prompt_wav": ("prompt.wav", _wav_bytes(q16), "audio/wav")})
    assert response.status_code == 201, response.text
    assert response.json()["speech_tokens"] > 0
    assert SPEAKER in http.get("/speakers").json()["speakers"]
    return SPEAKER


def _synthesize(http, path: str, data: dict, prompt=None) -> httpx.Response:
    files = {"prompt_wav": ("prompt.wav", _wav_bytes(prompt[0]), "audio/wav")} if prompt is not None else None
    return http.post(path, data=data, files=files)


@pytest.fixture(scope="module")
def zero_shot(http, prompt) -> np.ndarray:
    q16, text = prompt
    response = _synthesize(http, "/inference_zero_shot", {"tts_text": TEXT, "prompt_text": text}, prompt)
    assert response.status_code == 200, response.text
    assert response.headers["x-sample-rate"] == str(SAMPLE_RATE)
    return _pcm(response.content)


def test_zero_shot_streams_24khz_int16_pcm_of_whole_tokens(zero_shot):
    _assert_whole_tokens(zero_shot)


@pytest.mark.parametrize("path, fields, with_prompt", [
    ("/inference_sft", {"tts_text": TEXT, "spk_id": SPEAKER}, False),
    ("/inference_cross_lingual", {"tts_text": TEXT}, True),
    ("/inference_instruct2", {"tts_text": INSTRUCT_TEXT, "instruct_text": INSTRUCTION}, True),
], ids=["sft", "cross_lingual", "instruct2"])
def test_each_upstream_endpoint_streams_24khz_int16_pcm_of_whole_tokens(http, speaker, prompt, path, fields,
                                                                        with_prompt):
    response = _synthesize(http, path, fields, prompt if with_prompt else None)
    assert response.status_code == 200, response.text
    assert response.headers["x-sample-rate"] == str(SAMPLE_RATE)
    assert response.headers["content-type"].startswith("audio/")
    _assert_whole_tokens(_pcm(response.content))


def test_instruct_is_refused_on_a_cosyvoice2_model(http, speaker):
    response = http.post("/inference_instruct", data={"tts_text": TEXT, "spk_id": SPEAKER,
                                                      "instruct_text": INSTRUCTION})
    assert response.status_code == 400
    assert "instruct2" in response.json()["detail"]


def _segment(text: str) -> str:
    """The gateway's one segment of ``text`` (what it sends Triton as target_text)."""
    from cosyvoice.serve.text import TextFrontend

    segments = TextFrontend().segments(text)
    assert len(segments) == 1, segments
    return segments[0]


async def _direct(grpc_url: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [chunk async for chunk in triton_stream(grpc_url, inputs)]


@pytest.fixture(scope="module")
def direct_zero_shot(triton_replicas, prompt) -> list[np.ndarray]:
    """The BLS' own stream for the zero_shot request: reference audio + transcript + target, straight to
    Triton (the BLS tokenizes and embeds the audio itself)."""
    q16, text = prompt
    wav = (q16.astype(np.float32) / 32768.0)[None]
    inputs = {"reference_wav": wav, "reference_wav_len": np.array([[wav.shape[1]]], np.int32),
              "reference_text": np.array([[text.strip()]], dtype=object),
              "target_text": np.array([[_segment(TEXT)]], dtype=object)}
    return asyncio.run(_direct(triton_replicas[0].grpc_url, inputs))


def test_zero_shot_through_the_gateway_equals_the_bls_stream(zero_shot, direct_zero_shot):
    direct = np.concatenate(direct_zero_shot)
    assert len(zero_shot) == len(direct)
    np.testing.assert_allclose(zero_shot / 32767.0, np.clip(direct, -1.0, 1.0), rtol=0, atol=PCM_STEP)


def test_grpc_streams_the_bls_chunks_as_they_come(grpc_gateway, prompt, zero_shot, direct_zero_shot):
    import grpc

    from cosyvoice.serve.grpc_server import _generated_modules

    pb2, pb2_grpc = _generated_modules()
    q16, text = prompt
    request = pb2.Request(zero_shot_request=pb2.zeroshotRequest(tts_text=TEXT, prompt_text=text,
                                                                 prompt_audio=q16.tobytes()))
    with grpc.insecure_channel(grpc_gateway) as channel:
        call = pb2_grpc.CosyVoiceStub(channel).Inference(request, timeout=300)
        chunks = [_pcm(response.tts_audio) for response in call]
        metadata = dict(call.initial_metadata())
    assert len(chunks) >= 2, f"{len(chunks)} chunk(s) of {sum(map(len, chunks))} samples: pick a TEXT with a longer reply"
    assert metadata.get("x-sample-rate") == str(SAMPLE_RATE)
    # one message per BLS response, same cut, same samples as the HTTP stream of the same request
    assert [len(c) for c in chunks] == [len(c) for c in direct_zero_shot]
    np.testing.assert_array_equal(np.concatenate(chunks), zero_shot)


def test_openai_client_streams_pcm_chunks_as_they_come(gateway, speaker):
    import openai

    client = openai.OpenAI(base_url=gateway + "/v1", api_key="unused")
    arrivals, body = [], b""
    start = time.perf_counter()
    with client.audio.speech.with_streaming_response.create(model="cosyvoice2", voice=speaker, input=TEXT,
                                                            response_format="pcm") as response:
        assert response.headers["x-sample-rate"] == str(SAMPLE_RATE)
        for part in response.iter_bytes():
            if part:
                arrivals.append(time.perf_counter() - start)
                body += part
    assert len(arrivals) >= 2, "the audio came in one piece"
    _assert_whole_tokens(_pcm(body))
    # streamed: the first bytes came well before the last (a chunk is ~1 s of CPU work here)
    assert arrivals[-1] - arrivals[0] > 0.05, arrivals


# --- a replica dies under load ---------------------------------------------------------------------
def _replica_states(http) -> dict[str, dict]:
    response = http.get("/readyz")
    return {s["replica"]: {**s, "status": response.status_code} for s in response.json()["replicas"]}


class _Outcome:
    """One streamed request of the load: where the gateway sent it, when its first bytes came, how it ended."""

    def __init__(self):
        self.replica: str | None = None
        self.first_byte: float | None = None
        self.body = b""
        self.status: int | None = None
        self.error: BaseException | None = None
        self.done = False


async def _sft(client: httpx.AsyncClient, outcome: _Outcome, text: str, on_first_byte=None) -> None:
    """POST /inference_sft and read the stream into ``outcome``; ``on_first_byte(outcome)`` runs as soon as
    the first audio bytes arrive (synchronously, before anything else reads)."""
    try:
        async with client.stream("POST", "/inference_sft", data={"tts_text": text, "spk_id": SPEAKER}) as response:
            outcome.status = response.status_code
            async for part in response.aiter_raw():
                if part and outcome.first_byte is None:
                    outcome.first_byte = time.monotonic()
                    if on_first_byte is not None:
                        on_first_byte(outcome)
                outcome.body += part
    except httpx.HTTPError as exc:
        outcome.error = exc
    finally:
        outcome.done = True


def _metric(families, name: str, **labels) -> float:
    total = 0.0
    for family in families:
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def _parse_metrics(text: str):
    from prometheus_client.parser import text_string_to_metric_families

    return list(text_string_to_metric_families(text))


def _metrics(http):
    return _parse_metrics(http.get("/metrics").text)


async def _dispatched_to(client: httpx.AsyncClient, sent: dict[str, float], labels: list[str]) -> str:
    """The replica the gateway sent the one request just made to: the one whose
    ``backend_requests_total`` rose past ``sent`` (updated). A counter, so completions cannot hide it."""
    deadline = time.monotonic() + 60
    while True:
        families = _parse_metrics((await client.get("/metrics")).text)
        now = {label: _metric(families, "cosyvoice_gateway_backend_requests_total", replica=label) for label in labels}
        risen = [label for label in labels if now[label] > sent[label]]
        if risen:
            assert len(risen) == 1 and now[risen[0]] == sent[risen[0]] + 1, (sent, now)
            sent.update(now)
            return risen[0]
        assert time.monotonic() < deadline, "the gateway did not send the request to a replica within 60 s"
        await asyncio.sleep(0.005)


def test_killing_a_replica_under_load_loses_no_request_that_had_not_started_streaming(
        gateway, http, speaker, triton_replicas, triton_env):
    """Four streams over two replicas (2 BLS instances each), placed one at a time while the replicas are
    frozen, so the test knows where each went; one replica is SIGKILLed the moment its first stream delivers
    audio. That stream is then mid-way (>= 3 chunks, each a token2wav call) and the replica's other request
    has sent nothing yet: a moment every run reaches, not a race on how many streams happen to overlap."""
    reference = http.post("/inference_sft", data={"tts_text": LONG_TEXT, "spk_id": SPEAKER})
    assert reference.status_code == 200
    tokens = len(reference.content) // 2 // SAMPLES_PER_TOKEN
    assert tokens >= 43, f"{tokens} tokens: LONG_TEXT must make >= 3 chunks (pick another text)"
    labels = [server.grpc_url for server in triton_replicas]
    families = _metrics(http)
    errors_before = {label: _metric(families, "cosyvoice_gateway_backend_errors_total", replica=label)
                     for label in labels}
    retries_before = _metric(families, "cosyvoice_gateway_backend_retries_total", model="cosyvoice2")
    kill: dict = {}

    def kill_on_the_victims_first_audio(outcome: _Outcome) -> None:
        if "label" in kill and outcome.replica == kill["label"] and "at" not in kill:
            os.killpg(kill["server"].process.pid, signal.SIGKILL)  # a crash: no draining
            kill.update(at=time.monotonic(), trigger=outcome)

    async def load():
        outcomes = [_Outcome() for _ in range(4)]  # 2 a replica: as many as its BLS instances stream at once
        late = [_Outcome() for _ in range(2)]  # sent after the kill, before the health check noticed
        async with httpx.AsyncClient(base_url=gateway, timeout=300) as client:
            sent = {label: _metric(_parse_metrics((await client.get("/metrics")).text),
                                   "cosyvoice_gateway_backend_requests_total", replica=label) for label in labels}
            tasks = []
            # frozen while the requests go out one at a time, each one's replica read off the gateway's
            # counters before the next: no audio can come before the test knows where each request went
            _signal_replicas(triton_replicas, signal.SIGSTOP)
            try:
                for outcome in outcomes:
                    tasks.append(asyncio.create_task(_sft(client, outcome, LONG_TEXT, kill_on_the_victims_first_audio)))
                    outcome.replica = await _dispatched_to(client, sent, labels)
                placed = {label: [o for o in outcomes if o.replica == label] for label in labels}
                label = max(labels, key=lambda lb: len(placed[lb]))  # least loaded first: 2 each
                assert len(placed[label]) >= 2, placed
                server = triton_replicas[labels.index(label)]
                kill.update(label=label, server=server, regions=shm_regions(server))
            finally:
                _signal_replicas(triton_replicas, signal.SIGCONT)
            deadline = time.monotonic() + 240
            while "at" not in kill:
                assert time.monotonic() < deadline, "no stream of the victim replica started within 240 s"
                assert not all(o.done for o in placed[label]), "the victim's requests ended without audio"
                await asyncio.sleep(0.01)
            tasks += [asyncio.create_task(_sft(client, o, LONG_TEXT)) for o in late]
            await asyncio.gather(*tasks)
        return outcomes + late, placed[label]

    try:
        outcomes, on_victim = asyncio.run(load())
        index = labels.index(kill["label"])
        victim = triton_replicas[index]
        victim.stop()  # reaps the killed group
        started = [o for o in outcomes if o.first_byte is not None and o.first_byte <= kill["at"]]
        not_started = [o for o in outcomes if o not in started]
        cut = [o for o in started if o.error is not None]
        print(f"replica killed with {len(started)} streams started: {len(cut)} cut mid-stream "
              f"({len(kill['trigger'].body)} of {len(reference.content)} bytes), {len(not_started)} not yet "
              f"streaming ({sum(o in on_victim for o in not_started)} of them on the victim): all complete")
        for o in not_started:  # retried on (or sent to) the surviving replica: complete
            assert o.error is None and o.status == 200, (o.status, o.error)
            assert o.body == reference.content
        assert kill["trigger"] in cut, "the stream in progress on the killed replica was not cut"
        assert any(o in on_victim for o in not_started), "no request on the killed replica was waiting to stream"
        for o in started:  # either complete on the survivor, or an error the client sees: never a short 200 body
            assert o.error is not None or (o.status == 200 and o.body == reference.content)
        for o in cut:
            assert isinstance(o.error, (httpx.RemoteProtocolError, httpx.ReadError)), repr(o.error)
            assert len(o.body) < len(reference.content)
        families = _metrics(http)  # the cut stream is counted against the victim; the waiting one was retried
        assert _metric(families, "cosyvoice_gateway_backend_errors_total", replica=victim.grpc_url) \
            >= errors_before[victim.grpc_url] + 1
        assert _metric(families, "cosyvoice_gateway_backend_retries_total", model="cosyvoice2") >= retries_before + 1

        def victim_out():
            states = _replica_states(http)
            return states if not states[victim.grpc_url]["healthy"] else None

        states = wait_until(victim_out, timeout=30, what="the killed replica out of rotation")
        assert states[victim.grpc_url]["status"] == 200  # still ready: the other replica serves
        assert sum(s["healthy"] for s in states.values()) == 1

        # a replacement on the same address comes back into rotation and takes requests again
        before = _metric(_metrics(http), "cosyvoice_gateway_backend_requests_total", replica=victim.grpc_url,
                         model="cosyvoice2")
        triton_replicas[index] = _replacement(victim, triton_env)
        wait_until(lambda: _replica_states(http)[victim.grpc_url]["healthy"], timeout=30,
                   what="the replacement back in rotation")

        async def two():
            async with httpx.AsyncClient(base_url=gateway, timeout=300) as client:
                return await asyncio.gather(*(client.post("/inference_sft", data={"tts_text": TEXT, "spk_id": SPEAKER})
                                              for _ in range(2)))

        assert all(r.status_code == 200 for r in asyncio.run(two()))
        after = _metric(_metrics(http), "cosyvoice_gateway_backend_requests_total", replica=victim.grpc_url,
                        model="cosyvoice2")
        assert after > before
    finally:
        if "at" in kill:  # a SIGKILLed server's stubs cannot unlink their shared memory
            remove_files(kill["regions"])
        for i, server in enumerate(triton_replicas):  # whatever failed, the next tests get two live replicas
            if server.process is None or server.process.poll() is not None:
                server.stop()
                triton_replicas[i] = _replacement(server, triton_env)


def _signal_replicas(servers: list[TritonServer], sig: signal.Signals) -> None:
    for server in servers:
        os.killpg(server.process.pid, sig)


def _replacement(dead: TritonServer, triton_env) -> TritonServer:
    """A tritonserver with every model loaded on the address (ports, repo, log file) of a dead one."""
    return start_replica(dead.repo, triton_env, dead.log_path, ports=(dead.http_port, dead.grpc_port),
                         extra_env=REPLICA_ENV)


def test_metrics_show_requests_first_chunk_latency_and_each_replica(http, gateway, zero_shot, speaker,
                                                                    triton_replicas):
    """Its own traffic (two concurrent sft streams, one a replica) read as differences: no other test's
    requests, kill or restart is needed for it to pass, in any order."""
    labels = [server.grpc_url for server in triton_replicas]
    wait_until(lambda: all(s["healthy"] for s in _replica_states(http).values()), timeout=60,
               what="every replica in rotation")

    def figures() -> dict:
        families = _metrics(http)
        return {"ok": _metric(families, "cosyvoice_gateway_requests_total", endpoint="/inference_sft", status="ok"),
                "first_chunks": _metric(families, "cosyvoice_gateway_first_chunk_seconds_count",
                                        endpoint="/inference_sft"),
                "first_chunks_inf": _metric(families, "cosyvoice_gateway_first_chunk_seconds_bucket",
                                            endpoint="/inference_sft", le="+Inf"),
                **{label: _metric(families, "cosyvoice_gateway_backend_requests_total", replica=label)
                   for label in labels}}

    before = figures()

    async def two():
        async with httpx.AsyncClient(base_url=gateway, timeout=300) as client:
            return await asyncio.gather(*(client.post("/inference_sft", data={"tts_text": TEXT, "spk_id": SPEAKER})
                                          for _ in range(2)))

    assert all(r.status_code == 200 for r in asyncio.run(two()))
    after = figures()
    families = _metrics(http)
    assert after["ok"] == before["ok"] + 2
    assert after["first_chunks"] == before["first_chunks"] + 2
    assert after["first_chunks_inf"] == before["first_chunks_inf"] + 2
    for label in labels:  # two requests at once: the least loaded replica takes each, one a replica
        assert after[label] == before[label] + 1, (before, after)
        assert _metric(families, "cosyvoice_gateway_backend_healthy", replica=label) == 1
    assert _metric(families, "cosyvoice_gateway_requests_total", endpoint="/inference_zero_shot", status="ok") >= 1
