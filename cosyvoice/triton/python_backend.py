"""What our Triton python-backend models share: request/response helpers, the BLS's LLM stream and
request loop, and the serving loop of an LLM that answers as the ``tensorrt_llm`` model does.

The models are rendered into a repository as ``<model>/1/model.py`` and import this module from the
installed package (as they import ``cosyvoice.triton.runtime``), so one piece of code serves the
CosyVoice2 and CosyVoice1 BLS models and both CPU LLMs. It imports ``triton_python_backend_utils``,
which exists only inside ``tritonserver``; the protocol logic that can be tested without a server lives
in ``runtime`` / ``runtime_v1``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import triton_python_backend_utils as pb_utils


class Cancelled(Exception):
    """The client cancelled a streaming request (Triton's request cancellation)."""


def optional(request, name: str) -> np.ndarray | None:
    """An input's array, or None when the request lacks it."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def scalar(request, name: str, default):
    """An input's first value as a Python scalar, or ``default`` when the request lacks it."""
    value = optional(request, name)
    return default if value is None else value.reshape(-1)[0].item()


def text(request, name: str) -> str | None:
    """The first string of a TYPE_STRING input, or None when the request lacks it."""
    value = optional(request, name)
    if value is None:
        return None
    value = value.reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def cancelled(request) -> bool:
    is_cancelled = getattr(request, "is_cancelled", None)  # python backend >= 23.10
    return bool(is_cancelled()) if is_cancelled is not None else False


def check(response):
    """``response``, or the sub-model's error raised."""
    if response.has_error():
        raise pb_utils.TritonModelException(response.error().message())
    return response


def output(response, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_output_tensor_by_name(response, name)
    return None if tensor is None else tensor.as_numpy()


def infer(model: str, inputs: dict[str, np.ndarray], outputs: list[str], request_id: str = ""):
    """One BLS call of a sub-model, its error raised."""
    request = pb_utils.InferenceRequest(model_name=model, requested_output_names=outputs,
                                        inputs=[pb_utils.Tensor(k, v) for k, v in inputs.items()],
                                        request_id=request_id)
    return check(request.exec())


def ids_response(ids) -> pb_utils.InferenceResponse:
    """``output_ids`` [1, 1, n] + ``sequence_length`` [1, 1], as the tensorrt_llm model answers."""
    ids = np.asarray(ids, dtype=np.int32).reshape(1, 1, -1)
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("output_ids", ids),
        pb_utils.Tensor("sequence_length", np.array([[ids.shape[2]]], dtype=np.int32))])


# --- the BLS side ----------------------------------------------------------------------------------

def token2wav(target_ids, prompt_ids, prompt_feat, embedding, request_id: str, *, speed: float = 1.0,
              offset: int | None = None, finalize: bool | None = None) -> np.ndarray:
    """Float32 samples from the token2wav model (both families' protocol): speech tokens as LLM ids, the
    prompt's ids and mel (None for an embedding-only prompt), its embedding; ``speed`` only when not 1
    (the mel stretched before the vocoder); ``offset``/``finalize`` for a streamed chunk."""
    inputs = {"target_speech_tokens": np.asarray(target_ids, dtype=np.int32)[None]}
    if prompt_ids is not None and prompt_feat is not None:
        inputs["prompt_speech_tokens"] = np.asarray(prompt_ids).astype(np.int32)[None]
        inputs["prompt_speech_feat"] = np.asarray(prompt_feat).astype(np.float16)[None]
    inputs["prompt_spk_embedding"] = np.asarray(embedding).astype(np.float16)[None]
    if speed != 1.0:
        inputs["speed"] = np.array([[speed]], dtype=np.float32)
    if offset is not None:
        inputs["token_offset"] = np.array([[offset]], dtype=np.int32)
        inputs["finalize"] = np.array([[finalize]], dtype=np.bool_)
    return output(infer("token2wav", inputs, ["waveform"], request_id), "waveform").astype(np.float32)


