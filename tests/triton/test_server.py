"""The rendered repository served by a real tritonserver (CPU, python backend) on 127.0.0.1, end to end.

``speaker_embedding`` and ``audio_tokenizer`` run the reference ONNX models and must return what
the offline extraction stage computes. ``tensorrt_llm`` is served by our HF runner behind the
identical 60-input/19-output config (``llm_backend="python"``), so the ``cosyvoice2`` BLS streams
through the real Triton machinery; ``token2wav`` runs the default acoustic runtime
(``cosyvoice.acoustic.token2wav:Token2Wav``) on the tiny reference ``flow.pt``/``hift.pt``. Text
goes in, 24 kHz audio comes out: streamed by the decoupled repository, in one piece by a
non-decoupled one, each equal to what the library computes for the LLM's tokens (vocoder noise
seeded by the ``token2wav_seed`` parameter), and the stream close to the offline waveform.
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
import time

import numpy as np
import pytest
import torch

from cosyvoice.corpus.kaldi import read_table
from cosyvoice.features import frontend
from cosyvoice.triton import runtime
from cosyvoice.triton.render import render_repo, repo_values
from cosyvoice.triton.server import TritonServer
from tests.support.tritonserver import stop_servers
from tests.triton.conftest import ONE_THREAD
from tests.triton.helpers import EOS1, ORIGINAL_VOCAB_SIZE

pytestmark = pytest.mark.slow
ALL_MODELS = ("speaker_embedding", "audio_tokenizer", "tensorrt_llm", "token2wav", "cosyvoice2")
SEED = 1234  # token2wav_seed: every token2wav call's vocoder noise, reproducible in the library
SAMPLES_PER_TOKEN = 2 * 480  # 2 mel frames per speech token, 480 samples (24 kHz) per frame
HELD_BACK = 3840  # samples a non-final chunk holds back for the cross-fade with the next one
#: documented tolerance (docs): relative RMS difference of the concatenated stream to the offline
#: waveform with seeded vocoder noise (chunk-causal flow, per-chunk noise, cross-fades)
STREAM_REL_RMS = 0.25
TARGET_TEXT = "the quick brown fox jumps over the lazy dog"


def _serve(triton_env, hf_dir, model_dir, out, *, decoupled):
    values = repo_values(engine_dir=hf_dir, hf_dir=hf_dir, model_dir=model_dir, bls_instances=1, decoupled=decoupled,
                         overrides={"token2wav_seed": str(SEED), "token2wav_device": "cpu"})
    render_repo(out, values, llm_backend="python")
    # one OpenMP thread per served model: thread pools of the python models contend on the suite's 2 cores
    return TritonServer(out, env=triton_env, extra_env=ONE_THREAD)


@pytest.fixture(scope="module")
def server(triton_env, hf_dir, model_dir, tmp_path_factory):
    """The decoupled (streaming) repository, as published."""
    srv = _serve(triton_env, hf_dir, model_dir, str(tmp_path_factory.mktemp("served") / "model_repo"),
                 decoupled=True).start()
    try:
        srv.load(*ALL_MODELS)
        assert srv.ready()
        yield srv
    finally:
        stop_servers([srv])  # not waiting out a lingering backend stub (tests/support/tritonserver.py)
    assert srv.process is None


@pytest.fixture(scope="module")
def client(server):
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(server.grpc_url)


def _input(name, array, dtype):
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def _wav16k(path):
    audio, rate = frontend.load_audio(path)
    return frontend.mono_16k(audio, rate)[0].numpy().astype(np.float32)


def _stream(client, inputs, request_id, max_chunks=None):
    """Chunks of one decoupled cosyvoice2 request (gRPC stream) and the error, if any."""
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    chunks, error = [], None
    try:
        client.async_stream_infer("cosyvoice2", inputs, request_id=request_id, enable_empty_final_response=True)
        while max_chunks is None or len(chunks) < max_chunks:
            result, error = results.get(timeout=300)
            if error is not None:
                break
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
            chunks.append(result.as_numpy("waveform").reshape(-1))
    finally:
        client.stop_stream(cancel_requests=max_chunks is not None)
    return chunks, error


def _expected_tokens(hf_dir, reference_text, target_text, prompt_tokens, max_new_tokens=runtime.MAX_NEW_TOKENS):
    from transformers import AutoTokenizer

    ids = runtime.prompt_ids(AutoTokenizer.from_pretrained(hf_dir), reference_text, target_text,
                             np.asarray(prompt_tokens) + ORIGINAL_VOCAB_SIZE)
    return _sampled_tokens(hf_dir, ids, max_new_tokens)


def _sampled_tokens(hf_dir, ids, max_new_tokens=runtime.MAX_NEW_TOKENS):
    """The speech tokens (0-based) the LLM stand-in samples after the input ids ``ids`` [1, L]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    s = runtime.SAMPLING
    bias = runtime.load_embedding_bias(hf_dir)
    assert bias is not None  # the export makes non-speech ids impossible; the BLS must send it
    out = runtime.sample_stream(model, torch.from_numpy(ids.astype(np.int64)), max_new_tokens=max_new_tokens,
                                end_id=EOS1, temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"],
                                repetition_penalty=s["repetition_penalty"], seed=s["seed"],
                                embedding_bias=torch.from_numpy(bias))
    return [t - ORIGINAL_VOCAB_SIZE for t in out]


