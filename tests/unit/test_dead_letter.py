"""Dead letters: what they hold, and that every one is written whatever Kafka says."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aiokafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)

from destination.devtools.local_kafka import LocalBroker, LocalProducer
from destination.gist import RetryPolicy
from destination.pipeline.dead_letter import (
    DeadLetterTopicError,
    DeadLetterWriter,
    RecordGone,
    check_topic,
    dead_letter_headers,
    dead_letter_value,
)
from destination.pipeline.inflight import Failure, Ledger, MessageWork, TopicPartition


def _message(
    value: bytes | None, index: int | None = None, body: object = None, key: bytes | None = b"u-1"
) -> MessageWork:
    ledger = Ledger()
    partition = ledger.assign(TopicPartition("events", 3))
    record = ledger.open_record(partition, 42, key, value, [("trace", b"t-1")])
    return ledger.open_message(record, index, "track", None, body)


def test_headers_keep_the_original_and_say_why() -> None:
    message = _message(b'{"type":"track"}')
    failure = Failure(
        "gist_rejected",
        "Gist rejected the request with 404",
        status=404,
        body_excerpt='{"errors":[]}',
        attempts=1,
    )
    headers = dict(dead_letter_headers(message, failure))
    assert headers["trace"] == b"t-1"
    assert headers["gist-dlq-reason"] == b"gist_rejected"
    assert headers["gist-dlq-http-status"] == b"404"
    assert headers["gist-dlq-source-topic"] == b"events"
    assert headers["gist-dlq-source-partition"] == b"3"
    assert headers["gist-dlq-source-offset"] == b"42"
    assert headers["gist-dlq-attempts"] == b"1"
    assert headers["gist-dlq-body-excerpt"] == b'{"errors":[]}'
    assert "gist-dlq-envelope-index" not in headers
    assert dead_letter_value(message) == b'{"type":"track"}'


def test_a_message_from_an_envelope_is_dead_lettered_alone() -> None:
    body = {"type": "track", "event": "x"}
    message = _message(b'{"batch":[{},{}]}', index=1, body=body)
    headers = dict(dead_letter_headers(message, Failure("missing_identity", "no id")))
    assert headers["gist-dlq-envelope-index"] == b"1"
    assert orjson.loads(dead_letter_value(message) or b"") == body


class Producer:
    """The Kafka edge: fails the first sends with the given errors, then takes them."""

    def __init__(self, *errors: Exception, max_request_size: int | None = None) -> None:
        self.errors = list(errors)
        self.max_request_size = max_request_size
        self.sent: list[dict[str, Any]] = []
        self.attempts = 0

    async def send_and_wait(
        self, topic: str, value: bytes | None, key: bytes | None, headers: Any
    ) -> None:
        self.attempts += 1
        assert not (value is None and key is None), "Need at least one: key or value"  # aiokafka
        if self.errors:
            raise self.errors.pop(0)
        size = len(value or b"") + len(key or b"") + sum(len(k) + len(v) for k, v in headers)
        if self.max_request_size is not None and size > self.max_request_size:
            raise MessageSizeTooLargeError("too large")
        self.sent.append({"topic": topic, "value": value, "key": key, "headers": dict(headers)})


FAST = RetryPolicy(base=0.001, cap=0.002)


async def test_transient_errors_are_retried_until_the_dead_letter_is_written() -> None:
    producer = Producer(KafkaTimeoutError(), NotLeaderForPartitionError(), KafkaTimeoutError())
    writer = DeadLetterWriter(producer, "dlq", retry=FAST)
    await writer.write(_message(b'{"a":1}'), Failure("invalid_field", "x"))
    assert producer.attempts == 4
    assert producer.sent[0]["value"] == b'{"a":1}'


async def test_a_forbidden_topic_is_retried_not_skipped() -> None:
    """An ACL fixed by an operator lets the held dead letter through."""
    producer = Producer(TopicAuthorizationFailedError(), UnknownTopicOrPartitionError())
    writer = DeadLetterWriter(producer, "dlq", retry=FAST)
    await writer.write(_message(b"{}"), Failure("invalid_field", "x"))
    assert len(producer.sent) == 1


async def test_a_record_too_large_for_kafka_is_written_without_its_value() -> None:
    """Regression: a 1.2 MB record got MessageSizeTooLargeError on every attempt and held
    its partition forever."""
    big = b'{"type":"track","pad":"' + b"x" * 1_200_000 + b'"}'
    producer = Producer(max_request_size=1024 * 1024)
    writer = DeadLetterWriter(producer, "dlq", retry=FAST)
    await writer.write(_message(big), Failure("invalid_field", "too big"))
    (sent,) = producer.sent
    assert sent["value"] == b""
    assert sent["key"] == b"u-1"
    assert sent["headers"]["trace"] == b"t-1"
    assert sent["headers"]["gist-dlq-reason"] == b"invalid_field"
    assert sent["headers"]["gist-dlq-value-omitted"] == b"too_large"
    assert sent["headers"]["gist-dlq-value-bytes"] == str(len(big)).encode()


async def test_a_keyless_record_too_large_or_empty_is_still_written() -> None:
    producer = Producer(max_request_size=1024)
    writer = DeadLetterWriter(producer, "dlq", retry=FAST)
    await writer.write(_message(b"x" * 5000, key=None), Failure("invalid_json", "x"))
    await writer.write(_message(None, key=None), Failure("empty_value", "x"))
    assert [s["value"] for s in producer.sent] == [b"", b""]
    assert producer.attempts == 3  # the first too large, then each written once


async def test_headers_too_large_are_dropped_last() -> None:
    ledger = Ledger()
    partition = ledger.assign(TopicPartition("events", 0))
    record = ledger.open_record(partition, 1, b"k", b"{}", [("huge", b"h" * 5000)])
    message = ledger.open_message(record, None, "track", None)
    producer = Producer(max_request_size=2048)
    await DeadLetterWriter(producer, "dlq", retry=FAST).write(message, Failure("x", "y"))
    (sent,) = producer.sent
    assert "huge" not in sent["headers"]
    assert sent["headers"]["gist-dlq-reason"] == b"x"
    assert sent["key"] == b"k"


async def test_a_record_gone_from_kafka_is_written_without_its_value() -> None:
    """Regression: retention removed a released record; the re-read raised an error the
    writer did not expect, on every attempt."""
    message = _message(b"{}")
    message.record.released = True
    message.record.value = None

    async def gone(topic: str, partition: int, offset: int) -> bytes | None:
        raise RecordGone(f"{topic}:{partition}@{offset}")

    producer = Producer()
    await DeadLetterWriter(producer, "dlq", gone, retry=FAST).write(message, Failure("x", "y"))
    (sent,) = producer.sent
    assert sent["value"] == b""
    assert sent["headers"]["gist-dlq-value-omitted"] == b"gone"
    assert sent["headers"]["gist-dlq-source-offset"] == b"42"


async def test_a_released_envelope_message_is_read_again_and_written_alone() -> None:
    message = _message(None, index=1)
    message.record.released = True

    async def read(topic: str, partition: int, offset: int) -> bytes | None:
        assert (topic, partition, offset) == ("events", 3, 42)
        return b'{"batch":[{"type":"track"},{"type":"identify","userId":"u"}]}'

    producer = Producer()
    await DeadLetterWriter(producer, "dlq", read, retry=FAST).write(message, Failure("x", "y"))
    assert orjson.loads(producer.sent[0]["value"]) == {"type": "identify", "userId": "u"}


async def test_a_released_envelope_message_keeps_the_envelopes_context() -> None:
    """Regression (repro f5): a parked message of an envelope whose record value was
    released was dead-lettered from the re-read element alone, without the envelope's
    own context and integrations it was mapped with, so a replay mapped it otherwise
    (no last-seen IP, no Engage audience priority). It is decoded as it was processed."""
    raw = orjson.dumps({
        "context": {"ip": "203.0.113.9", "personas": {"computation_class": "audience"}},
        "integrations": {"All": True},
        "batch": [{"type": "identify", "userId": "u1", "traits": {"vip": True}}],
    })  # fmt: skip
    message = _message(None, index=0)
    message.record.released = True

    async def read(topic: str, partition: int, offset: int) -> bytes | None:
        return raw

    producer = Producer()
    await DeadLetterWriter(producer, "dlq", read, retry=FAST).write(message, Failure("x", "y"))
    written = orjson.loads(producer.sent[0]["value"])
    assert written["context"]["ip"] == "203.0.113.9"
    assert written["context"]["personas"] == {"computation_class": "audience"}
    assert written["integrations"] == {"All": True}
    assert written["traits"] == {"vip": True}


async def test_the_dead_letter_topic_is_checked_at_start_up_without_creating_it() -> None:
    broker = LocalBroker(auto_create_topics=True)  # as Kafka's default, and Tansu
    broker.create_topic("dlq", partitions=2)
    broker.create_topic("forbidden")
    broker.forbid("forbidden")
    producer = LocalProducer(broker)
    assert await check_topic(producer, "dlq") == 2
    for typo in ("dlq-typo", "forbidden"):
        with pytest.raises(DeadLetterTopicError, match=f"KAFKA_DLQ_TOPIC: no topic '{typo}'"):
            await check_topic(producer, typo)
    assert broker.topics() == {"dlq", "forbidden"}  # the typo was not created


async def test_kafka_not_answering_the_topic_check_is_said_so() -> None:
    class Silent:
        async def fetch_all_metadata(self) -> Any:
            raise KafkaError("Unable to get cluster metadata over all known brokers")

    producer = LocalProducer(LocalBroker())
    producer.client = Silent()  # type: ignore[assignment]
    with pytest.raises(DeadLetterTopicError, match="could not check that topic 'dlq' exists"):
        await check_topic(producer, "dlq")
