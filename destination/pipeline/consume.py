"""Reading Kafka: records in, backpressure out, offsets committed behind the outcomes.

``StreamConsumer`` owns the Kafka consumer (aiokafka's, or the in-memory twin in tests:
anything with the methods of ``KafkaConsumer`` below). Fetched records wait in their
partition's *intake*; they are opened message by message (an envelope may hold
thousands), each message decoded, mapped and handed on (``Delivery``, or straight to
``Outcomes`` when it is skipped or rejected), and **every message opened is checked
against the limits first**, so one huge envelope cannot take more than the settings
allow: its remaining messages are opened as room frees. A partition whose intake holds
records is paused, so at most one fetch per partition waits in memory; all partitions
pause when the totals are at their bounds. The wanted set of paused partitions is
re-applied on every turn, since aiokafka forgets pauses on a rebalance.

Offsets are committed only up to the first record not finished, and a record finishes
only once it is sealed (all its messages opened) and each of them has ended.

A rebalance keeps what stays, and costs no budget while the group rejoins. On a
revocation (every partition, in aiokafka's eager protocol) nothing more is opened for the
partitions and what ended is committed, but what was opened goes on being sent while the
group rejoins (seconds): only the assignment says which partitions go, and a member is
not replaced before it has rejoined. The consumer names a sticky assignor
(``sticky_assignor``), so a member keeps the partitions it had: on the assignment those
go on where they were, their work kept and nothing read again; those that went to
another member stop at once, their requests on the wire get ``REBALANCE_TIMEOUT`` to
answer, what Gist confirmed is handed over (de-duplication ids, contact memory) and the
rest abandoned (the new owner reads again what did not end); new ones start from the
group's commit, ``REBALANCE_TIMEOUT`` after the assignment (their previous owner's last
requests answer first, so two owners never write one contact at once) unless their
previous owner released them as it stopped (``RELEASED``) or nobody consumed them.
Should the rejoin take longer than ``send_through`` (Kafka could then expel this member
and give its partitions away), sending stops as if the partitions went, until the
assignment says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import structlog
from aiokafka import ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata
from aiokafka.structs import TopicPartition as KafkaTopicPartition

from destination import reasons
from destination.mapping import Mapper
from destination.observability import log_events, metrics
from destination.operations import ContactDelete, Mapped, Rejected, Skipped
from destination.pipeline.decode import DecodeError, decode_record, decoded_size
from destination.pipeline.dedup import Dedup, coordinates_id
from destination.pipeline.deliver import Delivery
from destination.pipeline.inflight import (
    MESSAGE_OVERHEAD,
    OPEN,
    Failure,
    Ledger,
    MessageWork,
    PartitionWork,
    RecordWork,
    TopicPartition,
)
from destination.pipeline.outcome import Outcomes
from destination.pipeline.suppress import Suppressions
from destination.pipeline.waiting import wait_event

log = structlog.get_logger(__name__)

OPEN_AT_ONCE = 500
"""Messages opened before the consume loop yields to the event loop (a few ms of work)."""

RELEASED = "gist-destination:released:"
"""The metadata of a worker's last commit as it stops (then the Unix time): from that
moment it sends nothing more for the partition. A new owner that reads a release a
window old lets its share of the budget grow at once, not ``GROWTH_DELAY`` after the
assignment (without Redis; ``RateLimiter.set_share``), and clears it with a commit of its
own."""

RELEASE_SKEW = 1.0
"""Seconds added to a release's time for the clocks of two hosts."""

SEND_THROUGH = 20.0
"""Seconds after a revocation that its partitions' opened work goes on being sent while
the group rejoins, by default (``REBALANCE_SEND_THROUGH``; see the module docstring); the
worker gives Kafka a rebalance timeout past it, so that this member is never expelled
(its partitions given away) while it sends. 0: sending stops at the revocation."""


class KafkaConsumer(Protocol):
    """What the pipeline uses of ``aiokafka.AIOKafkaConsumer`` (the seam for the
    in-memory twin in ``destination.devtools.local_kafka``)."""

    def subscribe(self, topics: list[str], listener: Any = ...) -> None: ...
    async def getmany(
        self, *partitions: Any, timeout_ms: int = ..., max_records: int | None = ...
    ) -> dict[Any, list[Any]]: ...
    def assignment(self) -> set[Any]: ...
    def paused(self) -> set[Any]: ...
    def pause(self, *partitions: Any) -> None: ...
    def resume(self, *partitions: Any) -> None: ...
    async def commit(self, offsets: Any = ...) -> None: ...
    async def committed(self, partition: Any) -> int | None: ...
    async def beginning_offsets(self, partitions: list[Any]) -> dict[Any, int]: ...
    def highwater(self, partition: Any) -> int | None: ...
    def partitions_for_topic(self, topic: str) -> set[int] | None: ...


