"""speaker_embedding: 16 kHz reference audio -> CAM++ embedding (fp16), as the offline stage computes it."""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from cosyvoice.triton import runtime


class TritonPythonModel:
    def initialize(self, args):
        params = runtime.parameters(json.loads(args["model_config"]))
        self.session = runtime.onnx_session(os.path.join(params["model_dir"], "campplus.onnx"))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                wavs = pb_utils.get_input_tensor_by_name(request, "reference_wav").as_numpy()
                vectors = np.stack([runtime.speaker_embedding(self.session, wav) for wav in wavs])
                out = pb_utils.Tensor("prompt_spk_embedding", vectors.astype(np.float16))
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            except Exception as exc:  # one bad request must not fail the batch
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"speaker_embedding: {exc}")))
        return responses
