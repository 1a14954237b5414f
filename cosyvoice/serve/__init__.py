"""The serving gateway: upstream-compatible FastAPI and gRPC frontends and an OpenAI speech endpoint
over the published Triton repository (text frontend, speaker registry + prompt cache, client-side
load balancing over Triton replicas, Prometheus metrics)."""