class FlowLimits:
    """Bounds on work in flight.

    A message is opened only while every bound is below its limit, so no total exceeds
    its limit by more than one message; a record is begun only if what it holds fits
    under ``bytes`` (or nothing else is held: one record at most past the bound).
    Fetching pauses at the bounds and resumes below ``resume_at`` of them.
    ``messages`` bounds the messages not yet sent (``read_ahead`` sets it from the
    budget, ``max_messages`` the ceiling); ``awaiting_import`` the parked ones (see
    ``inflight``); ``bytes`` everything held (records, contacts' bodies and each
    message's bookkeeping, ``Ledger.bytes``); ``uncommitted_per_partition`` and
    ``uncommitted_total`` the records read past the committable offsets, finished ones
    included: one message retried for hours must not let the finished records after it
    pile up in the offset trackers."""

    def __init__(
        self,
        messages: int,
        bytes_: int,
        per_partition: int,
        awaiting_import: int,
        uncommitted_per_partition: int = 200_000,
        uncommitted_total: int = 1_000_000,
        resume_at: float = 0.8,
    ) -> None:
        """``messages`` is the ceiling; the bound in force on it may be lower
        (``read_ahead``)."""
        self.max_messages = messages
        self.max_awaiting_import = awaiting_import
        self.messages = messages
        self.bytes = bytes_
        self.per_partition = per_partition
        self.awaiting_import = awaiting_import
        self.uncommitted_per_partition = uncommitted_per_partition
        self.uncommitted_total = uncommitted_total
        self.resume_at = resume_at

    def room(self, ledger: Ledger, work: PartitionWork) -> bool:
        """Whether one more message of ``work``'s partition may be opened (bytes are
        counted, and bounded, per record: ``fits``)."""
        return (
            ledger.messages < self.messages
            and ledger.parked < self.awaiting_import
            and ledger.uncommitted < self.uncommitted_total
            and work.messages < self.per_partition
            and work.offsets.uncommitted < self.uncommitted_per_partition
        )

    def fits(self, ledger: Ledger, size: int) -> bool:
        """Whether a record whose decoded form takes ``size`` bytes may be opened: within
        the bound, or alone (a record larger than the bound waits until nothing else is
        held, so the bound is exceeded by one record at most)."""
        return ledger.bytes == 0 or ledger.bytes + size + MESSAGE_OVERHEAD <= self.bytes

    def full(self, ledger: Ledger, resuming: bool) -> bool:
        """Whether the totals are at the bound (or, when ``resuming``, not yet below
        the resume mark)."""
        share = self.resume_at if resuming else 1.0
        return (
            ledger.messages >= self.messages * share
            or ledger.bytes >= self.bytes * share
            or ledger.parked >= self.awaiting_import * share
            or ledger.uncommitted >= self.uncommitted_total * share
        )

    def partition_full(self, work: PartitionWork, resuming: bool) -> bool:
        """Whether one partition is at its own bounds (or, when ``resuming``, not yet
        below the resume mark)."""
        share = self.resume_at if resuming else 1.0
        return (
            work.messages >= self.per_partition * share
            or work.offsets.uncommitted >= self.uncommitted_per_partition * share
        )


class _Opening:
    """A record whose messages are being opened."""

    __slots__ = ("enveloped", "index", "messages", "record")

    def __init__(self, record: RecordWork, messages: list[Any], enveloped: bool) -> None:
        self.record = record
        self.messages = messages
        self.enveloped = enveloped
        self.index = 0


class _Fetched:
    """A fetched record, decoded only when its messages are opened (or, for a Redis
    look-up of its ids, when fetched: then kept decoded only if that is small), so that
    what a producer sends is bounded by the limits before it is decoded."""

    __slots__ = ("_decoded", "estimate", "record")

    KEEP_DECODED = 16 * 1024
    """Records decoded at fetch time are kept decoded up to this estimated size."""

    def __init__(self, record: Any) -> None:
        self.record = record
        self.estimate = decoded_size(record.value)
        self._decoded: tuple[list[Any], bool] | Exception | None = None

    def take(self) -> tuple[list[Any], bool] | Exception:
        """The record's messages (and whether they came in an envelope), or why it has
        none; the decoded form is the caller's from now on."""
        decoded = self._decoded if self._decoded is not None else self._decode()
        self._decoded = None
        return decoded

    def _decode(self) -> tuple[list[Any], bool] | Exception:
        try:
            return decode_record(self.record.value)
        except Exception as error:  # DecodeError, or a bug: the record is dead-lettered
            return error

    def message_ids(self) -> list[str]:
        decoded = self._decoded if self._decoded is not None else self._decode()
        if self.estimate <= self.KEEP_DECODED:
            self._decoded = decoded
        if isinstance(decoded, Exception):
            return []
        ids = []
        for message in decoded[0]:
            if isinstance(message, dict):
                value = message.get("messageId")
                if isinstance(value, str):
                    ids.append(value)
                elif isinstance(value, int) and not isinstance(value, bool):
                    ids.append(str(value))
        return ids


