"""Serving the CosyVoice1 LLM: sampled generation equal to upstream's, the v1 frontend per mode, and a CPU
tritonserver running the ``transformer_llm`` python model behind the ``cosyvoice`` BLS.

The sampled oracle (``tests/llm/data/upstream_transformer_lm_sampled.npz``) was recorded from upstream's
``TransformerLM.inference`` with upstream's ``ras_sampling`` by ``bench/upstream_transformer_lm_sampling.py``
on the greedy oracle's weights. The server (tests/triton/conftest.py ``v1_server``, shared with
test_token2wav_v1) serves the tiny CosyVoice1 reference dir (cosyvoice/acoustic/reference.py, eos suppressed)
with the real v1 token2wav (22.05 kHz, seeded), so the BLS's audio is compared with what the acoustic runtime
makes in-process of the tokens the LLM samples.
"""

from __future__ import annotations

import functools
import json
import os
import queue

import numpy as np
import pytest
import torch

from cosyvoice.triton import runtime_v1

LLM_DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "llm", "data")
SAMPLED_ORACLE = os.path.join(LLM_DATA, "upstream_transformer_lm_sampled.npz")
GREEDY_ORACLE = os.path.join(LLM_DATA, "upstream_transformer_lm.npz")
TARGET = "the quick brown fox jumps over the lazy dog"
SHORT_TARGET = "the quick brown fox jumps over the"  # 7 whisper ids: 140 tokens, a chunk of 100 + 20 and the rest
INSTRUCTION = "Theo is a fiery, passionate rebel leader."

#: the in-process side (sampling, the expected audio) on one torch thread, as the served models run
pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: a tiny v1 model dir's recipe: upstream's class paths and sampling, whisper text ids, 4096 speech codes
TINY_V1_YAML = """
llm: !new:cosyvoice.llm.llm.TransformerLM
    text_encoder_input_size: 8
    llm_input_size: 16
    llm_output_size: 16
    text_token_size: 51866
    speech_token_size: 4096
    length_normalized_loss: True
    lsm_weight: 0
    spk_embed_dim: 192
    text_encoder: !new:cosyvoice.transformer.encoder.ConformerEncoder
        input_size: 8
        output_size: 16
        attention_heads: 2
        linear_units: 32
        num_blocks: 1
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.0
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        use_cnn_module: False
        macaron_style: False
        use_dynamic_chunk: False
        use_dynamic_left_chunk: False
        static_chunk_size: 1
    llm: !new:cosyvoice.transformer.encoder.TransformerEncoder
        input_size: 16
        output_size: 16
        attention_heads: 2
        linear_units: 32
        num_blocks: 2
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.0
        input_layer: 'linear_legacy'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        static_chunk_size: 1
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
        top_k: 25
        win_size: 10
        tau_r: 0.1
get_tokenizer: !name:whisper.tokenizer.get_tokenizer
    multilingual: True
    num_languages: 100
    language: 'en'
    task: 'transcribe'
"""


@pytest.fixture(scope="module")
def tokenizer():
    from cosyvoice.dataset.text import get_whisper_tokenizer

    return get_whisper_tokenizer()


# --- the library: sampled generation and the per-mode frontend ------------------------------------

def _oracle_lm():
    """Ours, loaded strictly from the oracle's weights, sampling with the recipe's ras_sampling."""
    from cosyvoice.llm import ConformerEncoder, TransformerEncoder, TransformerLM, ras_sampling

    with np.load(GREEDY_ORACLE) as f:
        record = {k: f[k] for k in f.files}
    with np.load(SAMPLED_ORACLE) as f:
        sampled = {k: f[k] for k in f.files}
    settings = json.loads(str(record["settings"]))
    lm = TransformerLM(text_encoder=ConformerEncoder(**settings["text_encoder"]),
                       llm=TransformerEncoder(**settings["llm"]),
                       sampling=functools.partial(ras_sampling, **json.loads(str(sampled["ras"]))), **settings["lm"])
    lm.load_state_dict({k[len("weight/"):]: torch.from_numpy(v) for k, v in record.items() if k.startswith("weight/")},
                       strict=True)
    return lm.eval(), record, sampled


