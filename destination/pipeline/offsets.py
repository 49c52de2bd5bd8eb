"""Which offset of a partition may be committed: everything below it is finished.

Records finish out of order (an event is accepted while an earlier contact batch is
still importing); the committable offset is the lowest offset not yet finished, or one
past the highest seen when all are. Pure bookkeeping, no I/O.
"""

from __future__ import annotations

from collections import deque


class OffsetTracker:
    __slots__ = ("_done", "_end", "_pending")

    def __init__(self) -> None:
        self._pending: deque[int] = deque()
        self._done: set[int] = set()
        self._end: int | None = None

    def __len__(self) -> int:
        """Records seen and not finished yet."""
        return len(self._pending) - len(self._done)

    @property
    def uncommitted(self) -> int:
        """Records from the committable offset on, finished or not: what an unfinished
        record holds back (and what this tracker keeps in memory)."""
        return len(self._pending)

    def seen(self, offset: int) -> bool:
        """Whether ``offset`` is at or below one already added (a re-delivery)."""
        return self._end is not None and offset < self._end

    def add(self, offset: int) -> None:
        """A record was consumed. Offsets arrive in increasing order within a partition."""
        if self._end is not None and offset < self._end:
            raise ValueError(f"offset {offset} arrived after {self._end - 1}")
        self._pending.append(offset)
        self._end = offset + 1

    def finish(self, offset: int) -> None:
        """The record at ``offset`` was delivered or dead-lettered."""
        pending = self._pending
        if pending and pending[0] == offset:
            pending.popleft()
            done = self._done
            while pending and pending[0] in done:
                done.remove(pending.popleft())
        else:
            self._done.add(offset)

    def committable(self) -> int | None:
        """The offset to commit (Kafka's "next offset to read"), or None before any record."""
        if self._pending:
            return self._pending[0]
        return self._end
