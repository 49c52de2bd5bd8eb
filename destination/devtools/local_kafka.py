"""An in-memory Kafka for tests: ``LocalBroker``, ``LocalConsumer``, ``LocalProducer``.

In the spirit of getsentry/arroyo's ``backends/local``: a broker twin fast and
deterministic enough for unit tests of code that talks to aiokafka, kept honest by
``tests/contract``, which runs one suite against this twin and a real broker.

``LocalConsumer`` and ``LocalProducer`` are drop-ins for the subset of
``aiokafka.AIOKafkaConsumer`` / ``AIOKafkaProducer`` the worker uses: the same method
names, argument shapes, return types (aiokafka's own ``TopicPartition``,
``OffsetAndMetadata``, ``ConsumerRecord``, ``RecordMetadata``) and error classes::

    broker = LocalBroker()
    broker.create_topic("events", partitions=2)
    producer = LocalProducer(broker)
    await producer.start()
    await producer.send_and_wait("events", b"{}", key=b"user-1")
    consumer = LocalConsumer(broker, group_id="g", auto_offset_reset="earliest")
    consumer.subscribe(topics=["events"], listener=my_listener)
    await consumer.start()                      # returns once partitions are assigned
    batches = await consumer.getmany(timeout_ms=100)

What the twin promises (each checked against the real broker by the contract suite
unless it says otherwise):

- Records come back in offset order per partition, with key, value, headers (a tuple
  of ``(str, bytes)``) and timestamp as produced. A keyed record goes to the partition
  aiokafka's default partitioner picks (murmur2); an unkeyed one round-robin per
  producer (aiokafka picks at random); ``partition=`` wins.
- ``getmany(timeout_ms=...)`` waits up to that long for records without busy-looping
  and returns ``{}`` when there are none; it never returns records of a paused
  partition and never more than ``max_records`` (else ``max_poll_records``).
- Groups rebalance the way aiokafka's eager protocol does. A rebalance starts when a
  member starts (after ``subscribe``), subscribes anew, leaves (``stop``), is expelled
  (``LocalBroker.expel``, or missing the rebalance deadline) or a test calls
  ``LocalBroker.rebalance(group_id)``. Then, as in aiokafka, every member's own
  coordination task (started by ``start``), not ``getmany``:

  1. awaits ``listener.on_partitions_revoked(owned)`` with everything it owned (an
     empty set on its first join); the old assignment, positions and pauses stay in
     place meanwhile, so ``commit`` of owned partitions succeeds inside the callback;
  2. rejoins. Once every member has rejoined (or the rebalance timeout, aiokafka's
     ``rebalance_timeout_ms``, default ``session_timeout_ms``, expelled the late ones
     as Kafka does), partitions are assigned round-robin over members sorted by member
     id (``<client_id>-<n>``, numbered in join order) and partitions sorted by
     ``(topic, partition)``: aiokafka's default ``RoundRobinPartitionAssignor``; or,
     when the group's protocol is aiokafka's sticky assignor (the first assignor of
     ``partition_assignment_strategy`` every member names), balanced with each member
     keeping what it had;
  3. installs its new assignment with fresh partition state, so **every pause is
     forgotten**, also for partitions it keeps (aiokafka builds a new ``Assignment``);
     a new partition is read from the group's committed offset, else per
     ``auto_offset_reset``;
  4. awaits ``listener.on_partitions_assigned(assigned)``.

  ``getmany`` called while a rebalance is pending for its member waits (with no time
  limit, like aiokafka) until step 3 is done, so once it returns every rebalance
  pending at its call has been carried out: revocation callbacks returned, the
  assignment callback started (it runs up to its first ``await`` before ``getmany``
  resumes, and, as in aiokafka, may still be suspended there when records of the new
  assignment come back). ``start`` likewise returns after the first assignment.
  ``stop`` leaves the group without any callback (aiokafka documents the same).
  Exceptions raised by a callback are logged and kept in ``listener_errors``, not
  raised, as aiokafka swallows them.
- ``commit`` fails like Kafka: ``IllegalStateError`` for a partition not in the
  consumer's assignment (aiokafka's own check), ``CommitFailedError`` once the group
  has moved on without the member (expelled, or a generation it has not installed
  yet), also for a manually assigned consumer committing into a group with live
  members. ``committed`` reads the group's offsets, for any partition.
- Limits and faults: a record larger than the producer's ``max_request_size`` fails in
  ``send`` and one larger than the broker's ``max_message_bytes`` (default 1 MiB)
  fails in the returned future, both with ``MessageSizeTooLargeError`` (sizes as
  aiokafka estimates a one-record batch). ``LocalBroker.delete_records`` moves the log
  start, and reading below it (or past the end) is out of range: reset per
  ``auto_offset_reset``, or ``OffsetOutOfRangeError`` with ``"none"``.
  ``LocalBroker.forbid(topic)`` makes every call on the topic raise
  ``TopicAuthorizationFailedError``. A missing topic raises
  ``UnknownTopicOrPartitionError`` unless the broker auto-creates topics.

Where it differs from a real broker and aiokafka:

- No network, one broker, no replication, transactions, compression or
  serializers (passing one is a ``TypeError``), no pattern subscriptions, static
  membership or auto-commit (``enable_auto_commit=True`` with a group is a
  ``ValueError``); defaults follow aiokafka except ``enable_auto_commit`` (False) and
  ``max_poll_records`` (500).
- Time: rebalances are noticed at once (aiokafka: at the next heartbeat, so until then
  its ``getmany`` may still return records of the old assignment; here one called
  after a rebalance began never does) and complete as soon as the last member rejoins
  (Kafka delays a new group's first rebalance by ``group.initial.rebalance.delay.ms``;
  Tansu takes ~3 s per round); a missing topic fails at once (aiokafka retries
  metadata for ``request_timeout_ms``). The only timers are ``getmany``'s
  timeout and the rebalance deadline, which fires only when a revocation callback
  outlasts the rebalance timeout. Timestamps come from the broker's ``clock``.
- ``highwater`` is refreshed by ``getmany`` for the partitions it fetches (aiokafka's
  background fetcher refreshes it without a ``getmany``); there is no prefetch buffer,
  so a record produced while ``getmany`` waits is returned at once.
- Member ids are numbered in join order, so which member gets which partition is
  predictable here and not on Kafka (ids are random there). A starting member counts
  in the group from ``start``, its (empty) first revocation callback included; Kafka
  counts it once its JoinGroup arrives, after that callback.

Controls for tests, on ``LocalBroker``: ``produce`` / ``records`` (without clients),
``rebalance(group_id)``, ``expel(consumer)``, ``await wait_stable(group_id)``,
``forbid(topic)``, ``delete_records``, ``committed`` / ``members`` / ``assignment`` /
``generation`` of a group, ``max_message_bytes``, ``auto_create_topics``, ``clock``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import (
    CommitFailedError,
    ConsumerStoppedError,
    IllegalOperation,
    IllegalStateError,
    KafkaError,
    MessageSizeTooLargeError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
    ProducerClosed,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)
from aiokafka.partitioner import murmur2
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata, RecordMetadata, TopicPartition

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "LocalBroker",
    "LocalConsumer",
    "LocalProducer",
    "record_size",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
"""Kafka's default ``message.max.bytes`` (about 1 MiB) and aiokafka's default
``max_request_size``."""

_RESETS = ("earliest", "latest", "none")
_UNSUPPORTED = ("key_serializer", "value_serializer", "key_deserializer", "value_deserializer")
_NO_GENERATION = -1

Headers = tuple[tuple[str, bytes], ...]


def record_size(key: bytes | None, value: bytes | None, headers: Iterable[Any] = ()) -> int:
    """A record's size as aiokafka estimates it: one record in its own batch."""
    size: int = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, list(headers))
    return size


