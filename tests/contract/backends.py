"""The two Kafka backends the contract suite runs on, behind one small interface (as in
getsentry/arroyo's ``tests/backends/mixins.py``), and the group-member helper the tests
drive them with."""

from __future__ import annotations

import asyncio
import functools
import os
import time
import uuid
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from destination.devtools.broker import create_topics
from destination.devtools.local_kafka import LocalBroker, LocalConsumer, LocalProducer
from destination.worker import KafkaClients


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class KafkaBackend(ABC):
    """Makes topics, producers and consumers on one broker, and stops every client it
    made when the test ends. Clients come back unstarted, with aiokafka's signatures."""

    name: str
    settle_within: float
    """Seconds to allow a group change (join, leave) to complete."""
    poll_ms: int
    """The ``getmany`` time-out the helpers poll with."""
    auto_creates_topics: bool
    is_tansu: bool

    def __init__(self) -> None:
        self._clients: list[Any] = []

    @abstractmethod
    async def topic(self, partitions: int = 1) -> str:
        """A new, empty topic."""

    @abstractmethod
    def _producer(self, **options: Any) -> Any: ...

    @abstractmethod
    def _consumer(self, group_id: str | None, **options: Any) -> Any: ...

    @abstractmethod
    async def delete_records(self, tp: TopicPartition, before_offset: int) -> None:
        """Move the partition's log start to ``before_offset`` (as retention would)."""

    @abstractmethod
    def allow_auto_create(self) -> None:
        """Let a metadata request create a missing topic."""

    def producer(self, **options: Any) -> Any:
        client = self._producer(**options)
        self._clients.append(client)
        return client

    def consumer(self, group_id: str | None = None, **options: Any) -> Any:
        options.setdefault("auto_offset_reset", "earliest")
        client = self._consumer(group_id, enable_auto_commit=False, **options)
        self._clients.append(client)
        return client

    async def started_producer(self, **options: Any) -> Any:
        producer = self.producer(**options)
        await producer.start()
        return producer

    def differs_on_tansu(self, difference: str) -> None:
        """Skip a case for Tansu, naming how it differs from Kafka."""
        if self.is_tansu:
            pytest.skip(f"Tansu 0.6 differs from Kafka here: {difference}")

    async def close(self) -> None:
        for client in reversed(self._clients):
            await client.stop()


class TwinBackend(KafkaBackend):
    name = "twin"
    settle_within = 5.0
    poll_ms = 20
    auto_creates_topics = False
    is_tansu = False

    def __init__(self) -> None:
        super().__init__()
        self.broker = LocalBroker()

    async def topic(self, partitions: int = 1) -> str:
        name = unique("contract")
        self.broker.create_topic(name, partitions)
        return name

    def _producer(self, **options: Any) -> Any:
        return LocalProducer(self.broker, **options)

    def _consumer(self, group_id: str | None, **options: Any) -> Any:
        return LocalConsumer(self.broker, group_id=group_id, **options)

    async def delete_records(self, tp: TopicPartition, before_offset: int) -> None:
        self.broker.delete_records(tp.topic, tp.partition, before_offset)

    def allow_auto_create(self) -> None:
        self.broker.auto_create_topics = True
        self.auto_creates_topics = True


@functools.cache
def _real_broker_is_tansu() -> bool:
    """The ``kafka_bootstrap`` fixture's choice: the embedded Tansu broker unless
    ``KAFKA_BOOTSTRAP_SERVERS`` is set or Docker runs a Kafka container."""
    from tests.conftest import _docker_runs

    return not os.environ.get("KAFKA_BOOTSTRAP_SERVERS") and not _docker_runs()


class RealBackend(KafkaBackend):
    name = "real"
    settle_within = 45.0  # Tansu 0.6 takes 3 s per join round, more under load
    poll_ms = 200
    auto_creates_topics = True  # Tansu always; Kafka images by default

    def __init__(self, bootstrap: str) -> None:
        super().__init__()
        self.bootstrap = bootstrap
        self.is_tansu = _real_broker_is_tansu()

    async def topic(self, partitions: int = 1) -> str:
        name = unique("contract")
        await create_topics(self.bootstrap, [name], partitions)
        return name

    def _producer(self, **options: Any) -> Any:
        return AIOKafkaProducer(bootstrap_servers=self.bootstrap, **options)

    def _consumer(self, group_id: str | None, **options: Any) -> Any:
        # Fast heartbeats so members notice a rebalance within ~0.3 s (Kafka's minimum
        # session time-out is 6 s); short fetch waits so polls stay short.
        options.setdefault("heartbeat_interval_ms", 300)
        options.setdefault("session_timeout_ms", 6000)
        options.setdefault("fetch_max_wait_ms", 100)
        # The worker's factory: aiokafka's consumer, with its group join fixed
        # (``destination.kafka_join``).
        return KafkaClients().consumer(
            bootstrap_servers=self.bootstrap, group_id=group_id, **options
        )

    def allow_auto_create(self) -> None:
        pass  # the real broker here always auto-creates

    async def delete_records(self, tp: TopicPartition, before_offset: int) -> None:
        from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            await admin.delete_records({tp: RecordsToDelete(before_offset=before_offset)})
        finally:
            await admin.close()


