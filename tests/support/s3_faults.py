"""An S3 endpoint on 127.0.0.1 that answers chosen GETs with throttling / 5xx errors.

It serves moto's S3 app (the same in-process backend as the ``s3_server`` fixture, so objects put
through either endpoint are visible through both) behind a small WSGI middleware with a fault plan:
``faults.plan("wavs/a.wav", [503, None, 500])`` answers the 1st GET of a key ending in
``wavs/a.wav`` with 503 ServiceUnavailable, lets the 2nd through and answers the 3rd with 500
InternalError; ``faults.plan(key, always=503)`` fails every GET. ``faults.gets[key]`` counts GETs,
``faults.served[key]`` the injected error answers.

``use(monkeypatch)`` clears the plan and points ``cosyvoice.storage`` at it with botocore's own retries off
(``AWS_MAX_ATTEMPTS=1``: the injected faults stand for a throttle that outlasted the client's
retries) and storage's retries fast (``COSYVOICE_IO_RETRIES=3``, ``COSYVOICE_IO_RETRY_DELAY_S=0.01``).
"""

from __future__ import annotations

import threading
from urllib.parse import unquote

from werkzeug.serving import make_server

#: status -> (S3 error code, message); the messages avoid "SlowDown"/"reduce your request rate", which
#: s3fs retries by itself, so that an injected fault reaches our code
ERRORS = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    502: ("502", "Bad Gateway"),
    503: ("ServiceUnavailable", "Service is unable to handle the request."),
}


class FaultyS3:
    def __init__(self):
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )

        self.app = DomainDispatcherApplication(create_backend_app)
        self.plans: dict[str, tuple[list, int | None]] = {}
        self.gets: dict[str, int] = {}
        self.served: dict[str, int] = {}
        self.lock = threading.Lock()
        self.server = make_server("127.0.0.1", 0, self, threaded=True, request_handler=MotoRequestHandler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def plan(self, key: str, answers: list[int | None] = (), *, always: int | None = None) -> None:
        """Answers for the next GETs of objects whose key ends with ``key`` (None = serve it)."""
        with self.lock:
            self.plans[key] = (list(answers), always)
            self.gets[key] = self.served[key] = 0

    def clear(self) -> None:
        with self.lock:
            self.plans.clear()
            self.gets.clear()
            self.served.clear()

    def _fault(self, environ) -> int | None:
        if environ["REQUEST_METHOD"] != "GET":
            return None
        path = unquote(environ.get("PATH_INFO", ""))
        with self.lock:
            for key, (answers, always) in self.plans.items():
                if path.endswith("/" + key):
                    self.gets[key] += 1
                    answer = always if always is not None else (answers.pop(0) if answers else None)
                    self.served[key] += answer is not None
                    return answer
        return None

    def __call__(self, environ, start_response):
        status = self._fault(environ)
        if status is None:
            return self.app(environ, start_response)
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        code, message = ERRORS[status]
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f"<RequestId>injected</RequestId></Error>").encode()
        start_response(f"{status} {code}", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
        return [body]

    def use(self, monkeypatch, *, retries: int = 3) -> None:
        """Point storage at this endpoint for one test, with no faults planned yet."""
        self.clear()
        monkeypatch.setenv("COSYVOICE_S3_ENDPOINT_URL", self.endpoint)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        monkeypatch.setenv("COSYVOICE_IO_RETRIES", str(retries))
        monkeypatch.setenv("COSYVOICE_IO_RETRY_DELAY_S", "0.01")

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join()
        self.server.server_close()