def test_speaker_embedding_and_audio_tokenizer_equal_the_offline_extraction(client, data_dir, model_dir, tmp_path):
    from cosyvoice.features.stages import extract_embedding, extract_speech_token

    work = str(tmp_path / "data")
    shutil.copytree(data_dir, work)
    embeddings = extract_embedding(work, os.path.join(model_dir, "campplus.onnx"), num_workers=1).results
    tokens = extract_speech_token(work, os.path.join(model_dir, "speech_tokenizer_v2.onnx"), num_workers=1).results
    wavs = read_table(work, "wav.scp")
    utts = sorted(wavs)[:4]
    for utt in utts:
        wav = _wav16k(wavs[utt])[None]
        result = client.infer("speaker_embedding", [_input("reference_wav", wav, "FP32")])
        vector = result.as_numpy("prompt_spk_embedding")
        assert vector.dtype == np.float16 and vector.shape == (1, 192)
        np.testing.assert_array_equal(vector[0], np.asarray(embeddings[utt], dtype=np.float32).astype(np.float16))
        result = client.infer("audio_tokenizer", [_input("reference_wav", wav, "FP32"),
                                                  _input("reference_wav_len", np.array([[wav.shape[1]]], np.int32), "INT32")])
        ids = result.as_numpy("prompt_speech_tokens")
        assert ids.dtype == np.int32 and len(tokens[utt]) > 0
        assert (ids[0] - ORIGINAL_VOCAB_SIZE).tolist() == tokens[utt]


def _prompt_tokens(model_dir, wav):
    """What the BLS puts after the text: audio_tokenizer tokens trimmed to the 24 kHz prompt mel (1 : 2)."""
    session = runtime.onnx_session(os.path.join(model_dir, "speech_tokenizer_v2.onnx"))
    tokens, feat = runtime.align_prompt(runtime.speech_tokens(session, wav), runtime.prompt_speech_feat(wav))
    assert len(feat) == 2 * len(tokens) > 0
    return tokens


@pytest.fixture(scope="module")
def utterance(data_dir):
    """Reference audio (16 kHz) and its transcript: the prompt of the end-to-end requests."""
    texts, wavs = read_table(data_dir, "text", joined=True), read_table(data_dir, "wav.scp")
    utt = sorted(wavs)[0]
    return _wav16k(wavs[utt]), texts[utt]


def _reference_inputs(wav, text, target=TARGET_TEXT):
    return [_input("reference_wav", wav[None], "FP32"),
            _input("reference_wav_len", np.array([[len(wav)]], np.int32), "INT32"),
            _input("reference_text", np.array([[text]], dtype=object), "BYTES"),
            _input("target_text", np.array([[target]], dtype=object), "BYTES")]


@pytest.fixture(scope="module")
def expected_tokens(utterance, hf_dir, model_dir):
    """The speech tokens the LLM stand-in generates for the request (what token2wav must voice)."""
    wav, text = utterance
    tokens = _expected_tokens(hf_dir, text, TARGET_TEXT, _prompt_tokens(model_dir, wav))
    assert len(tokens) >= 18 + 25  # long enough for two streamed chunks before the final one
    return tokens


@pytest.fixture(scope="module")
def library(utterance, model_dir):
    """The acoustic runtime in this process, seeded like the served one, with the prompt the BLS
    sends token2wav (prompt tokens aligned 1 : 2 to the 24 kHz mel, mel and embedding as FP16)."""
    from cosyvoice.acoustic.token2wav import Token2Wav

    wav, _ = utterance
    tokens = _prompt_tokens(model_dir, wav)
    feat = runtime.align_prompt(tokens, runtime.prompt_speech_feat(wav))[1]
    campplus = runtime.onnx_session(os.path.join(model_dir, "campplus.onnx"))
    embedding = runtime.speaker_embedding(campplus, wav)
    prompt = (tokens, feat.astype(np.float16).astype(np.float32), embedding.astype(np.float16).astype(np.float32))
    return Token2Wav(model_dir, seed=SEED, device="cpu"), prompt


