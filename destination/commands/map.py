"""``gist-destination map [FILE|-] [--rules PATH]``: what messages become in Gist.

Offline (no Kafka, no Gist): reads record values (JSON lines or one JSON array; each a
Segment message or a ``{"batch": [...]}`` envelope, as a Kafka record holds it) and
prints, for each message, the Gist operations the mapping rules turn it into, or why it
is skipped or rejected (the reason a dead letter would carry), and each field of a sent
message that is left out (``dropped``: the field and why, as ``fields_dropped_total``
counts it). JSON lines, or a table on a terminal. The way to try a rules change on real
messages before deploying it::

    kcat -C -b B -t segment -o -100 -e -f '%s\\n' | gist-destination map - --rules new.yaml

Exit 0 when every record was read (rejections are results, not failures), 2 when the
input or the rules cannot be read. With ``--strict`` (for CI on a rules change), exit 1
when any message was rejected (a record that is not a message counts), after printing
every row and a line on standard error saying how many::

    gist-destination map samples.jsonl --rules new.yaml --strict > /dev/null
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from typing import Any

import orjson

from destination import reasons
from destination.commands._input import record_values
from destination.mapping import FIELD_DROPS, Mapper, RulesError, load_rules
from destination.operations import (
    CommerceWrite,
    ContactAlias,
    ContactDelete,
    ContactUpsert,
    EventTrack,
    Mapped,
    Operation,
    Rejected,
    Skipped,
    SubscriptionChange,
    TagChange,
)
from destination.pipeline.decode import DecodeError, decode_record


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", nargs="?", default="-", metavar="FILE",
        help="record values: JSON lines or a JSON array (default -: standard input)",
    )  # fmt: skip
    parser.add_argument(
        "--rules", metavar="PATH", help="a mapping-rules file (default: the shipped rules)"
    )
    parser.add_argument(
        "--format", choices=("auto", "json", "table"), default="auto",
        help="JSON lines, a table, or a table on a terminal and JSON lines otherwise",
    )  # fmt: skip
    parser.add_argument(
        "--strict", action="store_true",
        help="exit 1 when any message is rejected (for CI on a rules change)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    dropped: list[tuple[str, str]] = []
    try:
        mapper = Mapper(
            load_rules(args.rules),
            on_dropped=lambda _type, field, reason: dropped.append((field, reason)),
        )
    except RulesError as error:
        print(f"gist-destination map: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"gist-destination map: cannot read {args.rules}: {error.strerror}", file=sys.stderr)
        return 2
    table = args.format == "table" or (args.format == "auto" and sys.stdout.isatty())
    tally = _Tally(results(record_values(args.source), mapper, dropped))
    try:
        if table:
            print_table(tally)
        else:
            for row in tally:
                sys.stdout.write(orjson.dumps(row).decode() + "\n")
    except BrokenPipeError:
        raise  # the reader of the output went away: ``cli.main`` ends quietly
    except OSError as error:
        print(f"gist-destination map: cannot read {args.source}: {error.strerror}", file=sys.stderr)
        return 2
    if args.strict and tally.rejected:
        print(
            f"gist-destination map: {tally.rejected} of {tally.rows} message(s) rejected "
            "(--strict)",
            file=sys.stderr,
        )
        return 1
    return 0


class _Tally:
    """The rows of ``results``, counted as they go by."""

    def __init__(self, rows: Iterator[dict[str, Any]]) -> None:
        self._rows = rows
        self.rows = 0
        self.rejected = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for row in self._rows:
            self.rows += 1
            if row["outcome"] == "rejected":
                self.rejected += 1
            yield row


def results(
    values: Iterator[bytes], mapper: Mapper, dropped: list[tuple[str, str]] | None = None
) -> Iterator[dict[str, Any]]:
    """One row per message: record number (1-based), index in its envelope, type,
    outcome (``sent`` / ``skipped`` / ``rejected``), and the operations or the reason;
    for a sent message with fields left out, ``dropped`` (field, reason, detail).
    ``dropped`` is the list ``mapper`` reports left-out fields to (emptied per row)."""
    if dropped is None:
        dropped = []
    for number, value in enumerate(values, start=1):
        try:
            messages, enveloped = decode_record(value)
        except DecodeError as error:
            yield {"record": number, "index": None, "type": "unknown", "outcome": "rejected",
                   "reason": error.reason, "detail": error.detail}  # fmt: skip
            continue
        for index, message in enumerate(messages):
            dropped.clear()
            out = row(number, index if enveloped else None, mapper.map(message))
            if dropped:
                out["dropped"] = [
                    {"field": field, "reason": reason, "detail": FIELD_DROPS[reason]}
                    for field, reason in dropped
                ]
            yield out


def row(number: int, index: int | None, result: Mapped | Skipped | Rejected) -> dict[str, Any]:
    out: dict[str, Any] = {"record": number, "index": index, "type": result.message_type}
    if isinstance(result, Rejected):
        out.update(outcome="rejected", reason=result.reason, detail=result.detail)
    elif isinstance(result, Skipped):
        out.update(outcome="skipped", reason=result.reason, detail=reasons.SKIP[result.reason])
    else:
        out.update(outcome="sent", operations=[operation_json(op) for op in result.operations])
    return out


def operation_json(operation: Operation) -> dict[str, Any]:
    """An operation as the request it becomes."""
    out: dict[str, Any]
    if isinstance(operation, ContactUpsert):
        out = {"operation": "contact_upsert", "request": "POST /contacts/batch",
               "contact": dict(operation.contact)}  # fmt: skip
    elif isinstance(operation, EventTrack):
        out = {"operation": "event", "request": "POST /events", "event": dict(operation.event)}
    elif isinstance(operation, ContactDelete):
        out = {"operation": "contact_delete", "request": "DELETE /contacts",
               "user_id": operation.user_id, "email": operation.email}  # fmt: skip
    elif isinstance(operation, ContactAlias):
        out = {"operation": "contact_alias", "request": "GET /contacts, POST /contacts",
               "previous_id": operation.previous_id, "user_id": operation.user_id}  # fmt: skip
    elif isinstance(operation, SubscriptionChange):
        out = {"operation": "subscribe" if operation.subscribed else "unsubscribe",
               "request": "POST /subscription_types/{id}",
               "subscription_type": operation.subscription_type,
               "user_id": operation.user_id, "email": operation.email}  # fmt: skip
    elif isinstance(operation, CommerceWrite):
        out = _commerce(operation)
    else:
        tag: TagChange = operation
        out = {"operation": "untag" if tag.untag else "tag", "request": "POST /tags",
               "tag": tag.tag, "user_id": tag.user_id, "email": tag.email}  # fmt: skip
    priority = getattr(operation, "priority", None)
    if priority is not None:
        out["priority"] = getattr(priority, "value", str(priority))
    if operation.message_id is not None:
        out["message_id"] = operation.message_id
    return out


def print_table(rows: Iterable[dict[str, Any]]) -> None:
    counts: dict[str, int] = {}
    print(f"{'#':>6}  {'type':<9} {'outcome':<9} what")
    for r in rows:
        where = f"{r['record']}" + (f".{r['index']}" if r["index"] is not None else "")
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        if r["outcome"] == "sent":
            what = "; ".join(_summary(op) for op in r["operations"]) or "(nothing to send)"
            for drop in r.get("dropped", ()):
                counts["field(s) dropped"] = counts.get("field(s) dropped", 0) + 1
                what += f"; dropped {drop['field']} ({drop['reason']})"
        else:
            what = f"{r['reason']}: {r['detail']}"
        print(f"{where:>6}  {r['type']:<9} {r['outcome']:<9} {what}")
    print("\n" + ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())))


def _summary(op: dict[str, Any]) -> str:
    kind = op["operation"]
    if kind == "contact_upsert":
        contact = op["contact"]
        who = contact.get("user_id") or contact.get("email")
        fields = sorted(k for k in contact if k not in ("user_id", "email", "custom_properties"))
        props = sorted(contact.get("custom_properties") or {})
        parts = [f"upsert {who}"]
        if fields:
            parts.append("fields " + ", ".join(fields))
        if props:
            parts.append("properties " + ", ".join(props))
        return " ".join(parts)
    if kind == "event":
        event = op["event"]
        return f"event {event['event_name']!r} for {event.get('user_id') or event.get('email')}"
    if kind in ("tag", "untag"):
        return f"{kind} {op['tag']!r} {op.get('user_id') or op.get('email')}"
    if kind == "contact_delete":
        return "delete " + " and ".join(
            str(op[key]) for key in ("user_id", "email") if op.get(key) is not None
        )
    return f"alias {op.get('previous_id')} -> {op.get('user_id')}"


_COMMERCE_REQUESTS: dict[str, str] = {
    "order": "POST /ecommerce/stores/{id}/orders, DELETE .../customers/{id}/cart",
    "order_update": "PATCH /ecommerce/stores/{id}/orders/{id}",
    "cart": "POST /ecommerce/stores/{id}/customers/{id}/cart",
    "cart_add": "POST /ecommerce/stores/{id}/customers/{id}/cart",
    "cart_remove": "POST /ecommerce/stores/{id}/customers/{id}/cart",
}


def _commerce(write: CommerceWrite) -> dict[str, Any]:
    """An e-commerce write as ``map`` shows it: what it writes; its customer and products
    are created first where the store may not have them."""
    out: dict[str, Any] = {
        "operation": f"ecommerce_{write.action}",
        "request": _COMMERCE_REQUESTS[write.action]
        + " (after the customer and products, where the store may not have them)",
        "customer_id": write.customer_id,
    }
    if write.order_id is not None:
        out["order_id"] = write.order_id
    if write.currency is not None:
        out["currency_code"] = write.currency
    if write.items:
        out["line_items"] = [
            {k: v for k, v in asdict(item).items() if v is not None} for item in write.items
        ]
    out.update(write.fields)
    if write.customer:
        out["customer"] = dict(write.customer)
    return out
