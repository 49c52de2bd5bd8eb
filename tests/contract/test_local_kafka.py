"""The twin's own promises: its test-only controls (``LocalBroker.rebalance``, ``expel``,
``wait_stable``, ``forbid``, the clock) and the details the contract suite cannot pin
down on a real broker (when callbacks run, the assignor, fairness under a limit)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from aiokafka.errors import (
    CommitFailedError,
    ConsumerStoppedError,
    IllegalOperation,
    IllegalStateError,
    MessageSizeTooLargeError,
    UnknownTopicOrPartitionError,
)
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from destination.devtools.local_kafka import LocalBroker, LocalConsumer, LocalProducer
from tests.contract.backends import Member

TOPIC = "events"
P0, P1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)


@pytest.fixture
def broker() -> LocalBroker:
    broker = LocalBroker(clock=lambda: 1_700_000_000.5)
    broker.create_topic(TOPIC, partitions=2)
    return broker


async def member(broker: LocalBroker, name: str, group: str = "g", **options: Any) -> Member:
    joined = Member(name, LocalConsumer(broker, group_id=group, client_id=name, **options))
    await joined.join(TOPIC)
    return joined


async def test_start_returns_with_the_first_assignment_in_place(broker: LocalBroker) -> None:
    a = await member(broker, "a")
    assert a.consumer.assignment() == {P0, P1}
    assert a.events == [("revoked", frozenset()), ("assigned", frozenset({P0, P1}))]
    assert broker.members("g") == ["a-1"]
    await a.consumer.stop()


async def test_a_rebalance_has_run_its_callbacks_when_getmany_returns(
    broker: LocalBroker,
) -> None:
    a = await member(broker, "a", auto_offset_reset="earliest")
    broker.produce(TOPIC, b"x", partition=0)
    a.consumer.pause(P1)

    broker.rebalance("g")
    assert a.events[2:] == []  # nothing runs until the test yields
    batches = await a.consumer.getmany(timeout_ms=0)

    assert a.events[2:] == [("revoked", frozenset({P0, P1})), ("assigned", frozenset({P0, P1}))]
    assert a.consumer.paused() == set()  # forgotten, although P1 stayed assigned
    assert [r.value for r in batches[P0]] == [b"x"]
    assert broker.generation("g") == 2
    await a.consumer.stop()


async def test_every_revocation_runs_before_any_assignment(broker: LocalBroker) -> None:
    order: list[str] = []

    class Tracing(Member):
        async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
            order.append(f"{self.name} revoked")
            await asyncio.sleep(0.01)
            await super().on_partitions_revoked(revoked)

        async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
            order.append(f"{self.name} assigned")
            await super().on_partitions_assigned(assigned)

    a = Tracing("a", LocalConsumer(broker, group_id="g", client_id="a"))
    b = Tracing("b", LocalConsumer(broker, group_id="g", client_id="b"))
    await a.join(TOPIC)
    order.clear()
    await b.join(TOPIC)
    await broker.wait_stable("g")

    assert sorted(order[:2]) == ["a revoked", "b revoked"]
    assert sorted(order[2:]) == ["a assigned", "b assigned"]
    assert broker.assignment("g") == {"a-1": {P0}, "b-2": {P1}}
    for m in (a, b):
        await m.consumer.stop()


async def test_partitions_are_dealt_round_robin_in_join_order(broker: LocalBroker) -> None:
    broker.create_topic("other", partitions=3)
    consumers = [LocalConsumer(broker, group_id="g", client_id=n) for n in ("x", "y")]
    consumers[0].subscribe(topics=[TOPIC, "other"])
    consumers[1].subscribe(topics=["other"])
    for consumer in consumers:
        await consumer.start()
    await broker.wait_stable("g")

    other = [TopicPartition("other", p) for p in range(3)]
    # Sorted partitions events-0, events-1, other-0..2 dealt x, y, x, ...; y skips events.
    assert broker.assignment("g") == {"x-1": {P0, P1, other[1]}, "y-2": {other[0], other[2]}}
    for consumer in consumers:
        await consumer.stop()


async def test_an_expelled_member_cannot_commit_until_it_has_rejoined(
    broker: LocalBroker,
) -> None:
    a = await member(broker, "a")
    b = await member(broker, "b")
    await broker.wait_stable("g")
    (owned,) = a.consumer.assignment()

    broker.expel(a.consumer)
    with pytest.raises(CommitFailedError):
        await a.consumer.commit({owned: 1})
    await broker.wait_stable("g")

    assert broker.members("g") == ["a-3", "b-2"]  # back, as a new member
    (owned,) = a.consumer.assignment()
    await a.consumer.commit({owned: 1})
    assert broker.committed("g", owned) == 1
    for m in (a, b):
        await m.consumer.stop()


async def test_a_member_missing_the_rebalance_deadline_is_expelled(broker: LocalBroker) -> None:
    broker.produce(TOPIC, b"x", partition=0)
    slow = await member(broker, "slow", rebalance_timeout_ms=50, auto_offset_reset="earliest")
    await slow.poll(0)
    slow._revoke_delay = 0.2

    other = await member(broker, "other", rebalance_timeout_ms=50)

    # The round completed without the slow member, which rejoins once its callback ends.
    assert other.consumer.assignment() == {P0, P1}
    await broker.wait_stable("g")
    assert isinstance(slow.revoke_commits[0], CommitFailedError)
    assert len(slow.consumer.assignment()) == len(other.consumer.assignment()) == 1
    for m in (slow, other):
        await m.consumer.stop()


async def test_a_commit_with_a_generation_not_yet_installed_fails(broker: LocalBroker) -> None:
    """Kafka's CompletingRebalance window: the group has a new generation, this member
    has not installed it yet."""
    a = await member(broker, "a")
    seen: list[BaseException | None] = []

    class Last(Member):  # rejoins last, so its task completes the round
        async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
            await asyncio.sleep(0.01)

        async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
            try:  # runs before a's task has installed the new generation
                await a.consumer.commit({next(iter(a.consumer.assignment())): 1})
            except CommitFailedError as exc:
                seen.append(exc)
            else:
                seen.append(None)

    last = Last("last", LocalConsumer(broker, group_id="g", client_id="last"))
    await last.join(TOPIC)
    await broker.wait_stable("g")

    assert isinstance(seen[0], CommitFailedError)
    (owned,) = a.consumer.assignment()
    await a.consumer.commit({owned: 1})  # installed now
    for m in (a, last):
        await m.consumer.stop()


async def test_a_manually_assigned_consumer_commits_only_into_an_empty_group(
    broker: LocalBroker,
) -> None:
    manual = LocalConsumer(broker, group_id="g")
    await manual.start()
    manual.assign([P0])
    await manual.commit({P0: OffsetAndMetadata(4, "meta")})
    assert await manual.committed(P0) == 4

    a = await member(broker, "a")
    with pytest.raises(CommitFailedError):
        await manual.commit({P0: 5})
    with pytest.raises(IllegalStateError):
        await manual.commit({P1: 5})
    await a.consumer.stop()
    await manual.stop()


async def test_commit_without_offsets_commits_every_position(broker: LocalBroker) -> None:
    for i in range(3):
        broker.produce(TOPIC, b"%d" % i, partition=1)
    a = await member(broker, "a", auto_offset_reset="earliest")
    await a.poll(0)
    await a.consumer.commit()
    assert broker.committed("g", P1) == 3
    assert broker.committed("g", P0) == 0
    await a.consumer.stop()


async def test_a_failing_listener_is_logged_and_kept_not_raised(
    broker: LocalBroker, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(Member):
        async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
            raise RuntimeError("boom")

    broken = Broken("broken", LocalConsumer(broker, group_id="g"))
    with caplog.at_level(logging.ERROR):
        await broken.join(TOPIC)
        await broker.wait_stable("g")
    assert [str(e) for e in broken.consumer.listener_errors] == ["boom"]
    assert "on_partitions_assigned" in caplog.text
    assert broken.consumer.assignment() == {P0, P1}
    await broken.consumer.stop()


async def test_stop_leaves_the_group_and_ends_waiting_getmany(broker: LocalBroker) -> None:
    a = await member(broker, "a")
    b = await member(broker, "b")
    waiting = asyncio.create_task(b.consumer.getmany(timeout_ms=10_000))
    await asyncio.sleep(0.01)
    await b.consumer.stop()

    assert await waiting == {}
    with pytest.raises(ConsumerStoppedError):
        await b.consumer.getmany()
    await broker.wait_stable("g")
    assert broker.members("g") == ["a-1"]
    assert a.consumer.assignment() == {P0, P1}
    await a.consumer.stop()


async def test_a_limited_getmany_takes_turns_between_partitions(broker: LocalBroker) -> None:
    for i in range(4):
        broker.produce(TOPIC, b"%d" % i, partition=0)
        broker.produce(TOPIC, b"%d" % i, partition=1)
    consumer = LocalConsumer(broker, auto_offset_reset="earliest")
    await consumer.start()
    consumer.assign([P0, P1])

    first = await consumer.getmany(max_records=2)
    second = await consumer.getmany(max_records=2)

    assert {tp: [r.offset for r in rs] for tp, rs in first.items()} == {P0: [0, 1]}
    assert {tp: [r.offset for r in rs] for tp, rs in second.items()} == {P1: [0, 1]}
    await consumer.stop()


async def test_getmany_only_for_the_partitions_asked(broker: LocalBroker) -> None:
    broker.produce(TOPIC, b"a", partition=0)
    broker.produce(TOPIC, b"b", partition=1)
    consumer = LocalConsumer(broker, auto_offset_reset="earliest")
    await consumer.start()
    consumer.assign([P0, P1])
    assert list(await consumer.getmany(P1, timeout_ms=0)) == [P1]
    assert consumer.highwater(P1) == 1
    assert consumer.highwater(P0) is None  # not fetched yet
    await consumer.stop()


async def test_unkeyed_records_go_round_robin_and_keep_the_clock(broker: LocalBroker) -> None:
    producer = LocalProducer(broker)
    await producer.start()
    sent = [await producer.send_and_wait(TOPIC, b"%d" % i) for i in range(4)]
    assert [m.partition for m in sent] == [0, 1, 0, 1]
    assert {m.timestamp for m in sent} == {1_700_000_000_500}
    stamped = await producer.send_and_wait(TOPIC, b"t", partition=0, timestamp_ms=42)
    assert broker.records(TOPIC, 0)[-1].timestamp == stamped.timestamp == 42
    await producer.stop()


async def test_the_brokers_limit_fails_the_future_not_the_send(broker: LocalBroker) -> None:
    small = LocalBroker(max_message_bytes=1000)
    small.create_topic(TOPIC)
    producer = LocalProducer(small, max_request_size=10_000)
    await producer.start()
    future = await producer.send(TOPIC, b"x" * 2000)
    with pytest.raises(MessageSizeTooLargeError):
        await future
    with pytest.raises(MessageSizeTooLargeError):  # over the producer's own limit
        await producer.send(TOPIC, b"x" * 20_000)
    assert small.end_offset(TOPIC) == 0
    await producer.stop()


async def test_delete_records_moves_the_log_start_and_keeps_offsets(broker: LocalBroker) -> None:
    for i in range(5):
        broker.produce(TOPIC, b"%d" % i)
    assert broker.delete_records(TOPIC, 0, 3) == 3
    assert [r.offset for r in broker.records(TOPIC)] == [3, 4]
    assert broker.produce(TOPIC, b"5").offset == 5
    assert broker.delete_records(TOPIC, 0, -1) == 6
    assert broker.records(TOPIC) == []


async def test_auto_created_topics_get_the_default_partitions() -> None:
    broker = LocalBroker(auto_create_topics=True, default_partitions=3)
    producer = LocalProducer(broker)
    await producer.start()
    assert await producer.partitions_for("fresh") == {0, 1, 2}
    consumer = LocalConsumer(broker, "made-on-subscribe", group_id="g")
    await consumer.start()
    assert len(consumer.assignment()) == 3
    await consumer.stop()
    await producer.stop()


async def test_a_consumer_subscribed_to_a_missing_topic_fails_to_start(
    broker: LocalBroker,
) -> None:
    consumer = LocalConsumer(broker, "missing", group_id="g")
    with pytest.raises(UnknownTopicOrPartitionError):
        await consumer.start()
    await consumer.stop()


def test_options_the_twin_cannot_honour_fail_loudly(broker: LocalBroker) -> None:
    with pytest.raises(ValueError, match="auto-commit"):
        LocalConsumer(broker, group_id="g", enable_auto_commit=True)
    with pytest.raises(TypeError, match="value_deserializer"):
        LocalConsumer(broker, value_deserializer=bytes.decode)
    with pytest.raises(TypeError, match="value_serializer"):
        LocalProducer(broker, value_serializer=str.encode)
    with pytest.raises(ValueError, match="auto_offset_reset"):
        LocalConsumer(broker, auto_offset_reset="smallest")


async def test_calls_that_need_a_group_or_an_assignment(broker: LocalBroker) -> None:
    consumer = LocalConsumer(broker, bootstrap_servers="ignored:9092")
    await consumer.start()
    with pytest.raises(IllegalOperation):
        await consumer.commit({P0: 1})
    with pytest.raises(IllegalOperation):
        await consumer.committed(P0)
    with pytest.raises(AssertionError):
        consumer.highwater(P0)
    consumer.assign([P0])
    with pytest.raises(IllegalStateError):
        consumer.subscribe(topics=[TOPIC])
    await consumer.stop()
