"""cosyvoice2: the BLS that turns (a prompt voice + text, target text) into speech.

Per request the prompt (the voice) is one of: reference audio (16 kHz ``reference_wav``), whose
speech tokens / speaker embedding come from ``audio_tokenizer`` / ``speaker_embedding`` and whose
flow-prompt mel is computed here; a cached prompt (``prompt_speech_tokens``, ``prompt_speech_feat``,
``prompt_spk_embedding``: what those models computed before, e.g. by the gateway's registry); or,
with neither, speaker "001" of ``<model_dir>/spk2info.pt``. ``mode`` decides what ``tensorrt_llm``
sees (``runtime.llm_input_ids``): zero_shot ``<|sos|>`` + reference text + target text +
``<|task_id|>`` + prompt tokens, cross_lingual without the prompt text and tokens, instruct2 with the
instruction (``reference_text``) instead of a transcript and no prompt tokens. ``token2wav`` always
gets the whole prompt, and ``speed`` (0.25-4.0, optional) when it is not 1. Decoupled: chunks stream out as the LLM produces tokens
(``runtime.ChunkSchedule``: first after 15 + 3 tokens, then 25, 50, 100, ... or time based), the
last one with ``finalize``. Not decoupled: one waveform per request.
"""

import json
import os
from contextlib import closing
from uuid import uuid4

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer

from cosyvoice.triton import python_backend as backend
from cosyvoice.triton import runtime

#: optional inputs whose presence decides where the prompt comes from (``runtime.prompt_source``)
_OPTIONAL_INPUTS = ("reference_wav", "reference_wav_len", "reference_text", *runtime.CACHED_PROMPT_INPUTS)


