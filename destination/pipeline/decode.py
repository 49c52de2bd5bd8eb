"""A Kafka record's value to the Segment messages inside it.

A value is one message as JSON, or a ``{"batch": [message, ...]}`` envelope as
Segment's HTTP API and many collectors send. What is not JSON is a ``DecodeError``.

An envelope's own ``integrations`` and ``context`` apply to each of its messages, as in
Segment's batch API: merged key by key under the message's own (the message's value
wins), so ``{"batch": [...], "integrations": {"Gist": false}}`` switches Gist off for
every message in it.
"""

from __future__ import annotations

from typing import Any

import orjson

from destination import reasons

DECODED_PER_TOKEN = 80
"""Bytes a decoded JSON value takes per element or key (a dict entry, a list slot, a
small object), measured on the worst case: ``{"batch":[{},{},...]}`` decodes to about 72
bytes a ``{}``, 24 times its size."""

_SHARED = ("integrations", "context")
"""Envelope fields that apply to every message of the envelope."""


class DecodeError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def decoded_size(value: bytes | None) -> int:
    """About how many bytes ``value`` takes once decoded and held (an upper estimate, made
    without decoding it): an envelope, whose messages are held decoded while in flight,
    its bytes plus ``DECODED_PER_TOKEN`` for each element and key; one message (decoded
    only while it is mapped), its bytes."""
    if not value:
        return 0
    if b'"batch"' not in value:
        return len(value)
    return len(value) + DECODED_PER_TOKEN * (value.count(b",") + value.count(b":") + 1)


def decode_record(value: bytes | None) -> tuple[list[Any], bool]:
    """The messages in a record value, and whether they came in an envelope."""
    if not value or value.isspace():  # (isspace, unlike strip, copies nothing)
        raise DecodeError(reasons.EMPTY_VALUE, "the record has no value")
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(reasons.INVALID_JSON, f"the value is not JSON: {exc.msg}") from None
    if isinstance(parsed, dict) and "type" not in parsed and isinstance(parsed.get("batch"), list):
        messages: list[Any] = parsed["batch"]
        shared = {k: v for k in _SHARED if isinstance(v := parsed.get(k), dict) and v}
        if shared:
            messages = [_with_shared(m, shared) for m in messages]
        return messages, True
    return [parsed], False


def _with_shared(message: Any, shared: dict[str, dict[str, Any]]) -> Any:
    if not isinstance(message, dict):
        return message
    merged = dict(message)
    for key, envelope_value in shared.items():
        own = message.get(key)
        merged[key] = {**envelope_value, **own} if isinstance(own, dict) else envelope_value
    return merged
