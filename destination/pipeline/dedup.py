"""``messageId`` de-duplication: a message whose operations were all delivered within
the window is skipped (reason ``duplicate``), as Segment does for its destinations.

Producers retry and Kafka replays: the same message comes again with the same
``messageId``. Gist has no idempotency key for events, so sending it twice makes two
events; a replayed identify sends values that may be older than what Gist holds. What a
message's operations did is recorded **per operation** (``operation_key``: the messageId
for its first operation, the messageId and the index for the others), each once Gist
confirmed it, never before; a message that comes again sends only the operations not
recorded (a track whose event went but whose tag change failed sends the tag change).
Ids only ever say "delivered", which stays true: nothing invalidates them but the
window; for an event, a store that lost some (a Redis flush, a write that failed) can
only cause a duplicate, never a loss. For a write it takes the rule below.

But "delivered" is not "Gist still holds it" for a **write** (every operation but an
event: an upsert, a tag or subscription change, a delete, a commerce write). Without
Redis, a partition that went to another worker and came back was read there from the
group's commit, and its older writes, whose ids that worker did not know, were sent
again over the newer ones: skipping the newer ones as delivered left Gist at older
values (model test seed 42). So without Redis a write's id counts only while the
partition stays with the worker that recorded it (``PartitionWork.epoch`` is in its
key); an event's counts for the window, wherever it is read again. With Redis every
owner knows every id, and the older writes are skipped as well; a write is recorded
there twice, by its key and by its key at its record (``record_key``). A copy found at
another record (a producer's retry of an older message) is skipped. The same record
found delivered by an earlier owner is skipped unless a write of the same contact
went out again in this ownership: Redis then lost the earlier writes' ids but not this
one's (a flush, an eviction), the contact is back before this write, and skipping it
would leave Gist at the older values (found reading model test seed 16 at 80 steps;
``test_dedup`` plays it).

- ``DeliveredIds`` keeps the ids delivered within ``window`` in this process (Python's
  string hash: fast, cached in the string, the same within the process), bounded and
  compact: the current time slice in a set, older slices as sorted arrays of 64-bit
  hashes (8 bytes an id; ``benchmarks/RESULTS.md`` has the measured figure) behind a
  counting Bloom filter (8 bytes an id of the capacity) that tells most new ids apart. Past
  ``capacity`` ids the oldest slice is forgotten early.
- ``SharedIds`` keeps them in Redis too (``REDIS_URL``), one set per hour of the window,
  so replicas and restarts share them; looked up once per fetched batch of records (the
  first ``LOOKED_UP_OPERATIONS`` operations of each message). Their hashes are the same
  in every process (BLAKE2b), and a write that failed is tried again with the next.
- ``Dedup`` holds the copies of a message that is still in flight: they end as it ends
  (delivered: skipped as ``duplicate``; dead-lettered: dead-lettered alike; skipped:
  skipped alike), so a producer's retry arriving right behind the original sends
  nothing twice and is never sent out of order.

A 64-bit hash can collide: with a million ids in the window the chance that a new id is
taken for one of them is about 5e-14.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import structlog

from destination import reasons
from destination.observability import log_events, metrics
from destination.operations import EventTrack, Operation
from destination.pipeline.inflight import MessageWork, PartitionWork

log = structlog.get_logger(__name__)

_MASK = (1 << 64) - 1
_PROBES = 4
"""Bits a Bloom filter sets an id: the hash plus 1, 2, 3, 4 times its upper half (odd)."""


LOOKED_UP_OPERATIONS = 4
"""Operations per message whose records a Redis look-up asks for (messages with more are
rare; beyond these, an operation done by another process is sent again)."""

MAX_UNWRITTEN = 100_000
"""Ids kept for the next write to Redis after a failed one, at most."""


def id_hash(key: str) -> int:
    """A 64-bit hash of an operation's key, the same in every process (ids are shared
    through Redis: Python's own string hash is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def coordinates_id(topic: str, partition: int, offset: int, index: int | None) -> str:
    """The messageId of a message that has none: where it was first read (its record and
    its place in an envelope). A redelivery of the record, and ``replay`` of its dead
    letter (which writes this id into the message), find what its operations did."""
    return f"kafka:{topic}:{partition}:{offset}:{'-' if index is None else index}"


def operation_key(message_id: str, index: int) -> str:
    """What a message's ``index``-th operation is recorded under."""
    return message_id if index == 0 else f"{message_id}\x00{index}"


def record_key(key: str, topic: str, partition: int, offset: int) -> str:
    """What a write is also recorded under in Redis: its operation key at the record
    that carried it. Found, it says the same record was delivered before (a redelivery
    after a revocation or a crash), not a producer's copy of it elsewhere."""
    return f"{key}\x00@{topic}:{partition}:{offset}"


