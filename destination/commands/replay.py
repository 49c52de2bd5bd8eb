"""``gist-destination replay --from DLQ_TOPIC --to TOPIC``: dead letters back to an input.

Once the cause of dead letters is fixed (the rules, the data, Gist), this copies them
back to an input topic with their original key, value and headers (the ``gist-dlq-*``
headers dropped; ``gist-replay`` and ``gist-replay-of`` added), filtered by reason
(``--reason``, repeatable), by when they were dead-lettered (``--since`` / ``--until``:
ISO 8601 or epoch seconds) and by where they came from (``--partition P --offsets A-B``:
source partition and offsets, as the worker's logs name them). ``--dry-run`` counts
what would be copied, by reason, and writes nothing.

It reads the dead-letter topic from its start up to its end as it was when the command
started (outside any consumer group: the topic is left as it is, nothing is committed),
one fetch at a time (bounded memory). Safe to run twice: the worker records what each
message's operations did under its ``messageId`` (``DEDUP_WINDOW``) and sends only what
was not done, so a second run sends nothing twice, and a message that partly succeeded
sends the rest. A message without a ``messageId`` is given the one the worker gave it
when it first read it, from where it was read (``gist-dlq-source-*`` headers and its
place in an envelope: ``dedup.coordinates_id``). A dead letter written without its
value (too large, or gone from Kafka) cannot be replayed: it is counted and left.

Dead letters about people deleted within ``SUPPRESS_DELETED_DAYS`` (their user id or
e-mail is in ``KAFKA_SUPPRESSION_TOPIC``, which must exist then) are refused: counted,
never copied.

Everything typed is checked before anything is read or written: both topics must exist
(asked without creating them, ``destination.kafka_topics``), ``--reason`` must be a
dead-letter reason of the catalogue (``destination.reasons``), ``--partition`` and the
offsets at least 0, ``--since`` / ``--until`` real times, ``--since`` before ``--until``.

Kafka connection settings are the worker's (``KAFKA_BOOTSTRAP_SERVERS``, the
``KAFKA_SECURITY_*`` / ``KAFKA_SASL_*`` / ``KAFKA_SSL_*`` variables); ``--bootstrap-servers``
overrides the first. Exit 0 when done, 2 for bad arguments, settings or a topic that is
not there, 1 when Kafka fails.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from destination import reasons
from destination.commands._kafka import kafka_failure, quiet_kafka_logs, started
from destination.kafka_topics import MissingTopicError, topic_partitions
from destination.pipeline.dead_letter import HEADER_PREFIX
from destination.pipeline.dedup import coordinates_id
from destination.pipeline.suppress import SuppressionLog, Suppressions

REPLAY_HEADER = "gist-replay"
REPLAY_OF_HEADER = "gist-replay-of"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", required=True, metavar="DLQ_TOPIC")
    parser.add_argument("--to", dest="target", required=True, metavar="TOPIC")
    parser.add_argument(
        "--reason", action="append", default=[], metavar="R",
        help="only dead letters with this gist-dlq-reason (repeatable; one of "
        + ", ".join(reasons.DEAD_LETTER) + ")",
    )  # fmt: skip
    parser.add_argument("--since", metavar="T", help="dead-lettered at or after T")
    parser.add_argument("--until", metavar="T", help="dead-lettered before T")
    parser.add_argument("--partition", type=int, metavar="P", help="source partition")
    parser.add_argument("--offsets", metavar="A-B", help="source offsets A to B (inclusive)")
    parser.add_argument("--dry-run", action="store_true", help="count by reason, write nothing")
    parser.add_argument("--bootstrap-servers", metavar="B", help="overrides the setting")


@dataclass
class Filter:
    reasons: frozenset[str] = frozenset()
    since: float | None = None
    until: float | None = None
    partition: int | None = None
    offsets: tuple[int, int] | None = None

    def keeps(self, why: dict[str, str]) -> bool:
        if self.reasons and why.get("reason") not in self.reasons:
            return False
        if self.since is not None or self.until is not None:
            when = _number(why.get("time"))
            if when is None:
                return False
            if self.since is not None and when < self.since:
                return False
            if self.until is not None and when >= self.until:
                return False
        if self.partition is not None and _number(why.get("source-partition")) != self.partition:
            return False
        if self.offsets is not None:
            offset = _number(why.get("source-offset"))
            if offset is None or not self.offsets[0] <= offset <= self.offsets[1]:
                return False
        return True


@dataclass
class Summary:
    read: int = 0
    copied: Counter[str] = field(default_factory=Counter)
    filtered: int = 0
    without_value: Counter[str] = field(default_factory=Counter)
    suppressed: int = 0

    def lines(self, dry_run: bool) -> list[str]:
        verb = "would copy" if dry_run else "copied"
        total = sum(self.copied.values())
        out = [f"read {self.read} dead letters; {verb} {total}"]
        for reason, count in self.copied.most_common():
            out.append(f"  {count:>8}  {reason}")
        if self.filtered:
            out.append(f"left by the filters: {self.filtered}")
        if self.without_value:
            kinds = ", ".join(f"{n} {why}" for why, n in self.without_value.most_common())
            out.append(f"cannot be replayed (written without their value): {kinds}")
        if self.suppressed:
            out.append(
                f"refused: {self.suppressed} about people deleted within SUPPRESS_DELETED_DAYS"
            )
        return out


def parse_time(text: str) -> float:
    """ISO 8601 (no zone: UTC) or epoch seconds; ``ValueError`` for anything else, ``nan``
    and ``inf`` included (they compare false with every time, so a filter on them would
    keep everything or nothing)."""
    try:
        seconds = float(text)
    except ValueError:
        parsed = datetime.fromisoformat(text)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.timestamp()
    if not math.isfinite(seconds):
        raise ValueError(f"not a time: {text!r}")
    return seconds


def parse_filter(args: argparse.Namespace) -> Filter:
    """The filter the arguments ask for; ``ValueError`` naming a bad one."""
    for reason in args.reason:
        if reason not in reasons.DEAD_LETTER:
            close = difflib.get_close_matches(reason, reasons.DEAD_LETTER, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"--reason: {reason!r} is not a dead-letter reason{hint}; one of: "
                f"{', '.join(reasons.DEAD_LETTER)}"
            )
    if args.partition is not None and args.partition < 0:
        raise ValueError(f"--partition must be 0 or more, got {args.partition}")
    offsets = None
    if args.offsets is not None:
        if args.partition is None:
            raise ValueError("--offsets needs --partition")
        first, sep, last = args.offsets.partition("-")
        if not sep or not first.isdigit() or not last.isdigit() or int(first) > int(last):
            raise ValueError(f"--offsets must be A-B with 0 <= A <= B, got {args.offsets!r}")
        offsets = (int(first), int(last))
    times: dict[str, float | None] = {}
    for option, text in (("--since", args.since), ("--until", args.until)):
        try:
            times[option] = None if text is None else parse_time(text)
        except ValueError:
            raise ValueError(
                f"{option} must be ISO 8601 or epoch seconds, got {text!r}"
            ) from None
    since, until = times["--since"], times["--until"]
    if since is not None and until is not None and since >= until:
        raise ValueError(f"--since ({args.since}) must be before --until ({args.until})")
    return Filter(frozenset(args.reason), since, until, args.partition, offsets)


def run(args: argparse.Namespace) -> int:
    from destination.settings import SettingsError, load_settings

    try:
        wanted = parse_filter(args)
        if args.source == args.target:
            raise ValueError("--from and --to name the same topic")
        overrides: dict[str, Any] = {
            "kafka_topics": args.target,
            "kafka_dlq_topic": args.source,
            "gist_api_key": "not-used-by-replay",
        }
        if args.bootstrap_servers:
            overrides["kafka_bootstrap_servers"] = args.bootstrap_servers
        settings = load_settings(**overrides)
    except (ValueError, SettingsError) as error:
        print(f"gist-destination replay: {error}", file=sys.stderr)
        return 2
    from destination.kafka_security import kafka_security

    quiet_kafka_logs()
    suppressions = (
        (settings.kafka_suppression_topic, Suppressions(settings.suppress_deleted_days))
        if settings.suppress_deleted_days > 0
        else None
    )
    try:
        summary = asyncio.run(
            replay(
                settings.kafka_bootstrap_servers,
                kafka_security(settings),
                args.source,
                args.target,
                wanted,
                args.dry_run,
                suppressions=suppressions,
            )
        )
    except MissingTopicError as error:
        print(f"gist-destination replay: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # Kafka's errors: say which, no traceback
        print(kafka_failure("replay", settings.kafka_bootstrap_servers, error), file=sys.stderr)
        return 1
    for line in summary.lines(args.dry_run):
        print(line)
    return 0


async def replay(
    bootstrap: str,
    security: dict[str, Any],
    source: str,
    target: str,
    wanted: Filter,
    dry_run: bool,
    progress: Any = None,
    suppressions: tuple[str, Suppressions] | None = None,
) -> Summary:
    """Copy the dead letters of ``source`` that ``wanted`` keeps to ``target``, but those
    about people deleted within the suppression period (``suppressions``: the topic and
    the store to load it into)."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    progress = progress if progress is not None else sys.stderr.isatty()
    summary = Summary()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=20, **security
    )
    reader = {"group_id": None, "enable_auto_commit": False, "auto_offset_reset": "earliest"}
    # The consumer is made once the producer is up: one made and never started warns.
    async with (
        started(producer),
        started(AIOKafkaConsumer(bootstrap_servers=bootstrap, **reader, **security)) as consumer,
    ):
        # Before anything names a topic to Kafka: naming a missing one may create it.
        named = {source: "--from", target: "--to"}
        if suppressions is not None:
            named[suppressions[0]] = "KAFKA_SUPPRESSION_TOPIC"
        await topic_partitions(producer.client, named)
        refused: Suppressions | None = None
        if suppressions is not None:
            topic, refused = suppressions
            await SuppressionLog(
                refused,
                topic,
                producer,
                lambda: AIOKafkaConsumer(bootstrap_servers=bootstrap, **reader, **security),
            ).load()
        partitions = await producer.partitions_for(source)
        tps = [TopicPartition(source, p) for p in sorted(partitions)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        pending = []
        began = time.monotonic()
        idle = 0
        while True:
            done = [await consumer.position(tp) >= ends[tp] for tp in tps]
            if all(done) and idle >= 1:
                break
            batch = await consumer.getmany(timeout_ms=1000, max_records=500)
            if not batch:
                idle += 1
                if idle >= 3 and all(done):
                    break
                if idle >= 10:  # the end offsets the broker reported were too high
                    break
                continue
            idle = 0
            for records in batch.values():
                for record in records:
                    summary.read += 1
                    pending += _copy(
                        record, source, target, wanted, summary, dry_run, producer, refused
                    )
            if len(pending) >= 500:
                await asyncio.gather(*pending)
                pending = []
            if progress:
                rate = summary.read / max(0.001, time.monotonic() - began)
                print(
                    f"\rread {summary.read}, copying {sum(summary.copied.values())} "
                    f"({rate:,.0f}/s)",
                    end="",
                    file=sys.stderr,
                )
        if pending:
            await asyncio.gather(*pending)
        if progress:
            print(file=sys.stderr)
    return summary


def _copy(
    record: Any,
    source: str,
    target: str,
    wanted: Filter,
    summary: Summary,
    dry_run: bool,
    producer: Any,
    refused: Suppressions | None = None,
) -> list[Any]:
    """The sends for one dead letter (none when filtered out, not replayable, or about a
    deleted person)."""
    headers = [(k, bytes(v)) for k, v in (record.headers or ())]
    why = {
        k[len(HEADER_PREFIX) :]: v.decode(errors="replace")
        for k, v in headers
        if k.startswith(HEADER_PREFIX)
    }
    reason = why.get("reason", "unknown")
    if not wanted.keeps(why):
        summary.filtered += 1
        return []
    omitted = why.get("value-omitted")
    if omitted is not None:
        summary.without_value[omitted] += 1
        return []
    if refused is not None and refused.suppressed(message_identities(record.value)):
        summary.suppressed += 1
        return []
    summary.copied[reason] += 1
    if dry_run:
        return []
    kept = [(k, v) for k, v in headers if not k.startswith(HEADER_PREFIX)]
    kept.append((REPLAY_HEADER, datetime.now(UTC).isoformat().encode()))
    kept.append((REPLAY_OF_HEADER, f"{source}:{record.partition}:{record.offset}".encode()))
    value = with_message_id(record.value, why)
    return [
        asyncio.ensure_future(
            producer.send_and_wait(target, value=value, key=record.key, headers=kept)
        )
    ]


def message_identities(value: bytes | None) -> list[str]:
    """The Gist identities a dead letter's message names (``u:<userId>``, ``e:<email>``
    from its traits, context traits and properties), as the shipped rules read them."""
    try:
        body = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return []
    if not isinstance(body, dict):
        return []
    out = []
    user_id = body.get("userId")
    if isinstance(user_id, str | int) and not isinstance(user_id, bool):
        out.append(f"u:{user_id}")
    context = body.get("context")
    context_traits = context.get("traits") if isinstance(context, dict) else None
    for holder in (body.get("traits"), context_traits, body.get("properties")):
        email = holder.get("email") if isinstance(holder, dict) else None
        if isinstance(email, str) and email.strip():
            out.append(f"e:{email.strip().lower()}")
    return out


def with_message_id(value: bytes | None, why: dict[str, str]) -> bytes | None:
    """The dead letter's message with the ``messageId`` the worker gave it when it had
    none (``coordinates_id``), so that replaying it twice sends it once; any other value
    as it is."""
    if not value:
        return value
    try:
        body = orjson.loads(value)
    except orjson.JSONDecodeError:
        return value
    if not isinstance(body, dict) or "type" not in body or body.get("messageId") is not None:
        return value  # not one message (an envelope, not JSON of one), or it has its id
    try:
        topic = why["source-topic"]
        partition = int(why["source-partition"])
        offset = int(why["source-offset"])
        index = int(why["envelope-index"]) if "envelope-index" in why else None
    except (KeyError, ValueError):
        return value
    body["messageId"] = coordinates_id(topic, partition, offset, index)
    return orjson.dumps(body)


def _number(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(float(text))
    except ValueError:
        return None