# --- the broker -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp: int


class _Log:
    """One partition: records from ``start`` (the log start offset) to ``end``."""

    def __init__(self) -> None:
        self.start = 0
        self.records: list[_Record] = []

    @property
    def end(self) -> int:
        return self.start + len(self.records)

    def read(self, offset: int, limit: int | None) -> list[_Record]:
        first = offset - self.start
        return self.records[first : None if limit is None else first + limit]


class _Group:
    def __init__(self, group_id: str) -> None:
        self.group_id = group_id
        self.generation = 0
        self.members: dict[str, LocalConsumer] = {}
        self.consumers: set[LocalConsumer] = set()  # started and not stopped, members or not
        self.committed: dict[Any, Any] = {}  # TopicPartition -> OffsetAndMetadata
        self.assignment: dict[str, frozenset[Any]] = {}
        self.rebalancing = False
        self.rejoined: set[str] = set()
        self.round = 0
        self.deadline: asyncio.TimerHandle | None = None


class LocalBroker:
    """Topics, their records, and consumer groups, in memory.

    ``auto_create_topics`` makes a metadata request (``partitions_for``, ``send``,
    ``start`` of a subscribed consumer) create a missing topic with
    ``default_partitions`` partitions, as Kafka's ``auto.create.topics.enable``; off by
    default (production clusters turn it off). ``clock`` gives record timestamps, in
    seconds like ``time.time``.
    """

    def __init__(
        self,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        auto_create_topics: bool = False,
        default_partitions: int = 1,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_message_bytes = max_message_bytes
        self.auto_create_topics = auto_create_topics
        self.default_partitions = default_partitions
        self.clock = clock
        self._topics: dict[str, list[_Log]] = {}
        self._forbidden: set[str] = set()
        self._groups: dict[str, _Group] = {}
        self._member_ids = itertools.count(1)
        self._changed = asyncio.Event()

    # --- topics and records -----------------------------------------------------------
    def create_topic(self, name: str, partitions: int = 1) -> None:
        """Create a topic with ``partitions`` empty partitions
        (``TopicAlreadyExistsError`` if it exists)."""
        if partitions < 1:
            raise ValueError("a topic needs at least one partition")
        if name in self._topics:
            raise TopicAlreadyExistsError(name)
        self._topics[name] = [_Log() for _ in range(partitions)]

    def topics(self) -> set[str]:
        return set(self._topics)

    def forbid(self, topic: str, forbidden: bool = True) -> None:
        """Make every produce, fetch, commit and metadata call on ``topic`` raise
        ``TopicAuthorizationFailedError`` (as an ACL would), or allow it again."""
        if forbidden:
            self._forbidden.add(topic)
        else:
            self._forbidden.discard(topic)
        self._notify()

    def partitions_for(self, topic: str) -> set[int]:
        """The topic's partition ids, as a metadata request sees them: may auto-create
        it; raises ``TopicAuthorizationFailedError`` / ``UnknownTopicOrPartitionError``."""
        return set(range(len(self._logs(topic, metadata=True))))

    def produce(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int = 0,
        headers: Iterable[tuple[str, bytes]] | None = None,
        timestamp_ms: int | None = None,
    ) -> Any:
        """Append one record to ``topic``'s ``partition``; returns its
        ``RecordMetadata``. ``MessageSizeTooLargeError`` above ``max_message_bytes``."""
        logs = self._logs(topic, metadata=True)
        if not 0 <= partition < len(logs):
            raise UnknownTopicOrPartitionError(f"{topic}:{partition}")
        stored_headers = _headers(headers)
        size = record_size(key, value, stored_headers)
        if size > self.max_message_bytes:
            raise MessageSizeTooLargeError(
                f"the record is {size} bytes, above the broker's message.max.bytes "
                f"({self.max_message_bytes})"
            )
        log_ = logs[partition]
        timestamp = timestamp_ms if timestamp_ms is not None else int(self.clock() * 1000)
        log_.records.append(_Record(log_.end, key, value, stored_headers, timestamp))
        self._notify()
        return RecordMetadata(
            topic,
            partition,
            TopicPartition(topic, partition),
            log_.end - 1,
            timestamp,
            0,  # CreateTime
            log_.start,
        )

    def records(self, topic: str, partition: int = 0) -> list[Any]:
        """Every record still in the partition, as ``ConsumerRecord``s (for assertions)."""
        log_ = self._log(TopicPartition(topic, partition))
        return [_consumer_record(topic, partition, r) for r in log_.records]

    def log_start_offset(self, topic: str, partition: int = 0) -> int:
        return self._log(TopicPartition(topic, partition)).start

    def end_offset(self, topic: str, partition: int = 0) -> int:
        return self._log(TopicPartition(topic, partition)).end

    def delete_records(self, topic: str, partition: int, before_offset: int) -> int:
        """Drop the records below ``before_offset`` (-1: all), as retention or
        Kafka's DeleteRecords does; returns the new log start offset. Offsets are not
        reused; reading below the log start is then out of range."""
        log_ = self._log(TopicPartition(topic, partition))
        before = log_.end if before_offset == -1 else before_offset
        if before > log_.end or before < -1:
            raise OffsetOutOfRangeError({TopicPartition(topic, partition): before_offset})
        if before > log_.start:
            del log_.records[: before - log_.start]
            log_.start = before
        self._notify()
        return log_.start

    # --- groups -----------------------------------------------------------------------
    def committed(self, group_id: str, tp: Any) -> int | None:
        """The group's committed offset for ``tp`` (None when it never committed)."""
        group = self._groups.get(group_id)
        found = group.committed.get(tp) if group else None
        return None if found is None else int(found.offset)

    def members(self, group_id: str) -> list[str]:
        """The group's member ids, sorted."""
        group = self._groups.get(group_id)
        return sorted(group.members) if group else []

    def assignment(self, group_id: str) -> dict[str, set[Any]]:
        """Member id -> partitions, as decided by the last completed rebalance."""
        group = self._groups.get(group_id)
        return {m: set(tps) for m, tps in group.assignment.items()} if group else {}

    def generation(self, group_id: str) -> int:
        """How many rebalances of the group completed (0: none yet)."""
        group = self._groups.get(group_id)
        return group.generation if group else 0

    def rebalance(self, group_id: str) -> None:
        """Start a rebalance of the group, as Kafka does when membership or metadata
        changes. Call it from a coroutine; the members carry it out in their own tasks
        (``wait_stable`` or any member's ``getmany`` waits for it)."""
        group = self._groups.get(group_id)
        if group is not None and group.members:
            self._begin_rebalance(group)

    def expel(self, consumer: LocalConsumer) -> None:
        """Remove a member from its group as Kafka does when its session times out: its
        commits fail with ``CommitFailedError`` until it has rejoined, which it does by
        itself (revocation callback first, like aiokafka after ``UNKNOWN_MEMBER_ID``);
        the remaining members rebalance."""
        group = self._groups.get(consumer.group_id or "")
        if group is None or consumer.member_id not in group.members:
            return
        self._remove(group, consumer.member_id)
        consumer._rejoin_requested = True
        self._notify()

    async def wait_stable(self, group_id: str) -> None:
        """Wait until no rebalance of the group is pending or running: every running
        consumer of the group (expelled ones too) is a member, has installed the last
        assignment and runs no rebalance callback. Bound it with ``asyncio.timeout``."""

        def stable() -> bool:
            group = self._groups.get(group_id)
            if group is None:
                return True
            return not group.rebalancing and all(
                group.members.get(c.member_id or "") is c
                and c._generation == group.generation
                and not c._rejoin_requested
                and c._in_callback is None
                for c in group.consumers
            )

        await self._wait_until(stable, None)

    # --- internals --------------------------------------------------------------------
    def _notify(self) -> None:
        """Wake everything waiting for a change (records, rebalances, pauses, stops);
        waiters re-check their own condition."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_until(self, condition: Callable[[], bool], within: float | None) -> bool:
        """Wait until ``condition()`` holds (True) or ``within`` seconds pass (False)."""
        loop = asyncio.get_running_loop()
        deadline = None if within is None else loop.time() + within
        while True:
            changed = self._changed  # taken before the check: no change can be missed
            if condition():
                return True
            if deadline is None:
                await changed.wait()
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                async with asyncio.timeout(remaining):
                    await changed.wait()
            except TimeoutError:
                return condition()

    def _logs(self, topic: str, metadata: bool = False) -> list[_Log]:
        if topic in self._forbidden:
            raise TopicAuthorizationFailedError(topic)
        logs = self._topics.get(topic)
        if logs is None:
            if not (metadata and self.auto_create_topics):
                raise UnknownTopicOrPartitionError(topic)
            self.create_topic(topic, self.default_partitions)
            logs = self._topics[topic]
        return logs

    def _log(self, tp: Any) -> _Log:
        logs = self._logs(tp.topic)
        partition: int = tp.partition
        if not 0 <= partition < len(logs):
            raise UnknownTopicOrPartitionError(f"{tp.topic}:{partition}")
        return logs[partition]

    def _group(self, group_id: str) -> _Group:
        group = self._groups.get(group_id)
        if group is None:
            group = self._groups[group_id] = _Group(group_id)
        return group

    def _join(self, consumer: LocalConsumer) -> None:
        """A new member: it must revoke (nothing) and rejoin like everyone else."""
        assert consumer.group_id is not None
        group = self._group(consumer.group_id)
        member_id = f"{consumer.client_id}-{next(self._member_ids)}"
        consumer.member_id = member_id
        group.members[member_id] = consumer
        group.consumers.add(consumer)
        self._begin_rebalance(group)
        consumer._rejoin_requested = True
        self._notify()

    def _leave(self, consumer: LocalConsumer) -> None:
        group = self._groups.get(consumer.group_id or "")
        if group is not None:
            group.consumers.discard(consumer)
        if group is not None and group.members.get(consumer.member_id or "") is consumer:
            self._remove(group, consumer.member_id or "")
            self._notify()

    def _remove(self, group: _Group, member_id: str) -> None:
        del group.members[member_id]
        group.rejoined.discard(member_id)
        group.assignment.pop(member_id, None)
        if group.members:
            self._begin_rebalance(group)
            self._maybe_complete(group)
        else:
            self._complete(group)  # an empty group: a new generation, no one to assign

    def _begin_rebalance(self, group: _Group) -> None:
        if group.rebalancing:
            return  # a member joining now takes part in the rebalance under way
        group.rebalancing = True
        group.rejoined = set()
        group.round += 1
        for member in group.members.values():
            member._rejoin_requested = True
        timeout = max(m._rebalance_timeout for m in group.members.values())
        group.deadline = asyncio.get_running_loop().call_later(
            timeout, self._rebalance_deadline, group, group.round
        )
        self._notify()

    def _rejoin(self, consumer: LocalConsumer) -> None:
        """The member finished its revocation callback and asks to join."""
        assert consumer.group_id is not None
        group = self._group(consumer.group_id)
        member_id = consumer.member_id or ""
        if group.members.get(member_id) is not consumer:  # expelled: joins as a new member
            member_id = f"{consumer.client_id}-{next(self._member_ids)}"
            consumer.member_id = member_id
            group.members[member_id] = consumer
            self._begin_rebalance(group)
            consumer._rejoin_requested = False  # this is that rejoin
        group.rejoined.add(member_id)
        self._maybe_complete(group)
        self._notify()

    def _maybe_complete(self, group: _Group) -> None:
        if group.rebalancing and set(group.members) <= group.rejoined:
            self._complete(group)

    def _complete(self, group: _Group) -> None:
        if group.deadline is not None:
            group.deadline.cancel()
            group.deadline = None
        group.rebalancing = False
        group.generation += 1
        group.assignment = self._assign(group)
        for member_id, member in group.members.items():
            member._pending = (group.generation, group.assignment[member_id])
        self._notify()

    def _assign(self, group: _Group) -> dict[str, frozenset[Any]]:
        """aiokafka's RoundRobinPartitionAssignor: partitions sorted by (topic,
        partition) dealt in turn to the members, sorted by id, that subscribe to them;
        or, when every member names the sticky assignor, ``_assign_sticky``."""
        members = sorted(group.members)
        if not members:
            return {}
        topics = sorted(
            {t for m in group.members.values() for t in (m._subscription or ())} & set(self._topics)
        )
        if self._protocol(group, members) == "sticky":
            return self._assign_sticky(group, members, topics)
        owned: dict[str, set[Any]] = {m: set() for m in members}
        turn = itertools.cycle(members)
        for topic in topics:
            for partition in range(len(self._topics[topic])):
                member = next(turn)
                while topic not in (group.members[member]._subscription or ()):
                    member = next(turn)
                owned[member].add(TopicPartition(topic, partition))
        return {m: frozenset(tps) for m, tps in owned.items()}

    @staticmethod
    def _protocol(group: _Group, members: list[str]) -> str:
        """The assignor the group uses: the first of the first member's that every member
        names (Kafka takes one all support)."""
        common = set.intersection(*(set(group.members[m]._protocols) for m in members))
        for name in group.members[members[0]]._protocols:
            if name in common:
                return name
        return "roundrobin"

    def _assign_sticky(
        self, group: _Group, members: list[str], topics: list[str]
    ) -> dict[str, frozenset[Any]]:
        """What aiokafka's StickyPartitionAssignor promises (members subscribing to the
        same topics): balanced (sizes differ by one at most), and each member keeps as
        many of the partitions it had as balance allows; the rest go to the members with
        the fewest."""
        every = [TopicPartition(t, p) for t in topics for p in range(len(self._topics[t]))]
        ceiling = -(-len(every) // len(members))
        owned: dict[str, list[Any]] = {}
        taken: set[Any] = set()
        for member in members:
            had = [tp for tp in sorted(group.members[member]._assignment) if tp in every]
            kept = [tp for tp in had if tp not in taken][:ceiling]
            owned[member] = kept
            taken.update(kept)
        for tp in every:
            if tp not in taken:
                fewest = min(members, key=lambda m: (len(owned[m]), m))
                owned[fewest].append(tp)
        while True:
            most = max(members, key=lambda m: (len(owned[m]), m))
            least = min(members, key=lambda m: (len(owned[m]), m))
            if len(owned[most]) - len(owned[least]) <= 1:
                break
            owned[least].append(owned[most].pop())
        return {m: frozenset(tps) for m, tps in owned.items()}

    def _rebalance_deadline(self, group: _Group, round_: int) -> None:
        """Kafka removes members that did not rejoin within the rebalance timeout."""
        if not group.rebalancing or group.round != round_:
            return
        group.deadline = None
        for member_id in [m for m in group.members if m not in group.rejoined]:
            log.warning("local kafka: %s missed the rebalance deadline, expelled", member_id)
            del group.members[member_id]
        self._maybe_complete(group)
        if not group.members:
            self._complete(group)

    def _commit(self, consumer: LocalConsumer, offsets: Mapping[Any, Any]) -> None:
        assert consumer.group_id is not None
        for tp in offsets:
            self._log(tp)  # unknown or forbidden topics fail the whole commit
        group = self._group(consumer.group_id)
        if consumer._manual:
            # Kafka takes a commit without a generation only from a group with no members.
            if group.members:
                raise CommitFailedError()
        elif group.members.get(consumer.member_id or "") is not consumer:
            raise CommitFailedError()  # UNKNOWN_MEMBER_ID: expelled, or never joined
        elif consumer._generation != group.generation:
            raise CommitFailedError()  # ILLEGAL_GENERATION / REBALANCE_IN_PROGRESS
        group.committed.update(offsets)


# --- the consumer ---------------------------------------------------------------------


@dataclass
class _PartitionState:
    position: int | None = None  # next offset to fetch; None: from the commit or reset
    paused: bool = False
    highwater: int | None = None


class LocalConsumer:
    """A drop-in for the ``aiokafka.AIOKafkaConsumer`` calls the worker makes, on a
    ``LocalBroker``. See the module docstring for what runs when."""

    def __init__(
        self,
        broker: LocalBroker,
        *topics: str,
        group_id: str | None = None,
        client_id: str = "local-consumer",
        auto_offset_reset: str = "latest",
        max_poll_records: int | None = 500,
        enable_auto_commit: bool = False,
        session_timeout_ms: int = 10_000,
        rebalance_timeout_ms: int | None = None,
        partition_assignment_strategy: tuple[Any, ...] = (),
        **ignored: Any,
    ) -> None:
        if auto_offset_reset not in _RESETS:
            raise ValueError(f"auto_offset_reset must be one of {_RESETS}")
        if max_poll_records is not None and max_poll_records < 1:
            raise ValueError("`max_poll_records` should be positive Integer")
        if enable_auto_commit and group_id is not None:
            raise ValueError("LocalConsumer does not auto-commit: pass enable_auto_commit=False")
        unsupported = sorted(set(ignored) & set(_UNSUPPORTED))
        if unsupported:
            raise TypeError(f"LocalConsumer does not support {', '.join(unsupported)}")
        self._broker = broker
        self.group_id = group_id
        self.client_id = client_id
        self.member_id: str | None = None
        self.listener_errors: list[Exception] = []
        """Exceptions raised by the rebalance listener (logged, not raised, as in
        aiokafka)."""
        self._reset = auto_offset_reset
        self._max_poll_records = max_poll_records
        self._rebalance_timeout = (
            rebalance_timeout_ms if rebalance_timeout_ms is not None else session_timeout_ms
        ) / 1000
        # The assignors' names, in the member's order of preference (aiokafka's default
        # is its round-robin assignor).
        self._protocols = tuple(
            getattr(s, "name", "") for s in partition_assignment_strategy
        ) or ("roundrobin",)
        self._subscription: frozenset[str] | None = None
        self._listener: Any = None
        self._manual = False
        self._assignment: frozenset[Any] = frozenset()
        self._states: dict[Any, _PartitionState] = {}
        self._generation = _NO_GENERATION
        self._rejoin_requested = False
        self._reassigning = False
        self._pending: tuple[int, frozenset[Any]] | None = None
        self._in_callback: str | None = None
        self._coordinator: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False
        self._turn = 0
        if topics:
            self.subscribe(topics=list(topics))

    # --- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        """Join the group when subscribed, and return once the first assignment is in
        place (its ``on_partitions_assigned`` has started), like aiokafka."""
        if self._started:
            raise AssertionError("Did you call `start` twice?")
        self._started = True
        if self._subscription is None:
            return
        for topic in sorted(self._subscription):
            self._broker._logs(topic, metadata=True)
        if self.group_id is None:
            self._install(_NO_GENERATION, self._all_partitions(self._subscription))
            return
        self._broker._join(self)
        self._coordinator = asyncio.create_task(
            self._coordinate(), name=f"local-kafka-coordinator-{self.member_id}"
        )
        await self._broker._wait_until(
            lambda: self._closed or self._generation != _NO_GENERATION or self._failed(),
            None,
        )
        self._raise_if_failed()

    async def stop(self) -> None:
        """Leave the group (no callback, as in aiokafka); a rebalance callback under
        way is awaited first. ``getmany`` calls waiting now return ``{}``."""
        if self._closed:
            return
        self._closed = True
        self._broker._notify()
        if self._coordinator is not None:
            await self._coordinator
        if self.group_id is not None and not self._manual:
            self._broker._leave(self)
        self._broker._notify()

    def subscribe(
        self, topics: Iterable[str] = (), pattern: str | None = None, listener: Any = None
    ) -> None:
        """Subscribe to ``topics`` with an optional ``ConsumerRebalanceListener``; after
        ``start`` this starts a rebalance."""
        if pattern is not None:
            raise NotImplementedError("LocalConsumer does not support pattern subscriptions")
        if not isinstance(topics, list | tuple | set | frozenset):
            raise TypeError("Topics should be list of strings")
        if listener is not None and not isinstance(listener, ConsumerRebalanceListener):
            raise TypeError("listener should be an instance of ConsumerRebalanceListener")
        if self._manual:
            raise IllegalStateError(
                "Subscription to topics, partitions and pattern are mutually exclusive"
            )
        self._subscription = frozenset(topics)
        self._listener = listener
        if not self._started or self._closed:
            return
        if self.group_id is None:
            self._install(_NO_GENERATION, self._all_partitions(self._subscription))
        elif self.member_id is None:
            self._broker._join(self)
            self._coordinator = asyncio.create_task(self._coordinate())
        else:
            self._broker.rebalance(self.group_id)

    def assign(self, partitions: Iterable[Any]) -> None:
        """Take these partitions without a group (fresh positions, nothing paused)."""
        tps = list(partitions)
        _check_partitions(tps)
        if self._subscription is not None:
            raise IllegalStateError(
                "Subscription to topics, partitions and pattern are mutually exclusive"
            )
        self._manual = True
        self._install(_NO_GENERATION, frozenset(tps))

    # --- fetching ---------------------------------------------------------------------
    async def getmany(
        self, *partitions: Any, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[Any, list[Any]]:
        """Records by partition, in offset order, at most ``max_records`` (else
        ``max_poll_records``) in all, never from a paused partition; waits up to
        ``timeout_ms`` for some, else returns ``{}``. A rebalance pending for this
        member is waited out first, without a time limit, as in aiokafka."""
        _check_partitions(partitions)
        if self._closed:
            raise ConsumerStoppedError()
        if max_records is not None and (not isinstance(max_records, int) or max_records < 1):
            raise ValueError("`max_records` must be a positive Integer")
        limit = max_records or self._max_poll_records
        broker = self._broker
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_ms / 1000
        wanted = set(partitions)
        while True:
            await broker._wait_until(
                lambda: self._closed or self._failed() or not self._rebalance_pending(), None
            )
            self._raise_if_failed()
            if self._stopped():
                return {}
            changed = broker._changed
            records = self._fetch(wanted, limit)
            remaining = deadline - loop.time()
            if records or remaining <= 0:
                return records
            try:
                async with asyncio.timeout(remaining):
                    await changed.wait()
            except TimeoutError:
                if not self._rebalance_pending():
                    return {}

    def _fetch(self, wanted: set[Any], limit: int | None) -> dict[Any, list[Any]]:
        tps = sorted(self._assignment)
        if tps:  # start each fetch one partition further, so none starves under a limit
            turn = self._turn % len(tps)
            tps = tps[turn:] + tps[:turn]
        self._turn += 1
        out: dict[Any, list[Any]] = {}
        count = 0
        for tp in tps:
            state = self._states[tp]
            if state.paused or (wanted and tp not in wanted):
                continue
            try:
                log_ = self._broker._log(tp)
                position = self._position(tp, state, log_)
            except KafkaError:
                if out:  # the error comes back on the next call, as in aiokafka
                    break
                raise
            state.highwater = log_.end
            batch = log_.read(position, None if limit is None else limit - count)
            if batch:
                out[tp] = [_consumer_record(tp.topic, tp.partition, r) for r in batch]
                state.position = batch[-1].offset + 1
                count += len(batch)
                if limit is not None and count >= limit:
                    break
        return out

    def _position(self, tp: Any, state: _PartitionState, log_: _Log) -> int:
        if state.position is None:
            committed = None
            if self.group_id is not None:
                committed = self._broker._group(self.group_id).committed.get(tp)
            if committed is not None and committed.offset >= 0:
                state.position = int(committed.offset)
            else:
                state.position = self._reset_position(log_, NoOffsetForPartitionError(tp))
        if not log_.start <= state.position <= log_.end:
            state.position = self._reset_position(log_, OffsetOutOfRangeError({tp: state.position}))
        return state.position

    def _reset_position(self, log_: _Log, error: KafkaError) -> int:
        if self._reset == "earliest":
            return log_.start
        if self._reset == "latest":
            return log_.end
        raise error

    # --- assignment and pausing -------------------------------------------------------
    def assignment(self) -> set[Any]:
        """The partitions assigned now (the previous ones until a rebalance installs
        the next, as in aiokafka)."""
        return set(self._assignment)

    def pause(self, *partitions: Any) -> None:
        for tp in partitions:
            self._state(tp).paused = True

    def resume(self, *partitions: Any) -> None:
        for tp in partitions:
            self._state(tp).paused = False
        self._broker._notify()

    def paused(self) -> set[Any]:
        return {tp for tp, state in self._states.items() if state.paused}

    def seek(self, partition: Any, offset: int) -> None:
        if not isinstance(offset, int) or offset < 0:
            raise ValueError("Offset must be a positive integer")
        self._state(partition).position = offset
        self._broker._notify()

    async def position(self, partition: Any) -> int:
        """The offset of the next record ``getmany`` would return for the partition."""
        state = self._state(partition)
        return self._position(partition, state, self._broker._log(partition))

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        """The topic's partition numbers (None for a topic the broker does not have)."""
        try:
            return self._broker.partitions_for(topic)
        except KafkaError:
            return None

    def highwater(self, partition: Any) -> int | None:
        """The partition's end offset as of this consumer's last fetch of it."""
        if partition not in self._assignment:
            raise AssertionError("Partition is not assigned")
        return self._states[partition].highwater

    async def beginning_offsets(self, partitions: Iterable[Any]) -> dict[Any, int]:
        return {tp: self._broker._log(tp).start for tp in partitions}

    async def end_offsets(self, partitions: Iterable[Any]) -> dict[Any, int]:
        return {tp: self._broker._log(tp).end for tp in partitions}

    # --- offsets ----------------------------------------------------------------------
    async def commit(self, offsets: Mapping[Any, Any] | None = None) -> None:
        """Commit ``offsets`` ({tp: OffsetAndMetadata | (offset, metadata) | offset}),
        by default the positions of every assigned partition. Fails like aiokafka
        against Kafka; see the module docstring."""
        if self.group_id is None:
            raise IllegalOperation("Requires group_id")
        if self._subscription is None and not self._manual:
            raise IllegalStateError("Not subscribed to any topics")
        if offsets is None:
            formatted = {
                tp: OffsetAndMetadata(state.position, "")
                for tp, state in self._states.items()
                if state.position is not None
            }
        else:
            formatted = _commit_offsets(offsets)
            for tp in formatted:
                if tp not in self._assignment:
                    raise IllegalStateError(f"Partition {tp} is not assigned")
        if formatted:
            self._broker._commit(self, formatted)

    async def committed_offsets(self, partitions: Iterable[Any]) -> dict[Any, OffsetAndMetadata]:
        """The group's last committed offset and metadata of each partition that has one
        (aiokafka asks its group coordinator: ``pipeline.consume.committed_offsets``)."""
        if self.group_id is None:
            raise IllegalOperation("Requires group_id")
        group = self._broker._groups.get(self.group_id)
        found = {}
        for tp in partitions:
            self._broker._log(tp)
            meta = group.committed.get(tp) if group else None
            if meta is not None:
                found[tp] = OffsetAndMetadata(int(meta.offset), meta.metadata)
        return found

    def membership_lost(self) -> bool:
        """Whether the group no longer counts this member (``LocalBroker.expel``, or a
        rebalance deadline missed): aiokafka's coordinator has forgotten its member id
        by then (``consume.membership_lost``)."""
        group = self._broker._groups.get(self.group_id or "")
        return group is None or group.members.get(self.member_id or "") is not self

    async def committed(self, partition: Any) -> int | None:
        """The group's last committed offset for the partition, None if never."""
        if self.group_id is None:
            raise IllegalOperation("Requires group_id")
        self._broker._log(partition)
        return self._broker.committed(self.group_id, partition)

    # --- the group protocol -----------------------------------------------------------
    async def _coordinate(self) -> None:
        """This member's side of every rebalance, in its own task like aiokafka's
        coordinator: revoke, rejoin, wait for the group, install, assign."""
        broker = self._broker
        while True:
            await broker._wait_until(lambda: self._closed or self._rejoin_requested, None)
            if self._closed:
                return
            self._rejoin_requested = False
            self._reassigning = True
            broker._notify()
            await self._call_listener("on_partitions_revoked", set(self._assignment))
            if self._stopped():
                return
            broker._rejoin(self)
            await broker._wait_until(
                lambda: self._closed or self._pending is not None or self._rejoin_requested,
                None,
            )
            pending = self._pending
            if self._stopped():
                return
            if pending is None:
                continue  # expelled while waiting: revoke and rejoin again
            generation, assigned = pending
            self._pending = None
            self._install(generation, assigned)
            await self._call_listener("on_partitions_assigned", set(assigned))

    def _install(self, generation: int, assigned: frozenset[Any]) -> None:
        self._generation = generation
        self._assignment = assigned
        self._states = {tp: _PartitionState() for tp in sorted(assigned)}
        self._reassigning = False
        self._broker._notify()

    async def _call_listener(self, method: str, partitions: set[Any]) -> None:
        if self._listener is None:
            return
        self._in_callback = method
        try:
            result = getattr(self._listener, method)(partitions)
            if asyncio.iscoroutine(result):
                await result
        except Exception as exc:  # aiokafka logs a failing listener and carries on
            self.listener_errors.append(exc)
            log.exception("local kafka: %s of %s failed", method, self.member_id)
        finally:
            self._in_callback = None
            self._broker._notify()

    def _stopped(self) -> bool:
        return self._closed  # a call, so that type checkers re-read it after an await

    def _rebalance_pending(self) -> bool:
        return self._coordinator is not None and (self._rejoin_requested or self._reassigning)

    def _failed(self) -> bool:
        return self._coordinator is not None and self._coordinator.done()

    def _raise_if_failed(self) -> None:
        task = self._coordinator
        if task is not None and task.done() and not self._closed:
            error = task.exception()
            raise error or RuntimeError("the local consumer's coordinator ended")

    # --- helpers ----------------------------------------------------------------------
    def _state(self, tp: Any) -> _PartitionState:
        _check_partitions((tp,))
        state = self._states.get(tp)
        if state is None:
            raise IllegalStateError(f"No current assignment for partition {tp}")
        return state

    def _all_partitions(self, topics: Iterable[str]) -> frozenset[Any]:
        return frozenset(
            TopicPartition(topic, partition)
            for topic in topics
            for partition in self._broker.partitions_for(topic)
        )


