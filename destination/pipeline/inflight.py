"""What is in flight: partitions, their records, and the messages inside the records.

Pure bookkeeping, no I/O. A record is *opened* message by message (an envelope may hold
thousands) and *sealed* once its last message is opened; it is finished when it is
sealed and each of its messages has ended (delivered, skipped or dead-lettered, see
``outcome``). Only then does its offset count towards the partition's commit
(``OffsetTracker``). The ``Ledger`` keeps the totals that bound memory (messages and
record bytes in flight) and wakes whoever waits for them to change.

A message whose every open operation is a contact in a batch Gist has accepted is
*parked*: it only waits for Gist to finish the import, which can take minutes. Parked
messages leave the in-flight totals for a separate, larger bound, and once all of a
record's open messages are parked its value is released (a dead letter for it then
re-reads the record from Kafka). So slow imports hold offsets back, not memory.

A revoked partition's open work leaves the totals at once: the new owner reads it
again, and nothing that ends for it afterwards is counted here.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from destination.pipeline.offsets import OffsetTracker

MESSAGE_OVERHEAD = 1_800
"""Bytes an open message holds besides its record's value and its contact's body: its
bookkeeping (the message, its record's share, its step, its place in the per-contact
chains, contact memory's note). Counted in ``Ledger.bytes``, so that the bytes bound is
what the worker holds, not its records alone (``benchmarks/bench_held.py`` measures it;
the figure is in ``benchmarks/RESULTS.md``)."""


class TopicPartition(NamedTuple):
    topic: str
    partition: int


@dataclass(frozen=True, slots=True)
class Skip:
    """An operation that was not sent because it would change nothing in Gist
    (``reason`` from ``destination.reasons.SKIP``)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a message is dead-lettered. ``reason`` is a code from ``destination.reasons``;
    ``detail`` is for people and never holds the API key."""

    reason: str
    detail: str
    status: int | None = None
    body_excerpt: str = ""
    attempts: int = 0


_EPOCHS = itertools.count(1)


class PartitionWork:
    """One assigned partition; replaced by a fresh one on every assignment that was not
    this worker's already, so work finishing after a revocation cannot move a newer
    owner's commits. ``sending`` is set while requests may go for its work: cleared
    while a rebalance decides whether the partition stays (``Delivery.suspend``)."""

    __slots__ = (
        "committed",
        "epoch",
        "held_bytes",
        "messages",
        "offsets",
        "open",
        "returned",
        "revoked",
        "sending",
        "tp",
        "unfinished",
    )

    def __init__(self, tp: TopicPartition) -> None:
        self.tp = tp
        self.epoch = next(_EPOCHS)  # this ownership of the partition, in this process
        self.offsets = OffsetTracker()
        self.committed: int | None = None
        self.messages = 0  # in flight, not parked (the per-partition bound)
        self.returned = 0  # of those, back from parked: they may exceed the bound
        self.open = 0  # opened and not ended, parked ones included
        self.unfinished: dict[int, RecordWork] = {}  # by offset, oldest first
        self.held_bytes = 0  # bytes delivery holds for it beyond its records (``hold``)
        self.revoked = False
        self.sending = asyncio.Event()
        self.sending.set()

    @property
    def suspended(self) -> bool:
        """A rebalance is deciding whether the partition stays: nothing is sent for it."""
        return not self.sending.is_set()

    def oldest_unfinished_age(self, now: float) -> float:
        """Seconds since the oldest unfinished record of the partition was opened."""
        for record in self.unfinished.values():
            return max(0.0, now - record.opened_at)
        return 0.0


class RecordWork:
    __slots__ = (
        "headers",
        "key",
        "offset",
        "opened_at",
        "parked",
        "partition",
        "pending",
        "released",
        "sealed",
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
        opened_at: float,
        size: int | None = None,
    ) -> None:
        self.partition = partition
        self.offset = offset
        self.key = key
        self.value = value
        self.headers = tuple(headers)
        # What it holds: its bytes, or (an envelope) its decoded messages' estimated size.
        self.size = (len(value or b"") if size is None else size) + len(key or b"")
        self.opened_at = opened_at
        self.pending = 0  # messages opened and not ended
        self.parked = 0  # of those, parked
        self.sealed = False  # every message of the record is opened
        self.released = False  # value dropped: re-read from Kafka for a dead letter


OPEN = 0
DEAD_LETTERING = 1  # its dead letter is being written
ENDED = 2


class MessageWork:
    """One message of a record and the Gist operations still open for it.

    ``body`` is the parsed message when it came inside a ``{"batch": [...]}`` envelope
    (a dead letter then holds that message alone), else None (the record's value)."""

    __slots__ = (
        "body",
        "failure",
        "index",
        "is_parked",
        "message_id",
        "message_type",
        "parked",
        "pending",
        "record",
        "returned",
        "sent",
        "skipped",
        "state",
        "timestamp",
    )

    def __init__(
        self,
        record: RecordWork,
        index: int | None,
        message_type: str,
        timestamp: float | None,
        body: Any = None,
        message_id: str | None = None,
    ) -> None:
        self.record = record
        self.index = index
        self.message_type = message_type
        self.timestamp = timestamp
        self.body = body
        self.message_id = message_id
        self.sent = False  # an operation of it was delivered
        self.skipped: str | None = None  # the reason an operation was not sent
        self.pending = 0  # operations not over
        self.parked = 0  # of those, contacts in a batch Gist accepted
        self.is_parked = False
        self.returned = False  # parked, then back in flight (its batch sent again)
        self.failure: Failure | None = None
        self.state = OPEN

    @property
    def partition(self) -> PartitionWork:
        return self.record.partition

    def where(self) -> dict[str, Any]:
        """Where the message came from, for log lines."""
        record = self.record
        where: dict[str, Any] = {
            "topic": record.partition.tp.topic,
            "partition": record.partition.tp.partition,
            "offset": record.offset,
        }
        if self.index is not None:
            where["envelope_index"] = self.index
        return where


class Ledger:
    """Totals of the work in flight, and the partitions it belongs to."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self.partitions: dict[TopicPartition, PartitionWork] = {}
        self.messages = 0  # in flight, not parked
        self.returned = 0  # of those, back from parked (``unpark``)
        self.bytes = 0  # held: record bytes, contacts' bodies, MESSAGE_OVERHEAD a message
        self.parked = 0  # parked messages: waiting only for Gist to finish importing
        self.uncommitted = 0  # records read past the committable offsets, all partitions
        self.parked_total = 0  # messages ever parked (read-ahead measures with it)
        self.changed = asyncio.Event()

    # --- partitions -------------------------------------------------------------------
    def assign(self, tp: TopicPartition) -> PartitionWork:
        work = self.partitions[tp] = PartitionWork(tp)
        return work

    def revoke(self, tp: TopicPartition) -> PartitionWork | None:
        """Forget the partition: its open work leaves the totals (the new owner reads
        it again) and whatever ends for it from now on is not counted."""
        work = self.partitions.pop(tp, None)
        if work is None:
            return None
        work.revoked = True
        for record in work.unfinished.values():
            self.messages -= record.pending - record.parked
            self.parked -= record.parked
            if not record.released:
                record.released = True
                record.value = None
                self.bytes -= record.size
        self.uncommitted -= work.offsets.uncommitted
        self.bytes -= work.held_bytes + MESSAGE_OVERHEAD * work.open
        self.returned -= work.returned
        work.held_bytes = 0
        work.unfinished.clear()
        work.messages = work.open = work.returned = 0
        self.changed.set()
        return work

    def hold(self, partition: PartitionWork, n: int) -> None:
        """Delivery holds ``n`` more bytes for the partition (fewer when negative): a
        contact's encoded body, kept until its import ends, after its record's value may
        have been released. They count in ``bytes`` like record values."""
        if partition.revoked:
            return
        partition.held_bytes += n
        self.bytes += n
        if n < 0:
            self.changed.set()

    # --- opening ----------------------------------------------------------------------
    def open_record(
        self,
        partition: PartitionWork,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
        size: int | None = None,
    ) -> RecordWork:
        """``size``: what the record holds, when not its bytes (see ``RecordWork``)."""
        record = RecordWork(partition, offset, key, value, headers, self._clock(), size)
        partition.offsets.add(offset)
        partition.unfinished[offset] = record
        self.uncommitted += 1
        self.bytes += record.size
        return record

    def open_message(
        self,
        record: RecordWork,
        index: int | None,
        message_type: str,
        timestamp: float | None,
        body: Any = None,
        message_id: str | None = None,
    ) -> MessageWork:
        if record.sealed:
            raise RuntimeError("a message opened in a sealed record")
        message = MessageWork(record, index, message_type, timestamp, body, message_id)
        record.pending += 1
        partition = record.partition
        partition.messages += 1
        partition.open += 1
        self.messages += 1
        self.bytes += MESSAGE_OVERHEAD
        return message

    def seal(self, record: RecordWork) -> None:
        """Every message of the record is open: from now on it finishes when they end."""
        record.sealed = True
        if record.pending == 0 and not record.partition.revoked:
            self._finish_record(record)

    # --- messages waiting on Gist -----------------------------------------------------
    def park(self, message: MessageWork) -> None:
        """All of the message's open operations wait only for a batch import."""
        record = message.record
        if message.is_parked or message.state != OPEN or record.partition.revoked:
            return
        message.is_parked = True
        if message.returned:
            self._returned(message)
        self.parked_total += 1
        message.body = None  # re-read with the record if it is ever dead-lettered
        record.partition.messages -= 1
        self.messages -= 1
        self.parked += 1
        record.parked += 1
        self._maybe_release(record)
        self.changed.set()

    def unpark(self, message: MessageWork) -> None:
        """A parked message is back in flight (its batch is sent again). It counts in
        flight again, above the bounds if need be: it was let in below them, its body
        is released, and nothing new opens until the count is back under."""
        record = message.record
        if not message.is_parked or record.partition.revoked:
            return
        message.is_parked = False
        message.returned = True
        record.partition.messages += 1
        record.partition.returned += 1
        self.messages += 1
        self.returned += 1
        self.parked -= 1
        record.parked -= 1

    # --- ending -----------------------------------------------------------------------
    def ended(self, message: MessageWork) -> None:
        """The message is delivered, skipped or dead-lettered (``outcome`` calls this,
        once per message): release it, and finish its record when it was the last."""
        record = message.record
        partition = record.partition
        if partition.revoked:
            return
        if message.is_parked:
            self.parked -= 1
            record.parked -= 1
        else:
            partition.messages -= 1
            self.messages -= 1
            if message.returned:
                self._returned(message)
        partition.open -= 1
        record.pending -= 1
        self.bytes -= MESSAGE_OVERHEAD
        if record.pending == 0 and record.sealed:
            self._finish_record(record)
        else:
            self._maybe_release(record)
        self.changed.set()

    def _returned(self, message: MessageWork) -> None:
        """A message back from parked is parked again or ended."""
        message.returned = False
        message.record.partition.returned -= 1
        self.returned -= 1

    def _maybe_release(self, record: RecordWork) -> None:
        """Drop the value of a sealed record whose open messages all wait only for Gist."""
        if (
            not record.released
            and record.sealed
            and record.pending
            and record.parked == record.pending
        ):
            record.released = True
            record.value = None
            self.bytes -= record.size

    def _finish_record(self, record: RecordWork) -> None:
        partition = record.partition
        before = partition.offsets.uncommitted
        partition.offsets.finish(record.offset)
        self.uncommitted -= before - partition.offsets.uncommitted
        del partition.unfinished[record.offset]
        if not record.released:
            record.released = True
            record.value = None
            self.bytes -= record.size
        self.changed.set()

    def open_in(self, partitions: Sequence[PartitionWork]) -> int:
        """Messages opened and not ended in ``partitions``."""
        return sum(p.open for p in partitions)
