"""tensorrt_llm stand-in on the python backend: serves the exported HF ``Qwen2ForCausalLM``.

Rendered as ``tensorrt_llm/1/model.py`` when ``render_repo(..., llm_backend="python")``; the
config keeps the full TensorRT-LLM interface and ``gpt_model_path`` names the HF directory. It
reads the inputs the cosyvoice2 BLS sends (input_ids, input_lengths, request_output_len, end_id,
streaming, temperature, runtime_top_k/top_p, repetition_penalty, random_seed, embedding_bias) and answers like
the backend: streaming -> one response per new token with ``output_ids [1, 1, n]`` and
``sequence_length [1, 1]``, then an empty final response; otherwise one response with every
generated id (prompt included unless ``exclude_input_in_output``). CPU serving and tests only:
it decodes one request at a time per instance, without inflight batching. The serving loop is
``python_backend.TokenServer`` (as transformer_llm's); a stream the BLS cancels stops sampling.
"""

import json
import threading

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from cosyvoice.triton import runtime
from cosyvoice.triton.python_backend import TokenServer, optional, scalar


class TritonPythonModel(TokenServer):
    who = "tensorrt_llm (HF)"

    def initialize(self, args):
        from transformers import AutoModelForCausalLM

        config = json.loads(args["model_config"])
        params = runtime.parameters(config)
        self.exclude_input = params.get("exclude_input_in_output", "False").lower() in ("true", "1")
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        torch.set_num_threads(1)
        self.model = AutoModelForCausalLM.from_pretrained(params["gpt_model_path"], dtype=torch.float32).eval()
        self.lock = threading.Lock()
        self.threads = []

    def _generate(self, request):
        ids = optional(request, "input_ids").reshape(-1)
        length = int(scalar(request, "input_lengths", len(ids)))
        prompt = torch.from_numpy(ids[:length].astype(np.int64))[None]
        bias = optional(request, "embedding_bias")
        bias = None if bias is None else torch.from_numpy(bias.reshape(-1).astype(np.float32))
        stream = runtime.sample_stream(
            self.model, prompt, max_new_tokens=int(scalar(request, "request_output_len", 16)),
            end_id=int(scalar(request, "end_id", -1)), temperature=float(scalar(request, "temperature", 1.0)),
            top_k=int(scalar(request, "runtime_top_k", 0)), top_p=float(scalar(request, "runtime_top_p", 1.0)),
            repetition_penalty=float(scalar(request, "repetition_penalty", 1.0)),
            seed=int(scalar(request, "random_seed", 0)), embedding_bias=bias,
            stop_ids=runtime.parse_stop_words(optional(request, "stop_words_list")))
        return stream, [] if self.exclude_input else list(ids[:length])
