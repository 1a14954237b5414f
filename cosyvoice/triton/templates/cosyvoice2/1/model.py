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
import time
from contextlib import closing
from uuid import uuid4

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer

from cosyvoice.triton import runtime


def _check(response):
    if response.has_error():
        raise pb_utils.TritonModelException(response.error().message())
    return response


def _output(response, name):
    tensor = pb_utils.get_output_tensor_by_name(response, name)
    return None if tensor is None else tensor.as_numpy()


class _Cancelled(Exception):
    """The client cancelled a streaming request (Triton's request cancellation)."""


def _cancelled(request) -> bool:
    is_cancelled = getattr(request, "is_cancelled", None)  # python backend >= 23.10
    return bool(is_cancelled()) if is_cancelled is not None else False


#: optional inputs whose presence decides where the prompt comes from (``runtime.prompt_source``)
_OPTIONAL_INPUTS = ("reference_wav", "reference_wav_len", "reference_text", *runtime.CACHED_PROMPT_INPUTS)


def _input(request, name):
    return pb_utils.get_input_tensor_by_name(request, name).as_numpy()


def _text(request, name):
    """The first string of a TYPE_STRING input, or None when the request lacks it."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    value = tensor.as_numpy().reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


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
    def _infer(self, model, inputs, outputs, request_id=""):
        request = pb_utils.InferenceRequest(model_name=model, requested_output_names=outputs,
                                            inputs=[pb_utils.Tensor(k, v) for k, v in inputs.items()],
                                            request_id=request_id)
        return _check(request.exec())

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
        request = pb_utils.InferenceRequest(model_name="tensorrt_llm",
                                            requested_output_names=["output_ids", "sequence_length"],
                                            inputs=[pb_utils.Tensor(k, v) for k, v in inputs.items()])
        responses = request.exec(decoupled=True) if self.decoupled else [request.exec()]
        finished = False
        try:
            for response in responses:
                _check(response)
                ids, lengths = _output(response, "output_ids"), _output(response, "sequence_length")
                if ids is None:  # the empty final response of a decoupled stream
                    continue
                ids = ids[0][0][: int(lengths[0][0])].tolist()
                end = runtime.end_of_speech(ids, self.eos_id)  # an engine may return the stop token itself
                if end is not None:
                    yield ids[:end]
                    break
                yield ids
            finished = True
        finally:
            if not finished:  # abandoned (client cancelled, token2wav failed): end the LLM request too
                cancel = getattr(responses, "cancel", None)  # newer python backends can cancel a BLS stream
                if cancel is not None:
                    cancel()
                else:  # drained unvoiced: an abandoned in-flight LLM request would block the model's unload
                    try:
                        for _ in responses:
                            pass
                    except Exception as exc:  # the reason this stream was abandoned is what gets reported
                        pb_utils.Logger.log_verbose(f"cosyvoice2: draining an abandoned LLM stream: {exc}")

    def _prompt(self, request, source):
        """(speaker transcript, prompt LLM ids, mel [2T, 80], embedding [192]) of the request's voice."""
        if source == "default":
            if self.default_speaker is None:
                raise ValueError("no reference_wav, no cached prompt and no spk2info.pt in model_dir: give reference "
                                 "audio and text, or a cached prompt")
            return self.default_speaker
        if source == "cached":
            tensors = [_input(request, name) for name in runtime.CACHED_PROMPT_INPUTS]
            return ("", *runtime.cached_prompt(*tensors))
        samples = _input(request, "reference_wav").astype(np.float32)
        length = np.asarray(_input(request, "reference_wav_len")).reshape(-1)[:1].astype(np.int32)
        wav_16k = samples[0, : int(length[0])]
        tokens = _output(self._infer("audio_tokenizer", {"reference_wav": wav_16k[None], "reference_wav_len": length[None]},
                                     ["prompt_speech_tokens"]), "prompt_speech_tokens").reshape(-1)
        embedding = _output(self._infer("speaker_embedding", {"reference_wav": wav_16k[None]},
                                        ["prompt_spk_embedding"]), "prompt_spk_embedding").reshape(-1)
        tokens, feat = runtime.align_prompt(tokens, runtime.prompt_speech_feat(wav_16k))
        return "", tokens, feat, embedding.astype(np.float32)

    def _token2wav(self, ids, prompt, request_id, offset=None, finalize=None, speed=1.0):
        _, tokens, feat, embedding = prompt
        inputs = {"target_speech_tokens": np.asarray(ids, dtype=np.int32)[None],
                  "prompt_speech_tokens": tokens.astype(np.int32)[None],
                  "prompt_speech_feat": feat.astype(np.float16)[None],
                  "prompt_spk_embedding": embedding.astype(np.float16)[None]}
        if speed != 1.0:  # the mel stretched before the vocoder (token2wav)
            inputs["speed"] = np.array([[speed]], dtype=np.float32)
        if offset is not None:
            inputs["token_offset"] = np.array([[offset]], dtype=np.int32)
            inputs["finalize"] = np.array([[finalize]], dtype=np.bool_)
        return _output(self._infer("token2wav", inputs, ["waveform"], request_id), "waveform").astype(np.float32)

    # --- requests ----------------------------------------------------------------------------
    def _synthesize(self, request, send):
        mode = runtime.parse_mode(_text(request, "mode"))
        speed_tensor = pb_utils.get_input_tensor_by_name(request, "speed")
        speed = runtime.parse_speed(None if speed_tensor is None else speed_tensor.as_numpy())
        given = {name for name in _OPTIONAL_INPUTS if pb_utils.get_input_tensor_by_name(request, name) is not None}
        source = runtime.prompt_source(given, mode)
        prompt = self._prompt(request, source)
        text = runtime.llm_prompt_text(mode, source, _text(request, "reference_text"), prompt[0])
        input_ids = runtime.llm_input_ids(self.tokenizer, mode, _text(request, "target_text"), prompt_text=text,
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
                if _cancelled(request):  # the client is gone: stop spending the LLM's and token2wav's time on it
                    raise _Cancelled(repr(request_id))
                ids.extend(chunk)
                while schedule.ready(len(ids)):
                    upto = schedule.offset + schedule.hop + schedule.lookahead
                    send(self._token2wav(ids[:upto], prompt, request_id, schedule.offset, False, speed))
                    schedule.advance(len(ids))
        send(self._token2wav(ids, prompt, request_id, schedule.offset, True, speed))

    def execute(self, requests):
        responses = []
        for request in requests:
            started = time.monotonic()
            if self.decoupled:
                sender = request.get_response_sender()

                def send(wav, sender=sender):
                    sender.send(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("waveform", wav)]))
                try:
                    self._synthesize(request, send)
                    sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                except _Cancelled as stopped:
                    # its token2wav stream is released by token2wav's idle timeout
                    pb_utils.Logger.log_info(f"cosyvoice2: request {stopped} cancelled by the client; stopped")
                    try:
                        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    except Exception as exc:  # nobody is listening any more
                        pb_utils.Logger.log_verbose(f"cosyvoice2: closing cancelled request {stopped}: {exc}")
                except Exception as exc:
                    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"cosyvoice2: {exc}")),
                                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            else:
                out = []
                try:
                    self._synthesize(request, out.append)
                    responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("waveform", out[0])]))
                except Exception as exc:
                    responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"cosyvoice2: {exc}")))
            pb_utils.Logger.log_verbose(f"cosyvoice2: request done in {time.monotonic() - started:.2f} s")
        return None if self.decoupled else responses
