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
- an e-commerce write (``ecommerce`` rules) costs its order or cart request (an order two:
  it also clears the cart), plus one for each customer, product and variant the sample
  names for the first time (a worker that knows them sends nothing for them);
- a message whose ``messageId`` came before in the sample is a duplicate: nothing;
  skipped and rejected messages cost nothing (a dead letter is not a request).

Then the requests per day that the topic's rate implies (from the records' timestamps,
or ``--rate``) against the workspace's ceiling (``GIST_RATE_LIMIT`` per
``GIST_RATE_WINDOW``: 864,000 a day at 100 / 10 s), and, for a topic, the time to drain
the consumer group's current lag at the budget's rate (the group is ``KAFKA_GROUP_ID``,
or ``--group``, and is named). Contacts whose values Gist already holds cost nothing
either (``CONTACT_MEMORY``), which a sample cannot know: the contact figures are an
upper bound.

A rate measured from timestamps is the rate at which the sample was written: the report
gives the sample's time span, and for a topic warns when the sample is a burst, as after
a backfill or a one-off produce: its newest record is more than a minute old and older
than the time the sample took to write (the traffic stopped for longer than it lasted),
or the sample is the topic's whole content and was written in under a minute.

Offline with a FILE; with ``--topic`` it reads Kafka with the worker's settings (the
topic must exist: asked without creating it). Exit 0 with the plan, 2 for bad arguments,
settings, rules or a missing topic, 1 when Kafka fails (one line, no traceback).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from destination.commands._input import record_values
from destination.commands._kafka import kafka_failure, quiet_kafka_logs, started
from destination.kafka_topics import MissingTopicError, check_topics
from destination.mapping import Mapper, RulesError, load_rules
from destination.operations import (
    CommerceWrite,
    ContactAlias,
    ContactDelete,
    ContactUpsert,
    EventTrack,
    Mapped,
    Skipped,
    SubscriptionChange,
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
    parser.add_argument(
        "--group", metavar="G", help="the consumer group whose lag to drain (KAFKA_GROUP_ID)"
    )


BURST_AFTER = 60.0
"""A sample is a burst when its newest record is older than this (and than the sample's
span: below that, a quiet moment of a slow topic), or when it holds all the topic has
and was written in less than this."""


@dataclass
class TopicSample:
    """What ``sample_topic`` read: record values, their timestamps (s), and the group's
    lag (from the log start on partitions where ``group_committed`` is False: all of it)."""

    values: list[bytes]
    stamps: list[float]
    group: str
    lag: int
    group_committed: bool
    whole_topic: bool
    """The sample reached back to the log start of every partition."""


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
    known: set[Any] = set()  # customers, products and variants written once

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
                elif isinstance(op, ContactDelete):
                    line.requests += len(op.identities)  # one a user id, one an e-mail
                elif isinstance(op, EventTrack | SubscriptionChange):
                    line.requests += 1
                elif isinstance(op, CommerceWrite):
                    line.requests += commerce_cost(op, known)
    flush_batch()
    for keys in tags.values():
        requests = math.ceil(len(keys) / TAGS_PER_REQUEST)
        for key in keys:
            plan.lines[key].requests += requests / len(keys)
    timestamps.extend(times)
    return plan


def commerce_cost(op: CommerceWrite, known: set[Any]) -> int:
    """Requests of one e-commerce write: its own (an order two: the order and the cart
    cleared), and one per customer, product or variant not ``known`` (then known)."""
    requests = 2 if op.action == "order" else 1
    needed: list[Any] = [("customer", op.customer_id)]
    for item in op.items:
        needed.append(("product", item.product_id))
        if item.variant_id is not None:
            needed.append(("variant", item.key))
    for key in needed:
        if key not in known:
            known.add(key)
            requests += 1
    return requests


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
    if args.sample < 1:
        print(f"gist-destination plan: --sample must be 1 or more, got {args.sample}",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.rate is not None and not (math.isfinite(args.rate) and args.rate > 0):
        print(f"gist-destination plan: --rate must be a number above 0, got {args.rate}",
              file=sys.stderr)  # fmt: skip
        return 2
    sample: TopicSample | None = None
    try:
        if args.topic is not None:
            from destination.kafka_security import kafka_security

            quiet_kafka_logs()
            sample = asyncio.run(
                sample_topic(
                    settings.kafka_bootstrap_servers,
                    kafka_security(settings),
                    args.topic,
                    args.sample,
                    args.group or settings.kafka_group_id,
                )
            )
            values = sample.values
        else:
            values = list(record_values(args.source))
    except OSError as error:
        if args.topic is not None:
            print(kafka_failure("plan", settings.kafka_bootstrap_servers, error), file=sys.stderr)
            return 1
        print(f"gist-destination plan: cannot read {args.source}: {error}", file=sys.stderr)
        return 2
    except MissingTopicError as error:
        print(f"gist-destination plan: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # Kafka's errors
        print(kafka_failure("plan", settings.kafka_bootstrap_servers, error), file=sys.stderr)
        return 1
    times: list[float] = []
    plan = cost(values, mapper, settings.gist_batch_size, times)
    stamps = sample.stamps if sample is not None else times
    report = summarise(
        plan, args.rate, sample, settings.gist_rate_limit, settings.gist_rate_window,
        stamps=stamps, now=time.time(),
    )  # fmt: skip
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        print_report(report)
    return 0


def summarise(
    plan: Plan,
    rate: float | None,
    sample: TopicSample | None,
    limit: int,
    window: float,
    *,
    stamps: Sequence[float] = (),
    now: float | None = None,
) -> dict[str, Any]:
    """The report: ``rate`` is the operator's (``--rate``), else measured from ``stamps``
    (the sampled records' times, s), whose span and burst are reported either way."""
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
    if len(stamps) >= 2:
        oldest, newest = min(stamps), max(stamps)
        span = newest - oldest
        report["sample_oldest"] = _iso(oldest)
        report["sample_newest"] = _iso(newest)
        report["sample_span_seconds"] = round(span, 3)
        if rate is None and span > 0:
            rate = plan.records / span
            report["rate_source"] = "measured"
        if sample is not None and now is not None:  # a file's times say nothing of now
            quiet = max(0.0, now - newest)
            report["sample_newest_age_seconds"] = round(quiet)
            report["sample_whole_topic"] = sample.whole_topic
            report["burst"] = quiet > max(span, BURST_AFTER) or (
                sample.whole_topic and span < BURST_AFTER
            )
    if rate is not None:
        report.setdefault("rate_source", "given")
        per_day = per_record * rate * 86_400
        report["records_per_second"] = round(rate, 3)
        report["requests_per_day"] = round(per_day)
        report["share_of_budget"] = round(per_day / budget_per_day, 4)
        report["fits"] = per_day <= budget_per_day
        report["records_per_second_at_most"] = (
            round(budget_per_day / 86_400 / per_record, 2) if per_record else None
        )
    if sample is not None:
        report["group"] = sample.group
        report["group_committed"] = sample.group_committed
        report["lag"] = sample.lag
        seconds = sample.lag * per_record / (limit / window) if per_record else 0.0
        report["time_to_drain_seconds"] = round(seconds)
    return report


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


def duration(seconds: float) -> str:
    """A time to drain: in minutes below an hour, else in hours."""
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def span(seconds: float) -> str:
    """A time span: in seconds below a minute, else as ``duration``."""
    return f"{seconds:.3g} s" if seconds < 60 else duration(seconds)


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
    source = report.get("rate_source")
    if "sample_span_seconds" in report:
        took = report["sample_span_seconds"]
        print(f"\nsample written from {report['sample_oldest']} to {report['sample_newest']} "
              f"({span(took)})", end="")  # fmt: skip
        if "sample_newest_age_seconds" in report:
            print(f"; newest record {span(report['sample_newest_age_seconds'])} old", end="")
        print()
        if report.get("burst"):
            quiet = report["sample_newest_age_seconds"]
            if report["sample_whole_topic"] and quiet <= max(took, BURST_AFTER):
                what = f"the topic holds only what was written in {span(took)}"
            else:
                what = f"written in {span(took)}, then nothing for {span(quiet)}"
            then = {
                "measured": "the rate below is the burst's, not the topic's: give --rate R "
                "(records/s) for the topic's",
                "given": "the rate below is --rate's",
            }.get(str(source), "it gives no rate")
            print(f"WARNING: the sample is a burst ({what}): {then}")
    print(f"\nbudget: {report['budget_per_day']:,} requests a day")
    if "requests_per_day" in report:
        verdict = "fits" if report["fits"] else "DOES NOT FIT"
        print(f"at {report['records_per_second']:,} records/s ({source}): "
              f"{report['requests_per_day']:,} requests a day, "
              f"{report['share_of_budget']:.0%} of the budget: {verdict} "
              f"(at most {report['records_per_second_at_most']} records/s)")  # fmt: skip
    elif "sample_span_seconds" in report:
        print("rate unknown (the sampled records all have one time): give --rate R")
    else:
        print("rate unknown (no timestamps): give --rate to compare with the budget")
    if "lag" in report:
        drain = duration(report["time_to_drain_seconds"])
        never = "" if report["group_committed"] else " (it has committed nothing: all of it)"
        print(f"consumer group {report['group']!r}: lag {report['lag']:,} records{never}, "
              f"{drain} to drain at the budget's rate")  # fmt: skip


async def sample_topic(
    bootstrap: str, security: dict[str, Any], topic: str, sample: int, group: str
) -> TopicSample:
    """The last ``sample`` records of ``topic`` (spread over its partitions), their
    timestamps, and the lag of ``group``. ``MissingTopicError`` (nothing created) when
    the topic is not there."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka import TopicPartition as KafkaTP

    counts = await check_topics(bootstrap, security, {topic: "--topic"}, "gist-destination-plan")
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, **security
    )
    values: list[bytes] = []
    stamps: list[float] = []
    async with started(consumer):
        tps = [KafkaTP(topic, p) for p in range(counts[topic])]
        consumer.assign(tps)
        starts = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        each = max(1, sample // len(tps))
        whole = all(ends[tp] - each <= starts[tp] for tp in tps)
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
    lag, committed = await _group_lag(bootstrap, security, group, tps, starts, ends)
    return TopicSample(values, stamps, group, lag, committed, whole)


async def _group_lag(
    bootstrap: str,
    security: dict[str, Any],
    group: str,
    tps: list[Any],
    starts: dict[Any, int],
    ends: dict[Any, int],
) -> tuple[int, bool]:
    """The records of ``tps`` past ``group``'s commits (from the log start where it has
    none), and whether it has any."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False, **security
    )
    async with started(consumer):
        lag = 0
        any_commit = False
        for tp in tps:
            committed = await consumer.committed(tp)
            any_commit = any_commit or committed is not None
            lag += max(0, ends[tp] - max(starts[tp], committed or 0))
        return lag, any_commit
