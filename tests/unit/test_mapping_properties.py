"""Whatever arrives, the mapper answers: it maps or rejects, never raises, and what it
maps is something Gist can take (flat, JSON-serialisable, identified by a non-blank
string, times and integers in range)."""

from __future__ import annotations

import json
import textwrap
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from destination.mapping import SKIP_REASONS, Mapper, Rules, parse_rules
from destination.mapping._schema import CONTACT_FIELDS
from destination.operations import (
    ContactAlias,
    ContactDelete,
    ContactUpsert,
    EventTrack,
    Mapped,
    Rejected,
    Skipped,
    TagChange,
)
from destination.reasons import REJECT

MESSAGE_TYPES = ("identify", "track", "page", "screen", "group", "alias", "delete")

EVERYTHING_ON = textwrap.dedent(
    """
    invalid_fields: drop
    identity: {user_id: [userId, traits.id], email: [traits.email, context.traits.email]}
    values: {keys: lower_case, dates: keep, lists: join, list_objects: json, nulls: drop,
             event_names: lower_case}
    identify:
      traits: {exclude: ["re:pass.*"], rename: {plan: subscription_plan, a.b: ab}}
    engage: {send_events: true}
    track:
      events: {exclude: ["Debug*"], rename: {Order Completed: Purchase}}
      properties: {include: ["*"], exclude: [secret]}
    tags:
      traits:
        - {tag: "plan-{traits.plan}"}
        - {untag: trial, when: {traits.plan: [pro, 1, true, null]}}
      events:
        - {event: "*", tag: "seen-{event}"}
        - {event: "re:.*", untag: x, when: {properties.a: 1}}
    page: {enabled: true}
    screen: {enabled: true, event: "{name}"}
    group: {enabled: true, prefix: ""}
    """
)

MAPPERS = {"default": Mapper(Rules()), "everything-on": Mapper(parse_rules(EVERYTHING_ON))}

INT64 = (-(2**63), 2**63 - 1)
TIME_END = 253402300800  # 10000-01-01T00:00:00Z

# Values at the edges: beyond 64 bits (orjson reads an integer beyond 2**64 as a float),
# 1e300, times in every accepted form and out of range.
edge_numbers = st.sampled_from(
    [2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**64 + 1, -(2**63) - 1, 2**200, 1e300, -1e300,
     float(2**64 + 1), 1e11, 253402300800000, -1, 0]
)  # fmt: skip
edge_texts = st.sampled_from(
    ["", " ", "x" * 300, "1700000000", "1700000000000", "0001-01-01T00:00:00Z",
     "9999-12-31T23:59:59Z", "Wed, 01 Nov 2026 12:00:00 GMT", "a@b", "a@x.io", "$$",
     "\x00", "é@ü.de"]
)  # fmt: skip
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | edge_numbers
    | edge_texts
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
odd_names = [
    "email", "Email", "plan", "name", "NAME", "firstName", "createdAt", "tags", "a", "id",
    "user_id", "userId", "Plan Type", "plan_type", "planType", "$$", "", "custom properties",
    "a.b", "a_b", "created_at", "signed_up_at",
]  # fmt: skip
names = st.sampled_from(odd_names) | st.sampled_from(sorted(CONTACT_FIELDS)) | st.text(max_size=8)


def _nested(depth: int) -> Any:
    value: Any = 1
    for level in range(depth):
        value = {"d": value} if level % 2 else [value]
    return value


deep = st.integers(min_value=0, max_value=300).map(_nested)
objects = st.dictionaries(names, json_values | deep, max_size=6)
dates = (
    st.sampled_from(["2026-11-01T12:00:00.000Z", "2024-03-01", "2024-13-45", "x"])
    | edge_numbers
    | edge_texts
)
ids = (
    st.sampled_from(["u-1", "", "  ", 42, 4.5, 42.0, True, 2**64 + 1, float(2**64 + 1)])
    | json_values
)
emails = st.sampled_from(["ada@example.com", " A@X.IO ", "nope", ""]) | json_values
personas = st.fixed_dictionaries(
    {},
    optional={
        "computation_class": st.sampled_from(["audience", "trait", None]) | json_values,
        "computation_key": st.sampled_from(["plan", "a", "audience_x"]) | json_values,
    },
)
contexts = st.fixed_dictionaries(
    {},
    optional={
        "ip": st.sampled_from(["203.0.113.7"]) | json_values,
        "userAgent": json_values,
        "active": json_values,
        "traits": st.fixed_dictionaries({}, optional={"email": emails}) | json_values,
        "personas": personas | json_values,
    },
)
audience_properties = st.fixed_dictionaries(
    {"audience_key": st.sampled_from(["vip", "", "$$", "Email", "User ID"]) | json_values},
    optional={"vip": json_values, "email": emails},
)
messages = st.fixed_dictionaries(
    {
        "type": st.sampled_from(MESSAGE_TYPES)
        | st.sampled_from(MESSAGE_TYPES).map(str.title)
        | json_values
    },
    optional={
        "messageId": json_values,
        "userId": ids,
        "previousId": ids,
        "groupId": ids,
        "anonymousId": json_values,
        "event": st.sampled_from(["Order Completed", "Audience Entered", "Audience Exited", " "])
        | json_values,
        "name": json_values,
        "traits": st.fixed_dictionaries({}, optional={"email": emails, "createdAt": dates}).map(
            dict
        )
        | objects
        | json_values,
        "properties": objects | audience_properties | json_values,
        "context": contexts | json_values,
        "integrations": st.dictionaries(st.sampled_from(["All", "Gist"]), json_values)
        | json_values,
        "timestamp": dates | json_values,
        "originalTimestamp": dates,
        "sentAt": json_values,
    },
)


