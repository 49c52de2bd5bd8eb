"""``gist-destination suppressions list | lift``: the people a delete suppressed.

A delete suppresses every identity it carries for ``SUPPRESS_DELETED_DAYS``
(``destination.pipeline.suppress``): their messages are skipped (``suppressed``) and
``replay`` refuses them. The records are in ``KAFKA_SUPPRESSION_TOPIC`` under a hash of
the identity, so the list names no one:

    gist-destination suppressions list                      # hash, kind, since, until
    gist-destination suppressions list --user-id u-42       # is this one suppressed?
    gist-destination suppressions lift --user-id u-42 --email ada@example.com

``lift`` writes a tombstone for each identity given (every replica learns it within
about a second, and compaction forgets the record): from then on the person's messages
go to Gist again. Kafka settings are the worker's (``KAFKA_BOOTSTRAP_SERVERS``,
``KAFKA_SECURITY_*`` / ``KAFKA_SASL_*`` / ``KAFKA_SSL_*``; ``--bootstrap-servers``
overrides the first). Exit 0 when done, 2 for bad arguments or settings or a topic that
is not there, 1 when Kafka fails.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

from destination.commands._kafka import kafka_failure, quiet_kafka_logs, started
from destination.kafka_topics import MissingTopicError, topic_partitions
from destination.pipeline.suppress import identity_key


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["list", "lift"])
    parser.add_argument("--user-id", action="append", default=[], metavar="ID",
                        help="a user id (repeatable)")  # fmt: skip
    parser.add_argument("--email", action="append", default=[], metavar="EMAIL",
                        help="an e-mail address (repeatable)")  # fmt: skip
    parser.add_argument("--bootstrap-servers", metavar="B", help="overrides the setting")
    parser.add_argument("--json", action="store_true", help="list: one JSON object a line")


def _identities(args: argparse.Namespace) -> list[str]:
    out = [f"u:{u}" for u in args.user_id if u.strip()]
    out += [f"e:{e.strip().lower()}" for e in args.email if e.strip()]
    return out


def run(args: argparse.Namespace) -> int:
    from destination.settings import SettingsError, load_settings

    identities = _identities(args)
    if args.action == "lift" and not identities:
        print("gist-destination suppressions: lift needs --user-id or --email", file=sys.stderr)
        return 2
    overrides: dict[str, Any] = {
        "kafka_topics": "not-used-by-suppressions",
        "gist_api_key": "not-used-by-suppressions",
    }
    if args.bootstrap_servers:
        overrides["kafka_bootstrap_servers"] = args.bootstrap_servers
    try:
        settings = load_settings(**overrides)
    except SettingsError as error:
        print(f"gist-destination suppressions: {error}", file=sys.stderr)
        return 2
    from destination.kafka_security import kafka_security

    quiet_kafka_logs()
    try:
        return asyncio.run(
            _act(
                args,
                settings.kafka_bootstrap_servers,
                kafka_security(settings),
                settings.kafka_suppression_topic,
                identities,
            )
        )
    except MissingTopicError as error:
        print(f"gist-destination suppressions: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # Kafka's errors: say which, no traceback
        print(kafka_failure("suppressions", settings.kafka_bootstrap_servers, error),
              file=sys.stderr)  # fmt: skip
        return 1


async def _act(
    args: argparse.Namespace,
    bootstrap: str,
    security: dict[str, Any],
    topic: str,
    identities: list[str],
) -> int:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", **security)
    async with started(producer):
        await topic_partitions(producer.client, {topic: "KAFKA_SUPPRESSION_TOPIC"})
        if args.action == "lift":
            for identity in identities:
                await producer.send_and_wait(topic, value=None, key=identity_key(identity))
                kind = "user id" if identity.startswith("u:") else "e-mail"
                print(f"lifted the {kind} {identity[2:]!r}")
            return 0
        reader = {"group_id": None, "enable_auto_commit": False, "auto_offset_reset": "earliest"}
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, **reader, **security)
        async with started(consumer):
            latest = await _read_all(consumer, producer, topic)
    wanted = {identity_key(i): i for i in identities}
    now = datetime.now(UTC).timestamp()
    shown = 0
    for key, record in sorted(latest.items()):
        if record is None or (wanted and key not in wanted):
            continue
        until = float(record.get("until", 0))
        if until <= now:
            continue
        row = {
            "key": key.decode(),
            "kind": {"u": "user id", "e": "e-mail"}.get(record.get("kind", ""), "?"),
            "deleted_at": _when(record.get("deleted_at")),
            "until": _when(until),
        }
        if key in wanted:
            row["identity"] = wanted[key][2:]
        print(orjson.dumps(row).decode() if args.json else "  ".join(map(str, row.values())))
        shown += 1
    if not args.json:
        missing = [i[2:] for k, i in wanted.items() if latest.get(k) is None]
        for name in missing:
            print(f"{name!r} is not suppressed")
        print(f"{shown} suppressed", file=sys.stderr)
    return 0


async def _read_all(consumer: Any, producer: Any, topic: str) -> dict[bytes, Any]:
    """The last record per key (None for a tombstone) from the start to the end now."""
    from aiokafka.structs import TopicPartition

    partitions = await producer.partitions_for(topic)
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    for tp, start in (await consumer.beginning_offsets(tps)).items():
        consumer.seek(tp, start)
    ends = await consumer.end_offsets(tps)
    latest: dict[bytes, Any] = {}
    idle = 0
    while idle < 10:
        positions = [await consumer.position(tp) for tp in tps]
        if all(at >= ends[tp] for at, tp in zip(positions, tps, strict=True)):
            break
        batch = await consumer.getmany(timeout_ms=500, max_records=5000)
        idle = 0 if batch else idle + 1
        for records in batch.values():
            for record in records:
                if record.key is None:
                    continue
                try:
                    latest[record.key] = None if record.value is None else orjson.loads(
                        record.value
                    )
                except orjson.JSONDecodeError:
                    continue
    return latest


def _when(epoch: Any) -> str:
    try:
        return datetime.fromtimestamp(float(epoch), UTC).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError):
        return "?"
