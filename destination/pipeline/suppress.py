"""Deleted people stay deleted: the identities a delete carried, suppressed for a while.

A ``delete`` (a GDPR/CCPA request) removes the contact from Gist; without more, the next
replay, consumer-group reset or late message for the person would create it again.
``Suppressions`` remembers every identity a delete carried (``u:<user_id>``,
``e:<email>``) for ``SUPPRESS_DELETED_DAYS``: every later message for one of them, live,
replayed or read again after a group reset, is skipped (``suppressed``), and ``replay``
refuses to copy it back.

The record lives in a **compacted Kafka topic** (``KAFKA_SUPPRESSION_TOPIC``): the
worker already has Kafka, every replica reads the topic from its start when it starts
and follows it while it runs, and it survives restarts, with or without Redis. A record
is keyed by a hash of the identity (BLAKE2b: the list holds no e-mail address or user
id in clear), its value says until when (JSON); a null value (a tombstone) lifts it, and
compaction keeps the last word per identity.

What may go wrong, and which way: a delete's identities are suppressed here at once
(before the messages after it on its partition are opened) and its record is written to
Kafka before the contact is deleted; another replica learns it when it reads the record,
within about a second: a message for the person on another partition in that second may
still go (keying records by user keeps a person on one partition). A record that cannot
be written holds its message back (retried, the partition's oldest-unfinished age shows
it): a deletion is never half-recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson
import structlog

from destination.observability import log_events, metrics
from destination.pipeline.waiting import cancel_and_wait

log = structlog.get_logger(__name__)

DAY = 86_400.0


def identity_key(identity: str) -> bytes:
    """The key a suppression is kept under: a hash of ``u:<user_id>`` / ``e:<email>``
    (e-mail lower-cased), the same in every process."""
    if identity.startswith("e:"):
        identity = identity.lower()
    return hashlib.blake2b(identity.encode(), digest_size=16).hexdigest().encode()


class Suppressions:
    """The identities deleted within the suppression period, as this process knows them
    (from its own deletes at once, from the topic as it reads it)."""

    def __init__(self, days: float, clock: Callable[[], float] = time.time) -> None:
        self.period = days * DAY
        self._clock = clock
        self._until: dict[bytes, float] = {}  # identity key -> suppressed until (epoch s)

    def __len__(self) -> int:
        now = self._clock()
        return sum(1 for until in self._until.values() if until > now)

    def suppressed(self, identities: Iterable[str]) -> bool:
        """Whether any of ``identities`` is suppressed now."""
        if not self._until:
            return False
        now = self._clock()
        return any(self._until.get(identity_key(i), 0.0) > now for i in identities)

    def suppress(self, identities: Iterable[str]) -> list[tuple[bytes, bytes]]:
        """Suppress the identities from now on; the records to write (key, value)."""
        now = self._clock()
        until = now + self.period
        records = []
        for identity in identities:
            key = identity_key(identity)
            self._until[key] = until
            value = orjson.dumps(
                {"until": int(until), "deleted_at": int(now), "kind": identity.split(":", 1)[0]}
            )
            records.append((key, value))
        return records

    def learn(self, key: bytes, value: bytes | None) -> None:
        """A record read from the topic (a tombstone lifts)."""
        if value is None:
            self._until.pop(key, None)
            return
        try:
            until = float(orjson.loads(value)["until"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return
        if until > self._until.get(key, 0.0):
            self._until[key] = until

    def lift(self, key: bytes) -> None:
        self._until.pop(key, None)


class SuppressionLog:
    """The compacted topic behind ``Suppressions``: written with the worker's producer,
    read from its start by a consumer outside any group, then followed."""

    def __init__(
        self,
        suppressions: Suppressions,
        topic: str,
        producer: Any,
        consumer_factory: Callable[[], Any],
    ) -> None:
        self.suppressions = suppressions
        self.topic = topic
        self._producer = producer
        self._make_consumer = consumer_factory
        self._consumer: Any = None
        self._follow: asyncio.Task[None] | None = None

    async def load(self) -> int:
        """Read the topic from its start up to its end now; returns the records read."""
        from aiokafka.structs import TopicPartition

        consumer = self._consumer = self._make_consumer()
        await consumer.start()
        partitions = await self._producer.partitions_for(self.topic)
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        for tp, start in (await consumer.beginning_offsets(tps)).items():
            consumer.seek(tp, start)
        ends = await consumer.end_offsets(tps)
        read = 0
        idle = 0
        while idle < 10:
            behind = [tp for tp in tps if await consumer.position(tp) < ends[tp]]
            if not behind:
                break
            batch = await consumer.getmany(timeout_ms=500, max_records=5000)
            idle = 0 if batch else idle + 1
            for records in batch.values():
                for record in records:
                    self.suppressions.learn(record.key, record.value)
                    read += 1
        metrics.SUPPRESSED_IDENTITIES.set(len(self.suppressions))
        return read

    def follow(self) -> None:
        """Keep reading what other replicas (and operators) write, in the background."""
        self._follow = asyncio.create_task(self._following(), name="suppression-log")

    async def _following(self) -> None:
        while True:
            try:
                batch = await self._consumer.getmany(timeout_ms=1000, max_records=5000)
                for records in batch.values():
                    for record in records:
                        self.suppressions.learn(record.key, record.value)
                if batch:
                    metrics.SUPPRESSED_IDENTITIES.set(len(self.suppressions))
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a broker blip: read on at the next turn
                log.warning(log_events.SUPPRESSION_LOG_READ_FAILED, error=type(error).__name__)
                await asyncio.sleep(1.0)

    async def record(self, identities: Iterable[str]) -> None:
        """Suppress the identities (here at once) and write their records; returns once
        Kafka has them (retried while Kafka fails: a deletion is never half-recorded)."""
        records = self.suppressions.suppress(identities)
        metrics.SUPPRESSED_IDENTITIES.set(len(self.suppressions))
        delay = 0.5
        while True:
            try:
                for key, value in records:
                    await self._producer.send_and_wait(self.topic, value=value, key=key)
                return
            except Exception as error:
                log.warning(
                    log_events.SUPPRESSION_LOG_WRITE_RETRY,
                    error=type(error).__name__,
                    retry_in=delay,
                )
                await asyncio.sleep(delay)
                delay = min(30.0, delay * 2)

    async def close(self) -> None:
        if self._follow is not None:
            await cancel_and_wait(self._follow, within=5.0)
        if self._consumer is not None:
            # Bounded: with the broker gone aiokafka waits for a coordinator without
            # end. Its stop can also end in the CancelledError of its own fetch task
            # (it cancels and awaits it); gathered, that is a result, not our
            # cancellation.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5.0):
                    await asyncio.gather(self._consumer.stop(), return_exceptions=True)
