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

**Modes.** Which budget a replica uses is one state machine (``Mode``, ``Event``,
``TRANSITIONS``, kept by ``BudgetModes``); each mode gives the local limiter one role:

=========  ===================================================================
LOCAL      before ``start``: the local limiter grants (the start-up reserve)
SHARED     Redis grants; the local limiter only counts this replica's requests
           (``RateLimiter.track``), so it knows them if it must fall back, and
           schedules nothing for them
CHECKING   a call to Redis failed or took longer than ``timeout``: nothing is
           granted until one more call (what the log owes, else a ping) says
           whether Redis answers, one time-out at most
FALLBACK   Redis does not answer: the local limiter grants, at the partition share
           (``RateLimiter.set_share``)
RETURNING  back on Redis: the local limiter grants first, at the share, then Redis,
           for a window plus ``RETRY_REDIS_EVERY``
=========  ===================================================================

==========  ==============  =========  ==========================================
from        event           to         the local limiter
==========  ==============  =========  ==========================================
LOCAL       STARTED         SHARED     counts only from now
LOCAL       REDIS_FAILED    FALLBACK   goes on granting
SHARED      REDIS_FAILED    CHECKING   resumes: limits re-applied, pacing from now
SHARED      EPOCH_CHANGED   RETURNING  resumes, and holds (below)
CHECKING    REDIS_ANSWERED  RETURNING  goes on
CHECKING    REDIS_FAILED    FALLBACK   holds, if not yet since SHARED
FALLBACK    REDIS_ANSWERED  RETURNING  goes on
FALLBACK    RETRY_DUE       RETURNING  goes on
RETURNING   REDIS_FAILED    CHECKING   goes on
RETURNING   EPOCH_CHANGED   RETURNING  holds, if not yet since SHARED (the period
                                       starts again)
RETURNING   RETURNING_OVER  SHARED     counts only from now
==========  ==============  =========  ==========================================

Any other (mode, event) changes nothing. Why these rules:

- *Leaving SHARED, the local limiter resumes*: its pacing restarts from that moment;
  nothing was scheduled locally for the Redis grants, so it never waits on them, only
  on the window's count and its share.
- *Once Redis' view is lost after SHARED, the replica holds*, for one window, to what it
  sent itself in the last window (as well as its share): falling back, or seeing a
  changed *epoch* key (Redis lost its data). The other replicas' recent requests still
  count at Gist, and the replicas' own recent requests added up to no more than the
  budget. Once is enough: from then on its requests are bound by its share. A replica
  whose view was only in doubt (a late answer) and is back on Redis needs no hold: every
  grant it takes is Redis' too.
- *A failed or late call is checked before falling back*: a request granted locally
  while the other replicas still take slots from Redis is one they do not see, and they
  may take the slot it reuses (a 429). One late answer so costs the waiting requests one
  more call, and the replica returns (below) without a local grant.
- *Back on Redis, a replica keeps to its share too, for a window plus
  RETRY_REDIS_EVERY*: the other replicas come back up to one retry later (sooner when
  busy), and until then their requests on their shares may miss from Redis' log (a
  replica back alone after one window could take slots they had used). Every replica
  not in SHARED keeps to its share, and the shares add up to no more than the budget.
- *A replica returns as soon as Redis answers one of its calls*, not only on the retry:
  a return only adds Redis' check to the share it keeps anyway.

**What Redis' log owes this replica** (``LogRepairs``), written as soon as Redis answers
(by a background write, and always before the next shared grant): each request granted
while falling back, in flight or at its answer time, so that replicas still on Redis
count it; the answer time of a request whose release Redis did not take; and the removal
of a slot the log may hold for a request never sent (an acquire that timed out although
its script ran, a slot granted after its waiter gave up), which would otherwise hold it
``HOLD_IN_FLIGHT``. Requests in flight when Redis lost its data are owed again. What a
window has made irrelevant is forgotten, and the ledger is bounded.

