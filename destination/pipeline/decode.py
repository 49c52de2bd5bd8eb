"""A Kafka record's value to the Segment messages inside it.

A value is one message as JSON, or a ``{"batch": [message, ...]}`` envelope as
Segment's HTTP API and many collectors send. What is not JSON is a ``DecodeError``.
"""

from __future__ import annotations

from typing import Any

import orjson

from destination import reasons


class DecodeError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def decode_record(value: bytes | None) -> tuple[list[Any], bool]:
    """The messages in a record value, and whether they came in an envelope."""
    if not value or value.isspace():  # (isspace, unlike strip, copies nothing)
        raise DecodeError(reasons.EMPTY_VALUE, "the record has no value")
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(reasons.INVALID_JSON, f"the value is not JSON: {exc.msg}") from None
    if isinstance(parsed, dict) and "type" not in parsed and isinstance(parsed.get("batch"), list):
        return parsed["batch"], True
    return [parsed], False
