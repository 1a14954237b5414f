"""token2wav: LLM speech ids -> 24 kHz waveform, offline or streamed per request id.

This adapter owns the Triton protocol (optional prompt inputs, the 151663 id offset,
``token_offset``/``finalize`` streaming, per-request cache release). The acoustic model itself
(flow matching + HiFT on ``model_dir``'s ``flow.pt``/``hift.pt``) is a runtime object named by
the ``token2wav_runtime`` parameter ("module:attribute" or "/path/file.py:attribute"), a factory
``(model_dir) -> runtime`` whose runtime has ``synthesize(tokens, prompt_tokens, prompt_feat,
embedding, *, token_offset, finalize, request_id) -> float32 samples`` and ``release(request_id)``.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from cosyvoice.triton import runtime

DEFAULT_RUNTIME = "cosyvoice.acoustic.token2wav:Token2Wav"


def _optional(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class TritonPythonModel:
    def initialize(self, args):
        params = runtime.parameters(json.loads(args["model_config"]))
        spec = params.get("token2wav_runtime") or DEFAULT_RUNTIME
        try:
            factory = runtime.load_object(spec)
        except (ImportError, AttributeError) as exc:
            raise RuntimeError(f"token2wav: acoustic runtime {spec!r} is not available ({exc}); install the package "
                               "providing it or set the token2wav_runtime parameter") from exc
        self.runtime = factory(params["model_dir"])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                tokens = _optional(request, "target_speech_tokens").reshape(-1) - runtime.ORIGINAL_VOCAB_SIZE
                prompt_tokens = _optional(request, "prompt_speech_tokens")
                if prompt_tokens is not None:
                    prompt_tokens = prompt_tokens.reshape(-1) - runtime.ORIGINAL_VOCAB_SIZE
                feat = _optional(request, "prompt_speech_feat")
                embedding = _optional(request, "prompt_spk_embedding")
                offset = _optional(request, "token_offset")
                finalize = _optional(request, "finalize")
                streaming = offset is not None
                if streaming and finalize is None:
                    raise ValueError("token_offset given without finalize")
                request_id = request.request_id() or ""
                if streaming and not request_id:
                    raise ValueError("streaming token2wav needs a request id (it keys the vocoder cache)")
                done = (not streaming) or bool(np.asarray(finalize).reshape(-1)[0])
                wav = self.runtime.synthesize(
                    tokens, prompt_tokens,
                    None if feat is None else feat.reshape(-1, 80).astype(np.float32),
                    None if embedding is None else embedding.reshape(-1).astype(np.float32),
                    token_offset=int(np.asarray(offset).reshape(-1)[0]) if streaming else None,
                    finalize=done, request_id=request_id)
                if done:
                    self.runtime.release(request_id)
                out = pb_utils.Tensor("waveform", np.asarray(wav, dtype=np.float32).reshape(1, -1))
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"token2wav: {exc}")))
        return responses
