"""cosyvoice: the CosyVoice1 BLS that turns (a voice, text) into speech with transformer_llm + token2wav.

The client protocol is cosyvoice2's (target_text, reference_text, the cached-prompt tensors, mode,
speed -> waveform). The voice is 16 kHz reference audio (tokens, mel and embedding computed here by
``runtime_v1.ReferenceFrontend`` from the dir's speech_tokenizer_v1.onnx and campplus.onnx), a cached
prompt (``prompt_speech_tokens`` 0-based v1 tokens, ``prompt_speech_feat``, ``prompt_spk_embedding``: a
registered speaker of the gateway) or, with none, speaker "001" of ``<model_dir>/spk2info.pt`` (an SFT
model's entry may hold only its ``embedding``).
``mode`` (sft, zero_shot, cross_lingual, instruct) decides what the LLM and token2wav see
(``runtime_v1.llm_request`` / ``token2wav_prompt``: upstream's v1 frontend). Text is tokenized with the
model dir's recipe tokenizer (whisper's multilingual tiktoken). Decoupled: token2wav chunks of 100
tokens + 20 lookahead as upstream CosyVoiceModel streams (``runtime_v1.ChunkSchedule``), then the rest
with ``finalize``; not decoupled: one waveform. token2wav takes speech tokens as LLM ids (+151663, its
protocol for both families).
"""

import json
import os
from contextlib import closing
from uuid import uuid4

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from cosyvoice.triton import python_backend as backend
from cosyvoice.triton import runtime, runtime_v1


class TritonPythonModel:
    def initialize(self, args):
        self.config = json.loads(args["model_config"])
        params = runtime.parameters(self.config)
        self.tokenizer = runtime_v1.text_tokenizer(params["model_dir"])
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(self.config)
        # reference audio -> prompt, when the dir has speech_tokenizer_v1.onnx and campplus.onnx
        self.reference = runtime_v1.ReferenceFrontend.from_model_dir(params["model_dir"])
        self.default_speaker = None  # (transcript, tokens or None, mel or None, embedding) of speaker "001"
        cache = os.path.join(params["model_dir"], "spk2info.pt")
        if os.path.exists(cache):
            entry = torch.load(cache, map_location="cpu", weights_only=True).get("001")
            if entry is not None:
                tokens, feat = entry.get("speech_token"), entry.get("speech_feat")
                self.default_speaker = (
                    entry.get("prompt_text", ""),
                    None if tokens is None else runtime_v1.check_speech_tokens(np.asarray(tokens), "spk2info speech_token"),
                    None if feat is None else np.asarray(feat, dtype=np.float32).reshape(-1, runtime.MEL_BINS),
                    np.asarray(entry["embedding"], dtype=np.float32).reshape(-1))

    def _voice(self, request):
        """(transcript, prompt tokens or None, mel or None, embedding [192]) of the request's voice."""
        cached = [backend.optional(request, name) for name in runtime.CACHED_PROMPT_INPUTS]
        wav = backend.optional(request, "reference_wav")
        if wav is not None:
            if any(value is not None for value in cached):
                raise ValueError("give either reference_wav or a cached prompt, not both")
            if self.reference is None:
                raise ValueError(f"reference_wav needs {runtime_v1.SPEECH_TOKENIZER_FILE} and {runtime_v1.CAMPPLUS_FILE} "
                                 "in model_dir; send a cached prompt instead")
            length = backend.optional(request, "reference_wav_len")
            if length is None:
                raise ValueError("reference_wav needs reference_wav_len")
            tokens, feat, embedding = self.reference.prompt(np.asarray(wav, dtype=np.float32)[0, : int(length.reshape(-1)[0])])
            return "", tokens, feat, embedding
        if all(value is None for value in cached):
            if self.default_speaker is None:
                raise ValueError("no cached prompt and no speaker 001 in model_dir/spk2info.pt: send "
                                 f"{', '.join(runtime.CACHED_PROMPT_INPUTS)}")
            return self.default_speaker
        if any(value is None for value in cached):
            raise ValueError(f"incomplete cached prompt: {', '.join(runtime.CACHED_PROMPT_INPUTS)} go together")
        tokens, feat, embedding = cached
        if np.asarray(tokens).size == 0:  # an embedding-only (SFT) speaker of the gateway's registry
            tokens = feat = None
        embedding = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if embedding.size != runtime_v1.SPEAKER_EMBEDDING_DIM:
            raise ValueError(f"prompt_spk_embedding: expected {runtime_v1.SPEAKER_EMBEDDING_DIM} values, got {embedding.size}")
        if tokens is None:
            return "", None, None, embedding
        return ("", runtime_v1.check_speech_tokens(tokens, "prompt_speech_tokens"),
                np.asarray(feat, dtype=np.float32).reshape(-1, runtime.MEL_BINS), embedding)

    def _llm_stream(self, llm_request):
        """0-based v1 speech tokens from transformer_llm, per response as they arrive."""
        inputs = llm_request.tensors()
        inputs["streaming"] = np.array([[self.decoupled]], dtype=np.bool_)
        inputs["random_seed"] = np.array([[runtime_v1.SEED]], dtype=np.uint64)
        return backend.llm_stream("transformer_llm", inputs, self.decoupled, "cosyvoice")

    def _token2wav(self, tokens, prompt, request_id, speed, offset=None, finalize=None):
        prompt_tokens, feat, embedding = prompt
        as_llm_ids = None if prompt_tokens is None else prompt_tokens + runtime.ORIGINAL_VOCAB_SIZE
        return backend.token2wav(np.asarray(tokens, dtype=np.int64) + runtime.ORIGINAL_VOCAB_SIZE, as_llm_ids, feat,
                                 embedding, request_id, speed=speed, offset=offset, finalize=finalize)

    def _synthesize(self, request, send):
        mode = runtime_v1.parse_mode(backend.text(request, "mode"))
        speed = runtime.parse_speed(backend.optional(request, "speed"))
        transcript, tokens, feat, embedding = self._voice(request)
        reference_text = backend.text(request, "reference_text")
        prompt_text = transcript if reference_text is None else reference_text
        if mode in ("zero_shot", "cross_lingual") and (tokens is None or feat is None):
            raise ValueError(f"mode {mode} needs a prompt with speech tokens and mel; this voice has only an embedding "
                             "(use sft or instruct)")
        llm_request = runtime_v1.llm_request(self.tokenizer, mode, backend.text(request, "target_text"), prompt_text=prompt_text,
                                             prompt_speech_tokens=tokens, embedding=embedding)
        prompt = runtime_v1.token2wav_prompt(mode, tokens, feat, embedding)
        request_id = request.request_id() or str(uuid4())
        if not self.decoupled:
            ids = [t for chunk in self._llm_stream(llm_request) for t in chunk]
            if not ids:
                raise ValueError("the LLM generated no speech tokens")
            send(self._token2wav(ids, prompt, request_id, speed))
            return
        schedule = runtime_v1.ChunkSchedule()
        ids = []
        with closing(self._llm_stream(llm_request)) as stream:
            for chunk in stream:
                if backend.cancelled(request):
                    raise backend.Cancelled(repr(request_id))
                ids.extend(chunk)
                while schedule.ready(len(ids)):
                    send(self._token2wav(ids[: schedule.chunk_end()], prompt, request_id, speed, schedule.offset, False))
                    schedule.advance()
        send(self._token2wav(ids, prompt, request_id, speed, schedule.offset, True))

    def execute(self, requests):
        return backend.serve_waveforms(requests, self.decoupled, self._synthesize, "cosyvoice")
