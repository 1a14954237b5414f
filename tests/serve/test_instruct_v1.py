"""The gateway in front of a CosyVoice1 repository (``COSYVOICE_GATEWAY_MODEL=cosyvoice``): requests go to the
``cosyvoice`` BLS, ``/inference_instruct`` carries the instruction, ``/inference_sft`` is v1's own sft, and the
CosyVoice2-only ``/inference_instruct2`` is a clear 400 (over a recording fake Triton pool)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fastapi.testclient import TestClient

from cosyvoice.serve.app import create_app
from cosyvoice.serve.registry import PromptCache, SpeakerRegistry
from cosyvoice.serve.settings import GatewaySettings
from tests.serve.app_helpers import FakePool, SplitFrontend, wav_bytes

PROMPT_16K = (0.2 * np.sin(np.arange(32000) / 16000 * 2 * np.pi * 180)).astype(np.float32)
INSTRUCTION = "Theo 'Crimson', is a fiery, passionate rebel leader.<|endofprompt|>"


class ModelRecordingPool(FakePool):
    """The fake pool, also recording which Triton model each stream and config question went to."""

    def __init__(self, **kwargs):
        super().__init__(sample_rate=22050, inputs=["target_text", "reference_text", "mode", "speed"], **kwargs)
        self.models: list[str | None] = []
        self.asked: list[str] = []

    async def stream(self, inputs, *, request_id: str, model=None, parameters=None):
        self.models.append(model)
        async for piece in super().stream(inputs, request_id=request_id, model=model, parameters=parameters):
            yield piece

    async def model_inputs(self, model: str) -> list[str]:
        self.asked.append(model)
        return await super().model_inputs(model)


@pytest.fixture
def v1_client():
    pool = ModelRecordingPool()
    registry = SpeakerRegistry(None, pool=pool, cache=PromptCache())
    asyncio.run(registry.register("theo", PROMPT_16K, "the prompt transcript"))
    app = create_app(GatewaySettings(model="cosyvoice"), pool=pool, registry=registry, frontend=SplitFrontend())
    with TestClient(app) as client:
        yield client, pool, registry


def _sent(pool, name):
    return pool.sent[-1][0][name][0, 0]


def test_instruct_reaches_the_v1_bls_with_the_instruction_and_the_speakers_voice(v1_client):
    client, pool, registry = v1_client
    response = client.post("/inference_instruct", data={"tts_text": "Hello there.| Go on.", "spk_id": "theo",
                                                         "instruct_text": INSTRUCTION, "speed": "1.5"})
    assert response.status_code == 200, response.text
    assert response.headers["x-sample-rate"] == "22050"
    assert pool.models == ["cosyvoice", "cosyvoice"] and "cosyvoice" in pool.asked  # one request per segment
    assert [inputs["target_text"][0, 0] for inputs, _ in pool.sent] == ["Hello there.", "Go on."]
    assert _sent(pool, "mode") == "instruct" and _sent(pool, "reference_text") == INSTRUCTION
    assert float(_sent(pool, "speed")) == 1.5
    voice = registry.get("theo")
    np.testing.assert_array_equal(pool.sent[-1][0]["prompt_speech_tokens"][0], voice.speech_token)
    get = client.get("/inference_instruct", params={"tts_text": "Hi.", "spk_id": "theo", "instruct_text": " Calm. "})
    assert get.status_code == 200 and _sent(pool, "reference_text") == "Calm."
    empty = client.post("/inference_instruct", data={"tts_text": "Hi.", "spk_id": "theo", "instruct_text": " "})
    assert empty.status_code == 400 and "instruct_text" in empty.json()["detail"]


def test_sft_is_v1s_own_sft_and_instruct2_is_refused_on_a_v1_model(v1_client):
    client, pool, _ = v1_client
    assert client.post("/inference_sft", data={"tts_text": "Hi.", "spk_id": "theo"}).status_code == 200
    assert _sent(pool, "mode") == "sft" and pool.models[-1] == "cosyvoice"
    assert client.post("/inference_zero_shot", data={"tts_text": "Hi.", "prompt_text": "x", "spk_id": "theo"}
                       ).status_code == 200
    assert _sent(pool, "mode") == "zero_shot"
    sent = len(pool.sent)
    files = {"prompt_wav": ("p.wav", wav_bytes(1.0, 16000), "audio/wav")}
    infers = list(pool.infers)
    audio = client.post("/inference_zero_shot", data={"tts_text": "Hi.", "prompt_text": "the transcript"}, files=files)
    assert audio.status_code == 200, audio.text
    inputs = pool.sent[-1][0]  # the audio itself goes to the v1 BLS, which makes its own prompt from it
    assert inputs["reference_wav"].shape == (1, 16000) and inputs["reference_wav_len"].tolist() == [[16000]]
    assert _sent(pool, "reference_text") == "the transcript" and _sent(pool, "mode") == "zero_shot"
    assert "prompt_speech_tokens" not in inputs and pool.infers == infers  # no v2 features asked of Triton
    cross = client.post("/inference_cross_lingual", data={"tts_text": "Hi."}, files=files)
    assert cross.status_code == 200 and _sent(pool, "mode") == "cross_lingual" and _sent(pool, "reference_text") == ""
    long = {"prompt_wav": ("p.wav", wav_bytes(31.0, 16000), "audio/wav")}
    too_long = client.post("/inference_cross_lingual", data={"tts_text": "Hi."}, files=long)
    assert too_long.status_code == 400 and "1-30 s" in too_long.json()["detail"]
    sent = len(pool.sent)
    refused = client.post("/inference_instruct2", data={"tts_text": "Hi.", "instruct_text": "Softly.", "spk_id": "theo"})
    assert refused.status_code == 400 and "/inference_instruct " in refused.json()["detail"]
    assert len(pool.sent) == sent  # nothing reached Triton
    register = client.post("/speakers", data={"speaker_id": "bob", "prompt_text": "hi"}, files=files)
    assert register.status_code == 400 and "CosyVoice2/3 deployment" in register.json()["detail"]


def test_a_cosyvoice2_gateway_still_sends_to_the_cosyvoice2_bls():
    pool = ModelRecordingPool()
    registry = SpeakerRegistry(None, pool=pool, cache=PromptCache())
    asyncio.run(registry.register("theo", PROMPT_16K, "the prompt transcript"))
    with TestClient(create_app(GatewaySettings(), pool=pool, registry=registry, frontend=SplitFrontend())) as client:
        assert client.post("/inference_sft", data={"tts_text": "Hi.", "spk_id": "theo"}).status_code == 200
        assert client.post("/inference_instruct", data={"tts_text": "Hi.", "spk_id": "theo", "instruct_text": "x"}
                           ).status_code == 400
    assert pool.models == ["cosyvoice2"] and _sent(pool, "mode") == "zero_shot"


def test_an_upstream_sft_speaker_with_only_an_embedding_serves_sft_and_instruct(tmp_path):
    """CosyVoice-300M-SFT's spk2info.pt holds ``{speaker: {"embedding": [1, 192]}}``: such a speaker is
    sent with an empty prompt (the v1 BLS then conditions on the embedding only); zero_shot is a 400."""
    import torch

    path = tmp_path / "spk2info.pt"
    embedding = torch.randn(1, 192)
    torch.save({"中文女": {"embedding": embedding}}, path)
    pool = ModelRecordingPool()
    registry = SpeakerRegistry(str(path), pool=pool, cache=PromptCache())
    app = create_app(GatewaySettings(model="cosyvoice"), pool=pool, registry=registry, frontend=SplitFrontend())
    with TestClient(app) as client:
        assert client.get("/speakers").json() is not None
        ok = client.post("/inference_instruct", data={"tts_text": "Hi.", "spk_id": "中文女", "instruct_text": INSTRUCTION})
        assert ok.status_code == 200, ok.text
        inputs = pool.sent[-1][0]
        assert inputs["prompt_speech_tokens"].shape == (1, 0) and inputs["prompt_speech_feat"].shape == (1, 0, 80)
        np.testing.assert_allclose(inputs["prompt_spk_embedding"][0], embedding[0].numpy(), atol=1e-3)
        assert _sent(pool, "mode") == "instruct" and _sent(pool, "reference_text") == INSTRUCTION
        assert client.post("/inference_sft", data={"tts_text": "Hi.", "spk_id": "中文女"}).status_code == 200
        refused = client.post("/inference_cross_lingual", data={"tts_text": "Hi.", "spk_id": "中文女"})
        assert refused.status_code == 400 and "only a speaker embedding" in refused.json()["detail"]
    assert registry.get("中文女").to_spk2info().keys() == {"embedding"}  # written back in upstream's form


def test_a_v1_gateway_measures_english_segments_in_whisper_ids():
    from cosyvoice.dataset.text import get_whisper_tokenizer
    from cosyvoice.serve.service import build_synthesizer

    pool = ModelRecordingPool()
    synthesizer = build_synthesizer(GatewaySettings(model="cosyvoice"), pool=pool,
                                    registry=SpeakerRegistry(None, pool=pool, cache=PromptCache()))
    text = "Hello there, the quick brown fox."
    assert synthesizer.frontend.tokenize(text) == get_whisper_tokenizer().encode(text)
    assert synthesizer.bls_model == "cosyvoice"
