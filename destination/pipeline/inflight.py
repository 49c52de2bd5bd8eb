"""What is in flight: partitions, their records, and the messages inside the records.

A record is finished when each of its messages is delivered, skipped or dead-lettered;
only then does its offset count towards the partition's commit (``OffsetTracker``). The
``Ledger`` keeps the totals that bound memory (messages and record bytes in flight) and
wakes whoever waits for them to drain. Pure bookkeeping, no I/O.

A message whose every open operation is a contact in a batch Gist has accepted is
*parked*: it only waits for Gist to finish the import, which can take minutes. Parked
messages leave the in-flight totals for a separate, larger bound, and once all of a
record's open messages are parked its value is released (a dead letter for it then
re-reads the record from Kafka). So slow imports hold offsets back, not memory.
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
    __slots__ = (
        "headers",
        "key",
        "offset",
        "parked",
        "partition",
        "pending",
        "released",
        "size",
        "value",
    )

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
        self.pending = 0  # messages not finished
        self.parked = 0  # of those, parked
        self.released = False  # value dropped: re-read from Kafka for a dead letter


class MessageWork:
    """One message of a record and the Gist operations still open for it.

    ``body`` is the parsed message when it came inside a ``{"batch": [...]}`` envelope
    (a dead letter then holds that message alone), else None (the record's value)."""

    __slots__ = (
        "body",
        "failure",
        "index",
        "is_parked",
        "ledger",
        "message_type",
        "parked",
        "pending",
        "record",
        "timestamp",
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
        self.pending = 0  # operations not over
        self.parked = 0  # of those, contacts in a batch Gist accepted
        self.is_parked = False
        self.failure: Failure | None = None

    def expect(self, operations: int) -> None:
        self.pending += operations

    def operation_accepted(self) -> None:
        """One operation is now a contact in a batch Gist accepted (not yet imported)."""
        self.parked += 1
        if self.parked == self.pending and not self.is_parked:
            self.ledger.park(self)

    def operation_done(self, failure: Failure | None = None, *, accepted: bool = False) -> None:
        """One operation of the message is over (``accepted``: it was one whose batch Gist
        had accepted); the first failure decides the message's fate."""
        if failure is not None and self.failure is None:
            self.failure = failure
        self.pending -= 1
        if accepted:
            self.parked -= 1
        if self.pending == 0:
            self.ledger.message_settled(self)


class Ledger:
    """Totals of the work in flight, and the partitions it belongs to.

    ``on_settled(message)`` is called once per message whose operations are all over:
    the pipeline then counts it delivered, or dead-letters it, and calls ``finish``."""

    def __init__(self, on_settled: Callable[[MessageWork], None]) -> None:
        self._on_settled = on_settled
        self.partitions: dict[TopicPartition, PartitionWork] = {}
        self.messages = 0  # in flight, not parked
        self.bytes = 0  # record bytes held
        self.parked = 0  # parked messages: waiting only for Gist to finish importing
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

    def park(self, message: MessageWork) -> None:
        message.is_parked = True
        message.body = None  # re-read with the record if it is ever dead-lettered
        record = message.record
        record.partition.messages -= 1
        self.messages -= 1
        self.parked += 1
        record.parked += 1
        self._maybe_release(record)
        self.changed.set()

    def finish(self, message: MessageWork) -> None:
        """The message is delivered, skipped or dead-lettered: release it."""
        record = message.record
        if message.is_parked:
            self.parked -= 1
            record.parked -= 1
        else:
            record.partition.messages -= 1
            self.messages -= 1
        record.pending -= 1
        if record.pending == 0:
            self._finish_record(record)
        else:
            self._maybe_release(record)
        self.changed.set()

    def _maybe_release(self, record: RecordWork) -> None:
        """Drop the value of a record whose open messages all wait only for Gist."""
        if not record.released and record.pending and record.parked == record.pending:
            record.released = True
            record.value = None
            self.bytes -= record.size

    def _finish_record(self, record: RecordWork) -> None:
        record.partition.offsets.finish(record.offset)
        if not record.released:
            record.released = True
            record.value = None
            self.bytes -= record.size
        self.changed.set()

    def unfinished(self, partitions: Sequence[PartitionWork]) -> int:
        return sum(len(p.offsets) for p in partitions)