MAX_TAINTED = 100_000
"""Contacts per partition ownership whose writes went out, remembered at most (see
``Dedup._write_done``): beyond, a redelivered write whose earlier writes were sent again
may be skipped (only after Redis lost ids, and only that far into an ownership)."""


class DeliveredIds:
    """The messageIds delivered within the last ``window`` seconds, in this process."""

    __slots__ = (
        "_bloom",
        "_bloom_mask",
        "_clock",
        "_current",
        "_in_sealed",
        "_sealed",
        "_slice",
        "_slices",
        "_started",
        "capacity",
        "window",
    )

    def __init__(
        self,
        window: float,
        capacity: int,
        slices: int = 24,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.capacity = capacity
        self._slice = window / slices
        self._slices = slices
        self._clock = clock
        self._current: set[int] = set()
        self._started = clock()
        self._sealed: deque[tuple[float, array[int]]] = deque()  # (start, sorted hashes)
        self._in_sealed = 0  # ids in the sealed slices (``len`` is asked at every add)
        # A counting Bloom filter over the sealed slices (8 one-byte counters an id at
        # capacity, 4 probes: a new id passes it about once in 40), so that a new id, the
        # usual case, is not looked for in each of them: 24 bisections of boxed 64-bit
        # values were 14% of the worker's CPU on a 1,000,000 drain. A slice forgotten is
        # counted out (a rebuild instead stopped the event loop 0.75 s at 1,000,000).
        counters = 1 << max(10, min(24, (8 * capacity - 1).bit_length()))  # 16 MiB at most
        self._bloom = bytearray(counters)
        self._bloom_mask = counters - 1

    def __len__(self) -> int:
        return len(self._current) + self._in_sealed

    def __contains__(self, message_id: str | tuple[str, int]) -> bool:
        self._turn()
        h = hash(message_id) & _MASK
        if h in self._current:
            return True
        bloom, mask = self._bloom, self._bloom_mask
        step, bit = (h >> 32) | 1, h
        for _ in range(_PROBES):
            bit = (bit + step) & mask
            if not bloom[bit]:
                return False  # in no sealed slice
        for _, ids in self._sealed:
            i = bisect.bisect_left(ids, h)
            if i < len(ids) and ids[i] == h:
                return True
        return False

    def add(self, message_id: str | tuple[str, int]) -> None:
        self._turn()
        self._current.add(hash(message_id) & _MASK)
        if len(self) > self.capacity and self._sealed:
            self._count(self._sealed.popleft()[1], -1)

    def _turn(self) -> None:
        """Seal the current slice once it is a slice old (or holds its share of the
        capacity: a set costs ~60 bytes an id, a sealed slice 8); forget slices past the
        window."""
        now = self._clock()
        if (
            now - self._started >= self._slice
            or len(self._current) >= self.capacity // self._slices
        ):
            if self._current:
                sealed = array("Q", sorted(self._current))
                self._sealed.append((self._started, sealed))
                self._count(sealed, 1)
            self._current = set()
            self._started = now
        while self._sealed and self._sealed[0][0] + self._slice <= now - self.window:
            self._count(self._sealed.popleft()[1], -1)

    def _count(self, ids: array[int], by: int) -> None:
        """Count a slice's ids in (``by`` 1) or out (-1) of the filter. A counter at 255
        stays there (it may let a few more new ids through to the slices, never hide
        one)."""
        self._in_sealed += by * len(ids)
        bloom, mask = self._bloom, self._bloom_mask
        for h in ids:
            step, bit = (h >> 32) | 1, h
            for _ in range(_PROBES):
                bit = (bit + step) & mask
                count = bloom[bit]
                if count != 255:
                    bloom[bit] = count + by


class SharedIds:
    """The delivered ids in Redis (all replicas, across restarts): one set per hour."""

    def __init__(self, redis: Any, prefix: str, window: float, timeout: float) -> None:
        self._redis = redis
        self._prefix = prefix
        self.window = window
        self._timeout = timeout
        self._hour = 3600.0
        self._pending: list[str] = []
        self._flushing: asyncio.Task[None] | None = None

    def _key(self, hour: int) -> str:
        return f"{self._prefix}:delivered:{hour}"

    def _hours(self) -> list[int]:
        now = int(time.time() // self._hour)
        return list(range(now - int(self.window // self._hour) - 1, now + 1))

    async def delivered(self, message_ids: Sequence[str]) -> set[str]:
        """Those of the operation keys ``message_ids`` delivered within the window (an
        empty set when Redis does not answer: sending a duplicate is better than losing a
        message)."""
        if not message_ids:
            return set()
        members = [format(id_hash(m), "x") for m in message_ids]
        try:
            async with asyncio.timeout(self._timeout):
                pipe = self._redis.pipeline(transaction=False)
                for hour in self._hours():
                    pipe.smismember(self._key(hour), members)
                answers = await pipe.execute()
        except Exception as error:
            metrics.LIMITER_REDIS_ERRORS.labels("dedup_lookup").inc()
            log.warning(log_events.DEDUP_REDIS_UNAVAILABLE, error=type(error).__name__)
            return set()
        seen = set()
        for answer in answers:
            for message_id, hit in zip(message_ids, answer, strict=True):
                if hit:
                    seen.add(message_id)
        return seen

    def add(self, message_id: str) -> None:
        """Record a delivered operation key (written in the background, in batches)."""
        self._pending.append(format(id_hash(message_id), "x"))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.ensure_future(self._flush_soon())

    async def _flush_soon(self) -> None:
        # The ids added in this turn of the event loop go together; not later: an id
        # not written yet when the process is killed is an event the next owner sends
        # again (a failover benchmark saw one in three runs with a 50 ms gathering).
        await asyncio.sleep(0)
        await self.flush()

    async def flush(self) -> bool:
        """Write the ids recorded so far; False when Redis failed (they are kept, up to
        ``MAX_UNWRITTEN``, for the next write)."""
        while self._pending:
            members, self._pending = self._pending, []
            hour = self._hours()[-1]
            try:
                async with asyncio.timeout(self._timeout * 4):
                    pipe = self._redis.pipeline(transaction=False)
                    pipe.sadd(self._key(hour), *members)
                    pipe.expire(self._key(hour), int(self.window + 2 * self._hour))
                    await pipe.execute()
            except Exception:  # the local record stands; Redis gets them with the next
                metrics.LIMITER_REDIS_ERRORS.labels("dedup_record").inc()
                self._pending = (members + self._pending)[-MAX_UNWRITTEN:]
                return False
        return True


class _Copies:
    __slots__ = ("first", "waiting")

    def __init__(self, first: MessageWork) -> None:
        self.first = first
        self.waiting: list[tuple[MessageWork, Sequence[Operation]]] = []


Submit = Callable[[MessageWork, Sequence[Operation], Sequence[int]], None]
"""Hands a message's operations (those not done yet, with their indices) to delivery."""


class Dedup:
    """Decides, for each message opened with an id, which of its operations are sent
    (those not recorded as delivered), whether it is skipped as a duplicate (all were),
    or held behind its copy in flight; records each operation Gist confirmed."""

    def __init__(
        self,
        local: DeliveredIds,
        submit: Submit,
        skip: Callable[[MessageWork, str], None],
        dead_letter: Callable[[MessageWork, Any], None],
        shared: SharedIds | None = None,
    ) -> None:
        self.local = local
        self.shared = shared
        self._submit = submit
        self._skip = skip
        self._dead_letter = dead_letter
        self._in_flight: dict[str, _Copies] = {}
        # With Redis: per partition ownership, the contacts a write went out for.
        self._tainted: dict[PartitionWork, set[str]] = {}

    def offer(self, message: MessageWork, operations: Sequence[Operation]) -> None:
        message_id = message.message_id
        if message_id is None:
            self._submit(message, operations, range(len(operations)))
            return
        todo = self._todo(message, operations)
        if not todo:
            metrics.DUPLICATES.labels(message.message_type).inc()
            self._skip(message, reasons.DUPLICATE)
            return
        copies = self._in_flight.get(message_id)
        if copies is not None:
            copies.waiting.append((message, operations))
            return
        self._in_flight[message_id] = _Copies(message)
        self._send(message, operations, todo)

    def _local_key(self, message: MessageWork, key: str, write: bool) -> str | tuple[str, int]:
        """What an operation ``key`` is recorded under here: a write's, without Redis,
        names this ownership of its partition (module docstring)."""
        if write and self.shared is None:
            return (key, message.record.partition.epoch)
        return key

    def _todo(self, message: MessageWork, operations: Sequence[Operation]) -> list[int]:
        """The indices of the operations not recorded as delivered."""
        local, message_id = self.local, message.message_id
        assert message_id is not None
        if self.shared is None:
            return [
                i
                for i, operation in enumerate(operations)
                if self._local_key(
                    message, operation_key(message_id, i), type(operation) is not EventTrack
                )
                not in local
            ]
        todo = []
        for i, operation in enumerate(operations):
            key = operation_key(message_id, i)
            if type(operation) is EventTrack:
                if key not in local:
                    todo.append(i)
            elif not self._write_done(message, key, operation):
                todo.append(i)
        return todo

    def _write_done(self, message: MessageWork, key: str, operation: Operation) -> bool:
        """With Redis, whether a write need not go again. Recorded in this ownership of
        its partition: done. A producer's copy of one delivered elsewhere: done (sending
        it would put older values over newer ones). The same record, delivered by an
        earlier owner: done unless a write of the same contact went out again in this
        ownership, which puts the contact back before this write (the earlier writes'
        ids were lost: a Redis flush, an eviction; skipping it would leave Gist at the
        older values)."""
        local = self.local
        partition = message.record.partition
        if (key, partition.epoch) in local:
            return True
        if key not in local:
            return False
        tp = partition.tp
        if record_key(key, tp.topic, tp.partition, message.record.offset) not in local:
            return True  # a copy: its original was delivered at another record
        tainted = self._tainted.get(partition)
        return not tainted or not any(i in tainted for i in operation.identities)

    def _taint(self, message: MessageWork, operations: Sequence[Operation]) -> None:
        """Writes of these contacts go out in this ownership of the partition."""
        partition = message.record.partition
        tainted = self._tainted.get(partition)
        if tainted is None:
            tainted = self._tainted[partition] = set()
        if len(tainted) >= MAX_TAINTED:
            return
        for operation in operations:
            if type(operation) is not EventTrack:
                tainted.update(operation.identities)

    def _send(self, message: MessageWork, operations: Sequence[Operation], todo: list[int]) -> None:
        if self.shared is not None:
            self._taint(message, [operations[i] for i in todo])
        if len(todo) == len(operations):
            self._submit(message, operations, todo)
        else:  # a redelivery of a message that partly succeeded: the rest only
            self._submit(message, [operations[i] for i in todo], todo)

    def delivered(self, message: MessageWork, index: int, write: bool) -> None:
        """Gist confirmed the message's ``index``-th operation (or holds what it would
        have written): it is not sent again within the window (``write``: it is not an
        event; see the module docstring)."""
        if message.message_id is None:
            return
        key = operation_key(message.message_id, index)
        self.local.add(self._local_key(message, key, write))
        shared = self.shared
        if shared is not None:
            shared.add(key)
            if write:  # see ``_write_done``
                record = message.record
                tp = record.partition.tp
                at = record_key(key, tp.topic, tp.partition, record.offset)
                self.local.add((key, record.partition.epoch))
                self.local.add(at)
                shared.add(at)

    async def look_up(self, found: Iterable[tuple[str, str, int, int]]) -> None:
        """Ask Redis about the ids of records about to be opened (one round trip):
        (messageId, topic, partition, offset) of each message."""
        if self.shared is None:
            return
        keys: dict[str, None] = {}
        for message_id, topic, partition, offset in found:
            for i in range(LOOKED_UP_OPERATIONS):
                key = operation_key(message_id, i)
                if key not in self.local:
                    keys[key] = None
                at = record_key(key, topic, partition, offset)
                if at not in self.local:
                    keys[at] = None
        # Delivered within the window, by some replica: known here from now on, for
        # every copy of it (a replayed message and its producer's retries alike).
        for key in await self.shared.delivered(list(keys)):
            self.local.add(key)

    async def flush(self) -> None:
        """Write to Redis what was recorded so far (before a partition changes hands)."""
        if self.shared is not None:
            await self.shared.flush()

    def ended(self, message: MessageWork, how: str, reason: str | None) -> None:
        """An ``Outcomes`` observer: the message ended; its held copies end alike."""
        message_id = message.message_id
        if message_id is None:
            return
        copies = self._in_flight.get(message_id)
        if copies is None or copies.first is not message:
            return
        del self._in_flight[message_id]
        for waiting, _ in copies.waiting:
            if how == "delivered" or (how == "skipped" and reason in (None, reasons.UNCHANGED)):
                # "unchanged" says Gist holds the first's values: not so for a copy read
                # after a later update of the contact (model test seed 4, 80 steps).
                metrics.DUPLICATES.labels(waiting.message_type).inc()
                self._skip(waiting, reasons.DUPLICATE)
            elif how == "skipped":
                self._skip(waiting, reason or reasons.DUPLICATE)
            else:
                self._dead_letter(waiting, message.failure)

    def abandon(self, partitions: Iterable[PartitionWork]) -> None:
        """Revoked partitions: forget their messages; a copy waiting on one of them from
        another partition becomes the one sent (what the first did is recorded)."""
        gone = set(partitions)
        for partition in gone:
            self._tainted.pop(partition, None)
        for message_id, copies in list(self._in_flight.items()):
            if copies.first.record.partition not in gone:
                continue
            del self._in_flight[message_id]
            kept = [(m, ops) for m, ops in copies.waiting if m.record.partition not in gone]
            if kept:
                first, operations = kept[0]
                successor = _Copies(first)
                successor.waiting = kept[1:]
                todo = self._todo(first, operations)
                if not todo:
                    for message, _ in kept:
                        metrics.DUPLICATES.labels(message.message_type).inc()
                        self._skip(message, reasons.DUPLICATE)
                    continue
                self._in_flight[message_id] = successor
                self._send(first, operations, todo)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)