# --- the producer ---------------------------------------------------------------------


class LocalCluster:
    """What a metadata request for all topics answers (the calls of aiokafka's
    ``ClusterMetadata`` that ``kafka_topics`` makes): a snapshot, forbidden topics left
    out as Kafka leaves out those a client may not Describe."""

    def __init__(self, partitions: Mapping[str, int]) -> None:
        self._partitions = dict(partitions)

    def topics(self, exclude_internal_topics: bool = True) -> set[str]:
        return set(self._partitions)

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        count = self._partitions.get(topic)
        return None if count is None else set(range(count))


class LocalClient:
    """A producer's ``client``: ``fetch_all_metadata``, which creates no topic whatever
    ``auto_create_topics`` says (as Kafka's all-topics request)."""

    def __init__(self, broker: LocalBroker) -> None:
        self._broker = broker

    async def fetch_all_metadata(self) -> LocalCluster:
        broker = self._broker
        return LocalCluster(
            {
                name: len(broker._topics[name])
                for name in broker.topics()
                if name not in broker._forbidden
            }
        )


class LocalProducer:
    """A drop-in for the ``aiokafka.AIOKafkaProducer`` calls the worker makes, on a
    ``LocalBroker``. Every send is acknowledged at once; ``flush`` has nothing to do."""

    def __init__(
        self, broker: LocalBroker, max_request_size: int = DEFAULT_MAX_MESSAGE_BYTES, **ignored: Any
    ) -> None:
        unsupported = sorted(set(ignored) & set(_UNSUPPORTED))
        if unsupported:
            raise TypeError(f"LocalProducer does not support {', '.join(unsupported)}")
        self._broker = broker
        self.client = LocalClient(broker)
        self.max_request_size = max_request_size
        self._started = False
        self._closed = False
        self._round_robin: dict[str, int] = {}

    async def start(self) -> None:
        self._started = True

    async def stop(self) -> None:
        self._closed = True

    async def flush(self) -> None:
        return None

    async def partitions_for(self, topic: str) -> set[int]:
        """The topic's partitions: ``UnknownTopicOrPartitionError`` for a missing topic
        (at once; aiokafka retries for ``request_timeout_ms`` first) unless the broker
        auto-creates it, ``TopicAuthorizationFailedError`` for a forbidden one."""
        return self._broker.partitions_for(topic)

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: Iterable[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Any]:
        """Append the record; returns a future of its ``RecordMetadata`` (already done).
        Raises here what aiokafka raises from ``send`` (unknown or forbidden topic, a
        record over ``max_request_size``); the broker's refusals (over
        ``max_message_bytes``) fail the future."""
        if self._closed:
            raise ProducerClosed()
        if not self._started:
            raise RuntimeError("LocalProducer.send before start()")
        if value is None and key is None:
            raise AssertionError("Need at least one: key or value")
        partitions = sorted(self._broker.partitions_for(topic))
        stored_headers = _headers(headers)
        size = record_size(key, value, stored_headers)
        if size > self.max_request_size:
            raise MessageSizeTooLargeError(
                f"The message is {size} bytes when serialized which is larger than the "
                "maximum request size you have configured with the max_request_size "
                "configuration"
            )
        if partition is not None:
            if partition not in partitions:
                raise AssertionError("Unrecognized partition")
            chosen = partition
        elif key is not None:  # aiokafka's DefaultPartitioner
            chosen = partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]
        else:
            turn = self._round_robin.get(topic, 0)
            self._round_robin[topic] = turn + 1
            chosen = partitions[turn % len(partitions)]
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        try:
            future.set_result(
                self._broker.produce(topic, value, key, chosen, stored_headers, timestamp_ms)
            )
        except KafkaError as exc:
            future.set_exception(exc)
        return future

    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: Iterable[tuple[str, bytes]] | None = None,
    ) -> Any:
        """``send`` and wait for the ``RecordMetadata``."""
        future = await self.send(topic, value, key, partition, timestamp_ms, headers)
        return await future