class _Intake:
    """A partition's fetched records not yet opened, and the one being opened."""

    __slots__ = ("next_offset", "opening", "records")

    def __init__(self) -> None:
        self.records: deque[_Fetched] = deque()
        self.opening: _Opening | None = None
        self.next_offset: int | None = None  # records below it were taken already

    def holding(self) -> bool:
        return bool(self.records) or self.opening is not None

    def drop(self) -> None:
        self.records.clear()
        self.opening = None


class StreamConsumer:
    def __init__(
        self,
        consumer: KafkaConsumer,
        topics: list[str],
        mapper: Mapper,
        delivery: Delivery,
        outcomes: Outcomes,
        limits: FlowLimits,
        clock: Any = time.monotonic,
        on_share: Callable[[int, int, float | None], None] = lambda owned, total, quiet: None,
        dedup: Dedup | None = None,
        suppressions: Suppressions | None = None,
        send_through: float = SEND_THROUGH,
    ) -> None:
        """``on_share(owned, total, quiet_since)`` is told this worker's share of the
        partitions after every change (the rate limiter takes as much of the budget), and
        when the partitions it gained were released, since when (this clock) their
        previous owners have sent nothing."""
        self.consumer = consumer
        self.topics = topics
        self.mapper = mapper
        self.delivery = delivery
        self.outcomes = outcomes
        self.ledger = outcomes.ledger
        self.limits = limits
        self._clock = clock
        self._on_share = on_share
        self.dedup = dedup
        self.suppressions = suppressions
        self._stopping = False
        self._globally_full = False
        self._blocked = False  # some intake waits for room
        self._full_partitions: set[TopicPartition] = set()
        self._intakes: dict[TopicPartition, _Intake] = {}
        self._draining: set[TopicPartition] = set()
        self._suspended: set[TopicPartition] = set()  # a rebalance decides: open nothing
        self.send_through = send_through
        self._rebalancing: asyncio.Task[None] | None = None  # the send-through deadline
        self._sending_stopped = False  # it passed: sending stopped until the assignment
        self._rejoining = False  # between a revocation and the assignment: no commits
        self._assignments = 0  # assignments so far (a later one cancels ``_open_later``)
        self._group_commits: set[TopicPartition] = set()  # owned, with a group commit
        self.assigned_once = asyncio.Event()

    def subscribe(self) -> None:
        self.consumer.subscribe(topics=self.topics, listener=_Rebalance(self))

    def stop(self) -> None:
        """Stop fetching; the loop returns after its current turn."""
        self._stopping = True
        self._end_send_through()

    # --- the loop ---------------------------------------------------------------------
    async def run(self) -> None:
        while not self._stopping:
            await self._open_in_turns()
            self._apply_backpressure()
            batches = await self.consumer.getmany(timeout_ms=50 if self._blocked else 200)
            fetched: list[_Fetched] = []
            for tp, records in batches.items():
                fetched += self._enqueue(TopicPartition(tp.topic, tp.partition), records)
            if self.dedup is not None and self.dedup.shared is not None and fetched:
                # One round trip to Redis for the ids of the records about to be opened.
                await self.dedup.look_up(
                    (i, f.record.topic, f.record.partition, f.record.offset)
                    for f in fetched
                    for i in f.message_ids()
                )
            opened = await self._open_in_turns()
            if not batches and not opened and (self._blocked or self._paused_everything()):
                self.ledger.changed.clear()
                await wait_event(self.ledger.changed, 0.5)

    def _enqueue(self, tp: TopicPartition, records: list[Any]) -> list[_Fetched]:
        intake = self._intakes.get(tp)
        if intake is None or tp not in self.ledger.partitions or tp in self._draining:
            return []  # fetched just before a revocation: the new owner reads it
        taken = []
        for record in records:
            if intake.next_offset is not None and record.offset < intake.next_offset:
                continue  # fetched twice: it is already ours
            fetched = _Fetched(record)
            intake.records.append(fetched)
            taken.append(fetched)
            intake.next_offset = record.offset + 1
        return taken

    async def _open_in_turns(self) -> int:
        """``open_available``, yielding to the event loop every ``OPEN_AT_ONCE``
        messages: a start on a backlog opens tens of thousands at once, and the limiter's
        grants, answers and polls must not wait for them (0.3 s stalls at the real limit
        cost a tenth of the first window's budget)."""
        opened = 0
        while True:
            n = self.open_available(OPEN_AT_ONCE)
            opened += n
            if n < OPEN_AT_ONCE or self._stopping:
                return opened
            await asyncio.sleep(0)

    def open_available(self, most: int | None = None) -> int:
        """Open the messages of waiting records while the limits leave room (``most``
        of them at most); returns how many were opened."""
        ledger, limits = self.ledger, self.limits
        opened = 0
        self._blocked = False
        for tp, intake in self._intakes.items():
            work = ledger.partitions.get(tp)
            if work is None or tp in self._draining or tp in self._suspended:
                continue
            while intake.holding():
                if most is not None and opened >= most:
                    return opened
                if not limits.room(ledger, work) or (
                    intake.opening is None and not limits.fits(ledger, intake.records[0].estimate)
                ):
                    self._blocked = True
                    break
                if intake.opening is None:
                    self._begin(work, intake, intake.records.popleft())
                else:
                    self._open_next(intake, intake.opening)
                opened += 1
        return opened

    def _begin(self, work: PartitionWork, intake: _Intake, fetched: _Fetched) -> None:
        """Take a fetched record, decode it, and open its first message."""
        record = fetched.record
        if work.offsets.seen(record.offset):
            return
        headers = [(k, v) for k, v in (record.headers or ())]
        decoded = fetched.take()
        # An envelope's messages stay decoded while in flight (their bodies are kept for
        # dead letters): the record counts for its decoded size, not its bytes.
        enveloped = not isinstance(decoded, Exception) and decoded[1]
        taken = self.ledger.open_record(
            work,
            record.offset,
            record.key,
            record.value,
            headers,
            size=fetched.estimate if enveloped else None,
        )
        if isinstance(decoded, DecodeError):
            message = self._open_unknown(taken, None, None)
            self.outcomes.dead_letter(message, Failure(decoded.reason, decoded.detail))
            return
        if isinstance(decoded, Exception):  # a bug in decoding: a dead letter
            self.outcomes.internal_error(self._open_unknown(taken, None, None), decoded, "decode")
            return
        messages, enveloped = decoded
        if not messages:  # an empty envelope: nothing to wait for
            self.ledger.seal(taken)
            return
        opening = _Opening(taken, messages, enveloped)
        intake.opening = opening
        self._open_next(intake, opening)

    def _open_next(self, intake: _Intake, opening: _Opening) -> None:
        """Open the next message of the record being opened, and hand it on."""
        index = opening.index
        body = opening.messages[index]
        opening.index += 1
        last = opening.index == len(opening.messages)
        if last:
            intake.opening = None
        record = opening.record
        at = index if opening.enveloped else None
        kept = body if opening.enveloped else None
        ledger, outcomes = self.ledger, self.outcomes
        message: MessageWork | None = None
        try:
            result = self.mapper.map(body)
            kind = result.message_type
            metrics.child(metrics.MESSAGES_CONSUMED, kind).inc()
            timestamp = message_id = None
            if isinstance(result, Mapped) and result.operations:
                timestamp = result.operations[0].timestamp
                message_id = result.operations[0].message_id
                if message_id is None:  # its place says which message it is
                    tp = record.partition.tp
                    message_id = coordinates_id(tp.topic, tp.partition, record.offset, at)
            message = ledger.open_message(record, at, kind, timestamp, kept, message_id)
            if last:
                ledger.seal(record)
            if isinstance(result, Mapped) and self.suppressions is not None:
                result = self._suppression(result)
            if isinstance(result, Rejected):
                outcomes.dead_letter(message, Failure(result.reason, result.detail))
            elif isinstance(result, Skipped):
                outcomes.skipped(message, result.reason)
            elif not result.operations:
                outcomes.delivered(message)
            elif self.dedup is not None:
                self.dedup.offer(message, result.operations)
            else:
                self.delivery.submit(message, result.operations)
        except Exception as exc:  # a bug: the message ends as a dead letter, never hangs
            if message is None:
                message = self._open_unknown(record, at, kept, seal=last)
            if message.state == OPEN and message.pending == 0:
                outcomes.internal_error(message, exc, "intake")
            else:  # delivery has it: it ends there
                metrics.INTERNAL_ERRORS.labels("intake").inc()
                log.error(log_events.INTERNAL_ERROR, where="intake", exc_info=exc)

    def _suppression(self, result: Mapped) -> Mapped | Skipped:
        """A delete suppresses the identities it carries from now on (the messages after
        it are opened after it); a message for a suppressed identity is skipped."""
        suppressions = self.suppressions
        assert suppressions is not None
        deletes = [op for op in result.operations if isinstance(op, ContactDelete)]
        if deletes:
            for delete in deletes:
                suppressions.suppress(delete.identities)
            return result
        if suppressions.suppressed(i for op in result.operations for i in op.identities):
            return Skipped(result.message_type, reasons.SUPPRESSED)
        return result

    def _open_unknown(
        self, record: RecordWork, index: int | None, body: Any, seal: bool = True
    ) -> MessageWork:
        metrics.child(metrics.MESSAGES_CONSUMED, "unknown").inc()
        message = self.ledger.open_message(record, index, "unknown", None, body)
        if seal and not record.sealed:
            self.ledger.seal(record)
        return message

    # --- backpressure -----------------------------------------------------------------
    def _apply_backpressure(self) -> None:
        ledger, limits = self.ledger, self.limits
        self._globally_full = limits.full(ledger, resuming=self._globally_full)
        for tp, work in ledger.partitions.items():
            if limits.partition_full(work, resuming=tp in self._full_partitions):
                self._full_partitions.add(tp)
            else:
                self._full_partitions.discard(tp)
        self._full_partitions &= set(ledger.partitions)
        holding = {tp for tp, intake in self._intakes.items() if intake.holding()}

        assigned = {TopicPartition(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        wanted = (
            assigned
            if self._globally_full
            else assigned & (self._full_partitions | holding | self._draining)
        )
        paused = {TopicPartition(tp.topic, tp.partition) for tp in self.consumer.paused()}
        if wanted - paused:
            self.consumer.pause(*(KafkaTopicPartition(*tp) for tp in wanted - paused))
        if paused - wanted:
            self.consumer.resume(*(KafkaTopicPartition(*tp) for tp in paused - wanted))
        for tp in assigned:
            metrics.PARTITION_PAUSED.labels(tp.topic, str(tp.partition)).set(
                1 if tp in wanted else 0
            )
        metrics.MESSAGES_IN_FLIGHT.set(ledger.messages)
        metrics.BYTES_IN_FLIGHT.set(ledger.bytes)
        metrics.MESSAGES_AWAITING_IMPORT.set(ledger.parked)

    def _paused_everything(self) -> bool:
        assignment = self.consumer.assignment()
        return bool(assignment) and len(self.consumer.paused()) >= len(assignment)

    # --- commits ----------------------------------------------------------------------
    async def commit(
        self, partitions: list[PartitionWork] | None = None, release: bool = False
    ) -> None:
        """Commit, for each partition, the offset below which every record ended; not
        while the group rejoins (between a revocation and the assignment): a commit then
        reaches Kafka with a generation about to change or just changed, is refused
        (``IllegalGeneration``, ``RebalanceInProgress``) and makes aiokafka rejoin once
        more, a whole second rebalance.

        ``release``: this worker has stopped sending for good (shutdown); every partition
        is committed, also at an unchanged offset, with the moment in its metadata, so
        the next owner's share of the budget need not wait a whole window
        (``RELEASED``)."""
        if self._rejoining:
            return
        offsets = {}
        assigned = self.consumer.assignment()  # a partition that went is not committed
        for work in partitions if partitions is not None else list(self.ledger.partitions.values()):
            offset = work.offsets.committable()
            tp = KafkaTopicPartition(*work.tp)
            if offset is None or offset == work.committed:
                # Nothing new: a release commits the group's offset again (never one the
                # group did not have: the start of a partition nothing of was read).
                if not (release and work.tp in self._group_commits):
                    continue
                offset = work.committed
                if offset is None:
                    continue
            if not work.revoked and tp in assigned:
                offsets[tp] = (work, offset)
        if not offsets:
            return
        metadata = f"{RELEASED}{time.time():.3f}" if release else ""
        try:
            await self.consumer.commit(
                {tp: OffsetAndMetadata(o, metadata) for tp, (_, o) in offsets.items()}
            )
        except KafkaError as exc:
            # A rebalance under way: the next owner starts from the last good commit.
            log.warning(log_events.COMMIT_FAILED, error=type(exc).__name__)
            return
        for tp, (work, offset) in offsets.items():
            self._group_commits.add(work.tp)
            work.committed = offset
            metrics.COMMITTED_OFFSET.labels(tp.topic, str(tp.partition)).set(offset)

    def update_gauges(self) -> int:
        """Lag from the committed offset (the group's, until this worker commits), and
        the age of each partition's oldest unfinished record; returns the total lag."""
        now = self._clock()
        total = 0
        for tp, work in self.ledger.partitions.items():
            labels = (tp.topic, str(tp.partition))
            metrics.OLDEST_UNFINISHED_AGE.labels(*labels).set(work.oldest_unfinished_age(now))
            highwater = self.consumer.highwater(KafkaTopicPartition(*tp))
            if highwater is not None and work.committed is not None:
                lag = max(0, highwater - work.committed)
                metrics.CONSUMER_LAG.labels(*labels).set(lag)
                total += lag
        return total

    # --- draining: shutdown and revocation --------------------------------------------
    def stop_opening(self, partitions: list[PartitionWork]) -> None:
        """Open nothing more of these partitions: their fetched records are dropped (a
        record partly opened is never committed: it is read again from the start)."""
        for work in partitions:
            self._draining.add(work.tp)
            intake = self._intakes.get(work.tp)
            if intake is not None:
                intake.drop()

    async def drain(self, partitions: list[PartitionWork], within: float) -> bool:
        """Stop opening the partitions' records and wait until every message opened
        has ended; False on time-out."""
        self.stop_opening(partitions)
        deadline = time.monotonic() + within
        self.delivery.flush_now()
        try:
            while self.ledger.open_in(partitions):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.ledger.changed.clear()
                await wait_event(self.ledger.changed, min(remaining, 0.5))
            return True
        finally:
            self.delivery.flush_now(False)

    async def stop_sending(self, partitions: list[PartitionWork]) -> None:
        """Shutting down, the drain over: nothing more is sent, and what is on the wire
        gets ``REBALANCE_TIMEOUT`` to answer (``Delivery.suspend``), so the last commit
        covers what Gist took (without Redis the next owner would send it again)."""
        self.stop_opening(partitions)
        await self.delivery.suspend(partitions)

    async def hand_over(self) -> None:
        """Shutting down, after the last commit: whatever did not end is abandoned, and
        the partitions are handed over (``Delivery.revoke``) for the next owner."""
        works = list(self.ledger.partitions.values())
        self.stop_opening(works)
        self.outcomes.abandon(works)
        await self.delivery.revoke(works)
        for work in works:
            self.ledger.revoke(work.tp)

    # --- rebalance --------------------------------------------------------------------
    async def on_revoked(self, revoked: set[Any]) -> None:
        """A rebalance began (aiokafka's eager protocol revokes every partition): open
        nothing more of them until the assignment says which stay, and commit what
        ended; what was opened goes on being sent while the group rejoins, for
        ``send_through`` seconds at most (``_stop_sending_through``)."""
        works = [
            w
            for tp in revoked
            if (w := self.ledger.partitions.get(TopicPartition(tp.topic, tp.partition)))
        ]
        if works:
            self._suspended.update(w.tp for w in works)
            # Expelled (its session timed out: a Kafka it could not reach, a stalled
            # process), the member's partitions are another's already, or soon: nothing
            # more is sent for them, and no commit can succeed.
            expelled = membership_lost(self.consumer)
            if not expelled:
                await self.commit(works)
            self._rejoining = True
            self._end_send_through()
            self._sending_stopped = False
            self._rebalancing = asyncio.create_task(self._stop_sending_through(works, expelled))
        log.info(
            log_events.PARTITIONS_REVOKED,
            partitions=sorted(f"{w.tp.topic}:{w.tp.partition}" for w in works),
            open=self.ledger.open_in(works),
        )

    async def _stop_sending_through(self, works: list[PartitionWork], expelled: bool) -> None:
        """The rejoin took ``send_through`` (at once when the member was ``expelled``):
        Kafka may give the partitions to another, so nothing more is sent for them
        (requests on the wire get ``REBALANCE_TIMEOUT`` to answer, ``Delivery.suspend``)
        and what Gist confirmed is handed over, as if they went; the assignment resumes
        those that stay (and commits what ended meanwhile)."""
        if not expelled:
            await asyncio.sleep(self.send_through)
        self._sending_stopped = True
        works = [w for w in works if not w.revoked]
        if expelled:
            log.warning(log_events.MEMBER_EXPELLED, partitions=len(works))
        elif self.send_through > 0:
            log.warning(log_events.REBALANCE_SLOW, seconds=self.send_through, partitions=len(works))
        await self.delivery.suspend(works)
        await self.delivery.hand_over(works, leaving=False)

    def _end_send_through(self) -> asyncio.Task[None] | None:
        """Cancel the send-through deadline unless it already passed; returns the task
        still stopping the sending, if any (to be awaited before the assignment acts)."""
        task, self._rebalancing = self._rebalancing, None
        if task is None or task.done():
            return None
        if not self._sending_stopped:
            task.cancel()
            return None
        return task

    async def on_assigned(self, assigned: set[Any]) -> None:
        """The new assignment: partitions that stayed go on where they were (their work
        kept, nothing read again); those that went stop sending at once, their requests on
        the wire answer, what Gist confirmed is handed over and the rest abandoned (the
        new owner reads what did not end again); new ones start from the group's
        commit."""
        wanted = {TopicPartition(tp.topic, tp.partition) for tp in assigned}
        lost = [w for tp, w in self.ledger.partitions.items() if tp not in wanted]
        kept = [w for tp, w in self.ledger.partitions.items() if tp in wanted]
        for work in lost:  # before any await: not one more request for them from here
            work.sending.clear()
        self._rejoining = False
        stopping = self._end_send_through()
        # New partitions get their intake before the first await: the consumer fetches
        # them from the group's commit as soon as the assignment is installed, while
        # this callback may still be waiting (on Redis, on a hand-over), and a record
        # fetched for a partition without an intake would be dropped behind the
        # consumer's position, never read again, and committed past. They open
        # nothing until the callback is done (suspended), so contact memory's take-over
        # comes first.
        self._assignments += 1
        fresh = []
        quiet_since: float | None = None
        consumed: set[TopicPartition] = set()
        for tp in assigned:
            key = TopicPartition(tp.topic, tp.partition)
            if key not in self.ledger.partitions:
                fresh.append((tp, self.ledger.assign(key)))
                self._intakes[key] = _Intake()
                self._draining.discard(key)
                self._suspended.add(key)
        try:
            if stopping is not None:
                with contextlib.suppress(Exception):
                    await stopping
            if lost:
                await self.delivery.suspend(lost)
                await self._abandon(lost)
            if kept:
                self._suspended.difference_update(w.tp for w in kept)
                await self.delivery.resume(kept)
            quiet_since, consumed = await self._load_committed(fresh)
            await self.delivery.take_over([work for _, work in fresh])
        finally:  # whatever failed above, the partitions are this worker's to read
            # ...once their previous owner has stopped: it sent through the rejoin and
            # stops at this same assignment, its requests on the wire get
            # REBALANCE_TIMEOUT to answer; a partition it released, or that no one
            # consumed, opens at once.
            held = set() if quiet_since is not None else consumed
            self._suspended.difference_update(w.tp for _, w in fresh if w.tp not in held)
            if held:
                self._open_later(held, self.delivery.settings.revoke_wait)
        self._tell_share(quiet_since)
        self._apply_backpressure()
        self.assigned_once.set()
        log.info(
            log_events.PARTITIONS_ASSIGNED,
            partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in assigned),
            kept=len(kept),
            new=len(fresh),
        )

    async def _abandon(self, works: list[PartitionWork]) -> None:
        """The partitions went to another worker: whatever did not end is dropped (the new
        owner reads it again from the commit)."""
        self.stop_opening(works)
        left = self.ledger.open_in(works)
        self.outcomes.abandon(works)
        abandoned = await self.delivery.revoke(works)
        if self.dedup is not None:
            self.dedup.abandon(works)
        for work in works:
            self.ledger.revoke(work.tp)
            self._intakes.pop(work.tp, None)
            self._draining.discard(work.tp)
            self._suspended.discard(work.tp)
            self._group_commits.discard(work.tp)
            # The new owner reports these; a stale value here would hide its real one.
            labels = (work.tp.topic, str(work.tp.partition))
            for gauge in (
                metrics.PARTITION_PAUSED,
                metrics.CONSUMER_LAG,
                metrics.COMMITTED_OFFSET,
                metrics.OLDEST_UNFINISHED_AGE,
            ):
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels)
        # Our share of the budget shrinks only now.
        self._tell_share()
        if left:
            log.warning(log_events.PARTITION_WORK_ABANDONED, messages=left, steps=abandoned)

    def _tell_share(self, quiet_since: float | None = None) -> None:
        """This worker's share of the subscribed topics' partitions (``quiet_since``:
        see ``on_share``)."""
        total = 0
        for topic in self.topics:
            partitions = self.consumer.partitions_for_topic(topic)
            total += len(partitions) if partitions else 0
        owned = len(self.ledger.partitions)
        self._on_share(owned, max(total, owned), quiet_since)

    async def _load_committed(
        self, fresh: list[tuple[Any, PartitionWork]]
    ) -> tuple[float | None, set[TopicPartition]]:
        """Start each new partition's lag from the group's commit (or the log start), so
        a worker that cannot deliver its first record still reports how far behind it is.
        Returns since when (this clock) the previous owners have sent nothing, when every
        new partition was released (``RELEASED``; the releases are cleared), else None;
        and the new partitions someone consumed before (the group has a commit: all of
        them when that cannot be read)."""
        every = {work.tp for _, work in fresh}
        if not fresh:
            return None, every
        consumed = set()
        try:
            starts = await self.consumer.beginning_offsets([tp for tp, _ in fresh])
            for tp, work in fresh:
                committed = await self.consumer.committed(tp)
                work.committed = committed if committed is not None else starts.get(tp)
                if committed is not None:
                    consumed.add(work.tp)
                    self._group_commits.add(work.tp)
        except KafkaError as exc:
            log.warning(log_events.COMMITTED_UNKNOWN, error=type(exc).__name__)
            return None, every
        return await self._take_releases([tp for tp, _ in fresh]), consumed

    def _open_later(self, partitions: set[TopicPartition], delay: float) -> None:
        """Open nothing of ``partitions`` for ``delay`` seconds, unless a rebalance comes
        first (it decides again)."""
        assignment = self._assignments

        def open_now() -> None:
            if self._assignments == assignment:
                self._suspended.difference_update(partitions)
                self.ledger.changed.set()

        asyncio.get_running_loop().call_later(delay, open_now)

    async def _take_releases(self, partitions: list[Any]) -> float | None:
        """The latest release of ``partitions`` if each has one (see ``_load_committed``).
        Every release found is cleared by a commit of the same offset, so that none
        outlives this ownership."""
        try:
            found = await committed_offsets(self.consumer, partitions)
        except Exception as exc:  # an answer it cannot use: the share waits GROWTH_DELAY
            log.warning(log_events.COMMITTED_UNKNOWN, error=type(exc).__name__)
            return None
        released: list[float] = []
        claims = {}
        for tp in partitions:
            meta = found.get(tp)
            text = (getattr(meta, "metadata", "") or "") if meta is not None else ""
            if meta is None or not text.startswith(RELEASED):
                continue
            claims[tp] = OffsetAndMetadata(meta.offset, "")
            with contextlib.suppress(ValueError):
                released.append(float(text[len(RELEASED) :]))
        if claims:
            try:
                await self.consumer.commit(claims)
            except KafkaError as exc:
                log.warning(log_events.COMMIT_FAILED, error=type(exc).__name__)
        if len(released) < len(partitions):
            return None
        ago = max(0.0, time.time() - max(released))
        return float(self._clock()) - ago + RELEASE_SKEW


