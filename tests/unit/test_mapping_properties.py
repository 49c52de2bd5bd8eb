"""Whatever arrives, the mapper answers: it maps or rejects, never raises, and what it
maps is something Gist can take (flat, JSON-serialisable, identified)."""

from __future__ import annotations

import textwrap
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from destination.mapping import REJECT_REASONS, SKIP_REASONS, Mapper, Rules, parse_rules
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

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
names = st.sampled_from(
    ["email", "plan", "name", "firstName", "createdAt", "tags", "a", "id"]
) | st.text(max_size=8)
objects = st.dictionaries(names, json_values, max_size=6)
dates = st.sampled_from(["2026-11-01T12:00:00.000Z", "2024-03-01", "2024-13-45", "x"])
ids = st.sampled_from(["u-1", "", 42, 4.5, True]) | json_values
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
        "properties": objects | json_values,
        "context": contexts | json_values,
        "integrations": st.dictionaries(st.sampled_from(["All", "Gist"]), json_values)
        | json_values,
        "timestamp": dates | json_values,
        "sentAt": json_values,
    },
)


def _check_flat(properties: dict[str, Any]) -> None:
    for key, value in properties.items():
        assert isinstance(key, str), key
        assert key, key
        assert not any(c in ".$" or c.isspace() for c in key), key
        assert not isinstance(value, dict), (key, value)
        if isinstance(value, list):
            assert not any(isinstance(item, dict | list) for item in value), (key, value)


def _check(result: object, message: object) -> None:
    assert isinstance(result, Mapped | Skipped | Rejected)
    kind = message.get("type") if isinstance(message, dict) else None
    # The reported type is one of the spec's (it is a metric label), else "unknown".
    spec_type = kind.strip().lower() if isinstance(kind, str) else None
    assert result.message_type == (spec_type if spec_type in MESSAGE_TYPES else "unknown")
    if isinstance(result, Rejected):
        assert result.reason in REJECT_REASONS
        assert result.reason != "mapping_error", result.detail
        return
    if isinstance(result, Skipped):
        assert result.reason in SKIP_REASONS
        return
    assert result.operations
    for op in result.operations:
        assert op.identities, op
        for identity in op.identities:
            assert identity[2:], op
        if isinstance(op, ContactUpsert):
            orjson.dumps(op.contact)
            _check_flat(op.contact.get("custom_properties", {}))
            assert "@" in op.contact.get("email", "@")
        elif isinstance(op, EventTrack):
            orjson.dumps(op.event)
            assert op.event["event_name"].strip()
            assert not {".", "$"} & set(op.event["event_name"])
            _check_flat(op.event.get("properties", {}))
        elif isinstance(op, TagChange):
            assert op.tag.strip()
        else:
            assert isinstance(op, ContactAlias | ContactDelete)


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
