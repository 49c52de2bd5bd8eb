"""``gist-destination produce``: send messages to a Kafka topic.

From a file (JSON lines, or one JSON array; ``-`` reads standard input) or generated
sample traffic (``--sample N`` users), keyed by ``userId`` (else ``anonymousId``) so that
one user's messages stay in order on one partition, as collectors do.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from destination.devtools.sample import SampleRecord, sample_stream


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", nargs="?", help="a file of messages (JSON lines or array), - for stdin"
    )
    parser.add_argument(
        "--sample", type=int, metavar="USERS", help="generate sample traffic for USERS users"
    )
    parser.add_argument("--topic", required=True)
    parser.add_argument("--bootstrap-servers", default="localhost:9092")
    parser.add_argument("--create-topic", action="store_true", help="create the topic first")
    parser.add_argument("--partitions", type=int, default=3, help="with --create-topic")
    parser.add_argument("--seed", type=int, default=7, help="with --sample")


def run(args: argparse.Namespace) -> int:
    if (args.source is None) == (args.sample is None):
        print(
            "gist-destination produce: give a FILE or --sample USERS (one of them)", file=sys.stderr
        )
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
    sent = asyncio.run(
        produce(args.bootstrap_servers, args.topic, records, args.create_topic, args.partitions)
    )
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
) -> int:
    from aiokafka import AIOKafkaProducer

    from destination.devtools.broker import create_topics

    if create:
        await create_topics(bootstrap_servers, [topic], partitions)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, acks="all", linger_ms=10)
    await producer.start()
    sent = 0
    try:
        for record in records:
            value = record.value if isinstance(record.value, bytes) else orjson.dumps(record.value)
            await producer.send(topic, value, key=record.key)
            sent += 1
        await producer.flush()
    finally:
        await producer.stop()
    return sent