def _check_value(value: Any) -> None:
    if isinstance(value, int) and not isinstance(value, bool):
        assert INT64[0] <= value <= INT64[1], value


def _check_flat(properties: dict[str, Any], *, custom: bool) -> None:
    for key, value in properties.items():
        assert isinstance(key, str), key
        assert key, key
        assert not any(c in ".$" or c.isspace() for c in key), key
        assert not (custom and key in CONTACT_FIELDS), key
        assert not isinstance(value, dict), (key, value)
        if isinstance(value, list):
            assert not any(isinstance(item, dict | list) for item in value), (key, value)
            for item in value:
                _check_value(item)
        else:
            _check_value(value)


def _check_time(seconds: object) -> None:
    assert seconds is None or 0 <= seconds < TIME_END, seconds  # type: ignore[operator]


def _check(result: object, message: object) -> None:
    assert isinstance(result, Mapped | Skipped | Rejected)
    kind = message.get("type") if isinstance(message, dict) else None
    # The reported type is one of the spec's (it is a metric label), else "unknown".
    spec_type = kind.strip().lower() if isinstance(kind, str) else None
    assert result.message_type == (spec_type if spec_type in MESSAGE_TYPES else "unknown")
    if isinstance(result, Rejected):
        assert result.reason in REJECT
        assert result.reason != "mapping_error", result.detail
        assert result.detail
        return
    if isinstance(result, Skipped):
        assert result.reason in SKIP_REASONS
        return
    assert result.operations
    for op in result.operations:
        assert op.identities, op
        for identity in op.identities:
            assert isinstance(identity, str)
            assert identity[2:].strip(), op
        _check_time(op.timestamp)
        if isinstance(op, ContactUpsert):
            orjson.dumps(op.contact)
            _check_flat(op.contact.get("custom_properties", {}), custom=True)
            assert "@" in op.contact.get("email", "@")
            assert len(op.contact.get("email", "")) <= 254
            assert len(op.contact.get("user_id", "")) <= 255
            _check_time(op.contact.get("signed_up_at"))
        elif isinstance(op, EventTrack):
            orjson.dumps(op.event)
            assert op.event["event_name"].strip()
            assert not {".", "$"} & set(op.event["event_name"])
            _check_flat(op.event.get("properties", {}), custom=False)
            _check_time(op.event.get("occurred_at"))
        elif isinstance(op, TagChange):
            assert op.tag.strip()
            orjson.dumps([op.tag, op.user_id, op.email, op.untag])
        else:
            assert isinstance(op, ContactAlias | ContactDelete)
            orjson.dumps(op.identities)


@pytest.mark.parametrize("name", MAPPERS)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(message=json_values)
def test_any_json_value_maps_or_is_rejected(name: str, message: Any) -> None:
    _check(MAPPERS[name].map(message), message)


@pytest.mark.parametrize("name", MAPPERS)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(message=messages)
def test_any_message_shaped_object_maps_or_is_rejected(name: str, message: dict[str, Any]) -> None:
    mapper = MAPPERS[name]
    result = mapper.map(message)
    _check(result, message)
    assert mapper.map(message) == result  # the caches change nothing


@settings(max_examples=200)
@given(message=messages)
def test_parsed_json_maps_like_the_object(message: dict[str, Any]) -> None:
    mapper = MAPPERS["default"]
    try:
        data = orjson.dumps(message)
    except orjson.JSONEncodeError:  # an integer beyond 64 bits
        return
    assert mapper.map(orjson.loads(data)) == mapper.map(message)


@pytest.mark.parametrize("name", MAPPERS)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(message=messages)
def test_what_orjson_parses_maps_to_what_orjson_serialises(
    name: str, message: dict[str, Any]
) -> None:
    # Written by a JSON encoder without orjson's 64-bit limit, so integers beyond it
    # reach the mapper as orjson reads them (floats).
    try:
        data = json.dumps(message)
    except RecursionError:
        return
    _check(MAPPERS[name].map(orjson.loads(data)), message)


class Weird:
    """Not JSON at all: a Python caller's object."""


@pytest.mark.parametrize(
    "message",
    [
        Weird(),
        {"type": "identify", "userId": "u", "traits": {1: "int key", ("t",): 2, "w": Weird()}},
        {"type": "track", "userId": "u", "event": "E", "properties": {"t": (1, 2), "s": {3}}},
        {"type": "identify", "userId": "u", "traits": {"x": float("nan"), "y": float("inf")}},
        {"type": "identify", "userId": float("inf")},
        {"type": "identify", "userId": float("nan")},
        {"type": "track", "userId": "u", "event": "E", "timestamp": float("nan")},
    ],
)
def test_non_json_python_objects_never_raise(message: object) -> None:
    for mapper in MAPPERS.values():
        result = mapper.map(message)
        assert isinstance(result, Mapped | Skipped | Rejected)
        assert not isinstance(result, Rejected) or result.reason != "mapping_error", result
