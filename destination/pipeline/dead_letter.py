"""Dead letters: the original record (key, value, headers) plus headers saying why.

A message that came inside a ``{"batch": [...]}`` envelope is dead-lettered alone (its
JSON as the value) with ``gist-dlq-envelope-index`` saying where it stood, so a replay
does not send its neighbours again. A record whose value was released while it waited
for a batch import (see ``inflight``) is read again from Kafka by ``KafkaRecordReader``.
The headers never hold the API key: they are built from the ``Failure``, whose texts
come from our own messages and Gist's answers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog

from destination.gist import RetryPolicy
from destination.observability import log_events
from destination.pipeline.inflight import Failure, MessageWork

log = structlog.get_logger(__name__)

HEADER_PREFIX = "gist-dlq-"


def dead_letter_value(message: MessageWork) -> bytes | None:
    if message.index is None:
        return message.record.value
    try:
        return orjson.dumps(message.body)
    except TypeError:  # pragma: no cover - parsed JSON always serialises
        return message.record.value


def dead_letter_headers(message: MessageWork, failure: Failure) -> list[tuple[str, bytes]]:
    record = message.record
    why: dict[str, str] = {
        "reason": failure.reason,
        "detail": failure.detail[:500],
        "source-topic": record.partition.tp.topic,
        "source-partition": str(record.partition.tp.partition),
        "source-offset": str(record.offset),
        "message-type": message.message_type,
        "attempts": str(failure.attempts),
        "time": str(int(time.time())),
    }
    if failure.status is not None:
        why["http-status"] = str(failure.status)
    if failure.body_excerpt:
        why["body-excerpt"] = failure.body_excerpt[:300]
    if message.index is not None:
        why["envelope-index"] = str(message.index)
    original = [(k, v) for k, v in record.headers if not k.startswith(HEADER_PREFIX)]
    return original + [(HEADER_PREFIX + k, v.encode()) for k, v in why.items()]


ReadRecord = Callable[[str, int, int], Awaitable[bytes | None]]
"""Reads the value of the record at (topic, partition, offset) again from Kafka."""


class KafkaRecordReader:
    """Reads single records again by offset, with a consumer outside any group."""

    def __init__(self, bootstrap_servers: str, **options: Any) -> None:
        self._bootstrap = bootstrap_servers
        self._options = options
        self._consumer: Any = None
        self._lock = asyncio.Lock()

    async def __call__(self, topic: str, partition: int, offset: int) -> bytes | None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        async with self._lock:
            if self._consumer is None:
                consumer = AIOKafkaConsumer(
                    bootstrap_servers=self._bootstrap,
                    group_id=None,
                    enable_auto_commit=False,
                    auto_offset_reset="none",
                    **self._options,
                )
                await consumer.start()
                self._consumer = consumer
            tp = TopicPartition(topic, partition)
            self._consumer.assign([tp])
            self._consumer.seek(tp, offset)
            for _ in range(30):
                batch = await self._consumer.getmany(tp, timeout_ms=1000, max_records=1)
                for record in batch.get(tp, ()):
                    if record.offset == offset:
                        value: bytes | None = record.value
                        return value
                    raise LookupError(f"offset {offset} is gone (next is {record.offset})")
            raise TimeoutError(f"could not read {topic}:{partition}@{offset}")

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None


class DeadLetterWriter:
    """Writes dead letters and waits for the broker's acknowledgement; retries forever
    (holding the partition) because a dead letter that is not written must not let its
    offset be committed."""

    def __init__(
        self,
        producer: object,
        topic: str,
        read_record: ReadRecord | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._producer = producer
        self.topic = topic
        self._read_record = read_record
        self._retry = retry or RetryPolicy(base=0.5, cap=30.0)

    async def _value(self, message: MessageWork) -> tuple[bytes | None, bool]:
        """The dead letter's value, and False when Kafka no longer has the record."""
        record = message.record
        if not record.released or self._read_record is None:
            return dead_letter_value(message), True
        tp = record.partition.tp
        try:
            raw = await self._read_record(tp.topic, tp.partition, record.offset)
        except LookupError:  # retention removed it while Gist was importing
            return None, False
        if message.index is None or raw is None:
            return raw, True
        message.body = orjson.loads(raw)["batch"][message.index]
        return dead_letter_value(message), True

    async def write(self, message: MessageWork, failure: Failure) -> None:
        attempt = 0
        while True:
            attempt += 1
            try:
                value, available = await self._value(message)
                headers = dead_letter_headers(message, failure)
                if not available:
                    headers.append((HEADER_PREFIX + "value-unavailable", b"true"))
                await self._producer.send_and_wait(  # type: ignore[attr-defined]
                    self.topic, value=value, key=message.record.key, headers=headers
                )
                return
            except Exception as exc:  # aiokafka raises many types; all mean "try again"
                delay = self._retry.delay(attempt)
                log.warning(
                    log_events.DEAD_LETTER_RETRY,
                    error=type(exc).__name__,
                    attempt=attempt,
                    retry_in=round(delay, 2),
                )
                await asyncio.sleep(delay)
