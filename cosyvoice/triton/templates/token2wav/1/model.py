"""token2wav: LLM speech ids -> waveform (24 kHz, 22.05 kHz for CosyVoice1), offline or streamed per request id.

This adapter owns the Triton protocol (optional prompt inputs, the 151663 id offset,
``token_offset``/``finalize`` streaming, per-request cache release). The acoustic model itself
(flow matching + HiFT on ``model_dir``'s ``flow.pt``/``hift.pt``) is a runtime object made by a
factory named by the ``token2wav_runtime`` parameter ("module:attribute" or
"/path/file.py:attribute"; by default ``cosyvoice.acoustic.token2wav:Token2Wav``, which stands for
``cosyvoice.acoustic.runtimes:load_token2wav``: ``Token2Wav``, or ``Token2WavV1`` for a CosyVoice1 model
dir, one holding ``cosyvoice.yaml``), called as
``factory(model_dir, **options)``; the runtime has ``synthesize(tokens, prompt_tokens, prompt_feat,
embedding, *, token_offset, finalize, request_id[, speed]) -> float32 samples`` and
``release(request_id)`` (``speed`` is passed only when a request sets it to another value than 1).
``options`` are the runtime parameters the config sets (``device``, ``stream_cache``,
``chunk_causal_final``, ``estimator_dtype``, ``seed``, ``max_stream_cache_bytes``, ``compile``; see
``runtime.token2wav_options``), only those that are set; on a ``KIND_GPU`` instance without a
``device`` parameter the instance's GPU is the device. The output rate is the config's
``sample_rate`` (24000; 22050 for CosyVoice1): a runtime whose ``sample_rate`` differs fails the model load.

Inputs are checked before the runtime sees them: every id must be a speech token (151663 +
0..6560), ``token_offset`` must lie within the tokens; a bad request gets an error response, the
others of the batch are served. The runtime's per-stream caches are bounded by
``runtime.StreamCache``: released on the final chunk, on an error or a cancellation, after
``idle_timeout_s`` (parameter, default 60) without a chunk, and at most ``max_live_requests``
(parameter, default 64) streams are live at once.
"""

import json
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from cosyvoice.triton import runtime

DEFAULT_RUNTIME = runtime.DEFAULT_TOKEN2WAV_RUNTIME
#: what the default runtime's name loads: the acoustic runtime of the model dir's generation
DEFAULT_FACTORY = "cosyvoice.acoustic.runtimes:load_token2wav"


