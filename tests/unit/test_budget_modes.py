"""The shared budget's modes (``_redis.BudgetModes``) as a table of transitions on an
injected clock, and the rules they carry, on a Redis played in memory (``FakeLog``) and
virtual time: the local limiter never waits on a schedule built while on Redis; what the
log owes a replica (its fallback requests, a late answer's slot) is written once Redis
answers again, before the next shared grant."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from destination.gist import RateLimit, RateLimiter
from destination.gist._redis import (
    HOLD_IN_FLIGHT,
    RETRY_REDIS_EVERY,
    TRANSITIONS,
    BudgetModes,
    Event,
    LocalRule,
    LogRepairs,
    Mode,
    RedisBudget,
)
from tests.unit.test_limiter import VirtualTime

L, S, C, F, R = Mode.LOCAL, Mode.SHARED, Mode.CHECKING, Mode.FALLBACK, Mode.RETURNING
KEEP, COUNT, RESUME, HOLD = LocalRule.KEEP, LocalRule.COUNT, LocalRule.RESUME, LocalRule.HOLD
BOTH = LocalRule.RESUME_AND_HOLD

TABLE = [
    # mode, event,                next, what the local limiter does
    (L, Event.STARTED,            S, COUNT),
    (L, Event.REDIS_ANSWERED,     L, KEEP),
    (L, Event.REDIS_FAILED,       F, KEEP),
    (L, Event.EPOCH_CHANGED,      L, KEEP),
    (L, Event.RETRY_DUE,          L, KEEP),
    (L, Event.RETURNING_OVER,     L, KEEP),
    (S, Event.STARTED,            S, KEEP),
    (S, Event.REDIS_ANSWERED,     S, KEEP),
    (S, Event.REDIS_FAILED,       C, RESUME),
    (S, Event.EPOCH_CHANGED,      R, BOTH),
    (S, Event.RETRY_DUE,          S, KEEP),
    (S, Event.RETURNING_OVER,     S, KEEP),
    (C, Event.STARTED,            C, KEEP),
    (C, Event.REDIS_ANSWERED,     R, KEEP),
    (C, Event.REDIS_FAILED,       F, HOLD),
    (C, Event.EPOCH_CHANGED,      C, KEEP),
    (C, Event.RETRY_DUE,          C, KEEP),
    (C, Event.RETURNING_OVER,     C, KEEP),
    (F, Event.STARTED,            F, KEEP),
    (F, Event.REDIS_ANSWERED,     R, KEEP),
    (F, Event.REDIS_FAILED,       F, KEEP),
    (F, Event.EPOCH_CHANGED,      F, KEEP),
    (F, Event.RETRY_DUE,          R, KEEP),
    (F, Event.RETURNING_OVER,     F, KEEP),
    (R, Event.STARTED,            R, KEEP),
    (R, Event.REDIS_ANSWERED,     R, KEEP),
    (R, Event.REDIS_FAILED,       C, KEEP),
    (R, Event.EPOCH_CHANGED,      R, HOLD),
    (R, Event.RETRY_DUE,          R, KEEP),
    (R, Event.RETURNING_OVER,     S, COUNT),
]  # fmt: skip
"""Every (mode, event): the mode after it, and what it does to the local limiter."""

SPAN = 1.0  # the window (margin 0): the modes' timers and the local limiter's
RATE = RateLimit(limit=20, window=SPAN, margin=0.0)
SHARE = (20 - 2) // 2  # each of two replicas' share, less the start-up reserve
THE_WAY_IN = {L: [], S: [Event.STARTED], C: [Event.STARTED, Event.REDIS_FAILED],
              F: [Event.REDIS_FAILED],
              R: [Event.STARTED, Event.REDIS_FAILED, Event.REDIS_ANSWERED]}  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _replica(clock: Clock, mode: Mode, at: float = 0.0) -> BudgetModes:
    """A replica owning half of the partitions (its start at t=0), put in ``mode`` at
    ``at``."""
    local = RateLimiter(RATE, clock=clock)
    local.start_sharing()
    local.set_share(1, 2)
    modes = BudgetModes(local, span=SPAN, retry_every=RETRY_REDIS_EVERY, clock=clock)
    clock.now = at
    for event in THE_WAY_IN[mode]:
        modes.on(event)
    assert modes.mode is mode
    return modes


def test_the_table_names_every_mode_and_event_once() -> None:
    assert sorted((m.value, e.value) for m, e, _, _ in TABLE) == sorted(
        (m.value, e.value) for m in Mode for e in Event
    )
    assert {(m, e): (n, r) for m, e, n, r in TABLE if (m, e) in TRANSITIONS} == dict(TRANSITIONS)


@pytest.mark.parametrize(("mode", "event", "after", "rule"), TABLE)
async def test_each_mode_and_event_leads_where_the_table_says(
    mode: Mode, event: Event, after: Mode, rule: LocalRule
) -> None:
    clock = Clock()
    modes = _replica(clock, mode, at=2.5)  # long after the start-up hold
    local = modes.local
    # Three of this replica's requests, answered at once: two granted by Redis (counted
    # only), one by the local limiter (it paces: the next may go half a gap later).
    for at in (3.0, 3.1):
        clock.now = at
        local.release(local.track())
    clock.now = 3.2
    local.release(await local.acquire())
    clock.now = 3.25
    before = (local.current_limit, local.next_slot())
    timers = (modes.retry_at, modes.returning_until)
    assert before[0] == SHARE
    assert before[1] > 3.25

    change = modes.on(event)

    assert modes.mode is after
    assert (change is not None) == ((mode, event) in TRANSITIONS)
    if change is not None:
        assert (change.before, change.after, change.rule) == (mode, after, rule)
    if rule is RESUME:  # the pacing starts afresh: the next may go now
        assert (local.current_limit, local.next_slot()) == (SHARE, 3.25)
    elif rule in (HOLD, BOTH):
        # Held for a window to its own 3 requests: the next goes when the first ages out.
        assert (local.current_limit, local.next_slot()) == (3, 3.0 + SPAN)
    else:
        assert (local.current_limit, local.next_slot()) == before
    if change is not None and after is F:
        assert modes.retry_at == 3.25 + RETRY_REDIS_EVERY
    elif change is not None and after is R:
        assert modes.returning_until == 3.25 + SPAN + RETRY_REDIS_EVERY
    else:
        assert (modes.retry_at, modes.returning_until) == timers


def test_a_replica_is_held_once_per_departure_from_shared() -> None:
    """The hold is for requests made on Redis, not bound by the share: once held, or if
    never on Redis, losing Redis' view again holds nothing more (an idle replica would
    otherwise wait a window for nothing)."""
    clock = Clock()
    once = _replica(clock, F)  # from the start: never on Redis
    twice = _replica(clock, S)
    twice.on(Event.REDIS_FAILED)
    twice.on(Event.REDIS_FAILED)  # falls back: held to its own requests (none)
    clock.now = 2.0  # that hold is over
    for modes in (once, twice):
        modes.on(Event.RETRY_DUE)
        modes.local.release(modes.local.track())
        assert modes.mode is R
        modes.on(Event.EPOCH_CHANGED)  # Redis lost its data, as seen on return
        assert modes.local.current_limit == SHARE
    twice.on(Event.RETURNING_OVER)
    twice.on(Event.EPOCH_CHANGED)  # on Redis again: held again
    assert twice.local.current_limit == 1


def test_the_clock_makes_the_retry_and_the_end_of_returning_due() -> None:
    clock = Clock()
    falling_back, returning = _replica(clock, F), _replica(clock, R)
    quiet = [_replica(clock, L), _replica(clock, S), _replica(clock, C)]
    clock.now = RETRY_REDIS_EVERY - 0.01
    assert falling_back.due() is None
    clock.now = RETRY_REDIS_EVERY
    assert falling_back.due() is Event.RETRY_DUE
    assert returning.due() is None
    clock.now = SPAN + RETRY_REDIS_EVERY
    assert returning.due() is Event.RETURNING_OVER
    clock.now = 1e6
    assert [modes.due() for modes in quiet] == [None, None, None]


def test_an_epoch_change_while_returning_starts_the_period_again() -> None:
    clock = Clock()
    modes = _replica(clock, R)
    clock.now = 4.0
    modes.on(Event.EPOCH_CHANGED)
    clock.now = SPAN + RETRY_REDIS_EVERY
    assert modes.due() is None
    clock.now = 4.0 + SPAN + RETRY_REDIS_EVERY
    assert modes.due() is Event.RETURNING_OVER


# --- the ledger of what the log owes -----------------------------------------------------
def test_what_the_log_owes_is_forgotten_when_written_aged_or_past_the_bound() -> None:
    clock = Clock()
    owed = LogRepairs(SPAN, bound=3, clock=clock)
    owed.sent("a")
    owed.unused("b")
    entries = owed.entries()
    assert owed.answered("a", 0.5)  # answered while the write was on its way
    owed.written(entries)
    assert [m for m, _ in owed.entries()] == ["a"]  # owed still, at its answer time
    assert not owed.answered("c", 0.5)  # never owed: its release goes the usual way
    clock.now = 0.5 + SPAN
    assert owed.entries() == []  # an answer a window old no longer counts
    owed.unused("x")
    clock.now += HOLD_IN_FLIGHT
    assert owed.entries() == []  # that slot aged out of the log by itself
    for member in "defg":
        owed.sent(member)
    assert [m for m, _ in owed.entries()] == ["e", "f", "g"]  # the bound: oldest first


# --- the rules, on a Redis played in memory ----------------------------------------------
class FakeLog:
    """Just enough of redis.asyncio for ``RedisBudget``, on the test's clock (the server's
    time is the clock in ms): every ask is granted and logs its member; the release and
    repair scripts re-score and remove as Redis would. ``down`` fails every call,
    ``late`` answers the next ask after its script ran but too late."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.log: dict[str, float] = {}
        self.asked: list[str] = []
        self.calls: list[str] = []
        self.down = False
        self.late = False
        self.epoch = b"epoch-1"

    def register_script(self, source: str) -> object:
        if "ZREMRANGEBYSCORE" in source:
            return self._acquire
        if "'XX'" in source:
            return self._release
        if "'ZREM'" in source:
            return self._repair
        return self._rate_limited

    def _call(self, name: str) -> float:
        self.calls.append(name)
        if self.down:
            raise ConnectionError("Redis is down")
        return self.clock() * 1000

    async def _acquire(self, keys: list[str], args: list[object]) -> list[object]:
        now = self._call("acquire")
        member = str(args[4])
        self.log[member] = now + float(str(args[3]))
        self.asked.append(member)
        if self.late:
            self.late = False
            await asyncio.sleep(5)  # longer than any time-out of these tests
        return [1, 0, self.epoch, args[0]]

    async def _release(self, keys: list[str], args: list[object]) -> int:
        now = self._call("release")
        if str(args[0]) in self.log:
            self.log[str(args[0])] = now
        return 0

    async def _repair(self, keys: list[str], args: list[object]) -> float:
        now = self._call("repair")
        hold = float(str(args[0]))
        pairs = [str(a) for a in args[2:]]
        for member, owed in zip(pairs[::2], pairs[1::2], strict=True):
            if owed == "unused":
                self.log.pop(member, None)
            else:
                self.log[member] = now + hold if owed == "in-flight" else now - float(owed)
        return now

    async def _rate_limited(self, keys: list[str], args: list[object]) -> object:
        self._call("rate_limited")
        return args[0]

    async def ping(self) -> bool:
        self._call("ping")
        return True

    async def aclose(self) -> None:
        pass