One case stays uncovered: a replica cut off from Redis while the others still reach it
sends on its share, unseen by them until Redis takes its writes; meanwhile the workspace
may get up to that share too many (then Gist's 429s slow everyone).

**Priorities are per replica.** The shared log is one log: Redis knows nothing of lanes.
Each replica's waiters queue in its own ``Lanes``, and one asker task per replica asks
Redis for the next slot and gives it, once granted, to the next waiter by the lane rule
(``_limiter``), so a replica's urgent requests overtake its own others, not other
replicas' ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, TypeVar

import structlog

from destination.gist._limiter import RESERVE, Grant, Lanes, Priority, RateLimit, RateLimiter
from destination.observability import log_events, metrics

log = structlog.get_logger(__name__)

HOLD_IN_FLIGHT = 120.0
"""Seconds a request in flight holds its slot at most (longer than any request time-out):
the slots of a replica that died with requests in flight come free then."""

RETRY_REDIS_EVERY = 5.0
"""Seconds between attempts to return to Redis while falling back (sooner when Redis
takes one of the replica's writes meanwhile)."""

REPAIR_PAUSE = 1.0
"""Seconds background writes of what the log owes wait after one failed: Redis is likely
down, and the next write (or the return) carries everything owed anyway."""

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

_REPAIR = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local hold = tonumber(ARGV[1])
for i = 3, #ARGV, 2 do
  local member = ARGV[i]
  local owed = ARGV[i + 1]
  if owed == 'unused' then
    redis.call('ZREM', KEYS[1], member)
  elseif owed == 'in-flight' then
    redis.call('ZADD', KEYS[1], now + hold, member)
  else
    redis.call('ZADD', KEYS[1], now - tonumber(owed), member)
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return now
"""
"""KEYS: log. ARGV: hold ms, expiry ms, then pairs of a member and what is owed for it:
'unused' (remove it), 'in-flight' (held as a grant now), or its answer's age in ms."""


# --- the modes: one state machine -----------------------------------------------------
class Mode(enum.Enum):
    """The budget a replica uses."""

    LOCAL = "local"
    """Before ``start``: the local limiter grants (the start-up reserve)."""
    SHARED = "shared"
    """Redis grants; the local limiter only counts this replica's requests."""
    CHECKING = "checking"
    """A call to Redis failed or was late: nothing is granted until one more call (what
    the log owes, else a ping) says whether Redis answers; one time-out at most."""
    FALLBACK = "fallback"
    """Redis failed: the local limiter grants, at the partition share."""
    RETURNING = "returning"
    """Back on Redis: the local limiter grants first, at the share, then Redis."""

    @property
    def uses_redis(self) -> bool:
        """Whether requests take a slot of Redis' log in this mode."""
        return self in (Mode.SHARED, Mode.RETURNING)

    @property
    def backend(self) -> str:
        """Its ``backend`` label in the metrics (CHECKING, one time-out at most, counts
        as "fallback": Redis' budget is not in use)."""
        return _BACKENDS[self]


_BACKENDS: Final[Mapping[Mode, str]] = MappingProxyType({
    Mode.LOCAL: "local", Mode.SHARED: "redis", Mode.CHECKING: "fallback",
    Mode.FALLBACK: "fallback", Mode.RETURNING: "dual",
})  # fmt: skip


class Event(enum.Enum):
    """What ``BudgetModes`` is told (or its clock makes due)."""

    STARTED = "started"
    """``start``: Redis answered."""
    REDIS_ANSWERED = "redis answered"
    """A call was answered within the time-out (a check, or a write of what the log
    owes)."""
    REDIS_FAILED = "redis failed"
    """A call failed or was not answered within the time-out (an ask, a check, a shared
    cooldown, ``start``'s ping)."""
    EPOCH_CHANGED = "epoch changed"
    """Redis answered with another epoch: it lost its data, and its log with it."""
    RETRY_DUE = "retry due"
    """``RETRY_REDIS_EVERY`` after falling back: try Redis again."""
    RETURNING_OVER = "returning over"
    """A window plus ``RETRY_REDIS_EVERY`` after returning."""


class LocalRule(enum.Enum):
    """What a transition does to the local limiter."""

    KEEP = "keep"
    """It goes on as it is (granting, or counting)."""
    COUNT = "count"
    """From now on it only counts this replica's requests (Redis grants them)."""
    RESUME = "resume"
    """It grants again (``RateLimiter.resume``): limits re-applied, pacing from now."""
    HOLD = "hold"
    """Redis' view is lost: for a window it is held to this replica's own requests of
    the last window (``RateLimiter.hold``), once per departure from SHARED (before it,
    the replica's requests were not bound by its share; after one hold they are)."""
    RESUME_AND_HOLD = "resume and hold"
    """Both."""


TRANSITIONS: Final[Mapping[tuple[Mode, Event], tuple[Mode, LocalRule]]] = MappingProxyType(
    {
        (Mode.LOCAL, Event.STARTED): (Mode.SHARED, LocalRule.COUNT),
        (Mode.LOCAL, Event.REDIS_FAILED): (Mode.FALLBACK, LocalRule.KEEP),
        (Mode.SHARED, Event.REDIS_FAILED): (Mode.CHECKING, LocalRule.RESUME),
        (Mode.SHARED, Event.EPOCH_CHANGED): (Mode.RETURNING, LocalRule.RESUME_AND_HOLD),
        (Mode.CHECKING, Event.REDIS_ANSWERED): (Mode.RETURNING, LocalRule.KEEP),
        (Mode.CHECKING, Event.REDIS_FAILED): (Mode.FALLBACK, LocalRule.HOLD),
        (Mode.FALLBACK, Event.REDIS_ANSWERED): (Mode.RETURNING, LocalRule.KEEP),
        (Mode.FALLBACK, Event.RETRY_DUE): (Mode.RETURNING, LocalRule.KEEP),
        (Mode.RETURNING, Event.REDIS_FAILED): (Mode.CHECKING, LocalRule.KEEP),
        (Mode.RETURNING, Event.EPOCH_CHANGED): (Mode.RETURNING, LocalRule.HOLD),
        (Mode.RETURNING, Event.RETURNING_OVER): (Mode.SHARED, LocalRule.COUNT),
    }
)
"""Every transition (the table of the module docstring); entering FALLBACK sets the
retry, entering RETURNING (from itself too) starts its period. Any other (mode, event)
changes nothing."""


def transition(mode: Mode, event: Event) -> tuple[Mode, LocalRule]:
    """The mode after ``event`` in ``mode``, and what it does to the local limiter."""
    return TRANSITIONS.get((mode, event), (mode, LocalRule.KEEP))


@dataclass(frozen=True, slots=True)
class Change:
    """A transition that happened."""

    before: Mode
    event: Event
    after: Mode
    rule: LocalRule


class BudgetModes:
    """One replica's mode, its two timers on an injected clock, and each transition's rule
    applied to the local limiter. No I/O: ``RedisBudget`` tells it what happened and acts
    on the changes (logs, metrics, waiters routed again)."""

    __slots__ = ("_clock", "_retry_every", "_span", "hold_owed", "local", "mode",
                 "retry_at", "returning_until")  # fmt: skip

    def __init__(
        self,
        local: RateLimiter,
        *,
        span: float,
        retry_every: float = RETRY_REDIS_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.local = local
        self._span = span
        self._retry_every = retry_every
        self._clock = clock
        self.mode = Mode.LOCAL
        self.retry_at = math.inf  # FALLBACK: when to try Redis again
        self.returning_until = -math.inf  # RETURNING: when it ends
        self.hold_owed = False  # left SHARED, not held since

    def due(self) -> Event | None:
        """The event the clock has made due in this mode, if any."""
        now = self._clock()
        if self.mode is Mode.FALLBACK and now >= self.retry_at:
            return Event.RETRY_DUE
        if self.mode is Mode.RETURNING and now >= self.returning_until:
            return Event.RETURNING_OVER
        return None

    def on(self, event: Event) -> Change | None:
        """Take ``event``: the change it made, or None when it changes nothing."""
        if (self.mode, event) not in TRANSITIONS:
            return None
        after, rule = transition(self.mode, event)
        now = self._clock()
        change = Change(self.mode, event, after, rule)
        self.mode = after
        if after is Mode.FALLBACK:
            self.retry_at = now + self._retry_every
        elif after is Mode.RETURNING:
            self.returning_until = max(self.returning_until,
                                       now + self._span + self._retry_every)  # fmt: skip
        if change.before is Mode.SHARED:
            self.hold_owed = True
        elif after is Mode.SHARED:
            self.hold_owed = False
        if rule in (LocalRule.RESUME, LocalRule.RESUME_AND_HOLD):
            self.local.resume()
        if rule in (LocalRule.HOLD, LocalRule.RESUME_AND_HOLD) and self.hold_owed:
            self.hold_owed = False
            self.local.hold(self.local.sent_in_last_window())
        return change


# --- what the log owes this replica ------------------------------------------------------
class _Kind(enum.Enum):
    IN_FLIGHT = "in-flight"
    ANSWERED = "answered"
    UNUSED = "unused"


@dataclass(frozen=True, slots=True)
class Owed:
    """One write the log owes: ``kind`` of the request, and since when (its answer time
    when answered)."""

    kind: _Kind
    at: float

    def argument(self, now: float) -> str:
        """How ``_REPAIR`` takes it: 'unused', 'in-flight' or the answer's age in ms."""
        if self.kind is not _Kind.ANSWERED:
            return str(self.kind.value)
        return str(max(0, round((now - self.at) * 1000)))


class LogRepairs:
    """Writes Redis' log owes this replica (see the module docstring), by member.

    Invalidated by: a write Redis took (each entry it carried, unless the entry changed
    meanwhile: then the newer one is owed still); age (an answer a window old no longer
    counts, a slot owed for ``HOLD_IN_FLIGHT`` has aged out of the log by itself); the
    bound (the oldest entry goes first: memory never grows with an outage's length)."""

    __slots__ = ("_bound", "_clock", "_owed", "_span")

    def __init__(self, span: float, *, bound: int, clock: Callable[[], float]) -> None:
        self._span = span
        self._bound = bound
        self._clock = clock
        self._owed: dict[str, Owed] = {}

    def sent(self, member: str) -> None:
        """A request in flight the log may lack (kept if already owed)."""
        if member not in self._owed:
            self._put(member, Owed(_Kind.IN_FLIGHT, self._clock()))

    def answered(self, member: str, at: float) -> bool:
        """The request of ``member`` was answered at ``at``: if owed, it is owed at that
        time now. Whether it was owed."""
        if member not in self._owed:
            return False
        self._owed[member] = Owed(_Kind.ANSWERED, at)
        return True

    def missed_answer(self, member: str, at: float) -> None:
        """The log did not take the answer (at ``at``) of a request: owed at that time."""
        self._put(member, Owed(_Kind.ANSWERED, at))

    def unused(self, member: str) -> None:
        """The log may hold a slot for ``member``, a request never sent: owed its removal."""
        self._put(member, Owed(_Kind.UNUSED, self._clock()))

    def _put(self, member: str, owed: Owed) -> None:
        self._owed[member] = owed
        while len(self._owed) > self._bound:
            del self._owed[next(iter(self._owed))]

    def entries(self) -> list[tuple[str, Owed]]:
        """What is owed now (what age has made irrelevant forgotten first)."""
        now = self._clock()
        for member, owed in list(self._owed.items()):
            if owed.at <= now - (self._span if owed.kind is _Kind.ANSWERED else HOLD_IN_FLIGHT):
                del self._owed[member]
        return list(self._owed.items())

    def written(self, entries: list[tuple[str, Owed]]) -> None:
        """Redis took ``entries``: each is paid unless it changed since."""
        for member, owed in entries:
            if self._owed.get(member) == owed:
                del self._owed[member]

    def __len__(self) -> int:
        return len(self._owed)


# --- the budget --------------------------------------------------------------------------
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
        self._repair_log = redis.register_script(_REPAIR)
        self._modes = BudgetModes(local, span=self._span, clock=clock)
        self._lanes: Lanes[str] = Lanes()  # waiters for the shared log; a turn's result
        self._asker: asyncio.Task[None] | None = None  # is the member of its grant
        self._owed = LogRepairs(self._span, bound=max(64, 4 * rate.limit), clock=clock)
        self._repairing = asyncio.Lock()  # one write of what is owed at a time, in order
        self._repairer: asyncio.Task[None] | None = None
        self._repairs_paused_until = -math.inf
        self._checked = asyncio.Event()  # set but while CHECKING
        self._checked.set()
        self._doubt = ""  # the call whose failure is being checked, for the metric
        self._epoch: str | None = None
        self._limit = rate.limit - RESERVE
        self._members: dict[int, str] = {}  # id(grant) -> member, for release
        self._pending: set[asyncio.Task[Any]] = set()
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

    @property
    def backend(self) -> str:
        """The budget in use, by mode: "local" (before ``start``), "redis", "fallback" or
        "dual" (returning: the share and Redis)."""
        return self._mode().backend

    # --- life -------------------------------------------------------------------------
    async def start(self, workspace_id: str) -> None:
        """Use the workspace's shared log from now on (falling back if Redis fails)."""
        base = f"{self._prefix}:{workspace_id}"
        self._keys = [f"{base}:log", f"{base}:schedule", f"{base}:cooldown", f"{base}:epoch",
                      f"{base}:cut"]  # fmt: skip
        try:
            await _bounded(self._redis.ping(), self._timeout)
        except Exception as error:
            self._report(Event.REDIS_FAILED, error, "ping")
            return
        self._report(Event.STARTED)
        log.info(log_events.LIMITER_SHARED, workspace=workspace_id)

    async def close(self) -> None:
        # The writes under way (releases, what the log owes) may finish, in a time-out.
        if self._asker is not None:
            self._asker.cancel()
        writes = [*self._pending, *([self._repairer] if self._repairer is not None else [])]
        if writes:
            await asyncio.wait(writes, timeout=self._timeout)
        while writes:  # a check cancelled falls back, which starts one more task
            for task in writes:
                task.cancel()
            await asyncio.gather(*writes, return_exceptions=True)
            writes = [*self._pending, *([self._repairer] if self._repairer is not None else [])]
        await self._redis.aclose()

    # --- the budget -------------------------------------------------------------------
    @property
    def current_limit(self) -> int:
        if self._mode().uses_redis:
            return self._limit
        return self.local.current_limit

    def utilisation(self) -> float:
        return self.local.utilisation()  # our own part; the workspace's: ``shared_use``

    async def acquire(self, priority: Priority = Priority.NORMAL) -> Grant:
        """A slot of the workspace's budget, in the lane of ``priority`` among this
        replica's waiters, taken as the mode says (a waiter whose mode changes while it
        waits for Redis goes the new mode's way)."""
        start = self._clock()
        while True:
            mode = self._mode()
            if mode is Mode.CHECKING:
                await self._checked.wait()
                continue
            if mode is Mode.SHARED:
                try:
                    member = await self._shared_grant(priority)
                except _Rerouted:
                    continue
                grant = self.local.track()
                break
            grant = await self.local.acquire(priority)
            if mode is Mode.LOCAL:  # before start(): the start-up reserve, no Redis
                return grant
            member = await self._after_local_grant(grant, priority)
            break
        self._members[id(grant)] = member
        grant.waited = self._clock() - start
        return grant

    async def _after_local_grant(self, grant: Grant, priority: Priority) -> str:
        """The member of a request the local limiter granted: a slot of the shared log
        too while Redis is in use, else a member owed to the log (falling back)."""
        try:
            while True:
                mode = self._mode()
                if mode is Mode.CHECKING:
                    await self._checked.wait()
                    continue
                if not mode.uses_redis:
                    break
                try:
                    return await self._shared_grant(priority)
                except _Rerouted:
                    continue
        except BaseException:  # cancelled: the local grant is handed back unused
            self.local.release(grant)
            raise
        member = self._next_member()
        self._owed.sent(member)
        self._repair_soon()
        return member

    async def _shared_grant(self, priority: Priority) -> str:
        """Wait for this replica's asker to get a slot in the shared log; its member.
        ``_Rerouted`` when the mode changed meanwhile."""
        turn = self._lanes.push(priority)
        if self._asker is None:
            self._asker = asyncio.ensure_future(self._ask())
        try:
            return await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self._owed.unused(turn.result())  # granted as it was cancelled: never sent
                self._repair_soon()
            raise

    async def _ask(self) -> None:
        """While this replica's waiters wait: take the next slot of the shared log (one
        asker per replica), give it to the next waiter by the lane rule. What the log
        owes this replica is written first."""
        keys = self._keys
        assert keys is not None
        try:
            while self._lanes:
                member = self._next_member()
                asked = False
                try:
                    await self._repair()
                    asked = True
                    answer = await _bounded(
                        self._acquire(keys=keys, args=self._ask_args(member)), self._timeout
                    )
                except Exception as error:
                    if asked:  # the script may have run, its answer lost or late
                        self._owed.unused(member)
                    self._report(Event.REDIS_FAILED, error, "acquire" if asked else "repair")
                    self._lanes.fail(_Rerouted())
                    return
                granted, wait_ms, epoch, limit = answer
                self._limit = int(limit)
                self._report(Event.REDIS_ANSWERED)
                self._check_epoch(epoch.decode() if isinstance(epoch, bytes) else str(epoch))
                if not int(granted):
                    await asyncio.sleep(min(MAX_NAP, int(wait_ms) / 1000))
                    continue
                turn = self._lanes.pop()
                if turn is None:  # every waiter gave up, or went another way meanwhile
                    self._owed.unused(member)
                    self._repair_soon()
                    continue
                turn.set_result(member)
                self.granted += 1
                metrics.LIMITER_GRANTS.labels("redis").inc()
        except asyncio.CancelledError:  # closing
            self._lanes.fail(_Rerouted())
            raise
        except Exception as error:  # a bug: no waiter may wait for ever on it
            self._lanes.fail(error)
        finally:
            self._asker = None

    def _ask_args(self, member: str) -> list[object]:
        return [
            self._limit,
            round(self._span * 1000),
            round(self.rate.window * 1000),
            round(HOLD_IN_FLIGHT * 1000),
            member,
            1 if self.rate.pace else 0,
            uuid.uuid4().hex,
        ]

    def _next_member(self) -> str:
        self._seq += 1
        return f"{self._id}:{self._seq}"

    def release(self, grant: Grant) -> None:
        self.local.release(grant)
        member = self._members.pop(id(grant), None)
        if member is None or self._keys is None:
            return
        now = self._clock()
        if self._owed.answered(member, now):
            self._repair_soon()
        elif self._modes.mode is Mode.FALLBACK:  # Redis failed: its write waits with the rest
            self._owed.missed_answer(member, now)
            self._repair_soon()
        else:
            self._spawn(self._send_release(member, now))

    async def _send_release(self, member: str, at: float) -> None:
        assert self._keys is not None
        try:
            await _bounded(self._release(keys=self._keys[:1], args=[member]), self._timeout)
        except Exception:  # owed: written once Redis answers, not held HOLD_IN_FLIGHT
            metrics.LIMITER_REDIS_ERRORS.labels("release").inc()
            self._owed.missed_answer(member, at)
            self._repair_soon()

    def on_rate_limited(self, retry_after: float | None, backoff: float) -> None:
        self.rate_limited += 1
        self.local.on_rate_limited(retry_after, backoff)
        if self._keys is None or not self._mode().uses_redis:
            return
        pause = retry_after if retry_after is not None and retry_after >= 0 else backoff
        self._spawn(self._share_cooldown(pause))

    async def _share_cooldown(self, pause: float) -> None:
        assert self._keys is not None
        floor = max(1, int(self.rate.limit * 0.1))
        try:
            limit = await _bounded(
                self._rate_limited(
                    keys=[self._keys[2], self._keys[4]],
                    args=[self.rate.limit - RESERVE, round(self.rate.window * 1000),
                          round(pause * 1000), floor],
                ),
                self._timeout,
            )  # fmt: skip
            self._limit = int(limit)
        except Exception as error:
            self._report(Event.REDIS_FAILED, error, "cooldown")

    async def shared_use(self) -> float | None:
        """The workspace's budget in use over the last window, as Redis sees it (all
        replicas); None when Redis is not in use."""
        if self._keys is None or not self._mode().uses_redis:
            return None
        try:
            server = await _bounded(self._redis.time(), self._timeout)
            now_ms = server[0] * 1000 + server[1] // 1000
            used = await _bounded(
                self._redis.zcount(self._keys[0], now_ms - round(self._span * 1000), "+inf"),
                self._timeout,
            )
        except Exception:
            return None
        return float(used) / self.rate.limit

    # --- what the log owes ------------------------------------------------------------
    async def _repair(self) -> bool:
        """Write what the log owes this replica (``LogRepairs``), one write at a time so
        that a later one never lands first; whether there was anything to write. Raises
        what Redis raised."""
        assert self._keys is not None
        async with self._repairing:
            entries = self._owed.entries()
            if not entries:
                return False
            now = self._clock()
            args: list[object] = [round(HOLD_IN_FLIGHT * 1000),
                                  round((self._span + HOLD_IN_FLIGHT) * 1000)]  # fmt: skip
            for member, owed in entries:
                args += [member, owed.argument(now)]
            await _bounded(self._repair_log(keys=self._keys[:1], args=args), self._timeout)
            self._owed.written(entries)
            return True

    def _repair_soon(self) -> None:
        """Write what is owed in the background (one writer; paused after a failure)."""
        if (
            self._repairer is None
            and self._keys is not None
            and len(self._owed) > 0
            and self._clock() >= self._repairs_paused_until
        ):
            self._repairer = asyncio.ensure_future(self._repair_in_background())

    async def _repair_in_background(self) -> None:
        try:
            while len(self._owed) > 0:
                try:
                    await self._repair()
                except Exception:
                    metrics.LIMITER_REDIS_ERRORS.labels("repair").inc()
                    self._repairs_paused_until = self._clock() + REPAIR_PAUSE
                    return
                self._report(Event.REDIS_ANSWERED)  # falling back: Redis is back
        finally:
            self._repairer = None

    # --- modes ------------------------------------------------------------------------
    @property
    def _span(self) -> float:
        return self.rate.window + self.rate.margin

    def _mode(self) -> Mode:
        """The mode now, once what the clock made due has happened."""
        event = self._modes.due()
        if event is not None:
            self._report(event)
        return self._modes.mode

    async def _check(self, fresh: bool) -> None:
        """CHECKING: one more call decides whether Redis answers (writing what the log
        owes, a late answer's slot among them, else a ping), on ``fresh`` connections
        after a connection error."""
        try:
            if fresh:
                await self._drop_connections()
            if not await self._repair():
                await _bounded(self._redis.ping(), self._timeout)
        except BaseException as error:  # cancelled too: nobody may wait on the check
            self._report(Event.REDIS_FAILED, error)
            if not isinstance(error, Exception):
                raise
        else:
            metrics.LIMITER_REDIS_ERRORS.labels(self._doubt).inc()  # no fallback: counted
            self._report(Event.REDIS_ANSWERED)

    def _report(
        self, event: Event, error: BaseException | None = None, operation: str = ""
    ) -> None:
        """Tell the state machine (of a failure: of which ``operation``); act on the
        change it made, if any."""
        change = self._modes.on(event)
        if change is None:
            return
        for backend in ("local", "redis", "fallback", "dual"):
            metrics.LIMITER_BACKEND.labels(backend).set(int(backend == change.after.backend))
        if change.before is Mode.CHECKING:
            self._checked.set()
        if change.after is Mode.CHECKING:
            self._doubt = operation or "acquire"
            self._checked.clear()
            self._spawn(self._check(fresh=not isinstance(error, TimeoutError)))
        elif change.after is Mode.FALLBACK:
            metrics.LIMITER_FALLBACKS.inc()
            log.warning(
                log_events.LIMITER_FALLBACK,
                error=type(error).__name__,
                action="using this replica's share of the partitions until Redis answers again",
            )
            self._spawn(self._drop_connections())
        elif event is Event.EPOCH_CHANGED:
            # Redis lost its data (a restart without persistence): its log is empty but
            # the replicas' requests of the last window still count at Gist.
            log.warning(log_events.LIMITER_REDIS_RESET)
            for member in self._members.values():  # in flight: owed to the new log
                self._owed.sent(member)
        elif change.before is Mode.FALLBACK:
            log.info(log_events.LIMITER_SHARED_AGAIN)
        if change.before is Mode.SHARED or change.after in (Mode.CHECKING, Mode.FALLBACK):
            # The waiters for the shared log took no local grant (SHARED), or Redis is in
            # doubt: each goes the new mode's way.
            self._lanes.fail(_Rerouted())

    def _check_epoch(self, epoch: str) -> None:
        known, self._epoch = self._epoch, epoch
        if known is not None and epoch != known:
            self._report(Event.EPOCH_CHANGED)

    async def _drop_connections(self) -> None:
        """Close every pooled connection: after a Redis restart each one left open would
        fail once on its next use ("closed by server"), and that use may be the next
        ask, which would fall back again."""
        pool = getattr(self._redis, "connection_pool", None)
        if pool is not None:
            with contextlib.suppress(Exception):
                await _bounded(pool.disconnect(), self._timeout)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)


class _Rerouted(Exception):
    """The mode changed while waiting for Redis (Redis failed, or lost its data): the
    waiter goes the new mode's way."""


_T = TypeVar("_T")


async def _bounded(awaitable: Awaitable[_T], seconds: float) -> _T:
    """``asyncio.wait_for`` without its flaw on Python 3.11: a cancellation that arrives
    as the awaited call answers is lost there, and a loop built on it does not stop (a
    worker's housekeeping outlived its stop this way: model test seeds 32, 41, 56)."""
    async with asyncio.timeout(seconds):
        return await awaitable


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