@pytest.fixture(scope="module")
def streamed(client, utterance):
    chunks, error = _stream(client, _reference_inputs(*utterance), "with-reference")
    assert error is None
    return chunks


@pytest.fixture(scope="module")
def offline(triton_env, hf_dir, model_dir, tmp_path_factory, utterance):
    """The waveform of the same request from the same models, not decoupled (one waveform per
    request). That server is stopped in the background as soon as it answered (stopping waits
    for its backend stubs; the other tests run meanwhile)."""
    import tritonclient.grpc as grpcclient

    srv = _serve(triton_env, hf_dir, model_dir, str(tmp_path_factory.mktemp("served_offline") / "model_repo"),
                 decoupled=False)
    with srv:
        srv.load(*ALL_MODELS)
        client = grpcclient.InferenceServerClient(srv.grpc_url)
        assert not client.get_model_config("cosyvoice2").config.model_transaction_policy.decoupled
        result = client.infer("cosyvoice2", _reference_inputs(*utterance), client_timeout=600)
        stopping = threading.Thread(target=stop_servers, args=([srv],), name="stop-offline-tritonserver")
        stopping.start()
        yield result.as_numpy("waveform").reshape(-1)
        stopping.join()
    assert srv.process is None


def _is_audio(wav):
    return wav.dtype == np.float32 and bool(np.isfinite(wav).all()) and float(np.abs(wav).max()) <= 0.99


def test_the_served_rate_is_24_khz(client):
    config = client.get_model_config("token2wav").config
    assert config.parameters["sample_rate"].string_value == "24000"  # the model refuses a runtime producing another
    assert config.parameters["seed"].string_value == str(SEED)


def test_decoupled_bls_streams_the_speech_of_the_llm_tokens_in_upstream_chunks(streamed, expected_tokens, library):
    sizes = _chunk_sizes(len(expected_tokens))
    assert len(streamed) == len(sizes) >= 3
    # chunk k voices its tokens; the first holds back the cross-fade tail, the final one releases it
    lengths = [SAMPLES_PER_TOKEN * n for n in sizes]
    lengths[0] -= HELD_BACK
    lengths[-1] += HELD_BACK
    assert [len(c) for c in streamed] == lengths
    assert sum(lengths) == SAMPLES_PER_TOKEN * len(expected_tokens)
    assert all(_is_audio(c) for c in streamed)
    # the audio of exactly the LLM's tokens, cut where the BLS cut them: the library's stream, chunk by chunk
    runtime_, prompt = library
    ends = list(np.cumsum(sizes[:-1]))
    local = list(runtime_.stream(np.asarray(expected_tokens), *prompt, ends=ends))
    for k, (got, want) in enumerate(zip(streamed, local)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=f"chunk {k}")
    assert _chunk_sizes(750) == [15, 25, 50, 100, 200, 360]  # 15 + 3 first, then 25 * 2^k, the rest last


def test_offline_bls_returns_the_utterance_and_the_stream_agrees_with_it(offline, streamed, expected_tokens, library,
                                                                        record_property):
    n = len(expected_tokens)
    assert len(offline) == SAMPLES_PER_TOKEN * n and _is_audio(offline)
    runtime_, prompt = library
    np.testing.assert_allclose(offline, runtime_.synthesize(np.asarray(expected_tokens), *prompt), rtol=0, atol=1e-5)
    joined = np.concatenate(streamed)
    assert len(joined) == len(offline)
    rel_rms = float(np.sqrt(np.mean((joined - offline) ** 2)) / np.sqrt(np.mean(offline ** 2)))
    record_property("stream_vs_offline_rel_rms", rel_rms)
    print(f"stream vs offline: relative RMS {rel_rms:.4f} over {n} tokens, {len(streamed)} chunks")
    assert rel_rms <= STREAM_REL_RMS


def _chunk_sizes(total: int) -> list[int]:
    """Upstream exponential chunking of ``total`` tokens: 15 once 18 are pending, then 25, 50, ..."""
    sizes, offset, hop, k = [], 0, 15, 0
    while total - offset >= hop + 3:
        sizes.append(hop)
        offset, hop, k = offset + hop, 25 * 2 ** k, k + 1
    return sizes + [total - offset]


