"""``gist-destination plan [--topic T --sample N | FILE]``: does my volume fit Gist's budget?

Reads a sample of real messages (the last ``--sample`` records of a topic, or a file of
record values as ``map`` reads them), maps them with the rules, and reports, per message
type and event name, the Gist requests they cost after mapping, merging, de-duplication
and skipping:

- an event (track, page, screen) one request; a delete one; an alias two (a look-up and
  an update);
- contact upserts merge per contact while they wait for a batch, and go ``GIST_BATCH_SIZE``
  to an import, which costs two requests (the import and a status poll);
- tag changes go 50 contacts to a request;
- a message whose ``messageId`` came before in the sample is a duplicate: nothing;
  skipped and rejected messages cost nothing (a dead letter is not a request).

Then the requests per day that the topic's rate implies (from the records' timestamps,
or ``--rate``) against the workspace's ceiling (``GIST_RATE_LIMIT`` per
``GIST_RATE_WINDOW``: 864,000 a day at 100 / 10 s), and, for a topic, the time to drain
the consumer group's current lag at the budget's rate. Contacts whose values Gist
already holds cost nothing either (``CONTACT_MEMORY``), which a sample cannot know: the
contact figures are an upper bound.

Offline with a FILE; with ``--topic`` it reads Kafka with the worker's settings.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from destination.commands._input import record_values
from destination.mapping import Mapper, RulesError, load_rules
from destination.operations import (
    ContactAlias,
    ContactDelete,
    ContactUpsert,
    EventTrack,
    Mapped,
    Skipped,
    TagChange,
)
from destination.pipeline.decode import DecodeError, decode_record

TAGS_PER_REQUEST = 50


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="?", metavar="FILE", help="record values (or - )")
    parser.add_argument("--topic", help="sample this topic instead of a file")
    parser.add_argument("--sample", type=int, default=10_000, metavar="N",
                        help="records to read from the topic (default 10000)")  # fmt: skip
    parser.add_argument("--rules", metavar="PATH", help="a mapping-rules file")
    parser.add_argument("--rate", type=float, metavar="MSGS_PER_S",
                        help="the topic's records per second (default: measured)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--bootstrap-servers", metavar="B", help="overrides the setting")


@dataclass
class Line:
    """One message type (or event name): its messages and the requests they cost."""

    messages: int = 0
    requests: float = 0.0
    skipped: int = 0
    rejected: int = 0
    duplicates: int = 0


@dataclass
class Plan:
    records: int = 0
    messages: int = 0
    lines: dict[str, Line] = field(default_factory=lambda: defaultdict(Line))
    span_seconds: float | None = None  # between the first and the last message's time

    @property
    def requests(self) -> float:
        return sum(line.requests for line in self.lines.values())


def cost(
    values: Iterable[bytes], mapper: Mapper, batch_size: int, timestamps: list[float]
) -> Plan:
    """The requests a sample of record values costs (see the module docstring)."""
    plan = Plan()
    seen_ids: set[str] = set()
    batch: dict[str, list[str]] = {}  # contact -> the lines of the messages merged into it
    tags: dict[tuple[str, bool], list[str]] = defaultdict(list)
    times: list[float] = []

    def flush_batch() -> None:
        # One import of these contacts and one poll: shared by the messages in it.
        if not batch:
            return
        share = 2.0 / batch_size
        for keys in batch.values():
            for key in keys:
                plan.lines[key].requests += share / len(keys)
        batch.clear()

    for value in values:
        plan.records += 1
        try:
            messages, _ = decode_record(value)
        except DecodeError:
            plan.lines["(not JSON)"].messages += 1
            plan.lines["(not JSON)"].rejected += 1
            continue
        for message in messages:
            plan.messages += 1
            result = mapper.map(message)
            key = result.message_type
            if isinstance(result, Mapped) and result.operations:
                op = result.operations[0]
                if op.timestamp is not None:
                    times.append(op.timestamp)
                events = [o for o in result.operations if isinstance(o, EventTrack)]
                if events:
                    key = f"{result.message_type}: {events[0].event['event_name']}"
            line = plan.lines[key]
            line.messages += 1
            if isinstance(result, Skipped):
                line.skipped += 1
                continue
            if not isinstance(result, Mapped):
                line.rejected += 1
                continue
            message_id = result.operations[0].message_id if result.operations else None
            if message_id is not None:
                if message_id in seen_ids:
                    line.duplicates += 1
                    continue
                seen_ids.add(message_id)
            for op in result.operations:
                if isinstance(op, ContactUpsert):
                    contact = "|".join(op.identities)
                    batch.setdefault(contact, []).append(key)
                    if len(batch) >= batch_size:
                        flush_batch()
                elif isinstance(op, TagChange):
                    tags[(op.tag, op.untag)].append(key)
                elif isinstance(op, ContactAlias):
                    line.requests += 2
                elif isinstance(op, EventTrack | ContactDelete):
                    line.requests += 1
    flush_batch()
    for keys in tags.values():
        requests = math.ceil(len(keys) / TAGS_PER_REQUEST)
        for key in keys:
            plan.lines[key].requests += requests / len(keys)
    if len(times) >= 2:
        plan.span_seconds = max(times) - min(times)
    timestamps.extend(times)
    return plan


def run(args: argparse.Namespace) -> int:
    if (args.source is None) == (args.topic is None):
        print("gist-destination plan: give a FILE or --topic T (one of them)", file=sys.stderr)
        return 2
    try:
        mapper = Mapper(load_rules(args.rules))
    except (RulesError, OSError) as error:
        print(f"gist-destination plan: rules: {error}", file=sys.stderr)
        return 2
    from destination.settings import SettingsError, load_settings

    try:
        overrides: dict[str, Any] = {
            "kafka_topics": args.topic or "plan",
            "gist_api_key": "not-used-by-plan",
        }
        if args.bootstrap_servers:
            overrides["kafka_bootstrap_servers"] = args.bootstrap_servers
        settings = load_settings(**overrides)
    except SettingsError as error:
        print(f"gist-destination plan: {error}", file=sys.stderr)
        return 2
    lag: int | None = None
    rate = args.rate
    try:
        if args.topic is not None:
            from destination.worker import kafka_security

            values, record_rate, lag = asyncio.run(
                sample_topic(
                    settings.kafka_bootstrap_servers,
                    kafka_security(settings),
                    args.topic,
                    args.sample,
                    settings.kafka_group_id,
                )
            )
            rate = rate if rate is not None else record_rate
        else:
            values = list(record_values(args.source))
    except OSError as error:
        print(f"gist-destination plan: cannot read {args.source}: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # Kafka's errors
        print(f"gist-destination plan: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    times: list[float] = []
    plan = cost(values, mapper, settings.gist_batch_size, times)
    if rate is None and plan.span_seconds:
        rate = plan.records / plan.span_seconds
    report = summarise(plan, rate, lag, settings.gist_rate_limit, settings.gist_rate_window)
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        print_report(report)
    return 0


def summarise(
    plan: Plan, rate: float | None, lag: int | None, limit: int, window: float
) -> dict[str, Any]:
    budget_per_day = limit / window * 86_400
    per_record = plan.requests / plan.records if plan.records else 0.0
    report: dict[str, Any] = {
        "records": plan.records,
        "messages": plan.messages,
        "requests": round(plan.requests, 2),
        "requests_per_record": round(per_record, 4),
        "budget_per_day": round(budget_per_day),
        "lines": [
            {
                "what": key,
                "messages": line.messages,
                "requests": round(line.requests, 2),
                "requests_per_message": round(line.requests / line.messages, 4)
                if line.messages
                else 0.0,
                "skipped": line.skipped,
                "rejected": line.rejected,
                "duplicates": line.duplicates,
            }
            for key, line in sorted(plan.lines.items(), key=lambda kv: -kv[1].requests)
        ],
    }
    if rate is not None:
        per_day = per_record * rate * 86_400
        report["records_per_second"] = round(rate, 3)
        report["requests_per_day"] = round(per_day)
        report["share_of_budget"] = round(per_day / budget_per_day, 4)
        report["fits"] = per_day <= budget_per_day
        report["records_per_second_at_most"] = (
            round(budget_per_day / 86_400 / per_record, 2) if per_record else None
        )
    if lag is not None:
        report["lag"] = lag
        seconds = lag * per_record / (limit / window) if per_record else 0.0
        report["time_to_drain_seconds"] = round(seconds)
    return report


def print_report(report: dict[str, Any]) -> None:
    print(f"{report['records']} records, {report['messages']} messages sampled: "
          f"{report['requests']} Gist requests "
          f"({report['requests_per_record']} a record)")  # fmt: skip
    print(f"\n{'requests':>10} {'per msg':>8} {'messages':>9} {'skipped':>8} {'rejected':>9} "
          f"{'dupes':>6}  what")  # fmt: skip
    for line in report["lines"]:
        print(f"{line['requests']:>10} {line['requests_per_message']:>8} {line['messages']:>9} "
              f"{line['skipped']:>8} {line['rejected']:>9} {line['duplicates']:>6}  "
              f"{line['what']}")  # fmt: skip
    print(f"\nbudget: {report['budget_per_day']:,} requests a day")
    if "requests_per_day" in report:
        verdict = "fits" if report["fits"] else "DOES NOT FIT"
        print(f"at {report['records_per_second']} records/s: {report['requests_per_day']:,} "
              f"requests a day, {report['share_of_budget']:.0%} of the budget: {verdict} "
              f"(at most {report['records_per_second_at_most']} records/s)")  # fmt: skip
    else:
        print("rate unknown (no timestamps): give --rate to compare with the budget")
    if "lag" in report:
        hours = report["time_to_drain_seconds"] / 3600
        print(f"lag {report['lag']:,} records: {hours:.1f} h to drain at the budget's rate")


async def sample_topic(
    bootstrap: str, security: dict[str, Any], topic: str, sample: int, group: str
) -> tuple[list[bytes], float | None, int]:
    """The last ``sample`` records of ``topic`` (spread over its partitions), their rate
    (from the records' timestamps), and the lag of the worker's consumer group."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka import TopicPartition as KafkaTP

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, **security
    )
    await consumer.start()
    values: list[bytes] = []
    stamps: list[float] = []
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await consumer._client.force_metadata_update()  # the topic is not cached yet
            partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            raise LookupError(f"no topic {topic!r}")
        tps = [KafkaTP(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        starts = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        each = max(1, sample // len(tps))
        for tp in tps:
            consumer.seek(tp, max(starts[tp], ends[tp] - each))
        idle = 0
        while len(values) < sample and idle < 3:
            batch = await consumer.getmany(timeout_ms=1000)
            idle = 0 if batch else idle + 1
            for tp, records in batch.items():
                for record in records:
                    ends[tp] = max(ends[tp], record.offset + 1)  # some brokers under-report
                    if record.value is not None:
                        values.append(record.value)
                        stamps.append(record.timestamp / 1000)
            # At the end offsets, and two fetches in a row came back empty.
            if idle >= 2 and all([await consumer.position(tp) >= ends[tp] for tp in tps]):
                break
    finally:
        await consumer.stop()
    lag = await _group_lag(bootstrap, security, group, tps, ends)
    rate = None
    if len(stamps) >= 2 and max(stamps) > min(stamps):
        rate = len(stamps) / (max(stamps) - min(stamps))
    return values, rate, lag


async def _group_lag(
    bootstrap: str, security: dict[str, Any], group: str, tps: list[Any], ends: dict[Any, int]
) -> int:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False, **security
    )
    await consumer.start()
    try:
        lag = 0
        for tp in tps:
            committed = await consumer.committed(tp)
            lag += ends[tp] - (committed or 0)
        return lag
    finally:
        await consumer.stop()

