"""How long and how often a failed Gist request is tried again."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Capped exponential backoff with jitter (each delay drawn from the upper half).

    ``max_elapsed`` bounds the whole effort (the worker sets it to hours: a partition is
    held rather than its messages dead-lettered while Gist is down); ``max_attempts``
    bounds the count (0 means no bound)::

        RetryPolicy(base=0.5, cap=60, max_elapsed=4 * 3600)
    """

    base: float = 0.5
    cap: float = 30.0
    max_elapsed: float = 60.0
    max_attempts: int = 0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        ceiling = min(self.cap, self.base * (2 ** min(attempt - 1, 30)))
        return (rng or random).uniform(ceiling / 2, ceiling)

    def gives_up(self, attempt: int, elapsed: float) -> bool:
        if self.max_attempts and attempt >= self.max_attempts:
            return True
        return elapsed >= self.max_elapsed


NO_RETRY = RetryPolicy(max_attempts=1, max_elapsed=0.0)
