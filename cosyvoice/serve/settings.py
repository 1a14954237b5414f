"""The gateway's settings: one frozen dataclass read from ``COSYVOICE_GATEWAY_*`` environment variables.

Settings come from the environment (not from a file or flags alone) because the app runs under
``uvicorn --factory`` with several worker processes: each worker builds its app from the same
environment. The CLI writes its flags into that environment (:meth:`GatewaySettings.to_env`).
The API token is a secret and is read from the environment only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace

PREFIX = "COSYVOICE_GATEWAY_"

#: the model families a repository can serve: "cosyvoice2" (the Triton BLS) or "cosyvoice" (a v1 model,
#: the only one with ``/inference_instruct``)
MODELS = ("cosyvoice2", "cosyvoice")

#: the environment variable of each field (``api_token`` is the one never written by :meth:`to_env`)
ENV = {
    "triton": "TRITON",
    "spk2info": "SPK2INFO",
    "redis_url": "REDIS_URL",
    "api_token": "API_TOKEN",
    "rate_limit": "RATE_LIMIT",
    "max_text_chars": "MAX_TEXT_CHARS",
    "max_upload_bytes": "MAX_UPLOAD_BYTES",
    "model": "MODEL",
    "tokenizer_dir": "TOKENIZER_DIR",
    "cors_origins": "CORS_ORIGINS",
    "prompt_cache_size": "PROMPT_CACHE_SIZE",
}


def _split(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _check_replica(spec: str) -> None:
    """``host:grpc_port`` or ``host:grpc_port|http://host:http_port`` (the ``Replica.parse`` format)."""
    grpc, _, http = spec.partition("|")
    host, _, port = grpc.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{PREFIX}TRITON: {spec!r} is not host:grpc_port[|http://host:http_port]")
    if http and not http.startswith(("http://", "https://")):
        raise ValueError(f"{PREFIX}TRITON: the health URL of {spec!r} must start with http:// or https://")


@dataclass(frozen=True)
class GatewaySettings:
    """What one gateway process needs to know; every field has an environment variable (:data:`ENV`)."""

    #: Triton replicas, each ``host:grpc_port[|http://host:http_port]`` (default: Triton's own default ports)
    triton: tuple[str, ...] = ("127.0.0.1:8001",)
    #: the speaker registry file (spk2info.pt, local path or fsspec URL); None: an in-memory registry
    spk2info: str | None = None
    #: Redis for the prompt cache (shared by workers and gateways); None: an in-memory LRU per worker
    redis_url: str | None = None
    #: bearer token required by every synthesis and registry endpoint; None: open
    api_token: str | None = field(default=None, repr=False)
    #: requests per minute per client address; 0: no limit
    rate_limit: float = 0.0
    max_text_chars: int = 2000
    max_upload_bytes: int = 10 * 1024 * 1024
    model: str = "cosyvoice2"
    #: HF tokenizer dir: English segment lengths in LLM tokens (as upstream); None: the text frontend's default
    tokenizer_dir: str | None = None
    #: origins allowed by CORS (browsers on other sites); empty: no CORS headers
    cors_origins: tuple[str, ...] = ()
    #: prompts (from uploaded audio) kept in the cache
    prompt_cache_size: int = 256

    def __post_init__(self) -> None:
        if isinstance(self.triton, str):
            object.__setattr__(self, "triton", _split(self.triton))
        if isinstance(self.cors_origins, str):
            object.__setattr__(self, "cors_origins", _split(self.cors_origins))
        if not self.triton:
            raise ValueError(f"{PREFIX}TRITON: give at least one Triton replica (host:grpc_port)")
        for spec in self.triton:
            _check_replica(spec)
        if self.model not in MODELS:
            raise ValueError(f"{PREFIX}MODEL: {self.model!r} is not one of {', '.join(MODELS)}")
        if self.rate_limit < 0:
            raise ValueError(f"{PREFIX}RATE_LIMIT: {self.rate_limit} requests/minute must be >= 0 (0 = no limit)")
        for name in ("max_text_chars", "max_upload_bytes", "prompt_cache_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{PREFIX}{ENV[name]}: must be a positive integer, got {getattr(self, name)}")
        if self.api_token is not None and not self.api_token.strip():
            raise ValueError(f"{PREFIX}API_TOKEN is set but empty: unset it to run without a token")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> GatewaySettings:
        """Settings from ``env`` (default ``os.environ``); ``overrides`` (field -> value, None = not given)
        win over the environment. Malformed values raise ValueError naming the variable."""
        env = os.environ if env is None else env
        values: dict = {}
        types = {f.name: f.type for f in fields(cls)}
        for name, suffix in ENV.items():
            raw = env.get(PREFIX + suffix)
            if raw is None or raw.strip() == "":
                continue
            raw = raw.strip()
            kind = types[name]
            try:
                values[name] = int(raw) if kind == "int" else float(raw) if kind == "float" else raw
            except ValueError:
                raise ValueError(f"{PREFIX}{suffix}: expected a number, got {raw!r}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - set(types)
        if unknown:
            raise ValueError(f"unknown gateway setting(s): {', '.join(sorted(unknown))}")
        return cls(**values)

    def with_overrides(self, **overrides) -> GatewaySettings:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_env(self) -> dict[str, str]:
        """The environment that rebuilds these settings in another process (uvicorn workers), less the
        API token (a secret: it stays in the environment it came from)."""
        env = {}
        for name, suffix in ENV.items():
            value = getattr(self, name)
            if name == "api_token" or value is None:
                continue
            env[PREFIX + suffix] = ",".join(value) if isinstance(value, tuple) else str(value)
        return env
