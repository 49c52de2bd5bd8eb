"""Which lane each operation takes at Gist's rate limit: the rules' ``priorities`` section
(types, track events by name, Engage audiences) as the mapper applies it, and the
operations' own defaults."""

from __future__ import annotations

import textwrap
from functools import cache
from typing import Any

import pytest

from destination.gist import Priority
from destination.mapping import Mapper, Rules, load_rules, parse_rules
from destination.operations import (
    ContactAlias,
    ContactDelete,
    ContactUpsert,
    EventTrack,
    Mapped,
    Operation,
    TagChange,
)

HIGH, NORMAL, LOW = Priority.HIGH, Priority.NORMAL, Priority.LOW


@cache
def mapper(rules_yaml: str = "") -> Mapper:
    return Mapper(parse_rules(textwrap.dedent(rules_yaml), "test-rules.yaml"))


def operations(message: dict[str, Any], rules_yaml: str = "") -> tuple[Operation, ...]:
    result = mapper(rules_yaml).map(message)
    assert isinstance(result, Mapped), result
    return result.operations


def priorities(message: dict[str, Any], rules_yaml: str = "") -> list[tuple[str, Priority]]:
    return [(type(op).__name__, op.priority) for op in operations(message, rules_yaml)]


def track(name: str, **fields: Any) -> dict[str, Any]:
    return {"type": "track", "userId": "u-1", "event": name, **fields}


AUDIENCE = {"computation_class": "audience", "computation_key": "big_spenders"}
TRAIT = {"computation_class": "trait", "computation_key": "lifetime_value"}
ALL_TYPES_ON = "{page: {enabled: true}, screen: {enabled: true}, group: {enabled: true}}"


# The defaults ---------------------------------------------------------------------------


def test_the_shipped_rules_spell_out_the_default_priorities() -> None:
    shipped = load_rules(None).priorities
    assert shipped == Rules().priorities
    assert shipped.types.model_dump() == {
        "identify": "high",
        "track": "normal",
        "page": "low",
        "screen": "low",
        "group": "normal",
        "alias": "normal",
        "delete": "high",
    }
    assert shipped.events == {}
    assert shipped.audiences == "high"


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            {"type": "identify", "userId": "u-1", "traits": {"plan": "pro"}},
            [("ContactUpsert", HIGH)],
        ),
        (track("Order Completed"), [("EventTrack", NORMAL)]),
        ({"type": "page", "userId": "u-1", "name": "Home"}, [("EventTrack", LOW)]),
        ({"type": "screen", "userId": "u-1", "name": "Home"}, [("EventTrack", LOW)]),
        (
            {"type": "group", "userId": "u-1", "groupId": "g", "traits": {"name": "Acme"}},
            [("ContactUpsert", NORMAL)],
        ),
        ({"type": "alias", "previousId": "a", "userId": "b"}, [("ContactAlias", NORMAL)]),
        ({"type": "delete", "userId": "u-1"}, [("ContactDelete", HIGH)]),
        ({"type": "DELETE", "userId": "u-1"}, [("ContactDelete", HIGH)]),
    ],
    ids=["identify", "track", "page", "screen", "group", "alias", "delete", "DELETE"],
)
def test_each_type_takes_its_default_priority(
    message: dict[str, Any], expected: list[tuple[str, Priority]]
) -> None:
    assert priorities(message, ALL_TYPES_ON) == expected


def test_a_type_priority_can_be_changed() -> None:
    rules = "{priorities: {types: {identify: low, track: high, delete: normal}}}"
    assert priorities({"type": "identify", "userId": "u-1"}, rules) == [("ContactUpsert", LOW)]
    assert priorities(track("X"), rules) == [("EventTrack", HIGH)]
    assert priorities({"type": "delete", "userId": "u-1"}, rules) == [("ContactDelete", NORMAL)]


def test_an_identifys_tag_changes_take_its_priority() -> None:
    rules = """
    tags: {traits: [{untag: trial, when: {traits.plan: pro}}]}
    priorities: {types: {identify: low}}
    """
    message = {"type": "identify", "userId": "u-1", "traits": {"plan": "pro"}}
    assert priorities(message) == [("ContactUpsert", HIGH)]
    assert priorities(message, rules) == [("ContactUpsert", LOW), ("TagChange", LOW)]


# Track events by name -------------------------------------------------------------------

EVENT_RULES = """
priorities:
  types: {track: normal}
  events:
    "Order Completed": high
    Heartbeat: low
    "Debug *": low
    "re:(checkout|cart)-.*": high
"""


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Order Completed", HIGH),
        ("order completed", HIGH),  # compared case-insensitively, as track.events does
        ("  Order Completed ", HIGH),  # trimmed, as Gist stores it
        ("Heartbeat", LOW),
        ("Debug ping", LOW),  # a glob
        ("checkout-started", HIGH),  # a regular expression, matched in full
        ("Cart.Viewed", HIGH),  # "." compares as "-" (the way Gist stores names)
        ("Order Completed Twice", NORMAL),  # a name matches in full, not as a prefix
        ("Signed Up", NORMAL),  # no rule: the type's
    ],
)
def test_event_rules_match_names_the_way_track_rules_do(name: str, expected: Priority) -> None:
    assert priorities(track(name), EVENT_RULES) == [("EventTrack", expected)]


