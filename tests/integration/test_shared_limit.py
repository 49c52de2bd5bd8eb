"""One Gist budget for every replica: clients sharing it through a real redis-server,
in one process and in several, measured where Gist would count them (the sandbox's own
request log), and what happens when Redis goes away and comes back."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import orjson
import pytest

from destination.devtools.sandbox import Sandbox, SandboxConfig, running_sandbox
from destination.gist import GistClient, RateLimit, RateLimiter, RetryPolicy
from destination.gist._redis import RETRY_REDIS_EVERY, RedisBudget, redis_client
from destination.observability import metrics
from tests.support.budget_client import KEY, budget, send_events
from tests.support.parallel import ONE_AT_A_TIME
from tests.support.redis_server import RedisServer

pytestmark = [pytest.mark.integration, ONE_AT_A_TIME]

LIMIT, WINDOW = 20, 1.0
"""A short window: the sharing is under test, and the property is the same at 100/10 s."""


def most_in_any_window(times: list[float], window: float) -> int:
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def arrivals(sandbox: Sandbox) -> list[float]:
    """When the sandbox counted each API request (its rate limiter's clock)."""
    return [float(r["t"]) for r in sandbox.store.requests_json() if r["path"] == "/events"]


def statuses(sandbox: Sandbox) -> list[int]:
    return [int(r["status"]) for r in sandbox.store.requests_json()]


def client(url: str, shared: Any) -> GistClient:
    return GistClient(
        KEY, base_url=url, limiter=shared, retry=RetryPolicy(base=0.05, cap=0.5, max_elapsed=60)
    )


@pytest.fixture
async def sandbox() -> Any:
    async with running_sandbox(SandboxConfig(rate_limit=LIMIT, rate_window=WINDOW)) as sb:
        yield sb


class LateOnce:
    """A Redis client whose acquire script, once ``armed``, runs but answers too late
    (after the budget's time-out): the replica falls back although its slot was taken."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self.armed = False

    def register_script(self, source: str) -> Any:
        script = self._redis.register_script(source)
        if "ZREMRANGEBYSCORE" not in source:  # not the acquire script
            return script

        async def acquire(**kwargs: Any) -> Any:
            answer = await script(**kwargs)
            if self.armed:
                self.armed = False
                await asyncio.sleep(2.0)
            return answer

        return acquire

    def __getattr__(self, name: str) -> Any:
        return getattr(self._redis, name)


async def two_replicas(
    redis_url: str, sandbox_url: str, *, first_late: LateOnce | None = None
) -> tuple[list[RedisBudget], list[GistClient]]:
    """Two clients on Redis, each owning half of the partitions (its share without it);
    the first on ``first_late`` when given."""
    rate = RateLimit(limit=LIMIT, window=WINDOW, margin=0.05)
    budgets = []
    for index in range(2):
        if index == 0 and first_late is not None:
            local = RateLimiter(rate)
            local.start_sharing()
            local.set_share(1, 2)
            shared: RedisBudget | None = RedisBudget(first_late, rate, local, timeout=0.5)
        else:
            _, shared = budget(redis_url, rate, 1, 2)
        assert shared is not None
        await shared.start("sandbox-workspace")
        budgets.append(shared)
    return budgets, [client(sandbox_url, shared) for shared in budgets]


def answered_between(times: list[float], start: float, end: float) -> int:
    return sum(1 for t in times if start <= t < end)


async def slots_held_ahead(redis_url: str) -> int:
    """Members of the log scored more than a few seconds ahead of the server's clock: in
    flight, or held for a request nobody will answer."""
    import redis.asyncio as aioredis

    admin = aioredis.from_url(redis_url)
    seconds, micros = await admin.time()
    ahead = 0
    async for key in admin.scan_iter(match="*:log"):
        ahead += await admin.zcount(key, seconds * 1000 + micros // 1000 + 5000, "+inf")
    await admin.aclose()
    return int(ahead)


async def close_all(budgets: list[RedisBudget], clients: list[GistClient]) -> None:
    for c in clients:
        await c.aclose()
    for shared in budgets:
        await shared.close()


async def test_three_clients_in_one_process_share_one_budget(
    redis_server: RedisServer, sandbox: Sandbox
) -> None:
    rate = RateLimit(limit=LIMIT, window=WINDOW, margin=0.05)
    budgets = [budget(redis_server.url, rate, 1, 3)[1] for _ in range(3)]
    clients = [client(sandbox.url, b) for b in budgets]
    for shared in budgets:
        assert shared is not None
        await shared.start("sandbox-workspace")
        assert shared.backend == "redis"
    seconds = 5.0
    until = time.monotonic() + seconds
    sent = await asyncio.gather(
        *(send_events(c, until, name=f"c{i}") for i, c in enumerate(clients))
    )
    for c in clients:
        await c.aclose()
    for shared in budgets:
        assert shared is not None
        await shared.close()
    assert 429 not in statuses(sandbox)
    assert most_in_any_window(arrivals(sandbox), WINDOW) <= LIMIT
    # The whole budget (less the start-up reserve) was used, by all of them together.
    assert sum(sent) >= 0.85 * (LIMIT - 2) * seconds / WINDOW
    assert all(n > 0 for n in sent)


async def test_replicas_in_separate_processes_share_one_budget(
    redis_server: RedisServer,
) -> None:
    from benchmarks.processes import sandbox_subprocess

    async with sandbox_subprocess(
        api_key=KEY, rate_limit=LIMIT, rate_window=WINDOW, batch_delay=0.1
    ) as sandbox:
        seconds = 5.0
        command = [
            sys.executable, "-m", "tests.support.budget_client", sandbox.url,
            redis_server.url, str(seconds), str(LIMIT), str(WINDOW),
        ]  # fmt: skip
        procs = [
            await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
            for _ in range(3)
        ]
        outs = [orjson.loads((await p.communicate())[0].splitlines()[-1]) for p in procs]
        import httpx

        async with httpx.AsyncClient(base_url=sandbox.url) as http:
            log = (await http.get("/_sandbox/requests")).json()
    events = [r for r in log if r["path"] == "/events"]
    assert [r for r in events if r["status"] == 429] == []
    assert sum(o["rate_limited"] for o in outs) == 0
    assert most_in_any_window([r["t"] for r in events], WINDOW) <= LIMIT
    assert sum(o["sent"] for o in outs) >= 0.85 * (LIMIT - 2) * seconds / WINDOW


async def test_redis_down_falls_back_on_the_share_and_comes_back(
    redis_server: RedisServer, sandbox: Sandbox
) -> None:
    """Redis is stopped mid-run and started again (empty): the clients fall back on
    their partition share (never a full budget each), count and log it, and return to
    Redis; the workspace never gets more than its budget."""
    budgets, clients = await two_replicas(redis_server.url, sandbox.url)
    fallbacks = metrics.LIMITER_FALLBACKS._value.get()
    seen: set[str] = set()

    async def watch(until: float) -> None:
        while time.monotonic() < until:
            seen.update(shared.backend for shared in budgets)
            await asyncio.sleep(0.05)

    async def outage() -> None:
        await asyncio.sleep(1.5)
        redis_server.stop()
        await asyncio.sleep(3.0)
        redis_server.start()

    until = time.monotonic() + 12.0
    await asyncio.gather(
        *(send_events(c, until, name=f"c{i}") for i, c in enumerate(clients)),
        outage(),
        watch(until),
    )
    # A client tries Redis again on an ask at least RETRY_REDIS_EVERY (5 s) after it fell
    # back; on a busy machine that can fall after the 12 s (seen once in CI beside a
    # benchmark: one client still on its share at the end, no failed try logged). It must
    # come back all the same, so the clients go on asking, two more retry periods at most.
    back_by = time.monotonic() + 2 * RETRY_REDIS_EVERY + 2.0
    while time.monotonic() < back_by and any(shared.backend != "redis" for shared in budgets):
        step = time.monotonic() + 0.5
        await asyncio.gather(*(send_events(c, step, name=f"r{i}") for i, c in enumerate(clients)))
    backends = [shared.backend for shared in budgets]
    await close_all(budgets, clients)
    assert {"redis", "fallback"} <= seen
    assert backends == ["redis", "redis"]
    assert metrics.LIMITER_FALLBACKS._value.get() == fallbacks + 2
    assert 429 not in statuses(sandbox)
    assert most_in_any_window(arrivals(sandbox), WINDOW) <= LIMIT


async def test_redis_losing_its_log_costs_no_429_and_no_stall(
    redis_server: RedisServer, sandbox: Sandbox
) -> None:
    """Redis loses its data while the clients use it (a restart without persistence,
    played by FLUSHALL): the log is empty but the last window's requests still count at
    Gist. Each client sees the changed epoch and keeps to what it sent itself for a
    window, and to its share: the workspace gets no more than its budget, and each goes
    on at its share at once (it never waits on a schedule of its Redis grants)."""
    import redis.asyncio as aioredis

    budgets, clients = await two_replicas(redis_server.url, sandbox.url)
    answered: list[list[float]] = [[], []]
    flushed_at = 0.0

    async def flush() -> None:
        nonlocal flushed_at
        await asyncio.sleep(2.0)
        admin = aioredis.from_url(redis_server.url)
        await admin.flushall()
        flushed_at = time.monotonic()
        await admin.aclose()

    until = time.monotonic() + 5.0
    await asyncio.gather(
        *(send_events(c, until, name=f"c{i}", answered=answered[i]) for i, c in enumerate(clients)),
        flush(),
    )  # fmt: skip
    await close_all(budgets, clients)
    assert 429 not in statuses(sandbox)
    assert most_in_any_window(arrivals(sandbox), WINDOW) <= LIMIT
    # A share is 9 a window: each gets a good part of it in the two windows after (a
    # client that waits on a schedule of its Redis grants gets a few).
    after = [answered_between(times, flushed_at, flushed_at + 2 * WINDOW) for times in answered]
    assert min(after) >= 8, after


async def test_one_late_redis_answer_costs_no_stall_and_no_slot(
    redis_server: RedisServer, sandbox: Sandbox
) -> None:
    """One answer of Redis comes after the time-out, though its script ran (it took a
    slot). The client checks Redis with one more call, finds it answering and goes on at
    its share and on Redis at once (it never waits on a schedule of its Redis grants,
    and sends nothing the other client cannot see); the slot of the late answer is freed
    then, not held two minutes. The workspace gets no more than its budget."""
    late = LateOnce(redis_client(redis_server.url, None, 0.5))
    budgets, clients = await two_replicas(redis_server.url, sandbox.url, first_late=late)
    answered: list[list[float]] = [[], []]
    late_answers = metrics.LIMITER_REDIS_ERRORS.labels("acquire")._value.get()
    late_at = 0.0

    async def one_late_answer() -> None:
        nonlocal late_at
        await asyncio.sleep(2.0)
        late.armed = True
        late_at = time.monotonic()

    until = time.monotonic() + 5.0
    await asyncio.gather(
        *(send_events(c, until, name=f"c{i}", answered=answered[i]) for i, c in enumerate(clients)),
        one_late_answer(),
    )  # fmt: skip
    await asyncio.sleep(0.5)  # the last releases reach Redis
    held_ahead = await slots_held_ahead(redis_server.url)
    await close_all(budgets, clients)
    # Its share is 9 a window (the other client, on Redis alone, may take more of the
    # log): a good part of it in the three windows after the answer.
    assert answered_between(answered[0], late_at, late_at + 3 * WINDOW) >= 6
    assert held_ahead == 0
    assert metrics.LIMITER_REDIS_ERRORS.labels("acquire")._value.get() == late_answers + 1
    assert 429 not in statuses(sandbox)
    assert most_in_any_window(arrivals(sandbox), WINDOW) <= LIMIT
