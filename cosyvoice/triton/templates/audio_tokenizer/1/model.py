"""audio_tokenizer: 16 kHz reference audio -> S3 speech tokens + 151663 (LLM ids), as the offline stage computes them."""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from cosyvoice.triton import runtime


class TritonPythonModel:
    def initialize(self, args):
        params = runtime.parameters(json.loads(args["model_config"]))
        self.session = runtime.onnx_session(os.path.join(params["model_dir"], "speech_tokenizer_v2.onnx"))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                wavs = pb_utils.get_input_tensor_by_name(request, "reference_wav").as_numpy()
                lengths = pb_utils.get_input_tensor_by_name(request, "reference_wav_len").as_numpy().reshape(-1)
                rows = [runtime.speech_tokens(self.session, wav[: int(n)]) for wav, n in zip(wavs, lengths)]
                if len({len(r) for r in rows}) > 1:
                    raise ValueError("a request with several waveforms must give equal token counts; send one per request")
                tokens = np.stack(rows) + runtime.ORIGINAL_VOCAB_SIZE
                out = pb_utils.Tensor("prompt_speech_tokens", tokens.astype(np.int32))
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"audio_tokenizer: {exc}")))
        return responses