class TritonPythonModel:
    def initialize(self, args):
        self.config = json.loads(args["model_config"])
        params = runtime.parameters(self.config)
        self.strategy = params.get("dynamic_chunk_strategy", "exponential")
        runtime.ChunkSchedule(self.strategy)  # fail at load time on a bad strategy
        self.tokenizer = AutoTokenizer.from_pretrained(params["llm_tokenizer_dir"])
        self.eos_id = self.tokenizer.convert_tokens_to_ids("<|eos1|>")
        if self.eos_id is None or self.eos_id == self.tokenizer.unk_token_id:
            raise RuntimeError(f"{params['llm_tokenizer_dir']}: no <|eos1|> token (not a CosyVoice2 HF export)")
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(self.config)
        # speech-only logits (non-speech ids impossible), sent with every LLM request when the export has it
        self.embedding_bias = runtime.load_embedding_bias(params["llm_tokenizer_dir"])
        cache = os.path.join(params["model_dir"], "spk2info.pt")
        self.default_speaker = None  # (transcript, prompt LLM ids, mel, embedding) of speaker "001"
        if os.path.exists(cache):
            spk = runtime.load_spk2info(cache)["001"]
            self.default_speaker = (spk["prompt_text"], *runtime.cached_prompt(spk["speech_token"], spk["speech_feat"],
                                                                                 spk["embedding"]))

    # --- sub-models --------------------------------------------------------------------------
    def _llm_stream(self, input_ids):
        """Speech ids from tensorrt_llm, yielded per response as they arrive."""
        sampling = runtime.SAMPLING
        inputs = {
            "input_ids": input_ids.astype(np.int32),
            "input_lengths": np.array([[input_ids.shape[1]]], dtype=np.int32),
            "request_output_len": np.array([[runtime.MAX_NEW_TOKENS]], dtype=np.int32),
            "end_id": np.array([[self.eos_id]], dtype=np.int32),
            "pad_id": np.array([[self.eos_id]], dtype=np.int32),
            "streaming": np.array([[self.decoupled]], dtype=np.bool_),
            "runtime_top_p": np.array([[sampling["top_p"]]], dtype=np.float32),
            "runtime_top_k": np.array([[sampling["top_k"]]], dtype=np.int32),
            "temperature": np.array([[sampling["temperature"]]], dtype=np.float32),
            "repetition_penalty": np.array([[sampling["repetition_penalty"]]], dtype=np.float32),
            "random_seed": np.array([[sampling["seed"]]], dtype=np.uint64),
            "stop_words_list": runtime.stop_words_list(self.eos_id),
        }
        if self.embedding_bias is not None:
            inputs["embedding_bias"] = self.embedding_bias[None, :]
        with closing(backend.llm_stream("tensorrt_llm", inputs, self.decoupled, "cosyvoice2")) as responses:
            for ids in responses:
                end = runtime.end_of_speech(ids, self.eos_id)  # an engine may return the stop token itself
                if end is not None:
                    yield ids[:end]
                    return  # closing the stream ends the LLM request
                yield ids

    def _prompt(self, request, source):
        """(speaker transcript, prompt LLM ids, mel [2T, 80], embedding [192]) of the request's voice."""
        if source == "default":
            if self.default_speaker is None:
                raise ValueError("no reference_wav, no cached prompt and no spk2info.pt in model_dir: give reference "
                                 "audio and text, or a cached prompt")
            return self.default_speaker
        if source == "cached":
            tensors = [backend.optional(request, name) for name in runtime.CACHED_PROMPT_INPUTS]
            return ("", *runtime.cached_prompt(*tensors))
        samples = backend.optional(request, "reference_wav").astype(np.float32)
        length = np.asarray(backend.optional(request, "reference_wav_len")).reshape(-1)[:1].astype(np.int32)
        wav_16k = samples[0, : int(length[0])]
        tokens = backend.output(backend.infer("audio_tokenizer", {"reference_wav": wav_16k[None],
                                                                  "reference_wav_len": length[None]},
                                              ["prompt_speech_tokens"]), "prompt_speech_tokens").reshape(-1)
        embedding = backend.output(backend.infer("speaker_embedding", {"reference_wav": wav_16k[None]},
                                                 ["prompt_spk_embedding"]), "prompt_spk_embedding").reshape(-1)
        tokens, feat = runtime.align_prompt(tokens, runtime.prompt_speech_feat(wav_16k))
        return "", tokens, feat, embedding.astype(np.float32)

    def _token2wav(self, ids, prompt, request_id, offset=None, finalize=None, speed=1.0):
        _, tokens, feat, embedding = prompt
        return backend.token2wav(ids, tokens, feat, embedding, request_id, speed=speed, offset=offset,
                                 finalize=finalize)

    # --- requests ----------------------------------------------------------------------------
    def _synthesize(self, request, send):
        mode = runtime.parse_mode(backend.text(request, "mode"))
        speed = runtime.parse_speed(backend.optional(request, "speed"))
        given = {name for name in _OPTIONAL_INPUTS if pb_utils.get_input_tensor_by_name(request, name) is not None}
        source = runtime.prompt_source(given, mode)
        prompt = self._prompt(request, source)
        text = runtime.llm_prompt_text(mode, source, backend.text(request, "reference_text"), prompt[0])
        input_ids = runtime.llm_input_ids(self.tokenizer, mode, backend.text(request, "target_text"), prompt_text=text,
                                          prompt_tokens=prompt[1])
        request_id = request.request_id() or str(uuid4())
        if not self.decoupled:
            ids = [i for chunk in self._llm_stream(input_ids) for i in chunk]
            if not ids:
                raise ValueError("the LLM generated no speech tokens")
            send(self._token2wav(ids, prompt, request_id, speed=speed))
            return
        schedule = runtime.ChunkSchedule(self.strategy)
        ids = []
        with closing(self._llm_stream(input_ids)) as stream:
            for chunk in stream:
                if backend.cancelled(request):  # the client is gone: stop spending the LLM's and token2wav's time
                    raise backend.Cancelled(repr(request_id))
                ids.extend(chunk)
                while schedule.ready(len(ids)):
                    upto = schedule.offset + schedule.hop + schedule.lookahead
                    send(self._token2wav(ids[:upto], prompt, request_id, schedule.offset, False, speed))
                    schedule.advance(len(ids))
        send(self._token2wav(ids, prompt, request_id, schedule.offset, True, speed))

    def execute(self, requests):
        return backend.serve_waveforms(requests, self.decoupled, self._synthesize, "cosyvoice2")