def membership_lost(consumer: Any) -> bool:
    """Whether the group no longer counts this member: Kafka expelled it (its session
    timed out) and its partitions are, or will be, another's. aiokafka's coordinator
    forgets the member id then (``reset_generation`` on ``UNKNOWN_MEMBER_ID``, 0.14's
    private API, as ``destination.kafka_join``); the in-memory twin says so itself."""
    own = getattr(consumer, "membership_lost", None)
    if own is not None:
        return bool(own())
    coordinator = getattr(consumer, "_coordinator", None)
    return coordinator is not None and not getattr(coordinator, "member_id", "x")


async def committed_offsets(consumer: Any, partitions: list[Any]) -> dict[Any, Any]:
    """The group's committed ``OffsetAndMetadata`` of each partition that has one:
    aiokafka's consumer offers only the offset (``committed``), so this asks its group
    coordinator (aiokafka 0.14, as ``destination.kafka_join``); the in-memory twin has
    ``committed_offsets``."""
    own = getattr(consumer, "committed_offsets", None)
    if own is not None:
        return dict(await own(partitions))
    coordinator = consumer._coordinator
    found = await coordinator.fetch_committed_offsets(partitions)
    return {tp: meta for tp, meta in found.items() if meta.offset >= 0}


def sticky_assignor() -> type[Any]:
    """aiokafka's ``StickyPartitionAssignor``, for one consumer: it keeps the member's
    current assignment in class attributes, so each consumer gets a class of its own
    (two in one process, as in the tests, would otherwise share one)."""
    from aiokafka.coordinator.assignors.sticky.sticky_assignor import (
        StickyPartitionAssignor,
    )

    return type(
        "StickyAssignor",
        (StickyPartitionAssignor,),
        {"member_assignment": None, "generation": StickyPartitionAssignor.DEFAULT_GENERATION_ID},
    )


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: StreamConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: set[Any]) -> None:
        await self._owner.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[Any]) -> None:
        await self._owner.on_assigned(assigned)