# --- shared helpers -------------------------------------------------------------------


def _headers(headers: Iterable[tuple[str, bytes]] | None) -> Headers:
    checked = tuple((k, v) for k, v in headers or ())
    for name, value in checked:
        if not isinstance(name, str) or not isinstance(value, bytes):
            raise TypeError("headers must be (str, bytes) pairs")
    return checked


def _consumer_record(topic: str, partition: int, record: _Record) -> Any:
    return ConsumerRecord(
        topic,
        partition,
        record.offset,
        record.timestamp,
        0,  # CreateTime
        record.key,
        record.value,
        None,  # checksum: gone since the v2 record format
        len(record.key) if record.key is not None else -1,
        len(record.value) if record.value is not None else -1,
        record.headers,
    )


def _check_partitions(partitions: Iterable[Any]) -> None:
    if not all(isinstance(tp, TopicPartition) for tp in partitions):
        raise TypeError("partitions must be TopicPartition namedtuples")


def _commit_offsets(offsets: Mapping[Any, Any]) -> dict[Any, Any]:
    """aiokafka's accepted shapes: an offset, ``(offset, metadata)`` or
    ``OffsetAndMetadata`` per ``TopicPartition``."""
    if not offsets or not isinstance(offsets, Mapping):
        raise ValueError(offsets)
    formatted = {}
    for tp, given in offsets.items():
        _check_partitions((tp,))
        if isinstance(given, int):
            offset, metadata = given, ""
        else:
            offset, metadata = given
        if not isinstance(metadata, str):
            raise TypeError("Metadata should be a string")
        formatted[tp] = OffsetAndMetadata(offset, metadata)
    return formatted