def _optional(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _scalar(array, name):
    values = np.asarray(array).reshape(-1)
    if values.size != 1:
        raise ValueError(f"{name}: one value expected, got {values.size}")
    return values[0]


def _cancelled(request) -> bool:
    is_cancelled = getattr(request, "is_cancelled", None)  # python backend >= 23.10
    return bool(is_cancelled()) if is_cancelled is not None else False


class TritonPythonModel:
    def initialize(self, args):
        params = runtime.parameters(json.loads(args["model_config"]))
        idle = runtime.positive_parameter(params, "idle_timeout_s", runtime.IDLE_TIMEOUT_S)
        max_live = runtime.positive_parameter(params, "max_live_requests", runtime.MAX_LIVE_REQUESTS, cast=int)
        spec = params.get("token2wav_runtime") or DEFAULT_RUNTIME
        try:
            factory = runtime.load_object(DEFAULT_FACTORY if spec == DEFAULT_RUNTIME else spec)
        except (ImportError, AttributeError) as exc:
            raise RuntimeError(f"token2wav: acoustic runtime {spec!r} is not available ({exc}); install the package "
                               "providing it or set the token2wav_runtime parameter") from exc
        self.runtime = self._make_runtime(factory, spec, params, args)
        self.streams = runtime.StreamCache(self.runtime.release, idle_timeout_s=idle, max_live=max_live,
                                           log=pb_utils.Logger.log_warn)
        # idle streams are released even while no request arrives
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, args=(min(idle / 2, 5.0),), daemon=True,
                                         name="token2wav-stream-sweeper")
        self._sweeper.start()

    @staticmethod
    def _make_runtime(factory, spec, params, args):
        """``factory(model_dir, **options)``, its output rate checked against the config's."""
        options = runtime.token2wav_options(params)
        if "device" not in options and args.get("model_instance_kind") == "GPU":
            options["device"] = f"cuda:{args.get('model_instance_device_id') or 0}"
        if "device" in options:
            runtime.check_device(options["device"])
        try:
            made = factory(params["model_dir"], **options)
        except TypeError as exc:
            if not options:
                raise
            raise RuntimeError(f"token2wav: {spec}({params['model_dir']!r}, **{options}) failed ({exc}); the parameters "
                               f"{', '.join(sorted(options))} are options of {DEFAULT_RUNTIME}: leave them unset for a "
                               "runtime that does not take them") from exc
        declared = runtime.positive_parameter(params, "sample_rate", runtime.TOKEN2WAV_SAMPLE_RATE, cast=int)
        rate = getattr(made, "sample_rate", None)
        if rate is not None and int(rate) != declared:
            raise RuntimeError(f"token2wav: runtime {spec!r} produces {rate} Hz but the model declares sample_rate "
                               f"{declared} (what clients are told)")
        return made

    def _sweep_loop(self, interval):
        while not self._stop.wait(interval):
            self.streams.sweep()

    def _request(self, request):
        """The checked inputs of one request."""
        tokens = _optional(request, "target_speech_tokens")
        if tokens is None:
            raise ValueError("target_speech_tokens is required")
        tokens = runtime.speech_tokens_from_llm_ids(tokens, "target_speech_tokens")
        if tokens.size == 0:
            raise ValueError("target_speech_tokens is empty")
        prompt_tokens = _optional(request, "prompt_speech_tokens")
        if prompt_tokens is not None:
            prompt_tokens = runtime.speech_tokens_from_llm_ids(prompt_tokens, "prompt_speech_tokens")
        feat = _optional(request, "prompt_speech_feat")
        if feat is not None:
            feat = np.asarray(feat, dtype=np.float32).reshape(-1, 80)
        embedding = _optional(request, "prompt_spk_embedding")
        if embedding is not None:
            embedding = np.asarray(embedding, dtype=np.float32).reshape(-1)
        offset, finalize = _optional(request, "token_offset"), _optional(request, "finalize")
        streaming = offset is not None
        if streaming and finalize is None:
            raise ValueError("token_offset given without finalize")
        if not streaming and finalize is not None:
            raise ValueError("finalize given without token_offset")
        if streaming:
            offset = int(_scalar(offset, "token_offset"))
            if not 0 <= offset <= tokens.size:
                raise ValueError(f"token_offset {offset} outside the {tokens.size} target_speech_tokens")
        request_id = request.request_id() or ""
        if streaming and not request_id:
            raise ValueError("streaming token2wav needs a request id (it keys the vocoder cache)")
        done = (not streaming) or bool(_scalar(finalize, "finalize"))
        speed = _optional(request, "speed")  # passed on only when it changes something (custom runtimes may lack it)
        speed = 1.0 if speed is None else float(_scalar(speed, "speed"))
        options = {} if speed == 1.0 else {"speed": speed}
        return tokens, prompt_tokens, feat, embedding, (offset if streaming else None), done, request_id, options

    def _serve(self, request):
        tokens, prompt_tokens, feat, embedding, offset, done, request_id, options = self._request(request)
        if offset is None:  # offline: no stream state survives the call
            wav = self.runtime.synthesize(tokens, prompt_tokens, feat, embedding, token_offset=None, finalize=True,
                                          request_id=request_id, **options)
            if request_id and request_id not in self.streams:
                self.runtime.release(request_id)
            return wav
        self.streams.begin(request_id, offset)
        outcome = "error"
        try:
            if _cancelled(request):
                outcome = "cancelled"
                raise RuntimeError(f"request {request_id!r} was cancelled; its stream is released")
            wav = self.runtime.synthesize(tokens, prompt_tokens, feat, embedding, token_offset=offset, finalize=done,
                                          request_id=request_id, **options)
            outcome = "finalize" if done else None
            if not done and _cancelled(request):
                outcome = "cancelled"
                raise RuntimeError(f"request {request_id!r} was cancelled; its stream is released")
            return wav
        finally:
            self.streams.finish(request_id, release=outcome)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                wav = self._serve(request)
                out = pb_utils.Tensor("waveform", np.asarray(wav, dtype=np.float32).reshape(1, -1))
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"token2wav: {exc}")))
        return responses

    def finalize(self):
        self._stop.set()
        self._sweeper.join(timeout=10)
        self.streams.close()