async def _until(condition: Callable[[], bool], within: float = 2.0) -> None:
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 (the budget has no event to wait on)
            await asyncio.sleep(0.001)


def _budget(
    vt: VirtualTime, rate: RateLimit, *, share: bool = True
) -> tuple[RedisBudget, FakeLog]:
    local = RateLimiter(rate, clock=vt.clock, sleep=vt.sleep)
    if share:
        local.start_sharing()
        local.set_share(1, 2)
    fake = FakeLog(vt.clock)
    return RedisBudget(fake, rate, local, timeout=0.05, clock=vt.clock), fake


@pytest.mark.parametrize("fault", ["one slow answer", "redis down", "redis lost its data"])
async def test_a_replica_leaving_redis_grants_at_its_share_without_waiting_on_redis_grants(
    fault: str,
) -> None:
    """F6 and F6b: a replica alone on Redis for 30 s, at the whole budget; then Redis
    fails it or loses its data. It goes on at its share as soon as its own requests of
    the last window allow, never on a schedule of the grants Redis made."""
    vt = VirtualTime()
    rate = RateLimit(limit=100, window=10.0, margin=0.05)
    budget, fake = _budget(vt, rate)
    await budget.start("w")
    for i in range(300):  # 10 a second, alone on Redis
        vt.now = 10.0 + i * 0.1
        budget.release(await budget.acquire())
    vt.now = 40.0
    if fault == "one slow answer":
        fake.late = True
    elif fault == "redis down":
        fake.down = True
    else:
        fake.epoch = b"epoch-2"
    granted: list[float] = []
    vt.progress = lambda: (len(granted), len(fake.calls))

    async def sender() -> None:
        while True:
            grant = await budget.acquire()
            granted.append(vt.now)
            budget.release(grant)  # answered at once

    senders = [asyncio.create_task(sender()) for _ in range(8)]
    await asyncio.sleep(0.2)  # the ask that fails or times out (wall clock)
    span = rate.window + rate.margin
    await vt.advance_to(40.0 + span)
    for task in senders:
        task.cancel()
    await asyncio.gather(*senders, return_exceptions=True)
    assert budget.backend != "redis"
    # Its 100 requests of the last window leave room under its share of 49 once 52 of
    # them aged out, about 5 s later; then it goes at its share's pace (a gap of 0.2 s).
    assert granted, "no grant in the window after the fault"
    assert granted[0] <= 40.0 + span / 2 + 1.0
    assert len(granted) >= 15
    await budget.close()