def test_sampled_generation_equals_upstreams_for_a_fixed_seed():
    """Upstream's ras_sampling (nucleus top_p 0.8/top_k 25, resampled from the full distribution when the pick
    repeats within 10 tokens) and ours make the same draws from torch's generator: same ids per seed, with the
    resample path taken in every run, for a prompted case (speaker, prompt text and speech) and a bare one."""
    lm, record, sampled = _oracle_lm()
    served = runtime_v1.ServedLM(lm)
    for case in ("prompted", "bare"):
        inputs = {k.split("/")[-1]: v for k, v in record.items() if k.startswith(f"infer/{case}/")}
        n_prompt = int(inputs["prompt_text_len"][0])
        text_ids = np.concatenate([inputs["prompt_text"][0, :n_prompt], inputs["text"][0]])
        embedding = inputs["embedding"][0] if inputs["embedding"].shape[0] else None
        for seed in sampled["seeds"].tolist():
            expected = sampled[f"{case}/{seed}/ids"].tolist()
            assert int(sampled[f"{case}/{seed}/resamples"]) > 0
            ids = list(served.generate(text_ids, prompt_text_len=n_prompt, prompt_speech_tokens=inputs["prompt_speech_token"],
                                       embedding=embedding, seed=seed))
            assert ids == expected, (case, seed)
        assert len(set(map(tuple, (sampled[f"{case}/{s}/ids"].tolist() for s in sampled["seeds"].tolist())))) > 1
    assert list(served.generate(text_ids, seed=0, max_new_tokens=3)) == sampled["bare/0/ids"].tolist()[:3]


def test_each_mode_gives_the_llm_and_token2wav_upstreams_v1_inputs(tokenizer):
    tokens, embedding = np.array([5, 6, 7]), np.arange(192, dtype=np.float32)
    target = tokenizer.encode(TARGET)
    transcript = "a reference transcript."
    zero = runtime_v1.llm_request(tokenizer, "zero_shot", TARGET, prompt_text=transcript, prompt_speech_tokens=tokens,
                                  embedding=embedding)
    assert zero.text_ids.tolist() == tokenizer.encode(transcript) + target
    assert zero.prompt_text_len == len(tokenizer.encode(transcript)) and zero.prompt_speech_tokens.tolist() == [5, 6, 7]
    for mode in ("sft", "cross_lingual"):
        req = runtime_v1.llm_request(tokenizer, mode, TARGET, prompt_text=transcript, prompt_speech_tokens=tokens,
                                     embedding=embedding)
        assert (req.text_ids.tolist(), req.prompt_text_len, len(req.prompt_speech_tokens)) == (target, 0, 0)
        np.testing.assert_array_equal(req.embedding, embedding)
    instruct = runtime_v1.llm_request(tokenizer, "instruct", TARGET, prompt_text=INSTRUCTION, prompt_speech_tokens=tokens,
                                      embedding=embedding)
    instruction_ids = tokenizer.encode(INSTRUCTION + "<|endofprompt|>")
    assert instruct.text_ids.tolist() == instruction_ids + target and instruct.prompt_text_len == len(instruction_ids)
    assert instruct.embedding is None and len(instruct.prompt_speech_tokens) == 0  # no speaker row, no prompt speech
    tensors = instruct.tensors()
    assert set(tensors) == {"input_ids", "input_lengths", "prompt_text_len"}
    assert runtime_v1.llm_request(tokenizer, "instruct", TARGET, prompt_text=INSTRUCTION + "<|endofprompt|>"
                                  ).text_ids.tolist() == instruct.text_ids.tolist()  # not appended twice
    feat = np.zeros((6, 80), np.float32)
    assert runtime_v1.token2wav_prompt("instruct", tokens, feat, embedding)[:2] == (None, None)
    assert runtime_v1.token2wav_prompt("sft", tokens, feat, embedding)[:2] == (None, None)
    assert runtime_v1.token2wav_prompt("cross_lingual", tokens, feat, embedding)[0] is tokens
    with pytest.raises(ValueError, match="instruct needs an instruction"):
        runtime_v1.llm_request(tokenizer, "instruct", TARGET, prompt_text=" ")
    with pytest.raises(ValueError, match="instruct2"):
        runtime_v1.llm_request(tokenizer, "instruct2", TARGET, embedding=embedding)
    with pytest.raises(ValueError, match="not CosyVoice1 speech tokens .*first: 6000"):
        runtime_v1.llm_request(tokenizer, "zero_shot", TARGET, prompt_speech_tokens=np.array([1, 6000]),
                               embedding=embedding)


