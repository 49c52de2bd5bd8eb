"""What is in flight: partitions, their records, and the messages inside the records.

A record is finished when each of its messages is delivered, skipped or dead-lettered;
only then does its offset count towards the partition's commit (``OffsetTracker``). The
``Ledger`` keeps the totals that bound memory (messages and record bytes in flight) and
wakes whoever waits for them to drain. Pure bookkeeping, no I/O.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from destination.pipeline.offsets import OffsetTracker


class TopicPartition(NamedTuple):
    topic: str
    partition: int


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a message is dead-lettered. ``reason`` is a stable code for metrics and the
    dead-letter headers; ``detail`` is for people and never holds the API key."""

    reason: str
    detail: str
    status: int | None = None
    body_excerpt: str = ""
    attempts: int = 0


class PartitionWork:
    """One assigned partition; replaced by a fresh one on every assignment, so work
    finishing after a revocation cannot move a newer owner's commits."""

    __slots__ = ("committed", "messages", "offsets", "revoked", "tp")

    def __init__(self, tp: TopicPartition) -> None:
        self.tp = tp
        self.offsets = OffsetTracker()
        self.committed: int | None = None
        self.messages = 0
        self.revoked = False


class RecordWork:
    __slots__ = ("headers", "key", "offset", "partition", "pending", "size", "value")

    def __init__(
        self,
        partition: PartitionWork,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
    ) -> None:
        self.partition = partition
        self.offset = offset
        self.key = key
        self.value = value
        self.headers = tuple(headers)
        self.size = len(value or b"") + len(key or b"")
        self.pending = 0


class MessageWork:
    """One message of a record and the Gist operations still open for it.

    ``body`` is the parsed message when it came inside a ``{"batch": [...]}`` envelope
    (a dead letter then holds that message alone), else None (the record's value)."""

    __slots__ = (
        "body", "failure", "index", "ledger", "message_type", "pending", "record", "timestamp",
    )

    def __init__(
        self,
        ledger: Ledger,
        record: RecordWork,
        index: int | None,
        message_type: str,
        timestamp: float | None,
        body: Any = None,
    ) -> None:
        self.ledger = ledger
        self.record = record
        self.index = index
        self.message_type = message_type
        self.timestamp = timestamp
        self.body = body
        self.pending = 0
        self.failure: Failure | None = None

    def expect(self, operations: int) -> None:
        self.pending += operations

    def operation_done(self, failure: Failure | None = None) -> None:
        """One operation of the message is over; the first failure decides its fate."""
        if failure is not None and self.failure is None:
            self.failure = failure
        self.pending -= 1
        if self.pending == 0:
            self.ledger.message_settled(self)


class Ledger:
    """Totals of the work in flight, and the partitions it belongs to.

    ``on_settled(message)`` is called once per message whose operations are all over:
    the pipeline then counts it delivered, or dead-letters it, and calls ``finish``."""

    def __init__(self, on_settled: Callable[[MessageWork], None]) -> None:
        self._on_settled = on_settled
        self.partitions: dict[TopicPartition, PartitionWork] = {}
        self.messages = 0
        self.bytes = 0
        self.changed = asyncio.Event()

    def assign(self, tp: TopicPartition) -> PartitionWork:
        work = self.partitions[tp] = PartitionWork(tp)
        return work

    def revoke(self, tp: TopicPartition) -> PartitionWork | None:
        work = self.partitions.pop(tp, None)
        if work is not None:
            work.revoked = True
        return work

    def open_record(
        self,
        partition: PartitionWork,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
    ) -> RecordWork:
        record = RecordWork(partition, offset, key, value, headers)
        partition.offsets.add(offset)
        self.bytes += record.size
        return record

    def open_message(
        self,
        record: RecordWork,
        index: int | None,
        message_type: str,
        timestamp: float | None,
        body: Any = None,
    ) -> MessageWork:
        message = MessageWork(self, record, index, message_type, timestamp, body)
        record.pending += 1
        record.partition.messages += 1
        self.messages += 1
        return message

    def close_record(self, record: RecordWork) -> None:
        """All messages of the record are open; a record with none is finished now."""
        if record.pending == 0:
            self._finish_record(record)

    def message_settled(self, message: MessageWork) -> None:
        self._on_settled(message)

    def finish(self, message: MessageWork) -> None:
        """The message is delivered, skipped or dead-lettered: release it."""
        record = message.record
        record.partition.messages -= 1
        self.messages -= 1
        record.pending -= 1
        if record.pending == 0:
            self._finish_record(record)
        self.changed.set()

    def _finish_record(self, record: RecordWork) -> None:
        record.partition.offsets.finish(record.offset)
        self.bytes -= record.size
        self.changed.set()

    def unfinished(self, partitions: Sequence[PartitionWork]) -> int:
        return sum(len(p.offsets) for p in partitions)