def test_bls_without_reference_audio_prompts_with_the_spk2info_cache(client, hf_dir, model_dir):
    from cosyvoice.acoustic.token2wav import Token2Wav

    missing_text = [_input("reference_wav", np.zeros((1, 16000), np.float32), "FP32"),
                    _input("reference_wav_len", np.array([[16000]], np.int32), "INT32"),
                    _input("target_text", np.array([["hello"]], dtype=object), "BYTES")]
    chunks, error = _stream(client, missing_text, "no-reference-text")
    assert chunks == [] and "reference_wav needs reference_wav_len and reference_text" in str(error)

    cached = runtime.load_spk2info(os.path.join(model_dir, "spk2info.pt"))["001"]
    target = "good morning"
    chunks, error = _stream(client, [_input("target_text", np.array([[target]], dtype=object), "BYTES")],
                            "cached-speaker", max_chunks=1)  # then cancelled: the server releases the stream
    assert error is None and len(chunks) == 1 and len(chunks[0]) == SAMPLES_PER_TOKEN * 15 - HELD_BACK
    expected = _expected_tokens(hf_dir, cached["prompt_text"], target, cached["speech_token"].reshape(-1).numpy(),
                                max_new_tokens=18)
    prompt = (cached["speech_token"].reshape(-1).numpy(),
              cached["speech_feat"].reshape(-1, 80).numpy().astype(np.float16).astype(np.float32),
              cached["embedding"].reshape(-1).numpy().astype(np.float16).astype(np.float32))
    first = Token2Wav(model_dir, seed=SEED, device="cpu").synthesize(
        np.asarray(expected), *prompt, token_offset=0, finalize=False, request_id="first")
    np.testing.assert_allclose(chunks[0], first, rtol=0, atol=1e-5)


# --- cached prompts and modes (what the gateway sends) -----------------------------------------

@pytest.fixture(scope="module")
def cached_prompt(client, utterance):
    """The reference request's prompt as the gateway's registry caches it: the server's own
    audio_tokenizer (0-based) and speaker_embedding outputs, and the 24 kHz mel, aligned 1 : 2."""
    wav, _ = utterance
    ids = client.infer("audio_tokenizer", [_input("reference_wav", wav[None], "FP32"),
                                           _input("reference_wav_len", np.array([[len(wav)]], np.int32), "INT32")])
    embedding = client.infer("speaker_embedding", [_input("reference_wav", wav[None], "FP32")])
    tokens, feat = runtime.align_prompt(ids.as_numpy("prompt_speech_tokens").reshape(-1) - ORIGINAL_VOCAB_SIZE,
                                        runtime.prompt_speech_feat(wav))
    return tokens.astype(np.int32), feat.astype(np.float16), embedding.as_numpy("prompt_spk_embedding").reshape(-1)


def _cached_inputs(prompt, text, target=TARGET_TEXT, mode=None):
    tokens, feat, embedding = prompt
    inputs = [_input("prompt_speech_tokens", tokens[None], "INT32"), _input("prompt_speech_feat", feat[None], "FP16"),
              _input("prompt_spk_embedding", embedding[None], "FP16"),
              _input("target_text", np.array([[target]], dtype=object), "BYTES")]
    if text is not None:
        inputs.append(_input("reference_text", np.array([[text]], dtype=object), "BYTES"))
    if mode is not None:
        inputs.append(_input("mode", np.array([[mode]], dtype=object), "BYTES"))
    return inputs


def test_a_cached_prompt_streams_the_same_audio_as_its_reference_audio(server, client, cached_prompt, utterance,
                                                                         streamed):
    # the first 3 chunks (90 of the 750 tokens), then cancelled: the prompt is constant over a request,
    # so a prefix tells as much as the whole stream, for a fraction of the CPU time
    chunks, error = _stream(client, _cached_inputs(cached_prompt, utterance[1], mode="zero_shot"), "cached-prompt",
                            max_chunks=3)
    assert error is None and len(chunks) == 3
    for k, (got, want) in enumerate(zip(chunks, streamed)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=f"chunk {k}")
    _wait_for_log(server, "cosyvoice2: request 'cached-prompt' cancelled by the client; stopped")


def _wait_for_log(server, line, timeout=60.0):
    """``line`` appears in the server log within ``timeout`` s (e.g. the BLS stopped voicing a
    cancelled stream at the LLM's next token instead of voicing all 750)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(server.log_path, errors="replace") as f:
            if line in f.read():
                return
        time.sleep(0.2)
    raise AssertionError(f"no {line!r} in the server log:\n{server.log_tail()}")


def _first_chunk(library, hf_dir, ids):
    """The first streamed chunk the LLM input ``ids`` should give with the reference voice: the
    library's token2wav on the first 15 + 3 sampled tokens."""
    runtime_, prompt = library
    tokens = _sampled_tokens(hf_dir, ids, max_new_tokens=18)
    first = runtime_.synthesize(np.asarray(tokens), *prompt, token_offset=0, finalize=False, request_id=str(ids.sum()))
    return tokens, first


