"""One Gist budget for every replica: the workspace's sliding-window log in Redis.

Every replica draws its grants from one sorted set per workspace (``{prefix}:{workspace}``),
taken atomically by a Lua script on the server's clock (no client clock skew): a request
is granted when fewer than ``limit`` requests hold a slot, and it holds its slot while in
flight (scored at grant time plus ``HOLD_IN_FLIGHT``, so a crashed replica's requests age
out) and until a window after its answer (``release`` re-scores it with the server's
time), as the local limiter does. Grants are paced through one shared schedule (a
theoretical send time kept in Redis), so the replicas together send no bursts. A 429
seen by any replica sets a shared cooldown (``Retry-After``, else a backoff) and cuts
the shared limit, which grows back by a tenth per quiet window.

**Without Redis the budget is never a full local one.** Redis unreachable or slower than
``timeout``: the replica falls back to its partition share (``RateLimiter.set_share``),
logs it once and counts it (``limiter_fallbacks_total``), and tries Redis again every
few seconds. Whenever the shared view is incomplete (falling back; coming back, since
Redis never heard of the requests made meanwhile; Redis having lost its data, told by a
changed *epoch* key), the replica keeps, for one window, to at most what it sent itself
in the last window, and on its way back it also keeps to its partition share, for a
window plus ``RETRY_REDIS_EVERY``: the other replicas come back up to one retry later,
and until then their requests on their shares are not in Redis' log (a replica back on
Redis alone after one window could take slots they had used). So a Redis restart costs
no extra requests: each replica knows its own recent ones, and their sum was within the
budget.

**Priorities are per replica.** The shared log is one log: Redis knows nothing of lanes.
Each replica's waiters queue in its own ``Lanes``, and one asker task per replica asks
Redis for the next slot and gives it, once granted, to the next waiter by the lane rule
(``_limiter``), so a replica's urgent requests overtake its own others, not other
replicas' ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Coroutine
from typing import Any

import structlog

from destination.gist._limiter import RESERVE, Grant, Lanes, Priority, RateLimit, RateLimiter
from destination.observability import log_events, metrics

log = structlog.get_logger(__name__)

HOLD_IN_FLIGHT = 120.0
"""Seconds a request in flight holds its slot at most (longer than any request time-out):
the slots of a replica that died with requests in flight come free then."""

RETRY_REDIS_EVERY = 5.0
"""Seconds between attempts to return to Redis while falling back."""

MAX_NAP = 0.25
"""Longest sleep between two asks of Redis (a slot may free sooner: an answer came)."""

_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local base = tonumber(ARGV[1])
local span = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local hold = tonumber(ARGV[4])
local pace = tonumber(ARGV[6])
local epoch = redis.call('GET', KEYS[4])
if not epoch then
  epoch = ARGV[7]
  redis.call('SET', KEYS[4], epoch)
end
local limit = base
local cut = redis.call('HMGET', KEYS[5], 'limit', 'since')
if cut[1] then
  local step = math.max(1, math.floor(base / 10))
  limit = math.min(base, tonumber(cut[1]) + math.floor((now - tonumber(cut[2])) / window) * step)
end
local cool = tonumber(redis.call('GET', KEYS[3]) or '0')
if cool > now then
  return {0, cool - now, epoch, limit}
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - span)
local used = redis.call('ZCARD', KEYS[1])
if used >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], used - limit, used - limit, 'WITHSCORES')
  return {0, math.max(1, tonumber(oldest[2]) + span - now), epoch, limit}
end
if pace == 1 then
  local gap = span / math.max(1, limit)
  local tat = tonumber(redis.call('GET', KEYS[2]) or '0')
  if now < tat - gap / 2 then
    return {0, math.max(1, math.ceil(tat - gap / 2 - now)), epoch, limit}
  end
  redis.call('SET', KEYS[2], tostring(math.max(tat, now) + gap), 'PX', math.ceil(span * 2))
end
redis.call('ZADD', KEYS[1], now + hold, ARGV[5])
redis.call('PEXPIRE', KEYS[1], math.ceil(span + hold))
return {1, 0, epoch, limit}
"""
"""KEYS: log, schedule, cooldown, epoch, cut. ARGV: limit, span ms, window ms, hold ms,
member, pace (1/0), a new epoch. Returns {granted, wait ms, epoch, limit in force}."""

_RELEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], 'XX', now, ARGV[1])
return now
"""
"""KEYS: log. ARGV: member. The request was answered: it holds its slot a window more."""

_RATE_LIMITED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local base = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local pause = tonumber(ARGV[3])
local floor = tonumber(ARGV[4])
local step = math.max(1, math.floor(base / 10))
local cut = redis.call('HMGET', KEYS[2], 'limit', 'since', 'last_cut')
local limit = base
local last_cut = -1e18
if cut[1] then
  limit = math.min(base, tonumber(cut[1]) + math.floor((now - tonumber(cut[2])) / window) * step)
  last_cut = tonumber(cut[3])
end
if now - last_cut >= window then
  limit = math.max(floor, math.floor(limit * 0.7))
  last_cut = now
end
redis.call('HSET', KEYS[2], 'limit', limit, 'since', now, 'last_cut', last_cut)
redis.call('PEXPIRE', KEYS[2], window * 12)
local cool = tonumber(redis.call('GET', KEYS[1]) or '0')
if now + pause > cool then
  redis.call('SET', KEYS[1], tostring(now + pause), 'PX', math.ceil(pause) + 1000)
end
return limit
"""
"""KEYS: cooldown, cut. ARGV: limit, window ms, pause ms, floor. A 429 somewhere."""


