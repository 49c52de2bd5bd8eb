"""Dead letters: the original record (key, value, headers) plus headers saying why.

A message that came inside a ``{"batch": [...]}`` envelope is dead-lettered alone (its
JSON as the value) with ``gist-dlq-envelope-index`` saying where it stood, so a replay
does not send its neighbours again. A record whose value was released while it waited
for a batch import (see ``inflight``) is read again from Kafka by ``KafkaRecordReader``.
The headers never hold the API key: they are built from the ``Failure``, whose texts
come from our own messages and Gist's answers.

Every dead letter is written, whatever Kafka says, so that its message ends and the
partition moves on:

- a transient error (broker unavailable, time-out, not the leader, no ACL yet) is
  retried with backoff, for as long as it takes: each retry is logged and counted
  (``dead_letter_write_retries_total``), and the stall shows in the oldest-unfinished
  age of the partition;
- a record Kafka can never take (larger than ``max_bytes`` or the broker's limit) is
  written *truncated*: the original key and the reason, an empty value
  (``gist-dlq-value-omitted: too_large`` and ``gist-dlq-value-bytes`` say what it was),
  then, if that is still too large, without the original headers too;
- a record that is no longer in Kafka when it must be re-read (retention, compaction)
  is written with an empty value and ``gist-dlq-value-omitted: gone``.

A missing or forbidden dead-letter topic is found at start-up (``check_topic``), not at
the first dead letter.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    OffsetOutOfRangeError,
    RecordTooLargeError,
)

from destination.gist import RetryPolicy
from destination.kafka_topics import MissingTopicError, topic_partitions
from destination.observability import log_events, metrics
from destination.pipeline.decode import DecodeError, decode_record
from destination.pipeline.inflight import Failure, MessageWork

log = structlog.get_logger(__name__)

HEADER_PREFIX = "gist-dlq-"

DEFAULT_MAX_BYTES = 1024 * 1024
"""Kafka's default largest record (``message.max.bytes``) and aiokafka's default
``max_request_size``."""


class RecordGone(Exception):
    """The record is no longer in Kafka (retention or compaction removed it)."""


class DeadLetterTopicError(Exception):
    """The dead-letter topic cannot be used; the message says what to fix."""


def dead_letter_value(message: MessageWork) -> bytes | None:
    if message.index is None:
        return message.record.value
    try:
        return orjson.dumps(message.body)
    except TypeError:  # pragma: no cover - parsed JSON always serialises
        return message.record.value


def dead_letter_headers(
    message: MessageWork,
    failure: Failure,
    *,
    omitted: str | None = None,
    value_bytes: int | None = None,
    keep_original: bool = True,
) -> list[tuple[str, bytes]]:
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
    if omitted is not None:
        why["value-omitted"] = omitted
        if value_bytes is not None:
            why["value-bytes"] = str(value_bytes)
    original = (
        [(k, v) for k, v in record.headers if not k.startswith(HEADER_PREFIX)]
        if keep_original
        else []
    )
    return original + [(HEADER_PREFIX + k, v.encode()) for k, v in why.items()]


ReadRecord = Callable[[str, int, int], Awaitable[bytes | None]]
"""Reads the value of the record at (topic, partition, offset) again from Kafka; raises
``RecordGone`` when Kafka no longer has it."""


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
                try:
                    batch = await self._consumer.getmany(tp, timeout_ms=1000, max_records=1)
                except OffsetOutOfRangeError:
                    raise RecordGone(
                        f"{topic}:{partition}@{offset} is below the log start"
                    ) from None
                for record in batch.get(tp, ()):
                    if record.offset == offset:
                        value: bytes | None = record.value
                        return value
                    raise RecordGone(f"offset {offset} is gone (next is {record.offset})")
            raise TimeoutError(f"could not read {topic}:{partition}@{offset}")

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None


_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError)


class DeadLetterWriter:
    """Writes dead letters and waits for the broker's acknowledgement (see the module
    docstring for what it does when Kafka refuses)."""

    def __init__(
        self,
        producer: object,
        topic: str,
        read_record: ReadRecord | None = None,
        retry: RetryPolicy | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self._producer = producer
        self.topic = topic
        self._read_record = read_record
        self._retry = retry or RetryPolicy(base=0.5, cap=30.0)
        self.max_bytes = max_bytes

    async def _value(self, message: MessageWork) -> bytes | None:
        """The dead letter's value; ``RecordGone`` when Kafka no longer has the record."""
        record = message.record
        if not record.released or self._read_record is None:
            return dead_letter_value(message)
        tp = record.partition.tp
        raw = await self._read_record(tp.topic, tp.partition, record.offset)
        if message.index is None or raw is None:
            return raw
        try:
            # Decoded as it was when it was processed: with the envelope's own context
            # and integrations applied, so that a replay maps it the same way.
            messages, enveloped = decode_record(raw)
            if not enveloped:
                return raw  # not the envelope it was: keep the whole record
            message.body = messages[message.index]
        except (DecodeError, IndexError):
            return raw
        return dead_letter_value(message)

    async def write(self, message: MessageWork, failure: Failure) -> None:
        key = message.record.key
        value: bytes | None = None
        have_value = False
        omitted: str | None = None
        value_bytes: int | None = None
        keep_headers = True
        attempt = 0
        while True:
            try:
                if not have_value:
                    value = await self._value(message)
                    have_value = True
                headers = dead_letter_headers(
                    message,
                    failure,
                    omitted=omitted,
                    value_bytes=value_bytes,
                    keep_original=keep_headers,
                )
                if value is None and key is None:
                    value = b""  # Kafka takes no record without key and value (a tombstone)
                await self._producer.send_and_wait(  # type: ignore[attr-defined]
                    self.topic, value=value, key=key, headers=headers
                )
                return
            except RecordGone:
                # An empty value, not None: Kafka takes no record without key and value.
                have_value, value, omitted = True, b"", "gone"
                self._truncated(message, "gone")
                continue
            except _TOO_LARGE:
                if omitted != "too_large" and value:
                    value_bytes = len(value)
                    have_value, value, omitted = True, b"", "too_large"
                    self._truncated(message, "too_large")
                    continue
                if keep_headers:
                    keep_headers = False
                    self._truncated(message, "headers_dropped")
                    continue
                if key is not None:  # a key larger than the limit: nothing else is left
                    key = None
                    self._truncated(message, "key_dropped")
                    continue
                error: Exception = RuntimeError("a dead letter without value is too large")
            except Exception as exc:  # aiokafka raises many types; all mean "try again"
                error = exc
            attempt += 1
            delay = self._retry.delay(attempt)
            metrics.DEAD_LETTER_WRITE_RETRIES.labels(type(error).__name__).inc()
            if attempt == 1 or attempt % 10 == 0:
                log.warning(
                    log_events.DEAD_LETTER_RETRY,
                    error=type(error).__name__,
                    attempt=attempt,
                    retry_in=round(delay, 2),
                    dlq_topic=self.topic,
                    **message.where(),
                )
            await asyncio.sleep(delay)

    def _truncated(self, message: MessageWork, how: str) -> None:
        metrics.DEAD_LETTERS_TRUNCATED.labels(how).inc()
        log.warning(log_events.DEAD_LETTER_TRUNCATED, how=how, **message.where())


async def check_topic(
    producer: Any, topic: str, within: float = 30.0, setting: str = "KAFKA_DLQ_TOPIC"
) -> int:
    """The partition count of a topic the worker writes to (the dead letters', or the
    one ``setting`` names); ``DeadLetterTopicError`` naming the setting when the topic is
    not there (or this client may not Describe it) or Kafka does not say within
    ``within`` seconds. Asked of all topics, never of this one by name, which would create
    it where the broker auto-creates topics (``destination.kafka_topics``)."""
    try:
        async with asyncio.timeout(within):
            counts = await topic_partitions(producer.client, {topic: setting})
    except MissingTopicError as error:
        raise DeadLetterTopicError(str(error)) from None
    except (KafkaError, TimeoutError) as error:
        raise DeadLetterTopicError(
            f"{setting}: could not check that topic {topic!r} exists: Kafka did not "
            f"list its topics within {within:g} s ({type(error).__name__})"
        ) from None
    return counts[topic]