def test_cross_lingual_voices_the_target_text_without_the_prompt_text_and_tokens(client, utterance, hf_dir,
                                                                                 expected_tokens, library):
    from transformers import AutoTokenizer

    wav, _ = utterance  # reference audio for the voice; no transcript needed in this mode
    ids = runtime.llm_input_ids(AutoTokenizer.from_pretrained(hf_dir), "cross_lingual", TARGET_TEXT)
    inputs = [_input("reference_wav", wav[None], "FP32"),
              _input("reference_wav_len", np.array([[len(wav)]], np.int32), "INT32"),
              _input("target_text", np.array([[TARGET_TEXT]], dtype=object), "BYTES"),
              _input("mode", np.array([["cross_lingual"]], dtype=object), "BYTES")]
    chunks, error = _stream(client, inputs, "cross-lingual", max_chunks=1)  # then cancelled
    assert error is None and len(chunks) == 1 and len(chunks[0]) == SAMPLES_PER_TOKEN * 15 - HELD_BACK
    # the tiny random LLM never ends before 750 tokens, whatever it saw: the first tokens' audio tells the prompts apart
    tokens, first = _first_chunk(library, hf_dir, ids)
    assert tokens != expected_tokens[:18]
    np.testing.assert_allclose(chunks[0], first, rtol=0, atol=1e-5)


def test_instruct2_follows_the_instruction_and_bad_requests_get_an_error_response(client, cached_prompt, utterance,
                                                                                   hf_dir, library, expected_tokens):
    from transformers import AutoTokenizer

    for inputs, message in [
        (_cached_inputs(cached_prompt, utterance[1], mode="instruct"), "mode 'instruct': expected one of zero_shot"),
        (_cached_inputs(cached_prompt, None, mode="instruct2"), "mode instruct2 needs the instruction in reference_text"),
        (_cached_inputs(cached_prompt[:2] + (np.zeros(80, np.float16),), "x"), "prompt_spk_embedding: expected [1, 192]"),
        (_cached_inputs(cached_prompt, "x") + [_input("reference_wav", utterance[0][None], "FP32")],
         "give either reference_wav or a cached prompt"),
    ]:
        chunks, error = _stream(client, inputs, "refused")
        assert chunks == [] and message in str(error)

    instruction = "speak slowly and softly."
    chunks, error = _stream(client, _cached_inputs(cached_prompt, instruction, mode="instruct2"), "instruct2",
                            max_chunks=1)  # then cancelled
    assert error is None and len(chunks) == 1
    ids = runtime.llm_input_ids(AutoTokenizer.from_pretrained(hf_dir), "instruct2", TARGET_TEXT, prompt_text=instruction)
    tokens, first = _first_chunk(library, hf_dir, ids)
    assert tokens != expected_tokens[:18]
    np.testing.assert_allclose(chunks[0], first, rtol=0, atol=1e-5)  # the instruction's tokens in the prompt's voice


def test_speed_reaches_token2wav_and_a_bad_speed_is_an_error_response(client, cached_prompt, utterance, library,
                                                                      expected_tokens):
    """The BLS passes ``speed`` to token2wav: the first chunk of a speed-2 request is the library's
    chunk of the same tokens at speed 2 (half the frames); an out-of-range speed is refused."""
    speed = [_input("speed", np.array([[2.0]], np.float32), "FP32")]
    chunks, error = _stream(client, _cached_inputs(cached_prompt, utterance[1]) + speed, "fast", max_chunks=1)
    assert error is None and len(chunks) == 1
    runtime_, prompt = library
    first = runtime_.synthesize(np.asarray(expected_tokens[:18]), *prompt, token_offset=0, finalize=False,
                                request_id="fast-library", speed=2.0)
    assert len(first) == 15 * 480 - HELD_BACK  # 30 mel frames of 15 tokens at speed 2 -> 15 frames
    np.testing.assert_allclose(chunks[0], first, rtol=0, atol=1e-5)
    bad = [_input("speed", np.array([[9.0]], np.float32), "FP32")]
    chunks, error = _stream(client, _cached_inputs(cached_prompt, utterance[1]) + bad, "too-fast")
    assert chunks == [] and "speed must be within 0.25-4.0" in str(error)

