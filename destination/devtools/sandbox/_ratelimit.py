"""A strict sliding-window limiter: never more than ``limit`` accepted requests in any
``window``-second interval. Rejected requests leave no trace."""

from __future__ import annotations

import math
from collections import deque


class SlidingWindow:
    __slots__ = ("_accepted",)

    def __init__(self) -> None:
        self._accepted: deque[float] = deque()

    def try_acquire(self, now: float, limit: int, window: float) -> float | None:
        """Accept a request at ``now`` (returns None) or say how many seconds until a slot
        frees. ``limit`` 0 disables the limit (nothing is recorded)."""
        if limit <= 0:
            return None
        accepted = self._accepted
        horizon = now - window
        while accepted and accepted[0] <= horizon:
            accepted.popleft()
        # A limit lowered at run time can leave more than ``limit`` in the window.
        if len(accepted) < limit:
            accepted.append(now)
            return None
        return accepted[len(accepted) - limit] + window - now

    def in_window(self, now: float, window: float) -> int:
        horizon = now - window
        return sum(1 for t in self._accepted if t > horizon)

    def clear(self) -> None:
        self._accepted.clear()


def retry_after_header(wait: float) -> str:
    """``Retry-After`` as whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(wait)))
