"""A shared store (a real ``redis-server``) that a test can make slow, down or flushed,
seen by each worker through its own wrapper around a real ``redis.asyncio`` client.

``StoreFaults`` is the store's health as the test plays it, and its history: the
intervals during which a worker's answers were slow or refused, the moments the data
was lost (FLUSHALL), and the workers that crashed. ``FaultyRedis`` is what one worker
gets where it would build its client (``destination.worker.redis_client``): every
command goes to the real server (so the project's Lua scripts run as written), but

- ``slow``: the command runs, and its answer comes ``slow_by`` seconds late (beyond
  ``REDIS_TIMEOUT``: the caller gives up first);
- ``down``: refused at once (``ConnectionError``), as a Redis that is not there;
- a *spike* for one worker: its next few answers are slow (one slow answer is all it
  takes to fall back);
- after the worker's crash: every call, and every answer still on its way, is refused
  (a killed process neither sends nor hears anything).

A call the worker gives up on before the server answered (its time-out, on a loaded
runner) counts as a slow answer for that worker: the store was slow as it saw it.

A FLUSHALL (``flush``) goes to the server itself through a client of the test's own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError


@dataclass
class StoreFaults:
    """The store's health, per worker, and its history (``time.monotonic`` times)."""

    slow_by: float
    mode: str = "healthy"  # healthy | slow | down
    spikes: dict[int, int] = field(default_factory=dict)  # worker -> slow answers to come
    dead: dict[int, float] = field(default_factory=dict)  # worker -> time of its crash
    flushes: list[float] = field(default_factory=list)
    # (worker or None for every worker, start, end or None while it lasts)
    bad: list[list[Any]] = field(default_factory=list)
    calls: int = 0

    def set_mode(self, mode: str) -> None:
        now = time.monotonic()
        if mode == self.mode:
            return
        for interval in self.bad:
            if interval[0] is None and interval[2] is None:
                interval[2] = now
        if mode != "healthy":
            self.bad.append([None, now, None])
        self.mode = mode

    def spike(self, worker: int, answers: int) -> None:
        """The worker's next ``answers`` answers are slow."""
        if self.spikes.get(worker, 0) == 0:
            self.bad.append([worker, time.monotonic(), None])
        self.spikes[worker] = self.spikes.get(worker, 0) + answers

    def flushed(self) -> None:
        now = time.monotonic()
        self.flushes.append(now)
        self.bad.append([None, now, now + 0.001])

    def heal(self) -> None:
        """Healthy for everyone from now on."""
        self.set_mode("healthy")
        for worker in list(self.spikes):
            self._spike_over(worker)

    def _take_spike(self, worker: int) -> bool:
        left = self.spikes.get(worker, 0)
        if left <= 0:
            return False
        self.spikes[worker] = left - 1
        return True

    def _spike_over(self, worker: int) -> None:
        self.spikes.pop(worker, None)
        for interval in self.bad:
            if interval[0] == worker and interval[2] is None:
                interval[2] = time.monotonic()

    def bad_intervals(self, worker: int, now: float) -> list[tuple[float, float]]:
        """When the worker's store was slow, down or lost its data (merged, in order)."""
        spans = sorted(
            (start, now if end is None else end)
            for who, start, end in self.bad
            if who is None or who == worker
        )
        merged: list[tuple[float, float]] = []
        for start, end in spans:
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        return merged

    def faulty_between(self, start: float, end: float, worker: int | None = None) -> bool:
        """Was the store slow, down or flushed (for ``worker``, or for anyone) at some
        time in [start, end]?"""
        for who, s, e in self.bad:
            if worker is not None and who is not None and who != worker:
                continue
            if s <= end and (e is None or e >= start):
                return True
        return False


class FaultyRedis:
    """One worker's client: the real one, behind the faults of ``StoreFaults``."""

    def __init__(self, real: Any, faults: StoreFaults, worker: int) -> None:
        self._real = real
        self._faults = faults
        self._worker = worker

    @property
    def connection_pool(self) -> Any:
        return self._real.connection_pool

    def register_script(self, script: Any) -> AsyncScript:
        # Bound to this wrapper, so that EVALSHA goes through the faults too.
        return AsyncScript(self, script)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> _Pipeline:
        return _Pipeline(self, self._real.pipeline(transaction=transaction, shard_hint=shard_hint))

    async def aclose(self) -> None:
        await self._real.aclose()

    def __getattr__(self, name: str) -> Any:
        command = getattr(self._real, name)
        if not callable(command):
            return command

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await self.call(lambda: command(*args, **kwargs))

        return call

    async def call(self, send: Callable[[], Awaitable[Any]]) -> Any:
        faults = self._faults
        faults.calls += 1
        self._refuse_if_dead()
        if faults.mode == "down":
            await asyncio.sleep(0)
            raise RedisConnectionError("Error 111 connecting: Connection refused (model)")
        slow = faults.mode == "slow" or faults._take_spike(self._worker)
        started = time.monotonic()
        try:
            answer = await send()
        except asyncio.CancelledError:
            # The worker gave up on an answer the server had not sent yet (its time-out,
            # on a runner too loaded to answer within REDIS_TIMEOUT): to the worker the
            # store was slow then, whatever the test played.
            faults.bad.append([self._worker, started, time.monotonic()])
            raise
        if slow:
            try:
                await asyncio.sleep(faults.slow_by)
            finally:
                if faults.spikes.get(self._worker) == 0:
                    faults._spike_over(self._worker)
        self._refuse_if_dead()
        return answer

    def _refuse_if_dead(self) -> None:
        if self._worker in self._faults.dead:
            raise RedisConnectionError("the worker crashed (model)")


class _Pipeline:
    """A pipeline whose commands queue on the real one and whose ``execute`` passes the
    faults (the commands run at the server only then, as with a real pipeline)."""

    def __init__(self, outer: FaultyRedis, real: Any) -> None:
        self._outer = outer
        self._real = real

    def __getattr__(self, name: str) -> Any:
        command = getattr(self._real, name)
        if not callable(command):
            return command

        def queue(*args: Any, **kwargs: Any) -> _Pipeline:
            command(*args, **kwargs)
            return self

        return queue

    async def execute(self, raise_on_error: bool = True) -> Any:
        try:
            return await self._outer.call(lambda: self._real.execute(raise_on_error))
        finally:
            await self._real.reset()

    async def __aenter__(self) -> _Pipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._real.reset()
