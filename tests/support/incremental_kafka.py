"""The Kafka twin's consumer with incremental (cooperative) rebalancing.

aiokafka rebalances eagerly: every member revokes everything it owns before rejoining,
so a worker never sees a revocation of *some* of its partitions. Kafka's cooperative
protocol (KIP-429, the Java client's and librdkafka's ``cooperative-sticky``) revokes
only the partitions that move, while the member goes on with the others; the worker's
rebalance listener (``on_partitions_revoked(revoked)``) is written for any subset, and
``Delivery.abandon`` takes a list of partitions. ``IncrementalConsumer`` plays that
protocol on the twin, so the model test reaches the paths where a revoked partition's
work is dropped while the others' goes on.

Per rebalance, each member: rejoins at once and keeps fetching what it owns; once the
group has decided, it revokes what it loses (the callback gets only those), installs
the new assignment keeping its positions and pauses for what it keeps, waits until the
previous owner of each partition it gains has finished revoking it (a partition never
has two owners at once, which Kafka's protocol ensures with a second round), and then
calls ``on_partitions_assigned`` with what it gained. ``Holders`` is that bookkeeping,
one per broker; a crashed member's partitions are released by ``Holders.release_all``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from destination.devtools.local_kafka import (
    LocalBroker,
    LocalConsumer,
    LocalKafkaClients,
    LocalProducer,
    _PartitionState,
)


class Holders:
    """Which member holds each partition (from its install until its revocation ends)."""

    def __init__(self) -> None:
        self.by_partition: dict[Any, LocalConsumer] = {}
        self.changed = asyncio.Event()

    def release(self, consumer: LocalConsumer, partitions: Any) -> None:
        for tp in partitions:
            if self.by_partition.get(tp) is consumer:
                del self.by_partition[tp]
        self._notify()

    def release_all(self, consumer: LocalConsumer) -> None:
        self.release(consumer, list(self.by_partition))

    def take(self, consumer: LocalConsumer, partitions: Any) -> None:
        for tp in partitions:
            self.by_partition[tp] = consumer
        self._notify()

    def free_for(self, consumer: LocalConsumer, partitions: Any) -> bool:
        return all(self.by_partition.get(tp) in (None, consumer) for tp in partitions)

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


_HOLDERS: dict[int, Holders] = {}


def holders_of(broker: LocalBroker) -> Holders:
    return _HOLDERS.setdefault(id(broker), Holders())


class IncrementalConsumer(LocalConsumer):
    async def _coordinate(self) -> None:
        broker = self._broker
        holders = holders_of(broker)
        while True:
            await broker._wait_until(lambda: self._closed or self._rejoin_requested, None)
            if self._closed:
                return
            self._rejoin_requested = False
            broker._rejoin(self)  # keeps fetching what it owns meanwhile
            await broker._wait_until(
                lambda: self._closed or self._pending is not None or self._rejoin_requested,
                None,
            )
            pending = self._pending
            if self._stopped():
                return
            if pending is None:
                continue
            generation, assigned = pending
            self._pending = None
            self._reassigning = True
            broker._notify()
            old = self._assignment
            lost, gained = old - assigned, assigned - old
            # The member's commits of what it loses must still count in its callback.
            self._generation = generation
            if lost:
                await self._call_listener("on_partitions_revoked", set(lost))
            if self._stopped():
                return
            holders.release(self, lost)
            while not (self._closed or holders.free_for(self, gained)):
                changed = holders.changed
                await changed.wait()
            if self._stopped():
                return
            self._assignment = assigned
            for tp in lost:
                self._states.pop(tp, None)
            for tp in gained:
                self._states[tp] = _PartitionState()
            holders.take(self, gained)
            self._reassigning = False
            broker._notify()
            if gained or not old:
                await self._call_listener("on_partitions_assigned", set(gained))

    async def stop(self) -> None:
        await super().stop()
        holders_of(self._broker).release_all(self)


class ModelKafkaClients(LocalKafkaClients):
    """The twin's clients for one worker, with ``IncrementalConsumer`` when
    ``incremental``; the producers are kept too, so that a crash can close them."""

    def __init__(
        self, broker: LocalBroker, incremental: bool = False, roundrobin: bool = False
    ) -> None:
        super().__init__(broker)
        self.incremental = incremental
        self.roundrobin = roundrobin
        self.producers: list[LocalProducer] = []

    def consumer(self, **options: Any) -> LocalConsumer:
        """``roundrobin``: the member names no assignor but the twin's default (an older
        worker's: every partition may move at every rebalance)."""
        if self.roundrobin:
            options["partition_assignment_strategy"] = ()
        kind = IncrementalConsumer if self.incremental else LocalConsumer
        consumer = kind(self.broker, **options)
        self.consumers.append(consumer)
        return consumer

    def producer(self, **options: Any) -> LocalProducer:
        producer = super().producer(**options)
        self.producers.append(producer)
        return producer