def llm_stream(model: str, inputs: dict[str, np.ndarray], decoupled: bool, who: str) -> Iterator[list[int]]:
    """The ids of an LLM model's responses (``output_ids`` cut at ``sequence_length``), per response as
    they arrive. Closed early (the client cancelled, token2wav failed, the caller stopped at its end
    token), the LLM request is ended too."""
    request = pb_utils.InferenceRequest(model_name=model, requested_output_names=["output_ids", "sequence_length"],
                                        inputs=[pb_utils.Tensor(k, v) for k, v in inputs.items()])
    responses = request.exec(decoupled=True) if decoupled else [request.exec()]
    finished = False
    try:
        for response in responses:
            check(response)
            ids, lengths = output(response, "output_ids"), output(response, "sequence_length")
            if ids is None:  # the empty final response of a decoupled stream
                continue
            yield ids[0][0][: int(lengths[0][0])].tolist()
        finished = True
    finally:
        if not finished:
            cancel = getattr(responses, "cancel", None)  # newer python backends can cancel a BLS stream
            if cancel is not None:
                cancel()
            else:  # drained unvoiced: an abandoned in-flight LLM request would block the model's unload
                try:
                    for _ in responses:
                        pass
                except Exception as exc:  # the reason this stream was abandoned is what gets reported
                    pb_utils.Logger.log_verbose(f"{who}: draining an abandoned LLM stream: {exc}")


def serve_waveforms(requests, decoupled: bool, synthesize: Callable, who: str):
    """A BLS's ``execute``: ``synthesize(request, send)`` sends each waveform of a request. Decoupled, each
    one is a response and an error or a cancellation ends the request's stream; otherwise the one
    waveform (or the error) is the request's response. Returns what ``execute`` returns."""
    responses = []
    for request in requests:
        started = time.monotonic()
        if decoupled:
            sender = request.get_response_sender()

            def send(wav, sender=sender):
                sender.send(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("waveform", wav)]))
            try:
                synthesize(request, send)
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Cancelled as stopped:
                # its token2wav stream is released by token2wav's idle timeout
                pb_utils.Logger.log_info(f"{who}: request {stopped} cancelled by the client; stopped")
                try:
                    sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                except Exception as exc:  # nobody is listening any more
                    pb_utils.Logger.log_verbose(f"{who}: closing cancelled request {stopped}: {exc}")
            except Exception as exc:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{who}: {exc}")),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        else:
            out = []
            try:
                synthesize(request, out.append)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("waveform", out[0])]))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{who}: {exc}")))
        pb_utils.Logger.log_verbose(f"{who}: request done in {time.monotonic() - started:.2f} s")
    return None if decoupled else responses


# --- the LLM side ----------------------------------------------------------------------------------

class TokenServer:
    """``execute``/``finalize`` of a python-backend LLM that answers as the tensorrt_llm model does.

    Decoupled: each request is served on its own thread; with ``streaming`` one response per token as
    it is sampled (stopping when the caller cancels), then an empty final response; otherwise one
    response with every id. A subclass sets ``decoupled``, ``threads`` (a list), ``who`` (the name its
    errors carry) and implements ``_generate``; ``lock``, when set, is held while a request samples.
    """

    who = "llm"
    decoupled: bool
    threads: list[threading.Thread]
    lock: threading.Lock | None = None

    def _generate(self, request) -> tuple[Iterator[int], list[int]]:
        """(the generated tokens, the ids to put before them in a non-streamed answer)."""
        raise NotImplementedError

    def _exclusive(self):
        return contextlib.nullcontext() if self.lock is None else self.lock

    def _whole(self, request) -> pb_utils.InferenceResponse:
        tokens, prefix = self._generate(request)
        with self._exclusive():
            out = list(tokens)
        return ids_response(prefix + out)

    def _serve_stream(self, request) -> None:
        sender = request.get_response_sender()
        try:
            if bool(scalar(request, "streaming", False)):
                tokens, _ = self._generate(request)
                with self._exclusive():
                    for token in tokens:
                        if cancelled(request):  # the BLS abandoned the stream: stop sampling for it
                            tokens.close()
                            break
                        sender.send(ids_response([token]))
            else:
                sender.send(self._whole(request))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as exc:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.who}: {exc}")),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def execute(self, requests):
        if self.decoupled:
            for request in requests:
                thread = threading.Thread(target=self._serve_stream, args=(request,), daemon=True)
                thread.start()
                self.threads.append(thread)
            self.threads = [t for t in self.threads if t.is_alive()]
            return None
        responses = []
        for request in requests:
            try:
                responses.append(self._whole(request))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.who}: {exc}")))
        return responses

    def finalize(self) -> None:
        for thread in self.threads:
            thread.join(timeout=30)