# --- a CPU tritonserver: transformer_llm, the cosyvoice BLS and the real v1 token2wav -------------

@pytest.fixture(scope="module")
def served_lm(v1_model_dir):
    return runtime_v1.ServedLM.from_model_dir(v1_model_dir, "cpu")


@pytest.fixture(scope="module")
def acoustic(v1_model_dir, v1_oracle):
    """The acoustic runtime token2wav serves, in-process, with the served model's seed (the oracle's)."""
    from cosyvoice.acoustic.token2wav_v1 import Token2WavV1

    return Token2WavV1(v1_model_dir, device="cpu", seed=int(v1_oracle["seed"]))


def _expected_stream(acoustic, tokens, prompt_tokens, prompt_feat, embedding, request_id):
    """The audio chunks upstream's CosyVoiceModel streams for ``tokens`` (chunks of 100 + 20 tokens, then
    the rest), from the acoustic runtime in-process; prompt mel and embedding as FP16 like the BLS sends."""
    feat = None if prompt_feat is None else prompt_feat.astype(np.float16).astype(np.float32)
    embedding = embedding.astype(np.float16).astype(np.float32)
    schedule, chunks = runtime_v1.ChunkSchedule(), []
    while schedule.ready(len(tokens)):
        chunks.append(acoustic.synthesize(tokens[: schedule.chunk_end()], prompt_tokens, feat, embedding,
                                          token_offset=schedule.offset, finalize=False, request_id=request_id))
        schedule.advance()
    chunks.append(acoustic.synthesize(tokens, prompt_tokens, feat, embedding, token_offset=schedule.offset,
                                      finalize=True, request_id=request_id))
    return chunks


def _assert_audio(got, want):
    from tests.acoustic.test_token2wav_v1 import ATOL

    assert [len(c) for c in got] == [len(c) for c in want]
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=ATOL)


