"""``gist-destination produce``: send messages to a Kafka topic.

From a file (JSON lines, or one JSON array; ``-`` reads standard input) or generated
sample traffic (``--sample N`` users), keyed by ``userId`` (else ``anonymousId``) so that
one user's messages stay in order on one partition, as collectors do.

Kafka connection settings are the worker's, from the environment
(``KAFKA_BOOTSTRAP_SERVERS``, ``KAFKA_SECURITY_PROTOCOL``, ``KAFKA_SASL_*``,
``KAFKA_SSL_*``); ``--bootstrap-servers`` overrides the first. The topic must exist
(asked without creating it) unless ``--create-topic``. Exit 0 when sent, 2 for bad
arguments, settings, input or a missing topic, 1 when Kafka fails.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson

from destination.commands._kafka import kafka_failure, quiet_kafka_logs, started
from destination.devtools.sample import SampleRecord, sample_stream
from destination.kafka_topics import MissingTopicError, topic_partitions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", nargs="?", help="a file of messages (JSON lines or array), - for stdin"
    )
    parser.add_argument(
        "--sample", type=int, metavar="USERS", help="generate sample traffic for USERS users"
    )
    parser.add_argument("--topic", required=True)
    parser.add_argument(
        "--bootstrap-servers", metavar="B", help="overrides KAFKA_BOOTSTRAP_SERVERS"
    )
    parser.add_argument(
        "--create-topic", action="store_true", help="create the topic if it does not exist"
    )
    parser.add_argument("--partitions", type=int, default=3, help="with --create-topic")
    parser.add_argument("--seed", type=int, default=7, help="with --sample")


def run(args: argparse.Namespace) -> int:
    if (args.source is None) == (args.sample is None):
        print(
            "gist-destination produce: give a FILE or --sample USERS (one of them)", file=sys.stderr
        )
        return 2
    for option, value in (("--sample", args.sample), ("--partitions", args.partitions)):
        if value is not None and value < 1:
            print(f"gist-destination produce: {option} must be 1 or more, got {value}",
                  file=sys.stderr)  # fmt: skip
            return 2
    try:
        records = (
            sample_stream(args.sample, args.seed)
            if args.sample is not None
            else read_messages(args.source)
        )
    except (OSError, ValueError) as error:
        print(f"gist-destination produce: {error}", file=sys.stderr)
        return 2
    from destination.kafka_security import kafka_security
    from destination.settings import SettingsError, load_settings

    try:
        overrides: dict[str, Any] = {
            "kafka_topics": args.topic,
            "gist_api_key": "not-used-by-produce",
        }
        if args.bootstrap_servers:
            overrides["kafka_bootstrap_servers"] = args.bootstrap_servers
        settings = load_settings(**overrides)
        security = kafka_security(settings)
    except SettingsError as error:
        print(f"gist-destination produce: {error}", file=sys.stderr)
        return 2
    bootstrap = settings.kafka_bootstrap_servers
    quiet_kafka_logs()
    try:
        sent = asyncio.run(
            produce(bootstrap, args.topic, records, args.create_topic, args.partitions, security)
        )
    except MissingTopicError as error:
        print(f"gist-destination produce: {error}, or pass --create-topic", file=sys.stderr)
        return 2
    except Exception as error:  # Kafka's errors: one line, no traceback
        print(kafka_failure("produce", bootstrap, error), file=sys.stderr)
        return 1
    print(f"sent {sent} records to {args.topic}")
    return 0


def read_messages(source: str) -> list[SampleRecord]:
    data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    stripped = data.lstrip()
    if stripped.startswith(b"["):
        try:
            items = orjson.loads(stripped)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"{source}: not a JSON array: {exc}") from None
        return [SampleRecord(record_key(m), m) for m in items]
    records = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            message = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise ValueError(f"{source}:{number}: not a JSON line") from None
        records.append(SampleRecord(record_key(message), message))
    return records


def record_key(message: Any) -> bytes | None:
    if isinstance(message, dict):
        for field in ("userId", "anonymousId"):
            value = message.get(field)
            if value is not None:
                return str(value).encode()
    return None


async def produce(
    bootstrap_servers: str,
    topic: str,
    records: Iterable[SampleRecord],
    create: bool = False,
    partitions: int = 3,
    security: Mapping[str, Any] | None = None,
) -> int:
    """Send ``records`` to ``topic``, which must exist (``MissingTopicError``, nothing
    created) unless ``create``; ``security``: ``kafka_security``'s client options."""
    from aiokafka import AIOKafkaProducer

    from destination.devtools.broker import create_topics

    options = dict(security or {})
    if create:
        await create_topics(bootstrap_servers, [topic], partitions, **options)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers, acks="all", linger_ms=10, **options
    )
    sent = 0
    async with started(producer):
        # Before the first send: a send to a missing topic may create it.
        await topic_partitions(producer.client, {topic: "--topic"})
        for record in records:
            value = record.value if isinstance(record.value, bytes) else orjson.dumps(record.value)
            await producer.send(topic, value, key=record.key)
            sent += 1
        await producer.flush()
    return sent
