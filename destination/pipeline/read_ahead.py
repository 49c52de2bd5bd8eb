"""How much to read ahead: what the budget can send in the next little while, plus what
Gist is importing, not whatever the fixed bounds allow.

Gist lets a workspace send about 2,500 contacts a second at best (batches of 500, an
import and a poll each) and 10 events a second. A worker that reads until
``MAX_INFLIGHT_MESSAGES`` / ``MAX_AWAITING_IMPORT`` holds minutes of work the budget
cannot send (measured: RSS climbing past 400 MB in the first minute of a backlog at the
real limit). ``ReadAhead`` sizes the two bounds from what the worker measured over the
last half minute:

- messages in flight (not yet sent): the budget's requests per second
  (``current_limit / window``) times the messages a request carried lately times
  ``seconds``: 10 s of events is 100 of them, 10 s of contacts the whole ceiling;
- messages *held*, not yet sent or waiting on Gist's import (*parked*): the rate
  messages ended lately times ``seconds`` (Little's law: then a message is held about
  ``seconds``); when Gist's import is what binds, holding more than it imports meanwhile
  only holds memory. (Bounding the parked ones alone would not do: what is
  read before they reach the bound is sent and parked on top; measured: 44,000 parked
  against a bound of 30,000.) Unless Gist says it is importing two or more of our
  batches and queues none (each pending batch last answered ``IN_PROGRESS``; one only
  accepted, not polled since, counts as ``QUEUED``): then it works side by side
  and the rate it completes may be bound by how much it was given, not by its speed (a
  Gist taking a minute per batch, in parallel, would otherwise be held to ``seconds`` /
  60 of what it can do); the bound grows by half each turn while that lasts, up to the
  ceiling. A Gist that queues our batches and imports them in turn gets no more than it
  completes.

The fixed settings stay as hard ceilings; small floors keep a batch fillable and a few
imports in flight before anything is measured (at start, or after a quiet spell).
Pure arithmetic on counters the worker reads; the worker applies the result to its
``FlowLimits`` every housekeeping turn.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Counts:
    """Totals since start, read at one instant."""

    at: float
    requests: int  # granted by the limiter
    served: int  # messages that left the in-flight set through a request: delivered, parked
    ended: int  # messages that ended: delivered, skipped, dead-lettered


class ReadAhead:
    def __init__(
        self,
        seconds: float,
        max_in_flight: int,
        max_held: int,
        min_in_flight: int,
        min_held: int,
        horizon: float = 30.0,
    ) -> None:
        self.seconds = seconds
        self.max_in_flight = max_in_flight
        self.max_held = max_held
        self.min_in_flight = min(min_in_flight, max_in_flight)
        self.min_held = min(min_held, max_held)
        self.horizon = horizon
        self._samples: deque[Counts] = deque()
        self.in_flight = self.min_in_flight
        self.held = self.min_held

    def update(
        self, counts: Counts, requests_per_second: float, working: int = 0
    ) -> tuple[int, int]:
        """New bounds (in flight, held) from the latest counts, the budget's rate and
        the number of our batches Gist says it is importing now (``working``)."""
        samples = self._samples
        samples.append(counts)
        while len(samples) > 2 and samples[1].at <= counts.at - self.horizon:
            samples.popleft()
        first = samples[0]
        span = counts.at - first.at
        requests = counts.requests - first.requests
        if span <= 0 or requests <= 0:
            return self.in_flight, self.held  # nothing measured lately: keep as is
        per_request = (counts.served - first.served) / requests
        wanted = per_request * requests_per_second * self.seconds
        self.in_flight = int(min(self.max_in_flight, max(self.min_in_flight, wanted)))
        ended_per_second = (counts.ended - first.ended) / span
        wanted = ended_per_second * self.seconds
        if working >= 2:  # Gist imports side by side: give it more while it does
            wanted = max(wanted, self.held * 1.5)
        self.held = int(min(self.max_held, max(self.min_held, wanted)))
        return self.in_flight, self.held