def _stream(url, model, inputs):
    """Every response of one decoupled request: a list of {output: array}, then the final flag."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    tensors = []
    for name, array in inputs.items():
        dtype = "BYTES" if array.dtype == object else {np.dtype(np.int32): "INT32", np.dtype(np.float32): "FP32",
                                                       np.dtype(np.float16): "FP16", np.dtype(np.bool_): "BOOL",
                                                       np.dtype(np.uint64): "UINT64"}[array.dtype]
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    responses = []
    try:
        client.async_stream_infer(model, tensors, enable_empty_final_response=True)
        while True:
            result, error = results.get(timeout=120)
            if error is not None:
                raise RuntimeError(str(error))
            if result.get_response().parameters["triton_final_response"].bool_param:
                return responses
            responses.append(result)
    finally:
        client.stop_stream()
        client.close()


@pytest.mark.slow
def test_transformer_llm_streams_one_sampled_token_per_response(v1_server, served_lm, tokenizer):
    request = runtime_v1.llm_request(tokenizer, "zero_shot", TARGET, prompt_text="a prompt.",
                                     prompt_speech_tokens=np.array([1, 2, 4095]), embedding=np.ones(192, np.float32))
    inputs = dict(request.tensors(), streaming=np.array([[True]]), random_seed=np.array([[5]], dtype=np.uint64))
    responses = _stream(v1_server.grpc_url, "transformer_llm", inputs)
    tokens = [r.as_numpy("output_ids").reshape(-1).tolist() for r in responses]
    assert all(len(t) == 1 and r.as_numpy("sequence_length").reshape(-1).tolist() == [1] for t, r in zip(tokens, responses))
    expected = list(served_lm.generate(request.text_ids, prompt_text_len=request.prompt_text_len,
                                       prompt_speech_tokens=request.prompt_speech_tokens, embedding=request.embedding,
                                       seed=5))
    assert [t[0] for t in tokens] == expected and len(expected) == 20 * len(tokenizer.encode(TARGET))
    assert max(expected) < 4096


@pytest.mark.slow
def test_instruct_through_the_v1_bls_is_upstreams_stream_of_the_llms_tokens(v1_server, served_lm, acoustic, tokenizer):
    """mode instruct with a registered speaker's cached prompt, end to end at 22.05 kHz: the LLM sees the
    instruction (+ <|endofprompt|>) and no speaker row; token2wav gets 100-token chunks (+ 20 lookahead) with the
    speaker embedding only, and the streamed audio is what the acoustic runtime makes of those tokens."""
    embedding = np.linspace(-1, 1, 192).astype(np.float32)
    inputs = {"target_text": np.array([[SHORT_TARGET]], dtype=object), "reference_text": np.array([[INSTRUCTION]], dtype=object),
              "mode": np.array([["instruct"]], dtype=object),
              "prompt_speech_tokens": np.array([[3, 4, 5]], dtype=np.int32),
              "prompt_speech_feat": np.zeros((1, 7, 80), dtype=np.float16),
              "prompt_spk_embedding": embedding.astype(np.float16)[None]}
    chunks = [r.as_numpy("waveform").reshape(-1) for r in _stream(v1_server.grpc_url, "cosyvoice", inputs)]
    request = runtime_v1.llm_request(tokenizer, "instruct", SHORT_TARGET, prompt_text=INSTRUCTION)
    tokens = list(served_lm.generate(request.text_ids, prompt_text_len=request.prompt_text_len, seed=runtime_v1.SEED))
    n = len(tokens)  # 20 per target token (eos never wins)
    assert n == 20 * len(tokenizer.encode(SHORT_TARGET)) == 140
    assert len(chunks) == (n - 20) // 100 + 1
    _assert_audio(chunks, _expected_stream(acoustic, tokens, None, None, embedding, "instruct"))


@pytest.mark.slow
def test_zero_shot_with_reference_audio_through_the_v1_bls(v1_server, v1_model_dir, served_lm, acoustic, tokenizer):
    """16 kHz reference audio: the BLS makes the prompt as upstream's v1 frontend (50 Hz v1 tokens, CAM++
    embedding, 22.05 kHz mel), the LLM continues its transcript + tokens, token2wav speaks with the whole prompt."""
    wav = (0.3 * np.sin(np.arange(16000) / 16000 * 2 * np.pi * 190)).astype(np.float32)
    frontend = runtime_v1.ReferenceFrontend.from_model_dir(v1_model_dir)
    tokens, feat, embedding = frontend.prompt(wav)
    assert len(tokens) == 50 and feat.shape == (int(22050 / 256), 80) and embedding.shape == (192,)
    request = runtime_v1.llm_request(tokenizer, "zero_shot", "hello", prompt_text="a prompt.",
                                     prompt_speech_tokens=tokens, embedding=embedding)
    speech = list(served_lm.generate(request.text_ids, prompt_text_len=request.prompt_text_len,
                                     prompt_speech_tokens=tokens, embedding=embedding, seed=runtime_v1.SEED))
    inputs = {"target_text": np.array([["hello"]], dtype=object), "reference_text": np.array([["a prompt."]], dtype=object),
              "reference_wav": wav[None], "reference_wav_len": np.array([[len(wav)]], dtype=np.int32)}
    chunks = [r.as_numpy("waveform").reshape(-1) for r in _stream(v1_server.grpc_url, "cosyvoice", inputs)]
    _assert_audio(chunks, _expected_stream(acoustic, speech, tokens, feat, embedding, "zero-shot"))


@pytest.mark.slow
def test_sft_with_the_default_speaker_and_v2_tokens_refused_through_the_v1_bls(v1_server, v1_model_dir, served_lm,
                                                                             acoustic, tokenizer):
    """No prompt: speaker 001 of spk2info.pt (an SFT entry, embedding only) in sft mode, and the same speaker
    as the gateway sends an embedding-only one (an empty cached prompt); zero_shot without prompt speech
    and v2 tokens (>= 4096) are refused with a message naming what is wrong."""
    spk = torch.load(os.path.join(v1_model_dir, "spk2info.pt"), weights_only=True)["001"]["embedding"].numpy()[0]
    request = runtime_v1.llm_request(tokenizer, "sft", "hello", embedding=spk)
    tokens = list(served_lm.generate(request.text_ids, embedding=request.embedding, seed=runtime_v1.SEED))
    inputs = {"target_text": np.array([["hello"]], dtype=object), "mode": np.array([["sft"]], dtype=object)}
    chunks = [r.as_numpy("waveform").reshape(-1) for r in _stream(v1_server.grpc_url, "cosyvoice", inputs)]
    _assert_audio(chunks, _expected_stream(acoustic, tokens, None, None, spk, "sft"))
    inputs.update(prompt_speech_tokens=np.zeros((1, 0), np.int32), prompt_speech_feat=np.zeros((1, 0, 80), np.float16),
                  prompt_spk_embedding=spk.astype(np.float16)[None])
    request = runtime_v1.llm_request(tokenizer, "sft", "hello", embedding=spk.astype(np.float16))
    tokens = list(served_lm.generate(request.text_ids, embedding=request.embedding, seed=runtime_v1.SEED))
    chunks = [r.as_numpy("waveform").reshape(-1) for r in _stream(v1_server.grpc_url, "cosyvoice", inputs)]
    _assert_audio(chunks, _expected_stream(acoustic, tokens, None, None, spk, "sft-cached"))
    inputs["mode"] = np.array([["zero_shot"]], dtype=object)
    with pytest.raises(RuntimeError, match="only an embedding"):
        _stream(v1_server.grpc_url, "cosyvoice", inputs)
    bad = {"target_text": np.array([["hello"]], dtype=object), "reference_text": np.array([["hi"]], dtype=object),
           "prompt_speech_tokens": np.array([[6000]], dtype=np.int32),
           "prompt_speech_feat": np.zeros((1, 2, 80), dtype=np.float16),
           "prompt_spk_embedding": np.ones((1, 192), dtype=np.float16)}
    with pytest.raises(RuntimeError, match="prompt_speech_tokens: 1 of 1 are not CosyVoice1 speech tokens"):
        _stream(v1_server.grpc_url, "cosyvoice", bad)


def test_triton_repo_renders_a_v1_repository_from_the_model_dirs_recipe(v1_model_dir, tmp_path, capsys):
    """``cosyvoice-pipeline triton-repo --model_dir <CosyVoice1 dir>``: the family comes from cosyvoice.yaml
    (TransformerLM), no engine or HF export is asked for, and the repository validates; validation names a
    v1 model dir without llm.pt and a BLS that streams while its LLM does not."""
    from cosyvoice.cli import main
    from cosyvoice.triton.validate import validate_repo

    assert runtime_v1.model_family(v1_model_dir) == "cosyvoice" and runtime_v1.model_family(str(tmp_path)) == "cosyvoice2"
    out = str(tmp_path / "repo")
    assert main(["triton-repo", "--model_dir", v1_model_dir, "--out", out, "--bls_instances", "1", "--no_validate"]) == 0
    assert sorted(os.listdir(out)) == ["cosyvoice", "token2wav", "transformer_llm"]
    report = validate_repo(out)
    assert report.ok and report.problems() == [] and report.schema_ok
    assert main(["triton-repo", "--model_dir", str(tmp_path), "--out", str(tmp_path / "v2")]) == 2
    assert "needs --engine_dir, --hf_dir" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / runtime_v1.RECIPE_FILE).write_text(TINY_V1_YAML)
    config = os.path.join(out, "transformer_llm", "config.pbtxt")
    with open(config) as f:
        text = f.read()
    with open(config, "w") as f:
        f.write(text.replace(v1_model_dir, str(broken)).replace("decoupled: True", "decoupled: False"))
    errors = " ".join(validate_repo(out).errors)
    assert "decoupled differs: cosyvoice=True, transformer_llm=False" in errors
    assert "lacks ['llm.pt']" in errors


def test_a_v1_model_dir_publishes_a_versioned_v1_repository(v1_model_dir, tmp_path, capsys):
    """``triton-publish --model_dir <CosyVoice1 dir>``: the bundle is the model dir alone, served by cosyvoice +
    transformer_llm + token2wav at 22050 Hz, on the python-backend (cpu) channel."""
    from cosyvoice.cli import main
    from cosyvoice.triton import publish

    root = str(tmp_path / "triton" / "cosyvoice")
    assert main(["triton-publish", "--root", root, "--model_dir", v1_model_dir, "--load_test", "skip",
                 "--mount", "/models/cosyvoice"]) == 0, capsys.readouterr()
    assert publish.latest(root, "cpu") == 1 and publish.latest(root, "gpu") is None
    manifest = publish.read_manifest(root, 1)
    assert manifest["llm_backend"] == "python" and manifest["engine_present"] is False
    assert manifest["values"]["model_dir"] == "/models/cosyvoice/cosyvoice2_model"
    assert manifest["values"]["token2wav_sample_rate"] == "22050"
    assert manifest["validation"]["valid"] and manifest["validation"]["problems"] == []
    dest = str(tmp_path / "pulled")
    publish.pull(root, dest, channel="cpu")
    assert sorted(os.listdir(os.path.join(dest, "model_repo"))) == sorted(["cosyvoice", "transformer_llm", "token2wav"])
    assert {"cosyvoice.yaml", "llm.pt", "flow.pt", "hift.pt"} <= set(os.listdir(os.path.join(dest, "cosyvoice2_model")))


@pytest.mark.slow
def test_the_gateway_serves_instruct_from_the_v1_repository(v1_server, v1_model_dir, served_lm, acoustic, tokenizer):
    """``COSYVOICE_GATEWAY_MODEL=cosyvoice`` against the served v1 repository: ``/inference_instruct`` with
    spk2info.pt's SFT speaker streams 22.05 kHz PCM, the audio of the instruction's tokens."""
    from fastapi.testclient import TestClient

    from cosyvoice.serve.app import create_app
    from cosyvoice.serve.settings import GatewaySettings

    settings = GatewaySettings(model="cosyvoice", triton=(f"{v1_server.grpc_url}|http://{v1_server.http_url}",),
                               spk2info=os.path.join(v1_model_dir, "spk2info.pt"))
    with TestClient(create_app(settings)) as client:
        response = client.post("/inference_instruct", data={"tts_text": "Hello.", "spk_id": "001",
                                                             "instruct_text": INSTRUCTION})
    assert response.status_code == 200, response.text
    assert response.headers["x-sample-rate"] == "22050"
    spk = torch.load(os.path.join(v1_model_dir, "spk2info.pt"), weights_only=True)["001"]["embedding"].numpy()[0]
    request = runtime_v1.llm_request(tokenizer, "instruct", "Hello.", prompt_text=INSTRUCTION)
    tokens = list(served_lm.generate(request.text_ids, prompt_text_len=request.prompt_text_len, seed=runtime_v1.SEED))
    want = np.concatenate(_expected_stream(acoustic, tokens, None, None, spk, "gateway"))
    pcm = np.frombuffer(response.content, "<i2")
    assert pcm.size == want.size  # the same samples, to the int16 step (the runtime's tolerance is 5e-5)
    assert np.abs(pcm.astype(np.int32) - (np.clip(want, -1, 1) * 32767).astype("<i2")).max() <= 2
