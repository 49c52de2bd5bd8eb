"""The workspace's request budget: never more than ``limit`` requests in any interval of
``window`` seconds, waiting requests served in arrival order.

Gist allows 100 requests per 10 s per workspace and does not say whether that window is
fixed or sliding; a limiter correct for a sliding window is correct for a fixed one, and
a token bucket is neither (it lets 2x the limit through in one window). So this keeps the
send times of the last ``limit`` requests and lets a request go only once the oldest of
them is ``window`` (plus a safety margin for network jitter) in the past.

Grants are also *paced*: spread ``span / limit`` apart rather than a window's budget in
one burst. A burst of 100 grants leaves the HTTP stack putting 100 requests on the wire
one after another (measured: up to ~200 ms from grant to arrival), more jitter than the
margin absorbs, so Gist would now and then count 101 in its window and answer 429.
Paced, the grant-to-arrival delay stays at a few milliseconds (benchmarks/RESULTS.md).
The pacing schedule does not drift: each grant advances a theoretical send time by one
gap from the previous one, and a grant up to half a gap early or late keeps it.

``SlidingWindow`` is the pure arithmetic on an explicit ``now``; ``RateLimiter`` adds the
async queue, an injected clock and the adaptive slow-down after a 429 from Gist (another
process sharing the workspace): a pause for ``Retry-After`` (or a backoff), and a
multiplicative cut of the limit that recovers by one request per quiet window.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RateLimit:
    """``limit`` requests in any ``window`` seconds. ``margin`` seconds are added to the
    window on our side so that jitter between our send and Gist's arrival time cannot
    squeeze ``limit + 1`` requests into one of Gist's windows."""

    limit: int = 100
    window: float = 10.0
    margin: float = 0.1
    pace: bool = True

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError("rate limit must be at least 1 request")
        if self.window <= 0 or self.margin < 0:
            raise ValueError("rate window must be positive and margin non-negative")


class SlidingWindow:
    """Send times of the most recent requests, and when the next one may go."""

    __slots__ = ("_capacity", "_sent", "_tat", "limit", "pace", "span")

    def __init__(self, limit: int, span: float, pace: bool = False) -> None:
        self.limit = limit
        self.span = span
        self.pace = pace
        self._capacity = limit  # the most send times a later, raised limit can need
        self._sent: deque[float] = deque()
        self._tat = float("-inf")  # paced: the theoretical time of the next send

    @property
    def gap(self) -> float:
        """Paced: the time between two sends at the limit's steady rate."""
        return self.span / self.limit

    def next_slot(self, now: float) -> float:
        """The earliest time >= ``now`` at which one more request keeps every interval of
        ``span`` seconds at ``limit`` requests or fewer."""
        slot = now
        sent = self._sent
        if len(sent) >= self.limit:
            slot = max(slot, sent[-self.limit] + self.span)
        if self.pace:
            slot = max(slot, self._tat - self.gap / 2)
        return slot

    def record(self, at: float) -> None:
        self._sent.append(at)
        if self.pace:
            self._tat = max(self._tat, at) + self.gap
        # Only the last ``limit`` send times can ever decide a slot.
        if len(self._sent) > self._capacity * 2:
            for _ in range(len(self._sent) - self._capacity):
                self._sent.popleft()

    def count_since(self, since: float) -> int:
        return sum(1 for t in self._sent if t > since)


Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class RateLimiter:
    """Every request to one workspace passes ``await limiter.acquire()`` first.

    Waiters are served strictly in arrival order (one waiter at a time holds the queue).
    ``on_rate_limited`` is called when Gist still answers 429: everyone pauses and the
    limit is cut, so one 429 slows every sender of the workspace.
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
        self._window = SlidingWindow(rate.limit, rate.window + rate.margin, rate.pace)
        self._queue = asyncio.Lock()  # asyncio.Lock wakes waiters in FIFO order
        self._paused_until = 0.0
        self._min_limit = max(1, int(rate.limit * min_fraction))
        self._cut = cut
        self._last_cut = float("-inf")
        self._quiet_since = float("-inf")  # recovery counts whole windows without a 429
        self._waiting = 0
        self.granted = 0
        self.rate_limited = 0
        self.total_wait = 0.0

    @property
    def current_limit(self) -> int:
        """The limit in force now, lower than ``rate.limit`` after 429s from Gist."""
        self._recover(self._clock())
        return self._window.limit

    @property
    def waiting(self) -> int:
        return self._waiting

    def utilisation(self) -> float:
        """Share of the configured budget used over the last window (0..1)."""
        now = self._clock()
        return self._window.count_since(now - self.rate.window) / self.rate.limit

    async def acquire(self) -> float:
        """Wait for a slot; returns the seconds waited."""
        start = self._clock()
        self._waiting += 1
        try:
            async with self._queue:
                while True:
                    now = self._clock()
                    self._recover(now)
                    slot = max(self._window.next_slot(now), self._paused_until)
                    if slot <= now:
                        break
                    await self._sleep(slot - now)
                self._window.record(now)
        finally:
            self._waiting -= 1
        self.granted += 1
        waited = now - start
        self.total_wait += waited
        return waited

    def on_rate_limited(self, retry_after: float | None, backoff: float) -> None:
        """Gist answered 429 although we kept to the budget: someone else shares it.

        Pause every sender for ``retry_after`` seconds (or ``backoff`` when Gist gave no
        hint) and cut the limit; it grows back by a tenth of the configured limit per
        window without a 429."""
        now = self._clock()
        self._recover(now)
        self.rate_limited += 1
        pause = retry_after if retry_after is not None and retry_after >= 0 else backoff
        self._paused_until = max(self._paused_until, now + pause)
        # Several in-flight requests see the same 429 storm: cut once per window.
        if now - self._last_cut >= self.rate.window:
            self._window.limit = max(self._min_limit, int(self._window.limit * self._cut))
            self._last_cut = now
        self._quiet_since = now

    def _recover(self, now: float) -> None:
        if self._window.limit >= self.rate.limit:
            return
        windows = int((now - self._quiet_since) // self.rate.window)
        if windows > 0:
            step = max(1, self.rate.limit // 10)
            self._window.limit = min(self.rate.limit, self._window.limit + windows * step)
            self._quiet_since += windows * self.rate.window