def test_the_first_matching_event_rule_wins_in_file_order() -> None:
    rules = """
    priorities:
      events:
        "Order*": low
        "Order Completed": high
    """
    assert priorities(track("Order Completed"), rules) == [("EventTrack", LOW)]


def test_event_rules_win_over_the_track_type() -> None:
    rules = "{priorities: {types: {track: low}, events: {Signed Up: high, Noise: normal}}}"
    assert priorities(track("Signed Up"), rules) == [("EventTrack", HIGH)]
    assert priorities(track("Noise"), rules) == [("EventTrack", NORMAL)]
    assert priorities(track("Anything else"), rules) == [("EventTrack", LOW)]


def test_an_event_rule_matches_the_name_as_sent_not_as_renamed() -> None:
    rules = """
    track: {events: {rename: {Order Completed: Purchase}}}
    priorities: {events: {Order Completed: high, Purchase: low}}
    """
    (op,) = operations(track("Order Completed"), rules)
    assert isinstance(op, EventTrack)
    assert (op.event["event_name"], op.priority) == ("Purchase", HIGH)


def test_a_tracks_tag_changes_take_its_priority_even_when_the_event_is_excluded() -> None:
    rules = """
    track: {events: {exclude: Subscription Cancelled}}
    tags: {events: [{event: Subscription Cancelled, untag: subscriber}]}
    priorities: {events: {Subscription Cancelled: high}}
    """
    (op,) = operations(track("Subscription Cancelled"), rules)
    assert op == TagChange("subscriber", "u-1", None, True, priority=HIGH)


def test_event_rules_do_not_apply_to_page_and_screen() -> None:
    rules = "{page: {enabled: true}, priorities: {events: {Viewed Home Page: high}}}"
    assert priorities({"type": "page", "userId": "u-1", "name": "Home"}, rules) == [
        ("EventTrack", LOW)
    ]


# Engage ---------------------------------------------------------------------------------


def audience_identify(**context: Any) -> dict[str, Any]:
    return {
        "type": "identify",
        "userId": "u-1",
        "traits": {"big_spenders": True, "lifetime_value": 10},
        "context": {"personas": AUDIENCE, **context},
    }


def audience_track(event: str = "Audience Entered") -> dict[str, Any]:
    return {
        "type": "track",
        "userId": "u-1",
        "event": event,
        "properties": {"audience_key": "big_spenders", "big_spenders": True},
        "context": {"personas": AUDIENCE},
    }


def test_audience_updates_take_the_audiences_priority_whatever_their_type_says() -> None:
    low_types = "{priorities: {types: {identify: low, track: low}}}"
    assert priorities(audience_identify(), low_types) == [("ContactUpsert", HIGH)]
    assert priorities(audience_track(), low_types) == [("ContactUpsert", HIGH)]
    assert priorities(audience_track("Audience Exited"), low_types) == [("ContactUpsert", HIGH)]
    low_audiences = "{priorities: {audiences: low}}"
    assert priorities(audience_identify(), low_audiences) == [("ContactUpsert", LOW)]
    assert priorities(audience_track(), low_audiences) == [("ContactUpsert", LOW)]


def test_an_audience_event_also_sent_keeps_the_tracks_priority() -> None:
    rules = "{engage: {send_events: true}, priorities: {events: {Audience Entered: low}}}"
    assert priorities(audience_track(), rules) == [("ContactUpsert", HIGH), ("EventTrack", LOW)]


def test_computed_traits_are_not_audiences_they_take_their_messages_priority() -> None:
    rules = "{priorities: {types: {identify: low, track: normal}}}"
    computed_identify = {
        "type": "identify",
        "userId": "u-1",
        "traits": {"lifetime_value": 10},
        "context": {"personas": TRAIT},
    }
    assert priorities(computed_identify, rules) == [("ContactUpsert", LOW)]
    computed_track = {
        "type": "track",
        "userId": "u-1",
        "event": "Trait Computed",
        "properties": {"lifetime_value": 10},
        "context": {"personas": TRAIT},
    }
    assert priorities(computed_track, rules) == [("ContactUpsert", NORMAL)]


def test_with_audiences_off_an_audience_identify_is_a_plain_identify() -> None:
    rules = "{engage: {audiences: false}, priorities: {types: {identify: low}}}"
    assert priorities(audience_identify(), rules) == [("ContactUpsert", LOW)]


# The operations' own defaults -------------------------------------------------------------


def test_operations_default_to_normal_and_contact_upserts_to_high() -> None:
    assert ContactUpsert({"user_id": "u"}).priority is HIGH
    assert EventTrack({"event_name": "X"}).priority is NORMAL
    assert ContactDelete("u").priority is NORMAL
    assert ContactAlias("a", "b").priority is NORMAL
    assert TagChange("t", "u").priority is NORMAL


def test_priority_is_the_last_field_so_positional_construction_keeps_working() -> None:
    upsert = ContactUpsert({"user_id": "u"}, "m-1", 1.0)
    assert (upsert.message_id, upsert.timestamp, upsert.priority) == ("m-1", 1.0, HIGH)
    tag = TagChange("t", "u", None, True, "m-1", 1.0, LOW)
    assert (tag.untag, tag.message_id, tag.timestamp, tag.priority) == (True, "m-1", 1.0, LOW)
    alias = ContactAlias("a", "b", "m-1", 2.0, HIGH)
    assert (alias.timestamp, alias.priority) == (2.0, HIGH)
    assert max(upsert.priority, tag.priority, alias.priority) is HIGH