class RedisBudget:
    """The ``Budget`` of every replica of a workspace, in Redis, with ``local`` (this
    replica's partition share) as the fallback. ``start(workspace_id)`` before use."""

    def __init__(
        self,
        redis: Any,
        rate: RateLimit,
        local: RateLimiter,
        *,
        prefix: str = "gist-destination",
        timeout: float = 0.5,
        clock: Any = time.monotonic,
    ) -> None:
        self._redis = redis
        self.rate = rate
        self.local = local
        self._prefix = prefix
        self._timeout = timeout
        self._clock = clock
        self._keys: list[str] | None = None
        self._acquire = redis.register_script(_ACQUIRE)
        self._release = redis.register_script(_RELEASE)
        self._rate_limited = redis.register_script(_RATE_LIMITED)
        self._lanes: Lanes[str] = Lanes()  # waiters for the shared log; a turn's result
        self._asker: asyncio.Task[None] | None = None  # is the member of its grant
        self._epoch: str | None = None
        self._limit = rate.limit - RESERVE
        self._members: dict[int, str] = {}  # id(grant) -> member, for release
        self._pending: set[asyncio.Task[Any]] = set()
        self._backend = "local"  # until start(): "redis", "fallback", or "dual" on return
        self._dual_until = 0.0
        self._next_try = 0.0
        self._id = uuid.uuid4().hex[:12]
        self._seq = 0
        self.granted = 0
        self.rate_limited = 0

    @property
    def redis(self) -> Any:
        """The client (the de-duplication and contact memory share it)."""
        return self._redis

    @property
    def prefix(self) -> str | None:
        """``{prefix}:{workspace}`` once started."""
        return None if self._keys is None else self._keys[0].rsplit(":", 1)[0]

    # --- life -------------------------------------------------------------------------
    async def start(self, workspace_id: str) -> None:
        """Use the workspace's shared log from now on (falling back if Redis fails)."""
        base = f"{self._prefix}:{workspace_id}"
        self._keys = [f"{base}:log", f"{base}:schedule", f"{base}:cooldown", f"{base}:epoch",
                      f"{base}:cut"]  # fmt: skip
        try:
            await asyncio.wait_for(self._redis.ping(), self._timeout)
        except Exception as error:
            self._fall_back(error)
            return
        self._set_backend("redis")
        log.info(log_events.LIMITER_SHARED, workspace=workspace_id)

    async def close(self) -> None:
        for task in [*self._pending, *([self._asker] if self._asker is not None else [])]:
            task.cancel()
        await self._redis.aclose()

    # --- the budget -------------------------------------------------------------------
    @property
    def current_limit(self) -> int:
        if self.backend in ("redis", "dual"):
            return self._limit
        return self.local.current_limit

    def utilisation(self) -> float:
        return self.local.utilisation()  # our own part; the workspace's: ``shared_use``

    async def acquire(self, priority: Priority = Priority.NORMAL) -> Grant:
        """A slot of the workspace's budget, in the lane of ``priority`` among this
        replica's waiters."""
        if self.backend == "local":  # before start(): the start-up reserve
            return await self.local.acquire(priority)
        now = self._clock()
        if self.backend == "fallback":
            if now < self._next_try:
                return await self.local.acquire(priority)
            self._next_try = now + RETRY_REDIS_EVERY
            self._come_back()  # try Redis again, holding to the share for a window
        if self.backend == "dual":
            grant = await self.local.acquire(priority)
            try:
                await self._shared_grant(grant, priority)
            except _Unavailable:  # fell back: the local grant stands
                pass
            except BaseException:  # cancelled: the grant is handed back unused
                self.release(grant)
                raise
            return grant
        start = self._clock()
        grant = self.local.track()
        try:
            await self._shared_grant(grant, priority)
        except _Unavailable:
            self.local.release(grant)
            return await self.local.acquire(priority)
        except BaseException:
            self.release(grant)
            raise
        grant.waited = self._clock() - start
        return grant

    async def _shared_grant(self, grant: Grant, priority: Priority) -> None:
        """Wait for this replica's asker to get ``grant`` a slot in the shared log;
        ``_Unavailable`` when Redis failed meanwhile."""
        turn = self._lanes.push(priority)
        if self._asker is None:
            self._asker = asyncio.ensure_future(self._ask())
        try:
            member = await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # granted as it was cancelled
                self._members[id(grant)] = turn.result()
            raise
        self._members[id(grant)] = member

    async def _ask(self) -> None:
        """While this replica's waiters wait: take the next slot of the shared log (one
        asker per replica), give it to the next waiter by the lane rule."""
        assert self._keys is not None
        try:
            while self._lanes:
                self._seq += 1
                member = f"{self._id}:{self._seq}"
                args = [
                    self._limit,
                    round(self._span * 1000),
                    round(self.rate.window * 1000),
                    round(HOLD_IN_FLIGHT * 1000),
                    member,
                    1 if self.rate.pace else 0,
                    uuid.uuid4().hex,
                ]
                while True:
                    try:
                        answer = await asyncio.wait_for(
                            self._acquire(keys=self._keys, args=args), self._timeout
                        )
                    except Exception as error:
                        self._fall_back(error)
                        self._lanes.fail(_Unavailable())
                        return
                    granted, wait_ms, epoch, limit = answer
                    self._limit = int(limit)
                    self._check_epoch(epoch.decode() if isinstance(epoch, bytes) else str(epoch))
                    if int(granted):
                        break
                    await asyncio.sleep(min(MAX_NAP, int(wait_ms) / 1000))
                turn = self._lanes.pop()
                if turn is None:  # every waiter gave up meanwhile: the slot goes unused
                    self._release_member(member)
                    return
                turn.set_result(member)
                self.granted += 1
                metrics.LIMITER_GRANTS.labels("redis").inc()
        except asyncio.CancelledError:  # closing
            self._lanes.fail(_Unavailable())
            raise
        except Exception as error:  # a bug: no waiter may wait for ever on it
            self._lanes.fail(error)
        finally:
            self._asker = None

    def release(self, grant: Grant) -> None:
        self.local.release(grant)
        member = self._members.pop(id(grant), None)
        if member is None or self._keys is None or self.backend == "fallback":
            return
        self._release_member(member)

    def _release_member(self, member: str) -> None:
        self._spawn(self._send_release(member))

    async def _send_release(self, member: str) -> None:
        assert self._keys is not None
        try:
            await asyncio.wait_for(
                self._release(keys=self._keys[:1], args=[member]), self._timeout
            )
        except Exception:  # the slot ages out by itself (HOLD_IN_FLIGHT): no harm
            metrics.LIMITER_REDIS_ERRORS.labels("release").inc()

    def on_rate_limited(self, retry_after: float | None, backoff: float) -> None:
        self.rate_limited += 1
        self.local.on_rate_limited(retry_after, backoff)
        if self._keys is None or self.backend == "fallback":
            return
        pause = retry_after if retry_after is not None and retry_after >= 0 else backoff
        self._spawn(self._share_cooldown(pause))

    async def _share_cooldown(self, pause: float) -> None:
        assert self._keys is not None
        floor = max(1, int(self.rate.limit * 0.1))
        try:
            limit = await asyncio.wait_for(
                self._rate_limited(
                    keys=[self._keys[2], self._keys[4]],
                    args=[self.rate.limit - RESERVE, round(self.rate.window * 1000),
                          round(pause * 1000), floor],
                ),
                self._timeout,
            )  # fmt: skip
            self._limit = int(limit)
        except Exception as error:
            self._fall_back(error)

    async def shared_use(self) -> float | None:
        """The workspace's budget in use over the last window, as Redis sees it (all
        replicas); None when Redis is not in use."""
        if self._keys is None or self.backend in ("local", "fallback"):
            return None
        try:
            server = await asyncio.wait_for(self._redis.time(), self._timeout)
            now_ms = server[0] * 1000 + server[1] // 1000
            used = await asyncio.wait_for(
                self._redis.zcount(self._keys[0], now_ms - round(self._span * 1000), "+inf"),
                self._timeout,
            )
        except Exception:
            return None
        return float(used) / self.rate.limit

    # --- modes ------------------------------------------------------------------------
    @property
    def _span(self) -> float:
        return self.rate.window + self.rate.margin

    def _own_recent(self) -> int:
        return self.local.sent_in_last_window()

    def _fall_back(self, error: BaseException) -> None:
        if self.backend == "fallback":
            return
        metrics.LIMITER_FALLBACKS.inc()
        log.warning(
            log_events.LIMITER_FALLBACK,
            error=type(error).__name__,
            action="using this replica's share of the partitions until Redis answers again",
        )
        self.local.hold(self._own_recent())
        self._next_try = self._clock() + RETRY_REDIS_EVERY
        self._set_backend("fallback")
        self._spawn(self._drop_connections())

    async def _drop_connections(self) -> None:
        """Close every pooled connection: after a Redis restart each one left open would
        fail once on its next use ("closed by server"), and that use may be the next
        ask, which would fall back again."""
        pool = getattr(self._redis, "connection_pool", None)
        if pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.disconnect(), self._timeout)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _come_back(self) -> None:
        """Redis may answer again: keep to the share too (Redis did not see the requests
        made while falling back, ours nor those of replicas that come back up to a retry
        later) until a window after the last of them."""
        self.local.hold(self._own_recent())
        self._dual_until = self._clock() + self._span + RETRY_REDIS_EVERY
        self._set_backend("dual")
        log.info(log_events.LIMITER_SHARED_AGAIN)

    def _check_epoch(self, epoch: str) -> None:
        if self._epoch is not None and epoch != self._epoch and self.backend == "redis":
            # Redis lost its data (a restart without persistence): its log is empty but
            # the replicas' requests of the last window still count at Gist.
            log.warning(log_events.LIMITER_REDIS_RESET)
            self.local.hold(self._own_recent())
            self._dual_until = self._clock() + self._span
            self._set_backend("dual")
        self._epoch = epoch

    @property
    def backend(self) -> str:
        """The budget in use: "local" (before ``start``), "redis", "dual" (back on Redis,
        held to the local share for one window too) or "fallback"."""
        if self._backend == "dual" and self._clock() >= self._dual_until:
            self._set_backend("redis")
        return self._backend

    def _set_backend(self, backend: str) -> None:
        self._backend = backend
        for name in ("local", "redis", "fallback", "dual"):
            metrics.LIMITER_BACKEND.labels(name).set(1 if name == backend else 0)


class _Unavailable(Exception):
    """Redis did not answer (in time): the replica fell back."""


def redis_client(url: str, password: str | None, timeout: float) -> Any:
    """An asyncio Redis client for ``url`` (``redis://`` or ``rediss://``)."""
    from redis.asyncio import Redis

    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry_on_timeout": False,
    }
    if password:
        options["password"] = password
    return Redis.from_url(url, **options)