async def test_a_late_answer_frees_its_slot_once_redis_answers_again() -> None:
    """Redis ran the acquire script but its answer came after the time-out: the slot the
    script took (held ``HOLD_IN_FLIGHT`` otherwise) is removed from the log by the next
    call, which finds Redis answering: the replica goes on through Redis (and its share)
    at once, although it sent nothing in the last window (no hold: every grant it takes
    is Redis' too)."""
    vt = VirtualTime()
    budget, fake = _budget(vt, RateLimit(20, 1.0, 0.0, pace=False), share=False)
    await budget.start("w")
    budget.release(await budget.acquire())
    vt.now = 5.0  # idle for a few windows
    fake.late = True
    waiter = asyncio.create_task(budget.acquire())
    await _until(lambda: len(fake.asked) == 2)
    late = fake.asked[-1]
    assert late in fake.log  # the script ran
    grant = await asyncio.wait_for(waiter, 2.0)
    assert late not in fake.log
    assert vt.now == 5.0  # no virtual time passed: nothing held it
    assert budget.backend == "dual"  # back on Redis, keeping to the share too
    assert fake.asked[-1] != late  # its slot is a new one of the shared log
    budget.release(grant)
    await budget.close()


async def test_the_fallback_requests_reach_the_log_as_soon_as_redis_answers() -> None:
    """Requests granted while Redis was down are written to the log with their answer
    times (or as in flight) as soon as Redis answers one write, so that replicas still on
    Redis count them; the replica is then back on Redis."""
    vt = VirtualTime()
    budget, fake = _budget(vt, RateLimit(20, 10.0, 0.0, pace=False), share=False)
    fake.down = True
    await budget.start("w")  # fails: falls back from the start
    assert budget.backend == "fallback"
    answered = []
    for at in (0.1, 0.2):
        vt.now = at
        budget.release(await budget.acquire())
        answered.append(at)
    vt.now = 0.3
    in_flight = await budget.acquire()
    assert fake.log == {}
    vt.now = 2.0  # Redis is back; the writes that failed paused for a second
    fake.down = False
    budget.release(in_flight)  # the next write owed carries everything
    await _until(lambda: len(fake.log) == 3)
    assert sorted(fake.log.values()) == [100.0, 200.0, 2000.0]  # their answer times, in ms
    assert budget.backend == "dual"
    await budget.close()


async def test_back_on_redis_the_fallback_requests_are_written_before_a_shared_grant() -> None:
    vt = VirtualTime()
    budget, fake = _budget(vt, RateLimit(20, 10.0, 0.0, pace=False), share=False)
    fake.down = True
    await budget.start("w")
    for at in (0.1, 0.2, 0.3):
        vt.now = at
        budget.release(await budget.acquire())
    fake.down = False
    fake.calls.clear()
    vt.now = RETRY_REDIS_EVERY + 0.5  # the retry is due; nothing was written meanwhile
    grant = await asyncio.wait_for(budget.acquire(), 2.0)
    assert fake.calls[:2] == ["repair", "acquire"]
    assert sorted(fake.log.values())[:3] == [100.0, 200.0, 300.0]
    assert len(fake.log) == 4  # and the shared grant
    budget.release(grant)
    await budget.close()
