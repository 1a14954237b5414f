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
import threading

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from cosyvoice.triton import runtime, runtime_v1


def _optional(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _scalar(request, name, default):
    value = _optional(request, name)
    return default if value is None else value.reshape(-1)[0].item()


def _cancelled(request) -> bool:
    is_cancelled = getattr(request, "is_cancelled", None)  # python backend >= 23.10
    return bool(is_cancelled()) if is_cancelled is not None else False


def _ids_response(ids):
    ids = np.asarray(ids, dtype=np.int32).reshape(1, 1, -1)
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("output_ids", ids),
        pb_utils.Tensor("sequence_length", np.array([[ids.shape[2]]], dtype=np.int32))])


class TritonPythonModel:
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

    def _tokens(self, request):
        ids = _optional(request, "input_ids").reshape(-1)
        length = int(_scalar(request, "input_lengths", len(ids)))
        limit = _optional(request, "request_output_len")
        return self.served.generate(
            ids[:length], prompt_text_len=int(_scalar(request, "prompt_text_len", 0)),
            prompt_speech_tokens=_optional(request, "prompt_speech_tokens"),
            embedding=_optional(request, "speaker_embedding"), seed=int(_scalar(request, "random_seed", 0)),
            max_new_tokens=None if limit is None else int(limit.reshape(-1)[0]))

    def _serve_stream(self, request):
        sender = request.get_response_sender()
        try:
            tokens = self._tokens(request)
            if bool(_scalar(request, "streaming", False)):
                for token in tokens:
                    if _cancelled(request):  # the BLS abandoned the stream: stop sampling for it
                        tokens.close()
                        break
                    sender.send(_ids_response([token]))
            else:
                sender.send(_ids_response(list(tokens)))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as exc:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"transformer_llm: {exc}")),
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
                responses.append(_ids_response(list(self._tokens(request))))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"transformer_llm: {exc}")))
        return responses

    def finalize(self):
        for thread in self.threads:
            thread.join(timeout=30)
