"""Dead letters: the original record (key, value, headers) plus headers saying why.

A message that came inside a ``{"batch": [...]}`` envelope is dead-lettered alone (its
JSON as the value) with ``gist-dlq-envelope-index`` saying where it stood, so a replay
does not send its neighbours again. The headers never hold the API key: they are built
from the ``Failure``, whose texts come from our own messages and Gist's answers.
"""

from __future__ import annotations

import asyncio
import time

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


class DeadLetterWriter:
    """Writes dead letters and waits for the broker's acknowledgement; retries forever
    (holding the partition) because a dead letter that is not written must not let its
    offset be committed."""

    def __init__(self, producer: object, topic: str, retry: RetryPolicy | None = None) -> None:
        self._producer = producer
        self.topic = topic
        self._retry = retry or RetryPolicy(base=0.5, cap=30.0)

    async def write(self, message: MessageWork, failure: Failure) -> None:
        value = dead_letter_value(message)
        headers = dead_letter_headers(message, failure)
        attempt = 0
        while True:
            attempt += 1
            try:
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
