"""The Synthesizer (service.py) and the gateway settings, over a fake Triton pool and the real speaker
registry: what each mode sends to the cosyvoice2 BLS, segment order, errors before the first chunk,
closing the Triton stream, metrics."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cosyvoice.serve import metrics
from cosyvoice.serve.registry import PromptCache, SpeakerRegistry
from cosyvoice.serve.service import BadRequest, Mode, SynthesisRequest, Synthesizer, first_and_rest, pcm16
from cosyvoice.serve.settings import GatewaySettings
from tests.serve.app_helpers import FakePool, SplitFrontend, chunk

PROMPT_16K = (0.2 * np.sin(np.arange(32000) / 16000 * 2 * np.pi * 180)).astype(np.float32)  # 2 s


def make(settings: GatewaySettings | None = None, **pool_kwargs) -> tuple[Synthesizer, FakePool]:
    pool = FakePool(**pool_kwargs)
    registry = SpeakerRegistry(None, pool=pool, cache=PromptCache())
    asyncio.run(registry.register("alice", PROMPT_16K, "the prompt transcript"))
    return Synthesizer(pool, registry, SplitFrontend(), settings or GatewaySettings()), pool


def collect(synth: Synthesizer, req: SynthesisRequest, endpoint: str = "/test") -> list[np.ndarray]:
    async def run():
        return [c async for c in synth.stream(req, endpoint=endpoint)]

    return asyncio.run(run())


def text_input(inputs: dict, name: str) -> str:
    value = inputs[name]
    assert value.shape == (1, 1) and value.dtype == object, (name, value.shape, value.dtype)
    return value[0, 0]


def sample(name: str, **labels) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def test_sft_streams_each_segment_in_order_with_the_speakers_stored_prompt():
    synth, pool = make()
    chunks = collect(synth, SynthesisRequest(Mode.sft, "First part.|Second part.", speaker_id="alice"))
    assert [c.size for c in chunks] == [4800, 2400, 1200] * 2
    assert synth.sample_rate == 24000
    assert [text_input(i, "target_text") for i, _ in pool.sent] == ["First part.", "Second part."]
    inputs = pool.sent[0][0]
    assert text_input(inputs, "mode") == "zero_shot"  # upstream's add_zero_shot_spk semantics
    assert text_input(inputs, "reference_text") == "the prompt transcript"
    assert inputs["prompt_speech_tokens"].dtype == np.int32 and inputs["prompt_speech_tokens"].shape == (1, 50)
    assert inputs["prompt_speech_feat"].dtype == np.float16 and inputs["prompt_speech_feat"].shape == (1, 100, 80)
    assert inputs["prompt_spk_embedding"].shape == (1, 192)
    assert "reference_wav" not in inputs and "speed" not in inputs
    ids = [rid for _, rid in pool.sent]
    assert len(set(ids)) == 2 and pool.finished == ids


@pytest.mark.parametrize("mode,bls_mode,reference_text", [
    (Mode.zero_shot, "zero_shot", "what the prompt says"),
    (Mode.cross_lingual, "cross_lingual", ""),
    (Mode.instruct2, "instruct2", "Speak slowly.<|endofprompt|>"),
])
def test_prompt_audio_modes_send_the_mode_and_the_right_reference_text(mode, bls_mode, reference_text):
    synth, pool = make()
    req = SynthesisRequest(mode, "Hello.", prompt_text="what the prompt says", prompt_wav_16k=PROMPT_16K,
                           instruct_text="Speak slowly.<|endofprompt|>")
    assert len(collect(synth, req)) == 3
    inputs = pool.sent[-1][0]
    assert text_input(inputs, "mode") == bls_mode
    assert text_input(inputs, "reference_text") == reference_text
    assert inputs["prompt_speech_tokens"].shape == (1, 50)


def test_repeated_prompt_audio_is_computed_once():
    synth, pool = make()
    before = list(pool.infers)  # the registered speaker's features
    for _ in range(3):
        collect(synth, SynthesisRequest(Mode.cross_lingual, "Hi.", prompt_wav_16k=PROMPT_16K.copy()))
    assert pool.infers == before, "the registered speaker's audio is in the prompt cache"
    other = PROMPT_16K * 0.5
    collect(synth, SynthesisRequest(Mode.cross_lingual, "Hi.", prompt_wav_16k=other))
    collect(synth, SynthesisRequest(Mode.cross_lingual, "Hi.", prompt_wav_16k=other))
    assert sorted(pool.infers[len(before):]) == ["audio_tokenizer", "speaker_embedding"]


def test_a_registered_speaker_can_replace_prompt_audio():
    synth, pool = make()
    collect(synth, SynthesisRequest(Mode.instruct2, "Hi.", speaker_id="alice", instruct_text="Whisper."))
    inputs = pool.sent[-1][0]
    assert text_input(inputs, "reference_text") == "Whisper." and text_input(inputs, "mode") == "instruct2"


@pytest.mark.parametrize("req,status,words", [
    (SynthesisRequest(Mode.sft, "   ", speaker_id="alice"), 400, "tts_text is empty"),
    (SynthesisRequest(Mode.sft, "...|!", speaker_id="alice"), 400, "nothing to speak"),
    (SynthesisRequest(Mode.sft, "x" * 2001, speaker_id="alice"), 413, "limit is 2000"),
    (SynthesisRequest(Mode.sft, "Hi.", speaker_id="bob"), 404, "unknown speaker 'bob'"),
    (SynthesisRequest(Mode.sft, "Hi."), 400, "needs spk_id"),
    (SynthesisRequest(Mode.zero_shot, "Hi.", prompt_wav_16k=PROMPT_16K), 400, "needs prompt_text"),
    (SynthesisRequest(Mode.zero_shot, "Hi.", prompt_text="p"), 400, "needs prompt_wav"),
    (SynthesisRequest(Mode.cross_lingual, "Hi.", prompt_wav_16k=PROMPT_16K, speaker_id="alice"), 400, "not both"),
    (SynthesisRequest(Mode.cross_lingual, "Hi.", prompt_wav_16k=PROMPT_16K[:8000]), 400, "0.50 s"),
    (SynthesisRequest(Mode.instruct2, "Hi.", speaker_id="alice"), 400, "needs instruct_text"),
    (SynthesisRequest(Mode.instruct, "Hi.", speaker_id="alice", instruct_text="x"), 400, "/inference_instruct2"),
    (SynthesisRequest(Mode.sft, "Hi.", speaker_id="alice", speed=5.0), 400, "outside 0.25-4.0"),
    (SynthesisRequest(Mode.sft, "Hi.", speaker_id="alice", speed=1.5), 400, "speed is not supported"),
])
def test_bad_requests_are_refused_before_triton_with_a_status_and_message(req, status, words):
    synth, pool = make()
    rejected = sample("cosyvoice_gateway_requests_total", endpoint="/bad", status="rejected")
    with pytest.raises(BadRequest) as info:
        collect(synth, req, endpoint="/bad")
    assert info.value.status == status and words in info.value.message, info.value.message
    assert pool.sent == []
    assert sample("cosyvoice_gateway_requests_total", endpoint="/bad", status="rejected") == rejected + 1
    assert sample("cosyvoice_gateway_in_flight_requests", endpoint="/bad") == 0


def test_instruct_goes_to_the_bls_on_a_cosyvoice1_gateway():
    synth, pool = make(GatewaySettings(model="cosyvoice"))
    collect(synth, SynthesisRequest(Mode.instruct, "Hi.", speaker_id="alice", instruct_text="Be happy."))
    inputs = pool.sent[-1][0]
    assert text_input(inputs, "mode") == "instruct" and text_input(inputs, "reference_text") == "Be happy."


def test_speed_is_sent_only_when_the_bls_declares_a_speed_input():
    synth, pool = make(inputs=["target_text", "speed"])
    collect(synth, SynthesisRequest(Mode.sft, "Hi.", speaker_id="alice", speed=1.5))
    speed = pool.sent[-1][0]["speed"]
    assert speed.dtype == np.float32 and speed.shape == (1, 1) and speed[0, 0] == 1.5


def test_the_sample_rate_is_the_models_not_an_assumed_one():
    synth, _ = make(sample_rate=22050)
    collect(synth, SynthesisRequest(Mode.sft, "Hi.", speaker_id="alice"))
    assert synth.sample_rate == 22050
    synth, _ = make(sample_rate=None)
    with pytest.raises(RuntimeError, match="sample_rate"):
        collect(synth, SynthesisRequest(Mode.sft, "Hi.", speaker_id="alice"))
    assert not asyncio.run(synth.ready())


def test_a_failure_after_chunks_propagates_and_closes_the_triton_stream():
    synth, pool = make(fail_at=2, error=RuntimeError("replica died"))
    got = []

    async def run():
        async for c in synth.stream(SynthesisRequest(Mode.sft, "Hi.", speaker_id="alice"), endpoint="/fail"):
            got.append(c)

    errors = sample("cosyvoice_gateway_requests_total", endpoint="/fail", status="error")
    with pytest.raises(RuntimeError, match="replica died"):
        asyncio.run(run())
    assert len(got) == 2 and len(pool.finished) == 1
    assert sample("cosyvoice_gateway_requests_total", endpoint="/fail", status="error") == errors + 1


def test_closing_the_stream_early_closes_the_triton_stream_and_counts_a_cancel():
    synth, pool = make()

    async def run():
        stream = synth.stream(SynthesisRequest(Mode.sft, "a|b", speaker_id="alice"), endpoint="/cancel")
        first, rest = await first_and_rest(stream)
        assert first.size == 4800
        await rest.aclose()

    asyncio.run(run())
    assert len(pool.sent) == 1 and pool.finished == [pool.sent[0][1]]
    assert sample("cosyvoice_gateway_requests_total", endpoint="/cancel", status="cancelled") == 1
    assert sample("cosyvoice_gateway_in_flight_requests", endpoint="/cancel") == 0


def test_metrics_of_a_request():
    synth, _ = make()
    collect(synth, SynthesisRequest(Mode.sft, "Hi.", speaker_id="alice"), endpoint="/metered")
    assert sample("cosyvoice_gateway_requests_total", endpoint="/metered", status="ok") == 1
    assert sample("cosyvoice_gateway_audio_seconds_total", endpoint="/metered") == pytest.approx(8400 / 24000)
    assert sample("cosyvoice_gateway_first_chunk_seconds_count", endpoint="/metered") == 1
    assert sample("cosyvoice_gateway_real_time_factor_count", endpoint="/metered") == 1
    assert sample("cosyvoice_gateway_request_seconds_count", endpoint="/metered") == 1


def test_pcm16_clips_and_scales():
    data = pcm16(np.array([0.0, 0.5, 1.0, -1.0, 3.0, -3.0], dtype=np.float32))
    assert np.frombuffer(data, "<i2").tolist() == [0, 16383, 32767, -32767, 32767, -32767]
    assert pcm16(chunk(3, 0.0)) == b"\0" * 6


# --- settings ------------------------------------------------------------------------------------------
def test_settings_from_the_environment():
    env = {"COSYVOICE_GATEWAY_TRITON": "10.0.0.1:8001, 10.0.0.2:9001|http://10.0.0.2:9000",
           "COSYVOICE_GATEWAY_RATE_LIMIT": "30", "COSYVOICE_GATEWAY_MAX_TEXT_CHARS": "500",
           "COSYVOICE_GATEWAY_API_TOKEN": "s3cret", "COSYVOICE_GATEWAY_MODEL": "cosyvoice",
           "COSYVOICE_GATEWAY_CORS_ORIGINS": "https://a.example,https://b.example"}
    settings = GatewaySettings.from_env(env)
    assert settings.triton == ("10.0.0.1:8001", "10.0.0.2:9001|http://10.0.0.2:9000")
    assert settings.rate_limit == 30 and settings.max_text_chars == 500 and settings.model == "cosyvoice"
    assert settings.cors_origins == ("https://a.example", "https://b.example")
    assert "s3cret" not in repr(settings)
    rebuilt = GatewaySettings.from_env({**settings.to_env(), "COSYVOICE_GATEWAY_API_TOKEN": "s3cret"})
    assert rebuilt == settings and "COSYVOICE_GATEWAY_API_TOKEN" not in settings.to_env()
    assert GatewaySettings.from_env(env, rate_limit=5, spk2info=None).rate_limit == 5
    defaults = GatewaySettings.from_env({})
    assert defaults.triton == ("127.0.0.1:8001",) and defaults.max_upload_bytes == 10 * 1024 * 1024


@pytest.mark.parametrize("env,words", [
    ({"COSYVOICE_GATEWAY_TRITON": "nohostport"}, "TRITON: 'nohostport'"),
    ({"COSYVOICE_GATEWAY_TRITON": "h:1|ftp://x"}, "http://"),
    ({"COSYVOICE_GATEWAY_RATE_LIMIT": "lots"}, "RATE_LIMIT: expected a number"),
    ({"COSYVOICE_GATEWAY_MAX_UPLOAD_BYTES": "0"}, "MAX_UPLOAD_BYTES: must be a positive"),
    ({"COSYVOICE_GATEWAY_MODEL": "cosyvoice3"}, "MODEL: 'cosyvoice3'"),
    ({"COSYVOICE_GATEWAY_API_TOKEN": " "}, None),  # blank = unset
])
def test_settings_errors_name_the_variable(env, words):
    if words is None:
        assert GatewaySettings.from_env(env).api_token is None
        return
    with pytest.raises(ValueError, match=words.replace("|", r"\|")):
        GatewaySettings.from_env(env)
