"""How much to read ahead of what is sent: what the budget can send in the next little
while, not whatever the fixed bounds allow.

Gist lets a workspace send about 2,500 contacts a second at best (batches of 500, an
import and a poll each) and 10 events a second. ``ReadAhead`` sizes the bound on
messages *in flight* (opened, not yet sent) from what the worker measured over the last
half minute: the budget's requests per second (``current_limit / window``) times the
messages a request carried lately times ``seconds``: 10 s of events is 100 of them,
10 s of contacts the whole ceiling. A floor keeps batches fillable before anything is
measured (at start, or after a quiet spell).

What is *held* beyond that (messages sent and waiting for Gist's import) is bounded by
bytes (``MAX_INFLIGHT_BYTES``: records, contacts' bodies and each message's bookkeeping,
``inflight.MESSAGE_OVERHEAD``), not by a guess of how fast Gist will complete them: a
worker starting on a backlog, or a Gist whose first import takes minutes, keeps sending
at the budget's pace until the bytes bound says the memory is spent.

Pure arithmetic on counters the worker reads; the worker applies the result to its
``FlowLimits`` every housekeeping turn; ``MAX_INFLIGHT_MESSAGES`` stays the ceiling.
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


class ReadAhead:
    def __init__(
        self,
        seconds: float,
        max_in_flight: int,
        min_in_flight: int,
        horizon: float = 30.0,
    ) -> None:
        self.seconds = seconds
        self.max_in_flight = max_in_flight
        self.min_in_flight = min(min_in_flight, max_in_flight)
        self.horizon = horizon
        self._samples: deque[Counts] = deque()
        self.in_flight = self.min_in_flight

    def update(self, counts: Counts, requests_per_second: float) -> int:
        """The bound on messages in flight, from the latest counts and the budget's rate."""
        samples = self._samples
        samples.append(counts)
        while len(samples) > 2 and samples[1].at <= counts.at - self.horizon:
            samples.popleft()
        first = samples[0]
        requests = counts.requests - first.requests
        if counts.at <= first.at or requests <= 0:
            return self.in_flight  # nothing measured lately: keep as is
        per_request = (counts.served - first.served) / requests
        wanted = per_request * requests_per_second * self.seconds
        self.in_flight = int(min(self.max_in_flight, max(self.min_in_flight, wanted)))
        return self.in_flight
