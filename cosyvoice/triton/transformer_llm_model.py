"""transformer_llm: CosyVoice1's ``TransformerLM`` on the python backend (there is no TensorRT-LLM engine for it).

Rendered as ``transformer_llm/1/model.py`` of a CosyVoice1 repository. Loads ``<model_dir>/cosyvoice.yaml``
+ ``llm.pt`` strictly (``runtime_v1.ServedLM``) and speaks the tensorrt_llm model's core protocol, so the BLS
reads it the same way: inputs ``input_ids`` (whisper text ids: prompt text, then target text),
``input_lengths``, optional ``request_output_len``, ``streaming``, ``random_seed``, plus v1's
``prompt_text_len``, ``prompt_speech_tokens`` and ``speaker_embedding``; outputs ``output_ids``
``[1, 1, n]`` (0-based v1 speech tokens, eos never included) and ``sequence_length`` ``[1, 1]``.
Decoupled + ``streaming``: one response per token as it is sampled, then an empty final response;
otherwise one response with every token. Requests run one at a time per instance (the sampling
draws from torch's global generator, seeded per request, as upstream's does).
"""

import json

import torch
import triton_python_backend_utils as pb_utils

from cosyvoice.triton import runtime, runtime_v1
from cosyvoice.triton.python_backend import TokenServer, optional, scalar


class TritonPythonModel(TokenServer):
    who = "transformer_llm"

    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = runtime.parameters(config)
        device = (params.get("device") or "").strip() or None
        if device is not None:
            runtime.check_device(device)
        torch.set_num_threads(1)
        self.served = runtime_v1.ServedLM.from_model_dir(params["model_dir"], device)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.threads = []

    def _generate(self, request):
        ids = optional(request, "input_ids").reshape(-1)
        length = int(scalar(request, "input_lengths", len(ids)))
        limit = optional(request, "request_output_len")
        tokens = self.served.generate(
            ids[:length], prompt_text_len=int(scalar(request, "prompt_text_len", 0)),
            prompt_speech_tokens=optional(request, "prompt_speech_tokens"),
            embedding=optional(request, "speaker_embedding"), seed=int(scalar(request, "random_seed", 0)),
            max_new_tokens=None if limit is None else int(limit.reshape(-1)[0]))
        return tokens, []
