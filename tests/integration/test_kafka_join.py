"""The worker's group membership on a real broker (``destination.kafka_join``): aiokafka
0.14.0 sent one JoinGroup per assignor, the first naming only the sticky one, and a
member of a first generation numbered 0 (Tansu's) left without a LeaveGroup."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiokafka
import pytest
from aiokafka.consumer import group_coordinator
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.structs import TopicPartition

from destination import kafka_join
from destination.devtools.broker import create_topics
from destination.pipeline.consume import sticky_assignor
from destination.worker import KafkaClients
from tests.integration.harness import unique

pytestmark = pytest.mark.integration


def test_the_fix_is_installed_over_the_locked_aiokafka() -> None:
    """When this fails, aiokafka was upgraded: check whether the new version still sends
    one JoinGroup per assignor (aio-libs/aiokafka#1168); if it does, copy its
    ``perform_group_join`` into ``destination.kafka_join`` with the fix and add the
    version to ``FIXED_VERSIONS``; if not, delete the module."""
    assert aiokafka.__version__ in kafka_join.FIXED_VERSIONS
    assert kafka_join.install()
    rebalance = group_coordinator.CoordinatorGroupRebalance
    assert rebalance.perform_group_join is kafka_join.perform_group_join
    coordinator = group_coordinator.GroupCoordinator
    assert coordinator._maybe_leave_group is kafka_join.maybe_leave_group


async def test_a_consumer_naming_two_assignors_joins_with_one_request_naming_both(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: each join and rejoin took two JoinGroup rounds (10 s on Tansu instead
    of 5: a failover's takeover 20-23 s), and the first named only the sticky assignor,
    which Kafka refuses in a group of older workers naming only round-robin."""
    sent: list[list[str]] = []
    original = group_coordinator.GroupCoordinator._send_req

    async def recording(self: Any, request: Any) -> Any:
        if type(request).__name__ == "JoinGroupRequest":
            sent.append([name for name, _ in request._group_protocols])
        return await original(self, request)

    monkeypatch.setattr(group_coordinator.GroupCoordinator, "_send_req", recording)
    topic = unique("join")
    await create_topics(kafka_bootstrap, [topic], 2)
    consumer = KafkaClients().consumer(
        bootstrap_servers=kafka_bootstrap,
        group_id=unique("group"),
        enable_auto_commit=False,
        partition_assignment_strategy=(sticky_assignor(), RoundRobinPartitionAssignor),
    )
    consumer.subscribe([topic])
    await consumer.start()
    try:
        assert consumer.assignment() == {TopicPartition(topic, 0), TopicPartition(topic, 1)}
    finally:
        await consumer.stop()
    # A first request answered MEMBER_ID_REQUIRED (KIP-394) and the join itself, both
    # naming both assignors in the order of preference; none naming only the first.
    assert sent
    assert all(names == ["sticky", "roundrobin"] for names in sent), sent
    assert len(sent) <= 2, sent


async def test_a_member_that_stops_in_the_first_generation_leaves_the_group(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: aiokafka sends LeaveGroup only above generation 0, and Tansu numbers a
    group's first generation 0, so a worker stopped then left nothing: the other member
    waited a whole session timeout for its partitions (a roll's first step took 15.7 s
    to rejoin instead of 5). Here the survivor owns both partitions well inside the
    session timeout after the stop, and the stopping member said it left."""
    session = 20.0  # Tansu answers a JoinGroup after half of it: 10 s a join
    left: list[int] = []
    original = group_coordinator.GroupCoordinator._send_req

    async def recording(self: Any, request: Any) -> Any:
        if type(request).__name__ == "LeaveGroupRequest":
            left.append(self.generation)
        return await original(self, request)

    monkeypatch.setattr(group_coordinator.GroupCoordinator, "_send_req", recording)
    topic, group = unique("leave"), unique("group")
    await create_topics(kafka_bootstrap, [topic], 2)
    both = {TopicPartition(topic, 0), TopicPartition(topic, 1)}

    def member() -> Any:
        consumer = KafkaClients().consumer(
            bootstrap_servers=kafka_bootstrap,
            group_id=group,
            enable_auto_commit=False,
            session_timeout_ms=int(session * 1000),
            heartbeat_interval_ms=1000,
            partition_assignment_strategy=(sticky_assignor(), RoundRobinPartitionAssignor),
        )
        consumer.subscribe([topic])
        return consumer

    async def owns(consumer: Any, wanted: int, within: float) -> float:
        started = time.monotonic()
        while len(consumer.assignment()) != wanted:
            assert time.monotonic() - started < within, consumer.assignment()
            await consumer.getmany(timeout_ms=200)
        return time.monotonic() - started

    first, second = member(), member()
    await asyncio.gather(first.start(), second.start())
    try:
        # One generation with both members (the first, unless a join straggled).
        await asyncio.gather(owns(first, 1, 4 * session), owns(second, 1, 4 * session))
        generation = first._coordinator.generation
        await first.stop()
        assert left == [generation], left
        took = await owns(second, 2, session)
        assert second.assignment() == both
        # A rejoin, not the session timeout: the coordinator was told.
        assert took < session, took
    finally:
        await second.stop()


async def test_a_member_the_group_forgot_is_told_apart_in_its_revocation(
    kafka_bootstrap: str,
) -> None:
    """``consume.membership_lost`` reads aiokafka 0.14's coordinator: in a rebalance the
    member is still counted (its partitions may stay: it sends through the rejoin);
    after ``UNKNOWN_MEMBER_ID`` (expelled: the coordinator resets the member) it is not
    (it stops at once). When this fails after an upgrade, find where aiokafka keeps the
    member id."""
    from aiokafka import ConsumerRebalanceListener

    from destination.pipeline.consume import membership_lost

    topic = unique("expel")
    await create_topics(kafka_bootstrap, [topic], 1)
    seen: list[bool] = []  # membership_lost, in each revocation of partitions
    assigned: list[set[Any]] = []

    class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
        async def on_partitions_revoked(self, revoked: set[Any]) -> None:
            if revoked:
                seen.append(membership_lost(consumer))

        async def on_partitions_assigned(self, partitions: set[Any]) -> None:
            assigned.append(partitions)

    consumer = KafkaClients().consumer(
        bootstrap_servers=kafka_bootstrap,
        group_id=unique("group"),
        enable_auto_commit=False,
        partition_assignment_strategy=(sticky_assignor(), RoundRobinPartitionAssignor),
    )
    consumer.subscribe([topic], listener=Listener())
    await consumer.start()
    try:
        assert not membership_lost(consumer)
        coordinator = consumer._coordinator
        coordinator.request_rejoin()  # a rebalance: still a member
        while len(assigned) < 2:  # the rebalance is over
            await consumer.getmany(timeout_ms=200)
        coordinator.reset_generation()  # what aiokafka does on UNKNOWN_MEMBER_ID
        while len(assigned) < 3:
            await consumer.getmany(timeout_ms=200)
        assert seen == [False, True]
        assert not membership_lost(consumer)  # rejoined
    finally:
        await consumer.stop()
