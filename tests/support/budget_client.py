"""A Gist client drawing on the shared budget, sending events as fast as the budget lets
it: ``python -m tests.support.budget_client GIST_URL REDIS_URL SECONDS LIMIT WINDOW``.
Several such processes play replicas on one workspace; prints its totals as JSON."""

from __future__ import annotations

import asyncio
import sys
import time

import orjson

from destination.gist import GistClient, RateLimit, RateLimiter, RetryPolicy
from destination.gist._redis import RedisBudget, redis_client

KEY = "sandbox-key"


def budget(redis_url: str | None, rate: RateLimit, owned: int, total: int) -> tuple[
    RateLimiter, RedisBudget | None
]:
    local = RateLimiter(rate)
    local.start_sharing()
    local.set_share(owned, total)
    shared = None
    if redis_url:
        shared = RedisBudget(redis_client(redis_url, None, 0.5), rate, local, timeout=0.5)
    return local, shared


async def send_events(
    gist: GistClient,
    until: float,
    senders: int = 4,
    name: str = "c",
    answered: list[float] | None = None,
) -> int:
    """Send events from ``senders`` tasks until ``until``; how many were sent. The time
    each was answered goes to ``answered`` when given."""
    sent = 0

    async def sender(index: int) -> None:
        nonlocal sent
        n = 0
        while time.monotonic() < until:
            n += 1
            await gist.track_event({"event_name": "Bench", "email": f"{name}{index}-{n}@x.io"})
            sent += 1
            if answered is not None:
                answered.append(time.monotonic())

    await asyncio.gather(*(sender(i) for i in range(senders)))
    return sent


async def main(url: str, redis_url: str, seconds: float, limit: int, window: float) -> None:
    rate = RateLimit(limit=limit, window=window, margin=0.05)
    local, shared = budget(redis_url or None, rate, 1, 2)
    gist = GistClient(KEY, base_url=url, limiter=shared or local,
                      retry=RetryPolicy(base=0.05, cap=0.5, max_elapsed=60))  # fmt: skip
    if shared is not None:
        await shared.start("sandbox-workspace")
    sent = await send_events(gist, time.monotonic() + seconds, name=str(id(gist)))
    limited = shared.rate_limited if shared is not None else local.rate_limited
    await gist.aclose()
    if shared is not None:
        await shared.close()
    print(orjson.dumps({"sent": sent, "rate_limited": limited}).decode())


if __name__ == "__main__":
    url, redis_url, seconds, limit, window = sys.argv[1:6]
    asyncio.run(main(url, redis_url, float(seconds), int(limit), float(window)))
