"""The rendered repository served by a real tritonserver (CPU, python backend) on 127.0.0.1.

``speaker_embedding`` and ``audio_tokenizer`` run the reference ONNX models and must return what
the offline extraction stage computes. ``tensorrt_llm`` is served by our HF runner behind the
identical 60-input/19-output config (``llm_backend="python"``), so the decoupled ``cosyvoice2``
BLS streams through the real Triton machinery. There is no acoustic model yet (issue: acoustic
model / token2wav): ``token2wav`` runs our real adapter with an echo runtime whose "waveform" is the
speech tokens of each chunk, so these tests stop at streamed speech tokens.
"""

from __future__ import annotations

import os
import queue
import shutil

import numpy as np
import pytest
import torch

from cosyvoice.corpus.kaldi import read_table
from cosyvoice.features import frontend
from cosyvoice.triton import runtime
from cosyvoice.triton.render import render_repo, repo_values
from cosyvoice.triton.server import TritonServer
from tests.triton.helpers import EOS1, ORIGINAL_VOCAB_SIZE, SPEECH_TOKENS

pytestmark = pytest.mark.slow
ECHO_RUNTIME = os.path.join(os.path.dirname(__file__), "helpers.py") + ":EchoToken2Wav"


@pytest.fixture(scope="module")
def server(triton_env, hf_dir, model_dir, tmp_path_factory):
    repo = str(tmp_path_factory.mktemp("served") / "model_repo")
    values = repo_values(engine_dir=hf_dir, hf_dir=hf_dir, model_dir=model_dir, bls_instances=1,
                         overrides={"token2wav_runtime": ECHO_RUNTIME})
    render_repo(repo, values, llm_backend="python")
    with TritonServer(repo, env=triton_env) as srv:
        srv.load("speaker_embedding", "audio_tokenizer", "tensorrt_llm", "token2wav", "cosyvoice2")
        assert srv.ready()
        yield srv
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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = runtime.prompt_ids(AutoTokenizer.from_pretrained(hf_dir), reference_text, target_text,
                             np.asarray(prompt_tokens) + ORIGINAL_VOCAB_SIZE)
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


def test_decoupled_bls_streams_the_llm_tokens_in_upstream_chunks(client, data_dir, hf_dir, model_dir):
    texts, wavs = read_table(data_dir, "text", joined=True), read_table(data_dir, "wav.scp")
    utt = sorted(wavs)[0]
    wav = _wav16k(wavs[utt])
    target = "the quick brown fox jumps over the lazy dog"
    inputs = [_input("reference_wav", wav[None], "FP32"),
              _input("reference_wav_len", np.array([[len(wav)]], np.int32), "INT32"),
              _input("reference_text", np.array([[texts[utt]]], dtype=object), "BYTES"),
              _input("target_text", np.array([[target]], dtype=object), "BYTES")]
    chunks, error = _stream(client, inputs, "with-reference")
    assert error is None
    expected = _expected_tokens(hf_dir, texts[utt], target, _prompt_tokens(model_dir, wav))
    assert len(expected) >= 18 + 25  # long enough for two streamed chunks before the final one
    streamed = [int(t) for c in chunks for t in c]
    assert streamed == expected and all(0 <= t < SPEECH_TOKENS for t in streamed)
    assert [len(c) for c in chunks] == _chunk_sizes(len(expected))
    assert _chunk_sizes(750) == [15, 25, 50, 100, 200, 360]  # 15 + 3 first, then 25 * 2^k, the rest last


def _chunk_sizes(total: int) -> list[int]:
    """Upstream exponential chunking of ``total`` tokens: 15 once 18 are pending, then 25, 50, ..."""
    sizes, offset, hop, k = [], 0, 15, 0
    while total - offset >= hop + 3:
        sizes.append(hop)
        offset, hop, k = offset + hop, 25 * 2 ** k, k + 1
    return sizes + [total - offset]


def test_bls_without_reference_audio_prompts_with_the_spk2info_cache(client, hf_dir, model_dir):
    missing_text = [_input("reference_wav", np.zeros((1, 16000), np.float32), "FP32"),
                    _input("reference_wav_len", np.array([[16000]], np.int32), "INT32"),
                    _input("target_text", np.array([["hello"]], dtype=object), "BYTES")]
    chunks, error = _stream(client, missing_text, "no-reference-text")
    assert chunks == [] and "reference_wav needs reference_wav_len and reference_text" in str(error)

    cached = runtime.load_spk2info(os.path.join(model_dir, "spk2info.pt"))["001"]
    target = "good morning"
    chunks, error = _stream(client, [_input("target_text", np.array([[target]], dtype=object), "BYTES")],
                            "cached-speaker", max_chunks=1)
    assert error is None and len(chunks) == 1 and len(chunks[0]) == 15
    expected = _expected_tokens(hf_dir, cached["prompt_text"], target, cached["speech_token"].reshape(-1).numpy(),
                                max_new_tokens=15)
    assert chunks[0].astype(int).tolist() == expected
