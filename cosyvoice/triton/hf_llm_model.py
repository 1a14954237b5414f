"""tensorrt_llm stand-in on the python backend: serves the exported HF ``Qwen2ForCausalLM``.

Rendered as ``tensorrt_llm/1/model.py`` when ``render_repo(..., llm_backend="python")``; the
config keeps the full TensorRT-LLM interface and ``gpt_model_path`` names the HF directory. It
reads the inputs the cosyvoice2 BLS sends (input_ids, input_lengths, request_output_len, end_id,
streaming, temperature, runtime_top_k/top_p, repetition_penalty, random_seed, embedding_bias) and answers like
the backend: streaming -> one response per new token with ``output_ids [1, 1, n]`` and
``sequence_length [1, 1]``, then an empty final response; otherwise one response with every
generated id (prompt included unless ``exclude_input_in_output``). CPU serving and tests only:
it decodes one request at a time per instance, without inflight batching.
"""

import json
import threading

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from cosyvoice.triton import runtime


def _scalar(request, name, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else tensor.as_numpy().reshape(-1)[0].item()


def _ids_response(ids):
    ids = np.asarray(ids, dtype=np.int32).reshape(1, 1, -1)
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("output_ids", ids),
        pb_utils.Tensor("sequence_length", np.array([[ids.shape[2]]], dtype=np.int32))])


class TritonPythonModel:
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
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy().reshape(-1)
        length = int(_scalar(request, "input_lengths", len(ids)))
        prompt = torch.from_numpy(ids[:length].astype(np.int64))[None]
        end_id = int(_scalar(request, "end_id", -1))
        bias = pb_utils.get_input_tensor_by_name(request, "embedding_bias")
        bias = None if bias is None else torch.from_numpy(bias.as_numpy().reshape(-1).astype(np.float32))
        stop = pb_utils.get_input_tensor_by_name(request, "stop_words_list")
        stream = runtime.sample_stream(
            self.model, prompt, max_new_tokens=int(_scalar(request, "request_output_len", 16)), end_id=end_id,
            temperature=float(_scalar(request, "temperature", 1.0)), top_k=int(_scalar(request, "runtime_top_k", 0)),
            top_p=float(_scalar(request, "runtime_top_p", 1.0)),
            repetition_penalty=float(_scalar(request, "repetition_penalty", 1.0)),
            seed=int(_scalar(request, "random_seed", 0)), embedding_bias=bias, stop_ids=runtime.parse_stop_words(
                None if stop is None else stop.as_numpy()))
        return ids[:length], stream

    def _serve_stream(self, request):
        sender = request.get_response_sender()
        try:
            prompt, tokens = self._generate(request)
            streaming = bool(_scalar(request, "streaming", False))
            with self.lock:
                if streaming:
                    for token in tokens:
                        sender.send(_ids_response([token]))
                else:
                    out = list(tokens)
                    sender.send(_ids_response(out if self.exclude_input else list(prompt) + out))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as exc:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"tensorrt_llm (HF): {exc}")),
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
                prompt, tokens = self._generate(request)
                with self.lock:
                    out = list(tokens)
                responses.append(_ids_response(out if self.exclude_input else list(prompt) + out))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"tensorrt_llm (HF): {exc}")))
        return responses

    def finalize(self):
        for thread in self.threads:
            thread.join(timeout=30)
