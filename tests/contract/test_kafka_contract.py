"""What the worker relies on from Kafka and aiokafka, checked on the twin and on the real
broker alike. A case the real broker here (Tansu 0.6) cannot show is skipped for it,
naming the difference, rather than weakened for the twin."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    MessageSizeTooLargeError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)
from aiokafka.partitioner import murmur2
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from destination.kafka_topics import MissingTopicError, topic_partitions
from tests.contract.backends import (
    KafkaBackend,
    Member,
    TwinBackend,
    fetch_until_error,
    poll_until,
    read_all,
    unique,
)


async def produce(backend: KafkaBackend, topic: str, partition: int, count: int) -> None:
    """``count`` records, one request each (Tansu's end offsets are right that way)."""
    producer = await backend.started_producer()
    for i in range(count):
        await producer.send_and_wait(topic, b"v%d" % i, key=b"k%d" % i, partition=partition)


# --- records --------------------------------------------------------------------------


async def test_records_come_back_in_offset_order_with_key_value_and_headers(
    backend: KafkaBackend,
) -> None:
    topic = await backend.topic(partitions=2)
    producer = await backend.started_producer()
    sent = []
    for i in range(6):
        key = None if i == 3 else b"user-%d" % i
        headers = [("trace", b"t%d" % i), ("empty", b"")]
        metadata = await producer.send_and_wait(
            topic, value=b'{"n": %d}' % i, key=key, partition=i % 2, headers=headers
        )
        assert (metadata.topic, metadata.partition) == (topic, i % 2)
        sent.append((metadata.partition, metadata.offset, key, headers))
    consumer = backend.consumer()
    await consumer.start()
    tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
    consumer.assign(tps)

    got = await read_all(backend, consumer, 6)

    for tp in tps:
        records = got[tp]
        assert [r.offset for r in records] == [0, 1, 2]
        expected = [s for s in sent if s[0] == tp.partition]
        for record, (_, offset, key, headers) in zip(records, expected, strict=True):
            assert record.offset == offset
            assert (record.topic, record.partition) == (topic, tp.partition)
            assert record.key == key
            assert record.value == b'{"n": %d}' % (offset * 2 + tp.partition)
            assert record.headers == tuple(headers)
            assert isinstance(record.timestamp, int)
            assert record.timestamp > 0


async def test_keyed_records_go_where_aiokafkas_partitioner_puts_them(
    backend: KafkaBackend,
) -> None:
    topic = await backend.topic(partitions=3)
    producer = await backend.started_producer()
    assert await producer.partitions_for(topic) == {0, 1, 2}
    for i in range(12):
        key = b"user-%d" % i
        metadata = await producer.send_and_wait(topic, b"x", key=key)
        assert metadata.partition == (murmur2(key) & 0x7FFFFFFF) % 3
    unkeyed = await producer.send_and_wait(topic, b"no key")
    assert unkeyed.partition in {0, 1, 2}


async def test_getmany_waits_up_to_its_timeout_then_returns_nothing(
    backend: KafkaBackend,
) -> None:
    topic = await backend.topic()
    consumer = backend.consumer()
    await consumer.start()
    consumer.assign([TopicPartition(topic, 0)])

    started = time.monotonic()
    assert await consumer.getmany(timeout_ms=300) == {}
    assert 0.25 <= time.monotonic() - started < 3


async def test_a_waiting_getmany_returns_a_record_produced_meanwhile(
    backend: KafkaBackend,
) -> None:
    topic = await backend.topic()
    consumer = backend.consumer()
    await consumer.start()
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    producer = await backend.started_producer()
    assert await consumer.getmany(timeout_ms=200) == {}  # the position is settled

    waiting = asyncio.create_task(consumer.getmany(timeout_ms=10_000))
    await asyncio.sleep(0.05)
    await producer.send_and_wait(topic, b"late", partition=0)
    started = time.monotonic()
    batches = await waiting

    assert [r.value for r in batches[tp]] == [b"late"]
    assert time.monotonic() - started < 5


async def test_max_records_bounds_every_batch(backend: KafkaBackend) -> None:
    topic = await backend.topic(partitions=2)
    await produce(backend, topic, 0, 7)
    await produce(backend, topic, 1, 7)
    consumer = backend.consumer(max_poll_records=4)
    await consumer.start()
    consumer.assign([TopicPartition(topic, 0), TopicPartition(topic, 1)])

    seen: dict[TopicPartition, list[int]] = {}
    deadline = time.monotonic() + backend.settle_within
    while sum(len(o) for o in seen.values()) < 14 and time.monotonic() < deadline:
        limit = 3 if len(seen) % 2 else None
        batches = await consumer.getmany(timeout_ms=backend.poll_ms, max_records=limit)
        assert sum(len(rs) for rs in batches.values()) <= (limit or 4)
        for tp, records in batches.items():
            seen.setdefault(tp, []).extend(r.offset for r in records)

    assert seen == {TopicPartition(topic, p): list(range(7)) for p in (0, 1)}


# --- pausing --------------------------------------------------------------------------


async def test_a_paused_partition_returns_nothing_until_resumed(backend: KafkaBackend) -> None:
    topic = await backend.topic(partitions=2)
    await produce(backend, topic, 0, 3)
    await produce(backend, topic, 1, 3)
    p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    consumer = backend.consumer()
    await consumer.start()
    consumer.assign([p0, p1])
    consumer.pause(p0)
    assert consumer.paused() == {p0}
    member = Member("reader", consumer)

    await poll_until(backend, [member], lambda: len(member.offsets(p1)) == 3, "p1's records")
    for _ in range(5):  # give p0 every chance to show up
        await member.poll(backend.poll_ms)
    assert member.offsets(p0) == []

    consumer.resume(p0)
    assert consumer.paused() == set()
    await poll_until(backend, [member], lambda: len(member.offsets(p0)) == 3, "p0's records")
    assert member.offsets(p0) == [0, 1, 2]
    assert member.offsets(p1) == [0, 1, 2]


async def test_pause_and_seek_need_an_assigned_partition(backend: KafkaBackend) -> None:
    topic = await backend.topic(partitions=2)
    consumer = backend.consumer()
    await consumer.start()
    consumer.assign([TopicPartition(topic, 0)])
    with pytest.raises(IllegalStateError):
        consumer.pause(TopicPartition(topic, 1))
    with pytest.raises(IllegalStateError):
        consumer.seek(TopicPartition(topic, 1), 0)
    with pytest.raises(IllegalStateError):
        await consumer.position(TopicPartition(topic, 1))


# --- offsets --------------------------------------------------------------------------


async def test_beginning_end_highwater_and_position(backend: KafkaBackend) -> None:
    topic = await backend.topic(partitions=2)
    await produce(backend, topic, 0, 3)
    p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    consumer = backend.consumer()
    await consumer.start()
    consumer.assign([p0, p1])

    assert await consumer.beginning_offsets([p0, p1]) == {p0: 0, p1: 0}
    assert await consumer.end_offsets([p0, p1]) == {p0: 3, p1: 0}
    await read_all(backend, consumer, 3)
    assert consumer.highwater(p0) == 3
    assert await consumer.position(p0) == 3


async def test_end_offsets_count_every_record_of_a_batched_produce(
    backend: KafkaBackend,
) -> None:
    backend.differs_on_tansu(
        "after several records are produced in one batch its ListOffsets(latest) "
        "reports 1 instead of the number of records"
    )
    topic = await backend.topic()
    producer = await backend.started_producer(linger_ms=50)
    futures = [await producer.send(topic, b"v%d" % i, partition=0) for i in range(5)]
    await producer.flush()
    assert [(await f).offset for f in futures] == [0, 1, 2, 3, 4]
    consumer = backend.consumer()
    await consumer.start()
    tp = TopicPartition(topic, 0)
    assert await consumer.end_offsets([tp]) == {tp: 5}


@pytest.mark.parametrize(("reset", "expected"), [("earliest", [0, 1, 2, 3]), ("latest", [3])])
async def test_a_group_without_commits_starts_per_auto_offset_reset(
    backend: KafkaBackend, reset: str, expected: list[int]
) -> None:
    topic = await backend.topic()
    await produce(backend, topic, 0, 3)
    tp = TopicPartition(topic, 0)
    consumer = backend.consumer(unique("group"), auto_offset_reset=reset)
    await consumer.start()
    consumer.assign([tp])
    assert await consumer.position(tp) == (0 if reset == "earliest" else 3)
    await produce(backend, topic, 0, 1)  # offset 3

    got = await read_all(backend, consumer, len(expected))
    assert [r.offset for r in got[tp]] == expected


async def test_a_group_without_commits_and_no_reset_fails_to_fetch(
    backend: KafkaBackend,
) -> None:
    topic = await backend.topic()
    await produce(backend, topic, 0, 2)
    tp = TopicPartition(topic, 0)
    consumer = backend.consumer(unique("group"), auto_offset_reset="none")
    await consumer.start()
    consumer.assign([tp])
    with pytest.raises(NoOffsetForPartitionError):
        await fetch_until_error(backend, consumer)


async def test_reading_below_the_log_start_is_out_of_range(backend: KafkaBackend) -> None:
    backend.differs_on_tansu("it does not implement DeleteRecords (it drops the connection)")
    topic = await backend.topic()
    await produce(backend, topic, 0, 5)
    tp = TopicPartition(topic, 0)
    await backend.delete_records(tp, 3)

    strict = backend.consumer(auto_offset_reset="none")
    await strict.start()
    strict.assign([tp])
    assert await strict.beginning_offsets([tp]) == {tp: 3}
    strict.seek(tp, 1)
    with pytest.raises(OffsetOutOfRangeError):
        await fetch_until_error(backend, strict)

    lenient = backend.consumer(auto_offset_reset="earliest")
    await lenient.start()
    lenient.assign([tp])
    lenient.seek(tp, 1)
    got = await read_all(backend, lenient, 2)
    assert [r.offset for r in got[tp]] == [3, 4]


async def test_commit_then_committed_for_any_member_of_the_group(backend: KafkaBackend) -> None:
    topic = await backend.topic(partitions=2)
    await produce(backend, topic, 0, 3)
    await produce(backend, topic, 1, 3)
    group = unique("group")
    p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    member = Member("a", backend.consumer(group))
    await member.join(topic)

    assert member.events == [("revoked", frozenset()), ("assigned", frozenset({p0, p1}))]
    assert member.consumer.assignment() == {p0, p1}
    await poll_until(
        backend, [member], lambda: len(member.offsets(p0)) == len(member.offsets(p1)) == 3, "all"
    )
    await member.consumer.commit({p0: OffsetAndMetadata(2, "")})
    await member.consumer.commit({p1: 1})  # aiokafka also takes a bare offset
    assert await member.consumer.committed(p0) == 2

    reader = backend.consumer(group)  # in the group without joining it
    await reader.start()
    assert await reader.committed(p0) == 2
    assert await reader.committed(p1) == 1
    other = await backend.topic()
    assert await reader.committed(TopicPartition(other, 0)) is None


# --- group membership -----------------------------------------------------------------


async def test_a_second_member_splits_the_partitions_and_starts_at_the_commits(
    backend: KafkaBackend,
) -> None:
    topic = await backend.topic(partitions=2)
    await produce(backend, topic, 0, 4)
    await produce(backend, topic, 1, 4)
    group = unique("group")
    both = {TopicPartition(topic, 0), TopicPartition(topic, 1)}
    # A "finished" only the first two records of each partition: it commits offset 2.
    a = Member("a", backend.consumer(group), commit_on_revoke=lambda _tp, _next: 2)
    await a.join(topic)
    await poll_until(backend, [a], lambda: all(len(a.offsets(tp)) == 4 for tp in both), "A reads")
    a.consumer.pause(*both)
    assert a.consumer.paused() == both
    a.forget_records()

    b = Member("b", backend.consumer(group))
    async with asyncio.timeout(backend.settle_within):
        await asyncio.gather(b.join(topic), poll_until(backend, [a], lambda: bool(b.events), "B"))
    await poll_until(
        backend,
        [a, b],
        lambda: len(a.events) >= 4 and len(b.events) >= 2,
        "both members to be assigned",
    )

    assert a.events[:3] == [
        ("revoked", frozenset()),
        ("assigned", frozenset(both)),
        ("revoked", frozenset(both)),
    ]
    assert a.revoke_commits == [dict.fromkeys(both, 2)]  # commits inside the callback work
    assert b.events[0] == ("revoked", frozenset())
    mine, theirs = a.last_assigned(), b.last_assigned()
    assert len(mine) == len(theirs) == 1
    assert mine | theirs == both
    assert a.consumer.assignment() == set(mine)
    assert a.consumer.paused() == set()  # a rebalance forgets every pause
    (pa,), (pb,) = mine, theirs

    await poll_until(
        backend,
        [a, b],
        lambda: len(a.offsets(pa)) >= 2 and len(b.offsets(pb)) >= 2,
        "each member to read its partition",
    )
    assert a.offsets(pa) == [2, 3]  # both start at the group's commit
    assert b.offsets(pb) == [2, 3]
    with pytest.raises(IllegalStateError):  # A no longer owns B's partition
        await a.consumer.commit({pb: OffsetAndMetadata(4, "")})


async def test_a_member_that_leaves_hands_over_without_a_callback(
    backend: KafkaBackend,
) -> None:
    topic = await backend.topic(partitions=2)
    group = unique("group")
    both = {TopicPartition(topic, 0), TopicPartition(topic, 1)}
    a = Member("a", backend.consumer(group))
    b = Member("b", backend.consumer(group))
    await a.join(topic)
    async with asyncio.timeout(backend.settle_within):
        await asyncio.gather(b.join(topic), poll_until(backend, [a], lambda: bool(b.events), "B"))
    await poll_until(
        backend, [a, b], lambda: len(a.events) >= 4 and len(b.events) >= 2, "the split"
    )
    (pb,) = b.last_assigned()
    await produce(backend, topic, pb.partition, 4)
    await poll_until(backend, [a, b], lambda: len(b.offsets(pb)) == 4, "B to read its partition")
    await b.consumer.commit({pb: OffsetAndMetadata(3, "")})
    b_events = list(b.events)

    await b.consumer.stop()
    await poll_until(backend, [a], lambda: a.last_assigned() == both, "A to take over")

    assert b.events == b_events  # no revocation callback on stop
    assert a.events[-2][0] == "revoked"
    assert a.consumer.assignment() == both
    await poll_until(backend, [a], lambda: bool(a.offsets(pb)), "A to read B's partition")
    assert a.offsets(pb) == [3]


async def test_with_the_sticky_assignor_members_keep_what_they_had(
    backend: KafkaBackend,
) -> None:
    """The worker names aiokafka's sticky assignor (one class per consumer): a member
    that joins takes partitions from the others without moving the rest, and when it
    leaves the others keep theirs and share its out."""
    from destination.pipeline.consume import sticky_assignor

    topic = await backend.topic(partitions=4)
    group = unique("group")
    every = {TopicPartition(topic, p) for p in range(4)}

    def member(name: str) -> Member:
        return Member(
            name, backend.consumer(group, partition_assignment_strategy=(sticky_assignor(),))
        )

    a, b = member("a"), member("b")
    await a.join(topic)
    await poll_until(backend, [a], lambda: a.last_assigned() == every, "A to own everything")
    async with asyncio.timeout(backend.settle_within * 2):
        await asyncio.gather(b.join(topic), poll_until(backend, [a], lambda: bool(b.events), "B"))
    await poll_until(
        backend,
        [a, b],
        lambda: len(a.last_assigned()) == 2 and len(b.last_assigned()) == 2,
        "the split",
    )
    a_had = a.last_assigned()
    assert a_had | b.last_assigned() == every
    c = member("c")
    async with asyncio.timeout(backend.settle_within * 2):
        await asyncio.gather(
            c.join(topic), poll_until(backend, [a, b], lambda: bool(c.events), "C")
        )
    await poll_until(
        backend,
        [a, b, c],
        lambda: sum(len(m.last_assigned()) for m in (a, b, c)) == 4
        and all(m.last_assigned() for m in (a, b, c)),
        "the three-way split",
    )
    assert a.last_assigned() <= a_had  # nothing moved between A and B: C took from them
    assert b.last_assigned() <= every - a_had
    a_had, b_had = a.last_assigned(), b.last_assigned()
    await c.consumer.stop()
    await poll_until(
        backend,
        [a, b],
        lambda: a.last_assigned() | b.last_assigned() == every,
        "A and B to share C's partitions out",
    )
    assert a.last_assigned() >= a_had  # each kept what it had
    assert b.last_assigned() >= b_had


async def test_committed_metadata_is_read_back_with_the_offset(backend: KafkaBackend) -> None:
    """A stopping worker's last commit says in its metadata when it released the
    partition (``pipeline.consume.RELEASED``); aiokafka's consumer returns only offsets,
    so the next owner asks the group coordinator for both (``committed_offsets``)."""
    from destination.pipeline.consume import RELEASED, committed_offsets

    topic = await backend.topic(partitions=2)
    p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    member = Member("a", backend.consumer(unique("group")))
    await member.join(topic)
    await poll_until(backend, [member], lambda: bool(member.last_assigned()), "A to own both")
    assert await committed_offsets(member.consumer, [p0, p1]) == {}  # nothing committed yet
    released = f"{RELEASED}1765000000.5"
    await member.consumer.commit({p0: OffsetAndMetadata(0, released)})
    found = await committed_offsets(member.consumer, [p0, p1])
    assert set(found) == {p0}
    assert found[p0].offset == 0
    backend.differs_on_tansu("its OffsetFetch answers every commit's metadata as empty")
    assert found[p0].metadata == released


async def test_a_worker_naming_the_sticky_assignor_joins_a_group_of_older_ones(
    backend: KafkaBackend,
) -> None:
    """A rolling upgrade: a worker that prefers the sticky assignor, and names aiokafka's
    default after it, joins a group whose other member names only the default."""
    from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor

    from destination.pipeline.consume import sticky_assignor

    topic = await backend.topic(partitions=2)
    group = unique("group")
    old = Member("old", backend.consumer(group))
    new = Member(
        "new",
        backend.consumer(
            group,
            partition_assignment_strategy=(sticky_assignor(), RoundRobinPartitionAssignor),
        ),
    )
    await old.join(topic)
    async with asyncio.timeout(backend.settle_within * 2):
        await asyncio.gather(
            new.join(topic), poll_until(backend, [old], lambda: bool(new.events), "new")
        )
    await poll_until(
        backend,
        [old, new],
        lambda: len(old.last_assigned()) == 1 and len(new.last_assigned()) == 1,
        "the split",
    )


async def test_a_member_too_slow_to_rejoin_is_expelled_and_cannot_commit(
    backend: KafkaBackend,
) -> None:
    backend.differs_on_tansu(
        "it waits for every member to rejoin however long on_partitions_revoked takes; "
        "Kafka removes a member that has not rejoined within rebalance_timeout_ms"
    )
    topic = await backend.topic(partitions=2)
    await produce(backend, topic, 0, 2)
    await produce(backend, topic, 1, 2)
    group = unique("group")
    both = {TopicPartition(topic, 0), TopicPartition(topic, 1)}
    slow = Member("slow", backend.consumer(group, rebalance_timeout_ms=300), revoke_delay=1.0)
    await slow.join(topic)
    await poll_until(backend, [slow], lambda: all(slow.offsets(tp) for tp in both), "reads")

    other = Member("other", backend.consumer(group, rebalance_timeout_ms=300))
    async with asyncio.timeout(backend.settle_within):
        await asyncio.gather(
            other.join(topic), poll_until(backend, [slow], lambda: bool(other.events), "other")
        )
    await poll_until(
        backend,
        [slow, other],
        lambda: bool(slow.revoke_commits) and len(slow.events) >= 4,
        "the slow member's commit and its rejoin",
    )

    assert isinstance(slow.revoke_commits[0], CommitFailedError)


# --- producing ------------------------------------------------------------------------


async def test_a_record_over_the_producers_max_request_size_fails(backend: KafkaBackend) -> None:
    topic = await backend.topic()
    producer = await backend.started_producer(max_request_size=10_000)
    with pytest.raises(MessageSizeTooLargeError):
        await producer.send_and_wait(topic, b"x" * 20_000, partition=0)
    await producer.send_and_wait(topic, b"x" * 5_000, partition=0)

    consumer = backend.consumer()
    await consumer.start()
    tp = TopicPartition(topic, 0)
    assert await consumer.end_offsets([tp]) == {tp: 1}


async def test_a_record_over_the_brokers_message_limit_fails(backend: KafkaBackend) -> None:
    backend.differs_on_tansu("it has no message.max.bytes: it accepts records of 2 MiB")
    topic = await backend.topic()
    producer = await backend.started_producer(max_request_size=4 * 1024 * 1024)
    with pytest.raises(MessageSizeTooLargeError):
        await producer.send_and_wait(topic, b"x" * (1024 * 1024 + 1024), partition=0)


async def test_producing_to_a_missing_topic_fails(backend: KafkaBackend) -> None:
    if backend.auto_creates_topics:
        pytest.skip(
            "the real broker here auto-creates topics: Tansu 0.6 creates any topic a "
            "metadata request names, and cannot be told not to"
        )
    producer = await backend.started_producer(request_timeout_ms=2000)
    with pytest.raises(UnknownTopicOrPartitionError):
        await producer.partitions_for(unique("missing"))
    with pytest.raises(UnknownTopicOrPartitionError):
        await producer.send_and_wait(unique("missing"), b"x")


async def test_producing_to_a_missing_topic_creates_it_where_topics_auto_create(
    backend: KafkaBackend,
) -> None:
    backend.allow_auto_create()
    topic = unique("auto")
    producer = await backend.started_producer()
    metadata = await producer.send_and_wait(topic, b"hello")
    assert metadata.partition in await producer.partitions_for(topic)
    consumer = backend.consumer()
    await consumer.start()
    tp = TopicPartition(topic, metadata.partition)
    consumer.assign([tp])
    got = await read_all(backend, consumer, 1)
    assert [r.value for r in got[tp]] == [b"hello"]


async def test_asking_whether_a_topic_exists_never_creates_it(backend: KafkaBackend) -> None:
    """``kafka_topics`` asks for all topics: where a metadata request that names a topic
    would create it (Tansu always, Kafka by default), this one creates nothing."""
    backend.allow_auto_create()
    topic, missing = await backend.topic(partitions=3), unique("typo")
    producer = await backend.started_producer()
    assert await topic_partitions(producer.client, {topic: "T"}) == {topic: 3}
    with pytest.raises(MissingTopicError) as raised:
        await topic_partitions(producer.client, {topic: "T", missing: "--to"})
    assert raised.value.missing == {missing: "--to"}
    cluster = await producer.client.fetch_all_metadata()
    assert topic in cluster.topics()
    assert missing not in cluster.topics()


async def test_a_forbidden_topic_fails_with_an_authorization_error(
    backend: KafkaBackend,
) -> None:
    if not isinstance(backend, TwinBackend):
        pytest.skip("needs ACLs on the broker (Tansu 0.6 has none)")
    topic = await backend.topic()
    await produce(backend, topic, 0, 1)
    tp = TopicPartition(topic, 0)
    consumer = backend.consumer(unique("group"))
    await consumer.start()
    consumer.assign([tp])
    producer = await backend.started_producer()
    backend.broker.forbid(topic)

    with pytest.raises(TopicAuthorizationFailedError):
        await producer.send_and_wait(topic, b"x")
    with pytest.raises(TopicAuthorizationFailedError):
        await producer.partitions_for(topic)
    with pytest.raises(TopicAuthorizationFailedError):
        await consumer.getmany(timeout_ms=0)
    with pytest.raises(TopicAuthorizationFailedError):
        await consumer.commit({tp: 1})