class LocalRecordReader:
    """``ReadRecord`` on a ``LocalBroker``: a record's value by offset, ``RecordGone``
    below the log start (retention) or where no record has that offset."""

    def __init__(self, broker: LocalBroker) -> None:
        self._broker = broker

    async def __call__(self, topic: str, partition: int, offset: int) -> bytes | None:
        from destination.pipeline.dead_letter import RecordGone

        for record in self._broker.records(topic, partition):
            if record.offset == offset:
                value: bytes | None = record.value
                return value
        raise RecordGone(f"{topic}:{partition}@{offset} is not in the log")

    async def close(self) -> None:
        return None


class LocalKafkaClients:
    """The worker's Kafka clients on a ``LocalBroker`` (see ``worker.KafkaClients``)::

        worker = Worker(settings, mapper, key, kafka=LocalKafkaClients(broker))
    """

    def __init__(self, broker: LocalBroker) -> None:
        self.broker = broker
        self.consumers: list[LocalConsumer] = []

    def consumer(self, **options: Any) -> LocalConsumer:
        consumer = LocalConsumer(self.broker, **options)
        self.consumers.append(consumer)
        return consumer

    def producer(self, **options: Any) -> LocalProducer:
        return LocalProducer(self.broker, **options)

    def record_reader(self, bootstrap_servers: str, **options: Any) -> LocalRecordReader:
        return LocalRecordReader(self.broker)
