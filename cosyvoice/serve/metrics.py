"""The gateway's Prometheus metrics: one registry, every name used by ``deploy/grafana``'s dashboard.

Kept in one module so the dashboard test can list them and the frontends (FastAPI, gRPC), the
Triton pool and the prompt cache record into the same series. ``endpoint`` is the route
(``/inference_zero_shot``, ``/v1/audio/speech``, ``grpc.Inference``...), ``replica`` a Triton URL.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

#: first-chunk and whole-request latencies: 5 ms .. 60 s
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0)
RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)

REQUESTS = Counter("cosyvoice_gateway_requests_total", "Synthesis requests by endpoint and outcome",
                   ["endpoint", "status"], registry=REGISTRY)
REQUEST_SECONDS = Histogram("cosyvoice_gateway_request_seconds", "Whole-request latency (last byte sent)",
                            ["endpoint"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
FIRST_CHUNK_SECONDS = Histogram("cosyvoice_gateway_first_chunk_seconds", "Time to the first audio chunk",
                                ["endpoint"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
REAL_TIME_FACTOR = Histogram("cosyvoice_gateway_real_time_factor", "Synthesis wall time / audio duration",
                             ["endpoint"], buckets=RTF_BUCKETS, registry=REGISTRY)
AUDIO_SECONDS = Counter("cosyvoice_gateway_audio_seconds_total", "Seconds of audio streamed to clients",
                        ["endpoint"], registry=REGISTRY)
# gauges under `gateway --workers N` (prometheus multiprocess mode): live workers only, summed or maxed
IN_FLIGHT = Gauge("cosyvoice_gateway_in_flight_requests", "Requests being synthesized now", ["endpoint"],
                  registry=REGISTRY, multiprocess_mode="livesum")
REJECTED = Counter("cosyvoice_gateway_rejected_total", "Requests refused before synthesis (4xx) by reason",
                   ["endpoint", "reason"], registry=REGISTRY)

PROMPT_CACHE = Counter("cosyvoice_gateway_prompt_cache_total", "Prompt-feature cache lookups by result (hit|miss)",
                       ["result"], registry=REGISTRY)

BACKEND_REQUESTS = Counter("cosyvoice_gateway_backend_requests_total", "Requests sent to a Triton replica",
                           ["replica", "model"], registry=REGISTRY)
BACKEND_ERRORS = Counter("cosyvoice_gateway_backend_errors_total", "Failed requests per Triton replica",
                         ["replica", "model"], registry=REGISTRY)
BACKEND_RETRIES = Counter("cosyvoice_gateway_backend_retries_total",
                          "Requests retried on another replica (nothing had been sent to the client yet)",
                          ["model"], registry=REGISTRY)
BACKEND_OUTSTANDING = Gauge("cosyvoice_gateway_backend_outstanding_requests", "Requests in flight per replica",
                            ["replica"], registry=REGISTRY, multiprocess_mode="livesum")
BACKEND_HEALTHY = Gauge("cosyvoice_gateway_backend_healthy", "1 when the replica is in rotation, else 0",
                        ["replica"], registry=REGISTRY, multiprocess_mode="livemax")
TRITON_QUEUE_SECONDS = Counter("cosyvoice_triton_queue_seconds_total",
                               "Cumulative queue time Triton reports per model (inference statistics)",
                               ["replica", "model"], registry=REGISTRY)
TRITON_INFERENCES = Counter("cosyvoice_triton_inferences_total",
                            "Cumulative successful inferences Triton reports per model (inference statistics)",
                            ["replica", "model"], registry=REGISTRY)
