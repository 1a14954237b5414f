"""Echo stand-in for the cosyvoice2 BLS: streams chunks described by ``target_text``.

``target_text`` holds ``key=value`` words: ``chunks`` (default 3), ``delay`` seconds between chunks
(default 0), ``size`` samples per chunk (default 4); the word ``error`` makes the request fail with
an error response. Chunk ``k`` is filled with ``ECHO_REPLICA * 1000 + k`` so a test can tell which
server produced it and in what order. Each request runs in its own thread (several in flight, as
on a real server) and, when ``ECHO_LOG_DIR`` is set, leaves ``<request_id>.<outcome>`` there
(``done`` | ``cancelled`` | ``failed``) so a test can see what the server saw.
"""

import os
import re
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.replica = float(os.environ.get("ECHO_REPLICA", "0"))
        self.log_dir = os.environ.get("ECHO_LOG_DIR")

    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self._stream, args=(request,), daemon=True).start()
        return None

    def _stream(self, request):
        sender = request.get_response_sender()
        text = pb_utils.get_input_tensor_by_name(request, "target_text").as_numpy().reshape(-1)[0].decode("utf-8")
        options = dict(re.findall(r"(\w+)=(\S+)", text))
        outcome = "done"
        try:
            if "error" in text.split():
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError("echo: asked to fail")),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                outcome = "failed"
                return
            size, delay = int(options.get("size", 4)), float(options.get("delay", 0))
            for k in range(int(options.get("chunks", 3))):
                if k and delay:
                    time.sleep(delay)
                if sender.is_cancelled():
                    outcome = "cancelled"
                    break
                wav = np.full((1, size), self.replica * 1000 + k, dtype=np.float32)
                sender.send(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("waveform", wav)]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception:
            outcome = "cancelled" if sender.is_cancelled() else "failed"
        finally:
            if self.log_dir:
                name = request.request_id() or "unnamed"
                with open(os.path.join(self.log_dir, f"{name}.{outcome}"), "w"):
                    pass
