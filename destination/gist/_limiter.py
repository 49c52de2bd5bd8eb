"""The workspace's request budget: never more than ``limit`` requests in any interval of
``window`` seconds as Gist counts them, waiting requests served by priority, then in
arrival order.

Gist allows 100 requests per 10 s per workspace and does not say whether that window is
fixed or sliding; a limiter correct for a sliding window is correct for a fixed one, and
a token bucket is neither (it lets 2x the limit through in one window).

**A request holds its slot until a window after its answer.** Gist counts a request when
it arrives, which is somewhere between our grant and its answer; on a busy machine
(measured: a saturated 2-core host) a granted request can wait hundreds of milliseconds
before it is on the wire, more than any fixed margin, and Gist then counts ``limit + 1``
in one of its windows. So a slot is taken at the grant, kept while the request is in
flight, and freed ``window`` (plus ``margin``) after the answer came back, an upper bound
of Gist's count time: whatever the delays on either side, two requests ``limit`` apart
arrive a full window apart. The cost is the answer's latency per request (tens of
milliseconds in 10 s).

Grants are also *paced*: spread ``span / limit`` apart rather than a window's budget in
one burst (a burst puts the requests on the wire one after another, with the jitter
that causes). The pacing schedule does not drift: each grant advances a theoretical send
time by one gap from the previous one, and a grant up to half a gap early or late keeps
it. Only this limiter's own grants move the schedule: requests granted by a shared
budget (``track``) are counted, never scheduled, and when this limiter grants again
after one (``resume``) its schedule starts afresh from that moment.

**Shares.** Several replicas of the worker on one workspace must not add up to more than
its budget. With a shared limiter (``_redis``) they draw from one log; without one, each
takes ``set_share(owned, total)``: its share of the assigned partitions, of the budget
less ``RESERVE`` (kept for starting replicas' key checks). A share that shrinks applies at
once (the replica sends nothing more until its own requests of the last window are below
it). A share that *grows* applies ``GROWTH_DELAY`` (2 s) after the assignment, at its pace
(until then, the lowest of the new share and any limit in force during the last window).
Why that is enough, although the previous owners' requests are still in Gist's window:
every replica's grants are paced, so the requests it made under its old share leave the
window at that share's rate, no faster than they came, and a replica that gains their
share sends at most that much faster. The sum of the replicas' rates never exceeds the
budget's, provided a replica's share grows no earlier than its previous owner's shrank or
it stopped: a stopping replica stops sending before it leaves the group (and its release
says when: ``pipeline.consume``), a killed one was gone for the session timeout before
the group noticed, and the members of one rebalance get their assignments in the same
round, at slightly different times, which ``GROWTH_DELAY`` covers, with the pacing's
slack of a request or two and requests that reach Gist late on a busy host
(``test_limiter`` plays assignments up to 0.5 s apart and arrivals up to 0.3 s after the
grant: at most 99 requests in any window over 60 seeds). Measured against a
window's wait (the rule until 2026-12-08): a failover's survivor used 73% of the budget
over the 20 s after its takeover, now 93% (``benchmarks/RESULTS.md``). What no rule
without a shared view covers: a member the group expelled that still sends (it cannot
reach Kafka and does not know); it stops as soon as it learns. Before any assignment a
replica has ``RESERVE`` for its start-up calls.

**Priorities.** Every request waits in the lane of its ``Priority``; priority decides only
the order of grants, never whether one is made (nothing is dropped). Each time a slot is
free and requests wait, ``Lanes.pop`` picks the next one:

1. ``CRITICAL`` (batch-status polls, the start-up key check) goes first: they are few, and
   a poll that waits holds offsets and memory. Only when CRITICAL requests keep coming
   do the others still get every other grant (``SHARE_BESIDE_CRITICAL``, 50 %): a flood
   of polls must not starve the deliveries whose batches they poll. Precisely: while
   CRITICAL and other lanes both wait, the others earn half a grant of credit per grant,
   and take the grant when it reaches a whole one (paying it); a CRITICAL request so gets
   the next grant, or the one after when the last grant went to CRITICAL too.
2. A grant for the other lanes: each of ``HIGH``, ``NORMAL``, ``LOW`` that has a waiter
   earns its reserved share of it as credit (``LANE_SHARES``: 60, 30 and 10 % of a
   grant); a lane that has no waiter loses its credit. The highest lane whose credit
   reached a whole grant is owed one and goes;
3. else the highest lane that waits goes.

The lane served pays a whole grant of credit (never going below none). So, over any run
of those grants during which a lane waits, it gets at least its share of them (60/30/10
%, less at most four grants), and higher lanes take whatever the lower ones are not owed
(HIGH and LOW waiting: 90/10); within a lane, strictly first come first served.

``SlidingWindow`` is the pure arithmetic on an explicit ``now``; ``Lanes`` the order of
waiters; ``RateLimiter`` adds the async queue, an injected clock, the shares and the
adaptive slow-down after a 429 from Gist (someone else shares the workspace): a pause for
``Retry-After`` (or a backoff), and a multiplicative cut of the limit that recovers by a
tenth per quiet window.
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Generic, Protocol, TypeVar

RESERVE = 2
"""Requests per window a shared budget keeps for replicas that are starting (their
``GET /token/info`` comes before they know their share)."""

GROWTH_DELAY: Final = 2.0
"""Seconds after an assignment before a share that grew applies (see **Shares**); a
window, if that is shorter (the previous owners' requests have all left it by then)."""


class Priority(enum.IntEnum):
    """How soon a request should go when requests wait; a greater value goes first (so
    ``max`` of several is the most urgent). Rules files name them in lower case."""

    LOW = 0
    NORMAL = 1
    HIGH = 2
    CRITICAL = 3
    """Batch-status polls and the start-up key check: first (at least every other grant
    while they keep coming), outside the shares of the others."""

    @property
    def label(self) -> str:
        """The name in rules files, logs and metrics: ``high``."""
        return self.name.lower()


LANE_SHARES: Final[Mapping[Priority, int]] = MappingProxyType(
    {Priority.HIGH: 60, Priority.NORMAL: 30, Priority.LOW: 10}
)
"""Percent of the grants (those not to CRITICAL) each lane is sure of while it waits (see
the module docstring); they add up to 100."""

SHARE_BESIDE_CRITICAL: Final = 50
"""Percent of the grants the lanes below CRITICAL are sure of, together, while CRITICAL
requests wait too."""

_WHOLE: Final = 100  # a whole grant, in the unit of LANE_SHARES
_SHARED_LANES: Final = tuple(sorted(LANE_SHARES, reverse=True))  # HIGH, NORMAL, LOW

_R = TypeVar("_R")


class Lanes(Generic[_R]):
    """Waiters queued by priority, each a future its turn resolves, and who goes next.

    ``pop`` applies the rule of the module docstring; a waiter that gave up (its future
    cancelled) is skipped and gives its turn to the next. Needs a running event loop."""

    __slots__ = ("_beside_critical", "_credit", "_queues")

    def __init__(self) -> None:
        self._queues: dict[Priority, deque[asyncio.Future[_R]]] = {
            priority: deque() for priority in sorted(Priority, reverse=True)
        }
        self._credit: dict[Priority, int] = dict.fromkeys(LANE_SHARES, 0)
        self._beside_critical = 0  # the other lanes' credit while CRITICAL waits too

    def push(self, priority: Priority) -> asyncio.Future[_R]:
        """Queue a waiter at the end of its lane; await the future for its turn."""
        future: asyncio.Future[_R] = asyncio.get_running_loop().create_future()
        self._queues[Priority(priority)].append(future)
        return future

    def _live(self, priority: Priority) -> bool:
        queue = self._queues[priority]
        while queue and queue[0].done():  # gave up while waiting
            queue.popleft()
        return bool(queue)

    def __bool__(self) -> bool:
        """Whether anyone waits."""
        return any(self._live(priority) for priority in self._queues)

    def pop(self) -> asyncio.Future[_R] | None:
        """The next waiter by the lane rule (taken off its lane), or None if none waits.
        Call it once per grant: the shares count calls."""
        waiting = [lane for lane in _SHARED_LANES if self._live(lane)]
        if self._live(Priority.CRITICAL):
            if not waiting:
                self._beside_critical = 0
                return self._queues[Priority.CRITICAL].popleft()
            self._beside_critical += SHARE_BESIDE_CRITICAL
            if self._beside_critical < _WHOLE:
                return self._queues[Priority.CRITICAL].popleft()
            self._beside_critical -= _WHOLE
        else:
            self._beside_critical = 0
        credit = self._credit
        for lane in _SHARED_LANES:
            credit[lane] = credit[lane] + LANE_SHARES[lane] if lane in waiting else 0
        if not waiting:
            return None
        owed = [lane for lane in waiting if credit[lane] >= _WHOLE]
        lane = owed[0] if owed else waiting[0]
        credit[lane] = max(0, credit[lane] - _WHOLE)
        return self._queues[lane].popleft()

    def pop_critical(self) -> asyncio.Future[_R] | None:
        """The next CRITICAL waiter (taken off its lane), or None if none waits; the other
        lanes' credit is left as it is."""
        if self._live(Priority.CRITICAL):
            return self._queues[Priority.CRITICAL].popleft()
        return None

    def fail(self, error: BaseException) -> None:
        """Every waiter's turn ends in ``error``; the lanes are left empty."""
        for queue in self._queues.values():
            for future in queue:
                if not future.done():
                    future.set_exception(error)
            queue.clear()


@dataclass(frozen=True, slots=True)
class RateLimit:
    """``limit`` requests in any ``window`` seconds. ``margin`` seconds are added to the
    window on our side against clock granularity."""

    limit: int = 100
    window: float = 10.0
    margin: float = 0.05
    pace: bool = True

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError("rate limit must be at least 1 request")
        if self.window <= 0 or self.margin < 0:
            raise ValueError("rate window must be positive and margin non-negative")


@dataclass(slots=True, eq=False)
class Grant:
    """A slot taken for one request; hand it back with ``release`` once answered."""

    at: float
    waited: float
    released: bool = field(default=False)


class Budget(Protocol):
    """What the Gist client needs of a limiter (local, or shared through Redis)."""

    async def acquire(self, priority: Priority = Priority.NORMAL) -> Grant: ...
    def release(self, grant: Grant) -> None: ...
    def on_rate_limited(self, retry_after: float | None, backoff: float) -> None: ...
    def utilisation(self) -> float: ...
    @property
    def current_limit(self) -> int: ...


class SlidingWindow:
    """Requests in flight and the answer times of recent ones, and when the next may go.

    The pacing schedule (``_tat``) is this window's own: only ``grant`` moves it, and
    ``restart_pacing`` drops it (a schedule kept while someone else granted would be
    stale)."""

    __slots__ = ("_answered", "_capacity", "_tat", "in_flight", "limit", "pace", "span")

    def __init__(self, limit: int, span: float, pace: bool = False) -> None:
        self.limit = limit
        self.span = span
        self.pace = pace
        self._capacity = max(1, limit)
        self._answered: deque[float] = deque()  # answer times, in order
        self.in_flight = 0
        self._tat = float("-inf")  # paced: the theoretical time of the next send

    @property
    def gap(self) -> float:
        """Paced: the time between two sends at the limit's steady rate."""
        return self.span / max(1, self.limit)

    def next_slot(self, now: float) -> float:
        """The earliest time >= ``now`` at which one more request keeps every interval of
        ``span`` seconds at ``limit`` requests or fewer (``inf``: not before a request in
        flight is answered, or the limit is raised)."""
        if self.limit < 1:
            return math.inf
        answered = self._answered
        recent = 0  # answered within the last span
        for t in reversed(answered):
            if t <= now - self.span:
                break
            recent += 1
        excess = self.in_flight + recent - self.limit + 1
        slot = now
        if excess > 0:
            if excess > recent:
                return math.inf
            # The excess-th oldest recent answer must leave the span.
            slot = max(slot, answered[len(answered) - recent + excess - 1] + self.span)
        if self.pace:
            slot = max(slot, self._tat - self.gap / 2)
        return slot

    def grant(self, at: float) -> None:
        self.in_flight += 1
        if self.pace:
            self._tat = max(self._tat, at) + self.gap

    def release(self, at: float) -> None:
        """A request granted earlier was answered at ``at``."""
        self.in_flight -= 1
        answered = self._answered
        if answered and at < answered[-1]:
            at = answered[-1]  # keep the order (a clock never goes back here)
        answered.append(at)
        # Only the last ``limit`` answer times can ever decide a slot.
        if len(answered) > self._capacity * 2:
            for _ in range(len(answered) - self._capacity):
                answered.popleft()

    def track(self) -> None:
        """A request granted elsewhere: it holds a slot here (in flight, then answered)
        but does not move the pacing schedule."""
        self.in_flight += 1

    def restart_pacing(self, now: float) -> None:
        """Forget the pacing schedule: the next grant may go at ``now``."""
        self._tat = now

    def ungrant(self) -> None:
        """A grant never used (its waiter gave up before sending): Gist never saw it, so
        its slot is free again. The pacing schedule keeps it (a gap, no more)."""
        self.in_flight -= 1

    def record(self, at: float) -> None:
        """A request sent and answered at ``at`` (no time in flight)."""
        self.grant(at)
        self.release(at)

    def set_limit(self, limit: int) -> None:
        """A new limit; the pacing schedule keeps the last grant and takes the new gap
        from it (the next send at the new rate, with no debt from the old one: a start's
        reserve of 2 per window set the next send 5 s on)."""
        if self.pace and limit >= 1 and self.limit >= 1 and self._tat > -math.inf:
            self._tat += self.span / limit - self.gap
        self.limit = limit
        self._capacity = max(self._capacity, limit)

    def count_since(self, since: float) -> int:
        """Requests in flight, and those answered after ``since``."""
        return self.in_flight + sum(1 for t in self._answered if t > since)


Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class RateLimiter:
    """Every request to one workspace passes ``grant = await limiter.acquire(priority)``
    first and ``limiter.release(grant)`` once answered (or failed).

    Waiters queue in the lane of their priority; one dispatcher task (alive while anyone
    waits) waits for each free slot and grants it to the next waiter by the lane rule of
    the module docstring, so the choice is made when the slot frees, not when the waiter
    arrived. ``on_rate_limited`` is called when Gist still answers 429: everyone pauses
    and the limit is cut, so one 429 slows every sender of the workspace.
    """

    def __init__(
        self,
        rate: RateLimit = RateLimit(),
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        min_fraction: float = 0.1,
        cut: float = 0.7,
    ) -> None:
        self.rate = rate
        self._clock = clock
        self._sleep = sleep
        self._span = rate.window + rate.margin
        self._window = SlidingWindow(rate.limit, self._span, rate.pace)
        self._lanes: Lanes[float] = Lanes()  # waiters; a turn's result is the grant time
        self._dispatcher: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()  # an answer came, or the limit moved
        self._paused_until = 0.0
        self._min_limit = max(1, int(rate.limit * min_fraction))
        self._cut = cut
        self._cut_limit = rate.limit  # after 429s from Gist
        self._last_cut = float("-inf")
        self._quiet_since = float("-inf")  # recovery counts whole windows without a 429
        # Shares: the share's limit, and the limits in force lately (a grown share holds
        # to the lowest of them for GROWTH_DELAY).
        self._share: int | None = None  # None: the whole budget (no shares)
        self._held: tuple[float, int] | None = None  # (until, limit) while a share grows
        self._starting_until = float("-inf")  # a start's hold: only CRITICAL calls go
        self._history: deque[tuple[float, int]] = deque()
        self._waiting = 0
        self.granted = 0
        self.rate_limited = 0
        self.total_wait = 0.0

    # --- what operators see -----------------------------------------------------------
    @property
    def current_limit(self) -> int:
        """The limit in force now: the share, held or cut after 429s from Gist."""
        self._update(self._clock())
        return self._window.limit

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def in_flight(self) -> int:
        return self._window.in_flight

    def utilisation(self) -> float:
        """Share of the configured budget used over the last window (0..1)."""
        now = self._clock()
        return self._window.count_since(now - self.rate.window) / self.rate.limit

    # --- shares -----------------------------------------------------------------------
    def start_sharing(self) -> None:
        """From now on this process is one of several: before its first share it keeps to
        ``RESERVE`` requests per window."""
        if self._share is None:
            self._set_share_limit(min(RESERVE, self.rate.limit))

    def set_share(self, owned: int, total: int, quiet_since: float | None = None) -> None:
        """Take ``owned / total`` of the budget (less ``RESERVE``): the share of the
        assigned partitions. A share that grows applies ``GROWTH_DELAY`` later, or sooner
        when ``quiet_since`` (this limiter's clock) says the previous owners of what it
        gains have sent nothing for a window (they released it as they stopped)."""
        budget = max(1, self.rate.limit - RESERVE) if self.rate.limit > RESERVE else 1
        target = 0 if total <= 0 or owned <= 0 else max(1, budget * owned // total)
        self._set_share_limit(target, quiet_since)

    def hold(self, limit: int) -> None:
        """Keep to at most ``limit`` requests per window for one window (a shared view of
        the budget was lost: see ``_redis``)."""
        now = self._clock()
        self._hold(now, max(0, limit))
        self._apply(now)

    def _hold(self, now: float, limit: int, until: float | None = None) -> None:
        """Hold to ``limit`` for a window from now (or ``until``); a hold in force keeps
        its stricter limit and the later end."""
        until = now + self._span if until is None else until
        if self._held is not None and now < self._held[0]:
            until = max(until, self._held[0])
            limit = min(limit, self._held[1])
        self._held = (until, limit)

    def _set_share_limit(self, target: int, quiet_since: float | None = None) -> None:
        now = self._clock()
        self._update(now)
        recent = max([limit for _, limit in self._history] + [self._window.limit])
        self._share = target
        until = now + min(GROWTH_DELAY, self._span)  # a window is always enough
        if quiet_since is not None:
            until = min(until, quiet_since + self._span)
        if target > recent and until > now:
            self._hold(now, recent, until)
            if recent <= RESERVE:
                # A start (or a first partition). Only CRITICAL calls take the reserve
                # meanwhile; the first data request waits for the share, rather than take
                # the reserve and be followed by nothing until the share applies.
                self._starting_until = until
        self._apply(now)

    def _starting(self, now: float) -> bool:
        return now < self._starting_until

    def _apply(self, now: float) -> None:
        limit = self._cut_limit
        if self._share is not None:
            limit = min(limit, self._share)
        if self._held is not None:
            until, held = self._held
            if now < until:
                limit = min(limit, held)
            else:
                self._held = None
        if limit != self._window.limit:
            self._window.set_limit(limit)
            self._history.append((now, limit))
            self._changed.set()
        # Keep each limit that was in force at some time in the last span.
        while len(self._history) > 1 and self._history[1][0] <= now - self._span:
            self._history.popleft()

    # --- granting ---------------------------------------------------------------------
    async def acquire(self, priority: Priority = Priority.NORMAL) -> Grant:
        """Wait for a slot, in the lane of ``priority``; the grant says how long it
        waited. Cancelled while waiting, it leaves its turn to the next waiter."""
        start = self._clock()
        self._update(start)
        if (
            not self._lanes
            and self._slot(start) <= start
            and (priority >= Priority.CRITICAL or not self._starting(start))
        ):  # nobody waits: no queue
            self._window.grant(start)
            return self._granted(start, start)
        turn = self._lanes.push(priority)
        self._waiting += 1
        try:
            if self._dispatcher is None:
                self._dispatcher = asyncio.ensure_future(self._dispatch())
            try:
                at = await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():  # granted as it was cancelled
                    self._window.ungrant()
                    self._changed.set()
                raise
        finally:
            self._waiting -= 1
        return self._granted(start, at)

    def _granted(self, start: float, at: float) -> Grant:
        self.granted += 1
        waited = at - start
        self.total_wait += waited
        return Grant(at=at, waited=waited)

    def _slot(self, now: float) -> float:
        return max(self._window.next_slot(now), self._paused_until)

    async def _dispatch(self) -> None:
        """While anyone waits: wait for a free slot, grant it to the next waiter."""
        try:
            while self._lanes:
                now = self._clock()
                self._update(now)
                slot = self._slot(now)
                if slot > now:
                    await self._wait(slot - now, now)
                    continue
                if self._starting(now):
                    turn = self._lanes.pop_critical()
                    if turn is None:  # only data waits: until the share applies
                        await self._wait(self._starting_until - now, now)
                        continue
                else:
                    turn = self._lanes.pop()
                if turn is not None:
                    self._window.grant(now)
                    turn.set_result(now)
                    # Let the granted waiter run first: what it does at once (a failure
                    # answered at once) decides the next slot.
                    await asyncio.sleep(0)
        except asyncio.CancelledError:  # the loop is closing: nobody will grant them
            self._lanes.fail(RuntimeError("the rate limiter's dispatcher was cancelled"))
            raise
        except Exception as error:  # a bug: no waiter may wait for ever on it
            self._lanes.fail(error)
        finally:
            self._dispatcher = None

    async def _wait(self, delay: float, now: float) -> None:
        """Sleep ``delay`` (``inf``: until an answer or a change of limit); a share's hold
        ending also wakes the waiter."""
        if self._held is not None:
            delay = min(delay, max(0.0, self._held[0] - now))
        self._changed.clear()
        if math.isinf(delay):
            await self._changed.wait()
            return
        sleeper = asyncio.ensure_future(self._sleep(delay))
        changed = asyncio.ensure_future(self._changed.wait())
        try:
            await asyncio.wait({sleeper, changed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (sleeper, changed):
                if not waiter.done():
                    waiter.cancel()

    def track(self) -> Grant:
        """A request granted elsewhere (a shared budget): counted here too, without
        waiting, so that this replica knows its own recent requests if it must fall back
        on its share. It holds a slot here like any grant but never moves the pacing
        schedule: however many a shared budget grants, this limiter owes no pacing for
        them when it grants again (``resume``)."""
        now = self._clock()
        self._update(now)  # keeps the limit in force current while nothing else asks
        self._window.track()
        self.granted += 1
        return Grant(at=now, waited=0.0)

    def resume(self) -> None:
        """Grant again after a shared budget did (it only counted here, ``track``): the
        limits in force are applied afresh (the share, any hold, a cut after 429s) and
        the pacing schedule restarts from now. So the next request goes within one
        pacing gap, or when the window's count lets it, never on a schedule of grants
        made elsewhere."""
        now = self._clock()
        self._update(now)
        self._window.restart_pacing(now)
        self._changed.set()

    def next_slot(self) -> float:
        """When a request asking now would be granted if nobody waited, under the limits
        in force now (``inf``: not before an answer comes or the limit changes)."""
        now = self._clock()
        self._update(now)
        return self._slot(now)

    def sent_in_last_window(self) -> int:
        """This replica's requests holding a slot: in flight, or answered within the
        last window."""
        return self._window.count_since(self._clock() - self._span)

    def release(self, grant: Grant) -> None:
        """The request of ``grant`` was answered (or failed) now."""
        if grant.released:
            return
        grant.released = True
        self._window.release(self._clock())
        self._changed.set()

    def on_rate_limited(self, retry_after: float | None, backoff: float) -> None:
        """Gist answered 429 although we kept to the budget: someone else shares it.

        Pause every sender for ``retry_after`` seconds (or ``backoff`` when Gist gave no
        hint) and cut the limit; it grows back by a tenth of the configured limit per
        window without a 429."""
        now = self._clock()
        self._update(now)
        self.rate_limited += 1
        pause = retry_after if retry_after is not None and retry_after >= 0 else backoff
        self._paused_until = max(self._paused_until, now + pause)
        # Several in-flight requests see the same 429 storm: cut once per window.
        if now - self._last_cut >= self.rate.window:
            self._cut_limit = max(self._min_limit, int(self._cut_limit * self._cut))
            self._last_cut = now
        self._quiet_since = now
        self._apply(now)

    def _update(self, now: float) -> None:
        if self._cut_limit < self.rate.limit:
            windows = int((now - self._quiet_since) // self.rate.window)
            if windows > 0:
                step = max(1, self.rate.limit // 10)
                self._cut_limit = min(self.rate.limit, self._cut_limit + windows * step)
                self._quiet_since += windows * self.rate.window
        self._apply(now)
