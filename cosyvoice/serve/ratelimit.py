"""Per-client rate limits of both frontends: a token bucket per client address (or token).

In memory each worker process counts only its own requests, so ``gateway --workers 4`` would let a
client through four times as often; with ``COSYVOICE_GATEWAY_REDIS_URL`` the bucket lives in Redis
(one Lua script: atomic, Redis' clock), shared by every worker and by the HTTP and gRPC frontends.
An unreachable Redis falls back to the in-memory bucket (a warning, never a refused or failed request
because of Redis).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

log = logging.getLogger(__name__)


class RateLimiter:
    """``per_minute`` requests a minute per client, bursts of up to ``per_minute`` (at least 1)."""

    def __init__(self, per_minute: float, *, clock: Callable[[], float] = time.monotonic, max_clients: int = 10_000):
        if per_minute <= 0:
            raise ValueError(f"rate limit must be > 0 requests a minute, got {per_minute}")
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, per_minute)
        self.clock = clock
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, client: str) -> float:
        """0 when the request may go ahead (one token taken), else the seconds until it may."""
        now = self.clock()
        tokens, last = self._buckets.pop(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)  # the least recently seen client starts over with a full bucket
        return wait

    async def acquire(self, client: str) -> float:
        return self.take(client)


#: the same bucket as RateLimiter.take, in a Redis hash per client; returns the wait as a string
#: (a Lua number would come back truncated to an integer)
_BUCKET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, capacity = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or capacity
local last = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - last) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(capacity / rate) + 1)
return tostring(wait)
"""


class RedisRateLimiter:
    """:class:`RateLimiter`'s bucket in Redis under ``cosyvoice:ratelimit:<client>``."""

    def __init__(self, per_minute: float, redis_url: str):
        self.fallback = RateLimiter(per_minute)
        self.rate, self.capacity = self.fallback.rate, self.fallback.capacity
        self.redis_url = redis_url
        self._script = None
        self._warned = False

    async def acquire(self, client: str) -> float:
        import redis.asyncio as redis

        try:
            if self._script is None:  # the client binds to the running event loop: made on first use
                self._script = redis.from_url(self.redis_url).register_script(_BUCKET)
            wait = float(await self._script(keys=[f"cosyvoice:ratelimit:{client}"], args=[self.rate, self.capacity]))
        except (redis.RedisError, OSError) as exc:
            if not self._warned:
                log.warning("rate limit: Redis at %s unreachable (%s); counting in this process", self.redis_url, exc)
                self._warned = True
            return self.fallback.take(client)
        self._warned = False
        return wait


def rate_limiter(per_minute: float, redis_url: str | None = None) -> RateLimiter | RedisRateLimiter | None:
    """The limiter the settings ask for: none at 0, shared through Redis when there is one."""
    if per_minute <= 0:
        return None
    return RedisRateLimiter(per_minute, redis_url) if redis_url else RateLimiter(per_minute)