# --- driving group members ------------------------------------------------------------


class Member(ConsumerRebalanceListener):  # type: ignore[misc]
    """A consumer in a group, with what it read and the rebalance callbacks it saw.

    Inside ``on_partitions_revoked`` it waits ``revoke_delay`` seconds when it owned
    something (as the worker drains), then commits, for each revoked partition it read,
    ``commit_on_revoke(partition, next offset)`` (by default the next offset), as the
    worker commits what it finished before giving partitions up."""

    def __init__(
        self,
        name: str,
        consumer: Any,
        commit_on_revoke: Callable[[TopicPartition, int], int] | None = None,
        revoke_delay: float = 0.0,
    ) -> None:
        self.name = name
        self.consumer = consumer
        self.events: list[tuple[str, frozenset[TopicPartition]]] = []
        self.records: dict[TopicPartition, list[Any]] = defaultdict(list)
        self.next_offsets: dict[TopicPartition, int] = {}
        """Per partition, the offset after the last record read (kept by
        ``forget_records``)."""
        self.revoke_commits: list[dict[TopicPartition, int] | Exception] = []
        self._commit_on_revoke = commit_on_revoke or (lambda _tp, offset: offset)
        self._revoke_delay = revoke_delay

    async def join(self, topic: str) -> None:
        self.consumer.subscribe(topics=[topic], listener=self)
        await self.consumer.start()

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.events.append(("revoked", frozenset(revoked)))
        if revoked and self._revoke_delay:
            await asyncio.sleep(self._revoke_delay)
        offsets = {
            tp: self._commit_on_revoke(tp, self.next_offsets[tp])
            for tp in revoked
            if tp in self.next_offsets
        }
        if not offsets:
            return
        try:
            await self.consumer.commit({tp: OffsetAndMetadata(o, "") for tp, o in offsets.items()})
        except Exception as exc:
            self.revoke_commits.append(exc)
        else:
            self.revoke_commits.append(offsets)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.events.append(("assigned", frozenset(assigned)))

    async def poll(self, timeout_ms: int) -> None:
        batches = await self.consumer.getmany(timeout_ms=timeout_ms)
        for tp, records in batches.items():
            self.records[tp].extend(records)
            self.next_offsets[tp] = records[-1].offset + 1

    def offsets(self, tp: TopicPartition) -> list[int]:
        return [r.offset for r in self.records[tp]]

    def forget_records(self) -> None:
        """Start ``records`` afresh (what to commit is kept)."""
        self.records.clear()

    def last_assigned(self) -> frozenset[TopicPartition]:
        assigned = [tps for kind, tps in self.events if kind == "assigned"]
        return assigned[-1] if assigned else frozenset()


async def poll_until(
    backend: KafkaBackend,
    members: list[Member],
    condition: Callable[[], bool],
    what: str,
    within: float | None = None,
) -> None:
    """Poll every member side by side (as each worker's loop would) until
    ``condition()`` holds; fails after ``within`` (default: the backend's settle time)."""
    deadline = time.monotonic() + (within if within is not None else backend.settle_within)
    while not condition():
        if time.monotonic() > deadline:
            state = {
                m.name: (m.events, {str(tp): m.offsets(tp) for tp in m.records}) for m in members
            }
            raise AssertionError(f"timed out waiting for {what}: {state}")
        await asyncio.gather(*(m.poll(backend.poll_ms) for m in members))


async def fetch_until_error(backend: KafkaBackend, consumer: Any) -> None:
    """Poll until ``getmany`` raises (it may take a fetch or two on a real broker)."""
    for _ in range(50):
        await consumer.getmany(timeout_ms=backend.poll_ms)
    raise AssertionError("getmany never raised")


async def read_all(
    backend: KafkaBackend, consumer: Any, expect: int, within: float | None = None
) -> dict[TopicPartition, list[Any]]:
    """Poll one consumer until it has read ``expect`` records."""
    member = Member("reader", consumer)
    await poll_until(
        backend,
        [member],
        lambda: sum(len(rs) for rs in member.records.values()) >= expect,
        f"{expect} records",
        within,
    )
    return dict(member.records)
