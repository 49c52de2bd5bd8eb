"""Reading Kafka: records in, backpressure out, offsets committed behind delivery.

``StreamConsumer`` owns the aiokafka consumer. Each record is decoded and mapped, and its
messages handed to ``Delivery``; the ``Ledger`` counts them until they are delivered or
dead-lettered. When too much is in flight (messages, bytes, or one partition's share),
the partitions concerned are paused and resumed as work drains; the wanted set of
paused partitions is re-applied on every turn, since aiokafka forgets pauses on a
rebalance. Offsets are committed only up to the first record not finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata
from aiokafka.structs import TopicPartition as KafkaTopicPartition

from destination.mapping import Mapper
from destination.observability import log_events, metrics
from destination.operations import Mapped, Rejected, Skipped
from destination.pipeline.decode import DecodeError, decode_record
from destination.pipeline.deliver import Delivery
from destination.pipeline.inflight import Failure, Ledger, PartitionWork, TopicPartition

log = structlog.get_logger(__name__)


class FlowLimits:
    """Bounds on work in flight; pausing at the bound, resuming below ``resume_at``.
    ``awaiting_import`` bounds the parked messages (see ``inflight``);
    ``uncommitted_per_partition`` the records a partition has read past its committable
    offset, finished ones included: one message retried for hours must not let the
    finished records after it pile up in the offset tracker."""

    def __init__(
        self,
        messages: int,
        bytes_: int,
        per_partition: int,
        awaiting_import: int,
        uncommitted_per_partition: int = 200_000,
        resume_at: float = 0.8,
    ) -> None:
        self.messages = messages
        self.bytes = bytes_
        self.per_partition = per_partition
        self.awaiting_import = awaiting_import
        self.uncommitted_per_partition = uncommitted_per_partition
        self.resume_at = resume_at

    def full(self, ledger: Ledger, resuming: bool) -> bool:
        """Whether the totals are at the bound (or, when ``resuming``, not yet below
        the resume mark)."""
        share = self.resume_at if resuming else 1.0
        return (
            ledger.messages >= self.messages * share
            or ledger.bytes >= self.bytes * share
            or ledger.parked >= self.awaiting_import * share
        )

    def partition_full(self, work: PartitionWork, resuming: bool) -> bool:
        """Whether one partition is at its own bounds (or, when ``resuming``, not yet
        below the resume mark)."""
        share = self.resume_at if resuming else 1.0
        return (
            work.messages >= self.per_partition * share
            or work.offsets.uncommitted >= self.uncommitted_per_partition * share
        )


class StreamConsumer:
    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        topics: list[str],
        mapper: Mapper,
        delivery: Delivery,
        ledger: Ledger,
        limits: FlowLimits,
        rebalance_timeout: float,
        fail: Callable[[Any, Failure], None],
    ) -> None:
        self.consumer = consumer
        self.topics = topics
        self.mapper = mapper
        self.delivery = delivery
        self.ledger = ledger
        self.limits = limits
        self.rebalance_timeout = rebalance_timeout
        self._fail = fail
        self._stopping = False
        self._globally_full = False
        self._full_partitions: set[TopicPartition] = set()
        self.assigned_once = asyncio.Event()

    def subscribe(self) -> None:
        self.consumer.subscribe(topics=self.topics, listener=_Rebalance(self))

    def stop(self) -> None:
        """Stop fetching; the loop returns after its current turn."""
        self._stopping = True

    # --- the loop ---------------------------------------------------------------------
    async def run(self) -> None:
        while not self._stopping:
            self._apply_backpressure()
            batches = await self.consumer.getmany(timeout_ms=200)
            for tp, records in batches.items():
                work = self.ledger.partitions.get(TopicPartition(tp.topic, tp.partition))
                if work is None:  # fetched just before a revocation: the new owner reads it
                    continue
                for record in records:
                    self._take(work, record)
            if not batches and self._paused_everything():
                self.ledger.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.ledger.changed.wait(), 0.5)

    def _take(self, partition: PartitionWork, record: Any) -> None:
        if partition.offsets.seen(record.offset):  # fetched twice: it is already ours
            return
        ledger = self.ledger
        headers = [(k, v) for k, v in (record.headers or ())]
        work = ledger.open_record(partition, record.offset, record.key, record.value, headers)
        try:
            messages, enveloped = decode_record(record.value)
        except DecodeError as error:
            message = ledger.open_message(work, None, "unknown", None)
            metrics.child(metrics.MESSAGES_CONSUMED, "unknown").inc()
            self._fail(message, Failure(error.reason, error.detail))
            ledger.close_record(work)
            return
        for index, body in enumerate(messages):
            result = self.mapper.map(body)
            kind = result.message_type
            metrics.child(metrics.MESSAGES_CONSUMED, kind).inc()
            timestamp = None
            if isinstance(result, Mapped) and result.operations:
                timestamp = result.operations[0].timestamp
            message = ledger.open_message(
                work, index if enveloped else None, kind, timestamp, body if enveloped else None
            )
            if isinstance(result, Rejected):
                self._fail(message, Failure(result.reason, result.detail))
            elif isinstance(result, Skipped):
                metrics.child(metrics.MESSAGES_SKIPPED, kind, result.reason).inc()
                ledger.finish(message)
            elif not result.operations:
                metrics.child(metrics.MESSAGES_DELIVERED, kind).inc()
                ledger.finish(message)
            else:
                self.delivery.submit(message, result.operations)
        ledger.close_record(work)

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

        assigned = {TopicPartition(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        wanted = assigned if self._globally_full else assigned & self._full_partitions
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
    async def commit(self, partitions: list[PartitionWork] | None = None) -> None:
        """Commit, for each partition, the offset below which everything is finished."""
        offsets = {}
        for work in partitions if partitions is not None else list(self.ledger.partitions.values()):
            offset = work.offsets.committable()
            if offset is not None and offset != work.committed:
                offsets[KafkaTopicPartition(*work.tp)] = (work, offset)
        if not offsets:
            return
        try:
            await self.consumer.commit(
                {tp: OffsetAndMetadata(o, "") for tp, (_, o) in offsets.items()}
            )
        except KafkaError as exc:
            # A rebalance under way: the next owner starts from the last good commit.
            log.warning(log_events.COMMIT_FAILED, error=type(exc).__name__)
            return
        for tp, (work, offset) in offsets.items():
            work.committed = offset
            metrics.COMMITTED_OFFSET.labels(tp.topic, str(tp.partition)).set(offset)

    def update_lag(self) -> None:
        """Lag from the committed offset (the group's, until this worker commits)."""
        for tp, work in self.ledger.partitions.items():
            highwater = self.consumer.highwater(KafkaTopicPartition(*tp))
            if highwater is not None and work.committed is not None:
                metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(
                    max(0, highwater - work.committed)
                )

    async def drain(self, partitions: list[PartitionWork], within: float) -> bool:
        """Wait until the partitions' records are all finished; False on time-out."""
        deadline = time.monotonic() + within
        self.delivery.flush_now()
        try:
            while self.ledger.unfinished(partitions):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.ledger.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.ledger.changed.wait(), min(remaining, 0.5))
            return True
        finally:
            self.delivery.flush_now(False)

    # --- rebalance --------------------------------------------------------------------
    async def on_revoked(self, revoked: set[Any]) -> None:
        works = [
            w
            for tp in revoked
            if (w := self.ledger.partitions.get(TopicPartition(tp.topic, tp.partition)))
        ]
        drained = True
        if works and not self._stopping:
            drained = await self.drain(works, self.rebalance_timeout)
        await self.commit(works)
        for work in works:
            self.ledger.revoke(work.tp)
            # The new owner reports these; a stale lag here would hide its real one.
            labels = (work.tp.topic, str(work.tp.partition))
            for gauge in (metrics.PARTITION_PAUSED, metrics.CONSUMER_LAG, metrics.COMMITTED_OFFSET):
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels)
        log.info(
            log_events.PARTITIONS_REVOKED,
            partitions=sorted(f"{w.tp.topic}:{w.tp.partition}" for w in works),
            drained=drained,
        )

    async def on_assigned(self, assigned: set[Any]) -> None:
        fresh = []
        for tp in assigned:
            key = TopicPartition(tp.topic, tp.partition)
            if key not in self.ledger.partitions:
                fresh.append((tp, self.ledger.assign(key)))
        await self._load_committed(fresh)
        self._apply_backpressure()
        self.assigned_once.set()
        log.info(
            log_events.PARTITIONS_ASSIGNED,
            partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in assigned),
        )

    async def _load_committed(self, fresh: list[tuple[Any, PartitionWork]]) -> None:
        """Start each new partition's lag from the group's commit (or the log start), so
        a worker that cannot deliver its first record still reports how far behind it is."""
        if not fresh:
            return
        try:
            starts = await self.consumer.beginning_offsets([tp for tp, _ in fresh])
            for tp, work in fresh:
                committed = await self.consumer.committed(tp)
                work.committed = committed if committed is not None else starts.get(tp)
        except KafkaError as exc:
            log.warning(log_events.COMMITTED_UNKNOWN, error=type(exc).__name__)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: StreamConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: set[Any]) -> None:
        await self._owner.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[Any]) -> None:
        await self._owner.on_assigned(assigned)
