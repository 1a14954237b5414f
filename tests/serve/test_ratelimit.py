"""The rate limit shared through a real redis-server: two gateway workers (two limiters) draw from one
budget per client, the wait is the bucket's, clients are separate, and a Redis outage falls back to
counting in the process."""

from __future__ import annotations

import asyncio

import pytest

from cosyvoice.serve.ratelimit import RateLimiter, RedisRateLimiter, rate_limiter
from cosyvoice.triton.server import free_port
from tests.serve.test_registry import redis_url  # noqa: F401 (the real redis-server fixture)


def test_two_workers_share_one_budget_per_client(redis_url):  # noqa: F811
    async def scenario():
        workers = [RedisRateLimiter(6, redis_url), RedisRateLimiter(6, redis_url)]
        waits = [await workers[i % 2].acquire("10.0.0.1") for i in range(7)]
        other = await workers[1].acquire("10.0.0.2")
        return waits, other

    waits, other = asyncio.run(scenario())
    assert waits[:6] == [0.0] * 6  # a burst of the per-minute budget, split over both workers
    assert waits[6] == pytest.approx(10.0, abs=0.5)  # 6 a minute: the next token in 10 s
    assert other == 0.0


def test_an_unreachable_redis_counts_in_the_process():
    limiter = RedisRateLimiter(2, f"redis://127.0.0.1:{free_port()}/0")

    async def scenario():
        return [await limiter.acquire("c") for _ in range(3)]

    waits = asyncio.run(scenario())
    assert waits[:2] == [0.0, 0.0] and waits[2] > 0


def test_the_settings_choose_the_limiter():
    assert rate_limiter(0) is None
    assert isinstance(rate_limiter(30), RateLimiter)
    assert isinstance(rate_limiter(30, "redis://127.0.0.1:6379/0"), RedisRateLimiter)
    with pytest.raises(ValueError, match="must be > 0"):
        RateLimiter(0)
