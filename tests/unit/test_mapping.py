"""The mapper, table by table: each row is (rules, message, what Gist must get).

Rules are given as the YAML an operator would write on top of the shipped default
(``""`` is the default itself); messages follow ../shared/segment-messages.md.
"""

from __future__ import annotations

import textwrap
from functools import cache
from typing import Any

import orjson
import pytest

from destination.gist import Priority
from destination.mapping import REJECT_REASONS, SKIP_REASONS, Mapper, load_rules, parse_rules
from destination.operations import (
    ContactAlias,
    ContactDelete,
    ContactUpsert,
    EventTrack,
    Mapped,
    MapResult,
    Operation,
    Rejected,
    Skipped,
    TagChange,
)

TS = "2026-11-01T12:00:00.000Z"
TS_EPOCH = 1793534400.0


@cache
def mapper(rules_yaml: str = "") -> Mapper:
    if not rules_yaml:
        return Mapper(load_rules(None))
    return Mapper(parse_rules(textwrap.dedent(rules_yaml), "test-rules.yaml"))


def run(message: object, rules_yaml: str = "") -> MapResult:
    return mapper(rules_yaml).map(message)


def operations(message: object, rules_yaml: str = "") -> tuple[Operation, ...]:
    result = run(message, rules_yaml)
    assert isinstance(result, Mapped), result
    return result.operations


def contact(message: object, rules_yaml: str = "") -> dict[str, Any]:
    (op,) = operations(message, rules_yaml)
    assert isinstance(op, ContactUpsert), op
    return dict(op.contact)


def event(message: object, rules_yaml: str = "") -> dict[str, Any]:
    (op,) = operations(message, rules_yaml)
    assert isinstance(op, EventTrack), op
    return dict(op.event)


def identify(traits: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    return {"type": "identify", "userId": "u-1", "traits": traits or {}, **fields}


def track(name: Any = "Order Completed", **fields: Any) -> dict[str, Any]:
    return {"type": "track", "userId": "u-1", "event": name, **fields}


# identify ------------------------------------------------------------------------------

SPEC_IDENTIFY = {
    "type": "identify",
    "messageId": "m-1",
    "userId": "u-42",
    "traits": {
        "email": "Ada@Example.com",
        "firstName": "Ada",
        "lastName": "Lovelace",
        "phone": "+44 20 7946 0000",
        "createdAt": "2024-03-01T10:00:00Z",
        "plan": "pro",
        "address": {"city": "London", "country": "UK"},
        "unsubscribed": False,
        "tags": ["beta"],
    },
    "context": {"ip": "203.0.113.7", "userAgent": "Mozilla/5.0 ..."},
    "timestamp": TS,
}


def test_the_spec_identify_becomes_one_contact_upsert() -> None:
    result = run(SPEC_IDENTIFY)
    assert result == Mapped(
        "identify",
        (
            ContactUpsert(
                {
                    "user_id": "u-42",
                    "email": "Ada@Example.com",
                    "name": "Ada Lovelace",
                    "phone": "+44 20 7946 0000",
                    "signed_up_at": 1709287200,
                    "unsubscribed_from_emails": False,
                    "tags": ["beta"],
                    "last_seen_ip": "203.0.113.7",
                    "last_seen_user_agent": "Mozilla/5.0 ...",
                    "custom_properties": {
                        "plan": "pro",
                        "address_city": "London",
                        "address_country": "UK",
                    },
                },
                message_id="m-1",
                timestamp=TS_EPOCH,
            ),
        ),
    )


CONTACT_CASES: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    # (id, rules, message, the contact sent)
    (
        "email only is enough",
        "",
        {"type": "identify", "traits": {"email": " a@x.io "}},
        {"email": "a@x.io"},
    ),
    (
        "email falls back to context.traits.email",
        "",
        {"type": "identify", "userId": "u-1", "context": {"traits": {"email": "c@x.io"}}},
        {"user_id": "u-1", "email": "c@x.io"},
    ),
    (
        "traits.email wins over context.traits.email",
        "",
        identify({"email": "t@x.io"}, context={"traits": {"email": "c@x.io"}}),
        {"user_id": "u-1", "email": "t@x.io"},
    ),
    (
        "an empty email counts as absent",
        "",
        identify({"email": "  "}, context={"traits": {"email": "c@x.io"}}),
        {"user_id": "u-1", "email": "c@x.io"},
    ),
    (
        "a numeric userId becomes its decimal string",
        "",
        {"type": "identify", "userId": 42},
        {"user_id": "42"},
    ),
    (
        "name wins over first and last names, which are not repeated",
        "",
        identify({"name": "Ada L.", "firstName": "Ada", "lastName": "Lovelace"}),
        {"user_id": "u-1", "name": "Ada L."},
    ),
    (
        "first_name and last_name",
        "",
        identify({"first_name": "Ada", "last_name": "Lovelace"}),
        {"user_id": "u-1", "name": "Ada Lovelace"},
    ),
    (
        "a first name alone",
        "",
        identify({"firstName": " Ada "}),
        {"user_id": "u-1", "name": "Ada"},
    ),
    (
        "a null name falls through to the parts",
        "",
        identify({"name": None, "firstName": "Ada"}),
        {"user_id": "u-1", "name": "Ada"},
    ),
    (
        "a null name clears it (nulls: keep)",
        "",
        identify({"name": None}),
        {"user_id": "u-1", "name": None},
    ),
    (
        "a null name is left alone with nulls: drop",
        "values: {nulls: drop}",
        identify({"name": None, "plan": None}),
        {"user_id": "u-1"},
    ),
    (
        "a numeric phone becomes a string",
        "",
        identify({"phone": 442079460000}),
        {"user_id": "u-1", "phone": "442079460000"},
    ),
    (
        "created_at in unix seconds",
        "",
        identify({"created_at": 1709287200}),
        {"user_id": "u-1", "signed_up_at": 1709287200},
    ),
    (
        "createdAt in milliseconds",
        "",
        identify({"createdAt": 1709287200123}),
        {"user_id": "u-1", "signed_up_at": 1709287200},
    ),
    (
        "createdAt as a date with an offset",
        "",
        identify({"createdAt": "2024-03-01T12:00:00+02:00"}),
        {"user_id": "u-1", "signed_up_at": 1709287200},
    ),
    (
        "signed_up_at is never the message timestamp",
        "",
        identify({}, timestamp=TS),
        {"user_id": "u-1"},
    ),
    (
        "unsubscribed true",
        "",
        identify({"unsubscribed": True}),
        {"user_id": "u-1", "unsubscribed_from_emails": True},
    ),
    (
        "unsubscribed as a string",
        "",
        identify({"unsubscribed": "TRUE"}),
        {"user_id": "u-1", "unsubscribed_from_emails": True},
    ),
    (
        "a single tag, and duplicate tags once",
        "",
        identify({"tags": "beta"}),
        {"user_id": "u-1", "tags": ["beta"]},
    ),
    (
        "duplicate tags are sent once",
        "",
        identify({"tags": ["a", "b", "a", " "]}),
        {"user_id": "u-1", "tags": ["a", "b"]},
    ),
    (
        "context.active false: no last-seen fields",
        "",
        identify({}, context={"ip": "203.0.113.7", "userAgent": "UA", "active": False}),
        {"user_id": "u-1"},
    ),
    (
        "context.active true: last-seen fields",
        "",
        identify({}, context={"ip": "203.0.113.7", "userAgent": "UA", "active": True}),
        {"user_id": "u-1", "last_seen_ip": "203.0.113.7", "last_seen_user_agent": "UA"},
    ),
    # custom properties
    (
        "property names made safe",
        "",
        identify(
            {
                "Plan Type": "a",
                "planTier": "b",
                "HTTPStatus": 1,
                "a.b$c": 2,
                "--x--": 3,
                "$$": 4,
            }
        ),
        {
            "user_id": "u-1",
            "custom_properties": {
                "plan_type": "a",
                "plan_tier": "b",
                "http_status": 1,
                "a_b_c": 2,
                "x": 3,
            },
        },
    ),
    (
        "keys: lower_case does not split camelCase",
        "values: {keys: lower_case}",
        identify({"planTier": "b", "Plan Type": "a"}),
        {"user_id": "u-1", "custom_properties": {"plantier": "b", "plan_type": "a"}},
    ),
    (
        "nested objects are flattened",
        "",
        identify({"company": {"name": "Acme", "hq": {"city": "Paris"}}}),
        {
            "user_id": "u-1",
            "custom_properties": {"company_name": "Acme", "company_hq_city": "Paris"},
        },
    ),
    (
        "ISO dates become unix seconds, other strings stay",
        "",
        identify({"birthday": "1990-05-01", "last_order": TS, "code": "2024-03-01-001"}),
        {
            "user_id": "u-1",
            "custom_properties": {
                "birthday": 641520000,
                "last_order": 1793534400,
                "code": "2024-03-01-001",
            },
        },
    ),
    (
        "dates: keep",
        "values: {dates: keep}",
        identify({"birthday": "1990-05-01"}),
        {"user_id": "u-1", "custom_properties": {"birthday": "1990-05-01"}},
    ),
    (
        "lists of scalars are sent as they are; objects inside lists become columns",
        "",
        identify({"langs": ["en", "fr"], "mixed": [1, {"a": 1}, [2], None, True]}),
        {
            "user_id": "u-1",
            "custom_properties": {
                "langs": ["en", "fr"],
                "mixed": [1, "[2]", None, True],
                "mixed_a": [1],
            },
        },
    ),
    (
        "list_objects: drop leaves objects and lists inside lists out",
        "values: {list_objects: drop}",
        identify({"langs": ["en", "fr"], "mixed": [1, {"a": 1}, [2], None, True]}),
        {
            "user_id": "u-1",
            "custom_properties": {"langs": ["en", "fr"], "mixed": [1, None, True]},
        },
    ),
    (
        "lists: join",
        "values: {lists: join}",
        identify({"langs": ["en", "fr"], "nums": [1, 2.5, True, None]}),
        {"user_id": "u-1", "custom_properties": {"langs": "en,fr", "nums": "1,2.5,true,"}},
    ),
    (
        "lists: drop",
        "values: {lists: drop}",
        identify({"langs": ["en", "fr"], "plan": "pro"}),
        {"user_id": "u-1", "custom_properties": {"plan": "pro"}},
    ),
    (
        "list_objects: json",
        "values: {list_objects: json}",
        identify({"items": [{"sku": "a"}, [1, 2], 3]}),
        {"user_id": "u-1", "custom_properties": {"items": ['{"sku":"a"}', "[1,2]", 3]}},
    ),
    (
        "nulls are sent as null",
        "",
        identify({"plan": None}),
        {"user_id": "u-1", "custom_properties": {"plan": None}},
    ),
    (
        "an empty object sends nothing",
        "",
        identify({"address": {}}),
        {"user_id": "u-1"},
    ),
    (
        "objects nested deeper than 8 levels are dropped",
        "",
        identify({"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": {"j": 1}}}}}}}}}, "k": 1}),
        {"user_id": "u-1", "custom_properties": {"k": 1}},
    ),
    # rules: fields and trait selection
    (
        "fields: a renamed source",
        "identify: {fields: {phone: [traits.phone, traits.mobile]}}",
        identify({"mobile": "+1 555"}),
        {"user_id": "u-1", "phone": "+1 555"},
    ),
    (
        "fields: [] never sets the field, and the trait can be renamed to a property",
        "identify: {fields: {phone: []}, traits: {rename: {phone: phone_number}}}",
        identify({"phone": "+1 555"}),
        {"user_id": "u-1", "custom_properties": {"phone_number": "+1 555"}},
    ),
    (
        "identity: email from another trait, which is then not repeated",
        "identity: {email: [traits.email_address, traits.email]}",
        identify({"email_address": "e@x.io", "email": "t@x.io"}),
        {"user_id": "u-1", "email": "e@x.io"},
    ),
    (
        "identity: user_id from another path, which is then not repeated",
        "identity: {user_id: [userId, traits.id]}",
        {"type": "identify", "traits": {"id": 7}},
        {"user_id": "7"},
    ),
    (
        "traits.exclude with a glob and a regex; exclude wins over include",
        """
        identify:
          traits:
            include: [plan, "password*", "re:.*_token"]
            exclude: ["PASSWORD*", "re:api_.*"]
        """,
        identify({"plan": "pro", "password_hint": "x", "api_token": "t", "auth_token": "u"}),
        {"user_id": "u-1", "custom_properties": {"plan": "pro", "auth_token": "u"}},
    ),
    (
        "traits.include names nested traits; an object includes its children",
        "identify: {traits: {include: [address.city, company]}}",
        identify({"address": {"city": "Paris", "zip": "75"}, "company": {"n": "A"}, "x": 1}),
        {"user_id": "u-1", "custom_properties": {"address_city": "Paris", "company_n": "A"}},
    ),
    (
        "traits.exclude an object drops its children",
        "identify: {traits: {exclude: [address]}}",
        identify({"address": {"city": "Paris"}, "plan": "pro"}),
        {"user_id": "u-1", "custom_properties": {"plan": "pro"}},
    ),
    (
        "traits.rename, case-insensitive, nested too",
        "identify: {traits: {rename: {plan: subscription_plan, address.postalcode: zip}}}",
        identify({"Plan": "pro", "address": {"postalCode": "75", "city": "Paris"}}),
        {
            "user_id": "u-1",
            "custom_properties": {"subscription_plan": "pro", "zip": "75", "address_city": "Paris"},
        },
    ),
    (
        "invalid_fields: drop leaves the bad field out",
        "invalid_fields: drop",
        identify({"name": 7, "createdAt": "yesterday", "unsubscribed": "maybe", "plan": "pro"}),
        {"user_id": "u-1", "custom_properties": {"plan": "pro"}},
    ),
    (
        "invalid_fields: drop falls through to the next email",
        "invalid_fields: drop",
        identify({"email": "not-an-email"}, context={"traits": {"email": "c@x.io"}}),
        {"user_id": "u-1", "email": "c@x.io"},
    ),
    # tags from traits
    (
        "tag rules add to the contact's tags",
        """
        tags:
          traits:
            - tag: "plan-{traits.plan}"
            - tag: vip
              when: {traits.plan: [enterprise, team]}
            - tag: never
              when: {traits.plan: free}
            - tag: "{traits.missing}"
        """,
        identify({"plan": "team", "tags": ["beta"]}),
        {
            "user_id": "u-1",
            "tags": ["beta", "plan-team", "vip"],
            "custom_properties": {"plan": "team"},
        },
    ),
    (
        "a when value true does not match the number 1",
        "tags: {traits: [{tag: vip, when: {traits.vip: true}}]}",
        identify({"vip": 1}),
        {"user_id": "u-1", "custom_properties": {"vip": 1}},
    ),
    (
        "a when value null matches an absent field",
        "tags: {traits: [{tag: no-plan, when: {traits.plan: null}}]}",
        identify({}),
        {"user_id": "u-1", "tags": ["no-plan"]},
    ),
]


@pytest.mark.parametrize(
    ("rules", "message", "expected"),
    [case[1:] for case in CONTACT_CASES],
    ids=[case[0] for case in CONTACT_CASES],
)
def test_identify(rules: str, message: dict[str, Any], expected: dict[str, Any]) -> None:
    assert contact(message, rules) == expected


def test_a_trait_untag_rule_adds_a_tag_change_after_the_upsert() -> None:
    rules = "tags: {traits: [{untag: trial, when: {traits.plan: pro}}]}"
    upsert, untag = operations(identify({"plan": "pro"}, messageId="m-9", timestamp=TS), rules)
    assert isinstance(upsert, ContactUpsert)
    assert untag == TagChange("trial", "u-1", None, True, "m-9", TS_EPOCH, Priority.HIGH)


# Engage --------------------------------------------------------------------------------

AUDIENCE_IDENTIFY = {
    "type": "identify",
    "userId": "u-42",
    "traits": {"email": "ada@example.com", "order_completed_last_30days": True},
    "context": {
        "personas": {
            "computation_class": "audience",
            "computation_key": "order_completed_last_30days",
            "computation_id": "aud_2Jx",
            "space_id": "spa_9",
        }
    },
    "integrations": {"All": False, "Gist": True},
}


def audience_track(entered: bool, **fields: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "userId": "u-42",
        "event": "Audience Entered" if entered else "Audience Exited",
        "properties": {
            "audience_key": "order_completed_last_30days",
            "order_completed_last_30days": entered,
        },
        "context": {
            "traits": {"email": "ada@example.com"},
            "personas": {
                "computation_class": "audience",
                "computation_key": "order_completed_last_30days",
            },
        },
        "integrations": {"All": False, "Gist": True},
        **fields,
    }


ENGAGE_CASES: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    (
        "an audience identify sets a boolean property (and is delivered despite All: false)",
        "",
        AUDIENCE_IDENTIFY,
        {
            "user_id": "u-42",
            "email": "ada@example.com",
            "custom_properties": {"order_completed_last_30days": True},
        },
    ),
    (
        "the audience property is set even when the trait filters exclude it",
        "identify: {traits: {include: []}}",
        AUDIENCE_IDENTIFY,
        {
            "user_id": "u-42",
            "email": "ada@example.com",
            "custom_properties": {"order_completed_last_30days": True},
        },
    ),
    (
        "with audiences off the filters apply",
        "{engage: {audiences: false}, identify: {traits: {include: []}}}",
        AUDIENCE_IDENTIFY,
        {"user_id": "u-42", "email": "ada@example.com"},
    ),
    (
        "an audience key is snake_cased; membership as a string",
        "identify: {traits: {include: []}}",
        {
            **AUDIENCE_IDENTIFY,
            "traits": {"Big Spenders": "false"},
            "context": {
                "personas": {"computation_class": "audience", "computation_key": "Big Spenders"}
            },
        },
        {"user_id": "u-42", "custom_properties": {"big_spenders": False}},
    ),
    (
        "a computed trait becomes a custom property whatever the filters say",
        "identify: {traits: {exclude: ['*']}}",
        {
            "type": "identify",
            "userId": "u-42",
            "traits": {"lifetime_value": 420.5, "other": 1},
            "context": {
                "personas": {"computation_class": "trait", "computation_key": "lifetime_value"}
            },
        },
        {"user_id": "u-42", "custom_properties": {"lifetime_value": 420.5}},
    ),
    (
        "Audience Entered sets the property true with an upsert",
        "",
        audience_track(True, messageId="m-5", timestamp=TS),
        {
            "user_id": "u-42",
            "email": "ada@example.com",
            "custom_properties": {"order_completed_last_30days": True},
        },
    ),
    (
        "Audience Exited sets it false; the name compares case-insensitively",
        "",
        {**audience_track(False), "event": "audience exited"},
        {
            "user_id": "u-42",
            "email": "ada@example.com",
            "custom_properties": {"order_completed_last_30days": False},
        },
    ),
    (
        "a computed-trait track sets the trait",
        "",
        {
            "type": "track",
            "userId": "u-42",
            "event": "Trait Computed",
            "properties": {"lifetime_value": 99},
            "context": {
                "personas": {"computation_class": "trait", "computation_key": "lifetime_value"}
            },
        },
        {"user_id": "u-42", "custom_properties": {"lifetime_value": 99}},
    ),
]


@pytest.mark.parametrize(
    ("rules", "message", "expected"),
    [case[1:] for case in ENGAGE_CASES],
    ids=[case[0] for case in ENGAGE_CASES],
)
def test_engage(rules: str, message: dict[str, Any], expected: dict[str, Any]) -> None:
    assert contact(message, rules) == expected


def test_computed_traits_off_leaves_them_to_the_trait_filters() -> None:
    message = {
        "type": "identify",
        "userId": "u-42",
        "traits": {"lifetime_value": 420.5},
        "context": {
            "personas": {"computation_class": "trait", "computation_key": "lifetime_value"}
        },
    }
    rules = "{engage: {computed_traits: false}, identify: {traits: {exclude: ['*']}}}"
    assert contact(message, rules) == {"user_id": "u-42"}
    computed_track = {
        **message,
        "type": "track",
        "event": "Trait Computed",
        "properties": message["traits"],
    }
    assert (
        event(computed_track, "engage: {computed_traits: false}")["event_name"] == "Trait Computed"
    )


def test_tag_rules_apply_to_an_audience_track_though_its_event_is_not_sent() -> None:
    rules = "tags: {events: [{event: Audience Entered, tag: 'in-{properties.audience_key}'}]}"
    upsert, tag = operations(audience_track(True), rules)
    assert isinstance(upsert, ContactUpsert)
    assert tag == TagChange("in-order_completed_last_30days", "u-42", "ada@example.com")


def test_an_audience_track_also_sends_the_event_when_asked() -> None:
    upsert, sent = operations(audience_track(True, timestamp=TS), "engage: {send_events: true}")
    assert isinstance(upsert, ContactUpsert)
    assert isinstance(sent, EventTrack)
    assert sent.event["event_name"] == "Audience Entered"
    assert sent.event["properties"]["audience_key"] == "order_completed_last_30days"


def test_with_audiences_off_an_audience_track_is_a_plain_event() -> None:
    sent = event(audience_track(True), "engage: {audiences: false}")
    assert sent["event_name"] == "Audience Entered"


def test_an_audience_track_without_audience_key_is_a_plain_event() -> None:
    message = audience_track(True)
    message["properties"] = {}
    message["context"] = {"traits": {"email": "ada@example.com"}}
    assert event(message)["event_name"] == "Audience Entered"


# track ---------------------------------------------------------------------------------

SPEC_TRACK = {
    "type": "track",
    "messageId": "m-2",
    "userId": "u-42",
    "event": "Order Completed",
    "properties": {"order_id": "o-9", "revenue": 42.5, "currency": "EUR"},
    "context": {"traits": {"email": "ada@example.com"}},
    "timestamp": "2026-11-01T12:01:00.000Z",
}


def test_the_spec_track_becomes_one_event() -> None:
    assert run(SPEC_TRACK) == Mapped(
        "track",
        (
            EventTrack(
                {
                    "event_name": "Order Completed",
                    "user_id": "u-42",
                    "email": "ada@example.com",
                    "properties": {"order_id": "o-9", "revenue": 42.5, "currency": "EUR"},
                    "occurred_at": 1793534460,
                },
                message_id="m-2",
                timestamp=1793534460.0,
            ),
        ),
    )


EVENT_CASES: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    (
        "email from properties.email, no userId",
        "",
        {"type": "track", "event": "Signed Up", "properties": {"email": "p@x.io"}},
        {"event_name": "Signed Up", "email": "p@x.io", "properties": {"email": "p@x.io"}},
    ),
    (
        "context.traits.email wins over properties.email",
        "",
        {
            "type": "track",
            "event": "E",
            "properties": {"email": "p@x.io"},
            "context": {"traits": {"email": "c@x.io"}},
        },
        {"event_name": "E", "email": "c@x.io", "properties": {"email": "p@x.io"}},
    ),
    (
        "the name is normalised the way Gist stores it",
        "",
        track(" completed.order$v2 "),
        {"event_name": "completed-order-v2", "user_id": "u-1"},
    ),
    (
        "values: event_names lower_case",
        "values: {event_names: lower_case}",
        track("Order.Completed"),
        {"event_name": "order-completed", "user_id": "u-1"},
    ),
    (
        "rename matches the way Gist compares names",
        "track: {events: {rename: {Order.Completed: Purchase}}}",
        track("ORDER-COMPLETED"),
        {"event_name": "Purchase", "user_id": "u-1"},
    ),
    (
        "properties are made safe and flattened",
        "",
        track(properties={"Order ID": "o-1", "shipping": {"method": "UPS"}, "at": TS}),
        {
            "event_name": "Order Completed",
            "user_id": "u-1",
            "properties": {"order_id": "o-1", "shipping_method": "UPS", "at": 1793534400},
        },
    ),
    (
        "property selection and renames",
        "track: {properties: {exclude: [products], rename: {revenue: amount}}}",
        track(properties={"revenue": 5, "products": [{"sku": "a"}], "currency": "EUR"}),
        {
            "event_name": "Order Completed",
            "user_id": "u-1",
            "properties": {"amount": 5, "currency": "EUR"},
        },
    ),
    (
        "occurred_at falls back to originalTimestamp",
        "",
        track(originalTimestamp="2026-11-01T12:00:00Z", sentAt="2030-01-01T00:00:00Z"),
        {"event_name": "Order Completed", "user_id": "u-1", "occurred_at": 1793534400},
    ),
    (
        "an unparseable timestamp is dropped under invalid_fields: drop",
        "invalid_fields: drop",
        track(timestamp="yesterday"),
        {"event_name": "Order Completed", "user_id": "u-1"},
    ),
    (
        "an included event",
        "track: {events: {include: ['Order *'], exclude: ['Order Refunded']}}",
        track("order completed"),
        {"event_name": "order completed", "user_id": "u-1"},
    ),
]


@pytest.mark.parametrize(
    ("rules", "message", "expected"),
    [case[1:] for case in EVENT_CASES],
    ids=[case[0] for case in EVENT_CASES],
)
def test_track(rules: str, message: dict[str, Any], expected: dict[str, Any]) -> None:
    assert event(message, rules) == expected


def test_event_tag_rules_tag_and_untag_even_when_the_event_is_excluded() -> None:
    rules = """
    track: {events: {exclude: [Subscription.Cancelled]}}
    tags:
      events:
        - {event: "Subscription*", untag: subscriber}
        - {event: "re:subscription-cancel+ed", tag: "churned-{properties.plan}"}
        - {event: "Subscription$Cancelled", tag: never, when: {properties.plan: free}}
    """
    message = track(
        "subscription-cancelled", properties={"plan": "pro"}, messageId="m", timestamp=TS
    )
    assert operations(message, rules) == (  # in rule order
        TagChange("subscriber", "u-1", None, True, "m", TS_EPOCH),
        TagChange("churned-pro", "u-1", None, False, "m", TS_EPOCH),
    )


def test_event_tag_rules_come_after_the_event() -> None:
    rules = "tags: {events: [{event: Order Completed, tag: customer}]}"
    sent, tag = operations(track(context={"traits": {"email": "a@x.io"}}), rules)
    assert isinstance(sent, EventTrack)
    assert tag == TagChange("customer", "u-1", "a@x.io")


# page, screen, group, alias, delete ----------------------------------------------------

PAGE_RULES = "{page: {enabled: true}, screen: {enabled: true}}"

OTHER_TYPE_CASES: list[tuple[str, str, dict[str, Any], MapResult]] = [
    (
        "page is off by default",
        "",
        {"type": "page", "userId": "u-1", "name": "Pricing"},
        Skipped("page", "type_off"),
    ),
    (
        "screen is off by default",
        "",
        {"type": "screen", "userId": "u-1", "name": "Home"},
        Skipped("screen", "type_off"),
    ),
    (
        "group is off by default",
        "",
        {"type": "group", "userId": "u-1", "groupId": "g", "traits": {"name": "Acme"}},
        Skipped("group", "type_off"),
    ),
    (
        "a page becomes an event",
        PAGE_RULES,
        {
            "type": "page",
            "userId": "u-1",
            "name": "Pricing",
            "properties": {"path": "/pricing", "url": "https://x.io/pricing"},
            "timestamp": TS,
            "messageId": "m-3",
        },
        Mapped(
            "page",
            (
                EventTrack(
                    {
                        "event_name": "Viewed Pricing Page",
                        "user_id": "u-1",
                        "properties": {"path": "/pricing", "url": "https://x.io/pricing"},
                        "occurred_at": 1793534400,
                    },
                    "m-3",
                    TS_EPOCH,
                    Priority.LOW,
                ),
            ),
        ),
    ),
    (
        "a page without a name takes the next template",
        PAGE_RULES,
        {"type": "page", "userId": "u-1"},
        Mapped(
            "page",
            (EventTrack({"event_name": "Viewed a Page", "user_id": "u-1"}, priority=Priority.LOW),),
        ),
    ),
    (
        "a screen becomes an event",
        PAGE_RULES,
        {"type": "screen", "userId": "u-1", "name": "Home"},
        Mapped(
            "screen",
            (
                EventTrack(
                    {"event_name": "Viewed Home Screen", "user_id": "u-1"}, priority=Priority.LOW
                ),
            ),
        ),
    ),
    (
        "a page template with category",
        "page: {enabled: true, event: 'Viewed {category} {name}'}",
        {"type": "page", "userId": "u-1", "name": "Pricing"},
        Skipped("page", "no_event_name"),
    ),
    (
        "group traits onto the contact, prefixed, with groupId as id",
        "group: {enabled: true}",
        {
            "type": "group",
            "userId": "u-1",
            "groupId": "g-1",
            "traits": {"name": "Acme", "employees": 40, "address": {"city": "Paris"}},
        },
        Mapped(
            "group",
            (
                ContactUpsert(
                    {
                        "custom_properties": {
                            "company_id": "g-1",
                            "company_name": "Acme",
                            "company_employees": 40,
                            "company_address_city": "Paris",
                        },
                        "user_id": "u-1",
                    },
                    priority=Priority.NORMAL,
                ),
            ),
        ),
    ),
    (
        "group prefix, selection and rename",
        "group: {enabled: true, prefix: org_, traits: {exclude: [plan], rename: {name: org}}}",
        {
            "type": "group",
            "context": {"traits": {"email": "a@x.io"}},
            "groupId": 7,
            "traits": {"name": "Acme", "plan": "team", "id": "own-id"},
        },
        Mapped(
            "group",
            (
                ContactUpsert(
                    {"custom_properties": {"org": "Acme", "org_id": "own-id"}, "email": "a@x.io"},
                    priority=Priority.NORMAL,
                ),
            ),
        ),
    ),
    (
        "a group with nothing to copy is skipped",
        "group: {enabled: true, traits: {include: []}}",
        {"type": "group", "userId": "u-1", "traits": {"name": "Acme"}},
        Skipped("group", "nothing_to_send"),
    ),
    (
        "an empty groupId is not copied",
        "group: {enabled: true}",
        {"type": "group", "userId": "u-1", "groupId": "", "traits": {}},
        Skipped("group", "nothing_to_send"),
    ),
    (
        "identify can be turned off",
        "identify: {enabled: false}",
        identify({"email": "a@x.io"}),
        Skipped("identify", "type_off"),
    ),
    (
        "track can be turned off",
        "track: {enabled: false}",
        track(),
        Skipped("track", "type_off"),
    ),
    (
        "alias moves the contact",
        "",
        {
            "type": "alias",
            "previousId": "anon-1",
            "userId": 42,
            "messageId": "m-4",
            "timestamp": TS,
        },
        Mapped("alias", (ContactAlias("anon-1", "42", "m-4", TS_EPOCH),)),
    ),
    (
        "an alias onto the same id is skipped",
        "",
        {"type": "alias", "previousId": "u-1", "userId": "u-1"},
        Skipped("alias", "nothing_to_send"),
    ),
    (
        "alias can be turned off",
        "alias: {enabled: false}",
        {"type": "alias", "previousId": "a", "userId": "b"},
        Skipped("alias", "type_off"),
    ),
    (
        "delete by userId and email",
        "",
        {"type": "delete", "userId": "u-1", "context": {"traits": {"email": "a@x.io"}}},
        Mapped("delete", (ContactDelete("u-1", "a@x.io", priority=Priority.HIGH),)),
    ),
    (
        "delete by email",
        "",
        {"type": "delete", "context": {"traits": {"email": "a@x.io"}}},
        Mapped("delete", (ContactDelete(None, "a@x.io", priority=Priority.HIGH),)),
    ),
    (
        "delete can be turned off",
        "delete: {enabled: false}",
        {"type": "delete", "userId": "u-1"},
        Skipped("delete", "type_off"),
    ),
    (
        "the type is read case-insensitively",
        "",
        {"type": "Delete", "userId": "u-1"},
        Mapped("delete", (ContactDelete("u-1", priority=Priority.HIGH),)),
    ),
]


@pytest.mark.parametrize(
    ("rules", "message", "expected"),
    [case[1:] for case in OTHER_TYPE_CASES],
    ids=[case[0] for case in OTHER_TYPE_CASES],
)
def test_other_types(rules: str, message: dict[str, Any], expected: MapResult) -> None:
    assert run(message, rules) == expected


# integrations switches -----------------------------------------------------------------

INTEGRATION_CASES: list[tuple[Any, bool]] = [
    # (integrations, delivered)
    (None, True),
    ({}, True),
    ({"All": True}, True),
    ({"All": False}, False),
    ({"All": False, "Gist": True}, True),
    ({"All": False, "Gist": {"some": "option"}}, True),
    ({"Gist": False}, False),
    ({"All": True, "Gist": False}, False),
    ({"Intercom": False}, True),
    ("not an object", True),
]


@pytest.mark.parametrize(("integrations", "delivered"), INTEGRATION_CASES)
def test_integrations_switches(integrations: Any, delivered: bool) -> None:
    for message in (identify({}), track(), {"type": "delete", "userId": "u-1"}):
        result = run({**message, "integrations": integrations})
        if delivered:
            assert isinstance(result, Mapped), result
        else:
            assert result == Skipped(message["type"], "integration_off")


def test_the_integration_name_is_a_setting() -> None:
    message = {**identify({}), "integrations": {"All": False, "gist-eu": True}}
    assert isinstance(run(message, "integration: gist-eu"), Mapped)
    assert isinstance(run(message), Skipped)


# rejections ----------------------------------------------------------------------------

REJECT_CASES: list[tuple[str, str, object, str, str]] = [
    # (id, rules, message, message_type, reason)
    ("a list", "", [SPEC_IDENTIFY], "unknown", "not_an_object"),
    ("a string", "", "identify", "unknown", "not_an_object"),
    ("null", "", None, "unknown", "not_an_object"),
    ("a batch envelope", "", {"batch": [SPEC_IDENTIFY]}, "unknown", "batch_envelope"),
    ("no type", "", {"userId": "u-1"}, "unknown", "unknown_type"),
    ("a numeric type", "", {"type": 3, "userId": "u-1"}, "unknown", "unknown_type"),
    # The type is a metric label: a producer's own word must not add series.
    ("an unknown type", "", {"type": "purchase", "userId": "u-1"}, "unknown", "unknown_type"),
    (
        "identify without userId and email",
        "",
        {"type": "identify", "anonymousId": "a-1", "traits": {"plan": "pro"}},
        "identify",
        "missing_identity",
    ),
    (
        "identify with traits not an object",
        "",
        identify(traits=None) | {"traits": [1]},
        "identify",
        "invalid_field",
    ),
    ("identify with a numeric email", "", identify({"email": 5}), "identify", "invalid_field"),
    (
        "identify with an email without @",
        "",
        identify({"email": "ada"}),
        "identify",
        "invalid_field",
    ),
    (
        "identify with a boolean userId",
        "",
        {"type": "identify", "userId": True},
        "identify",
        "invalid_field",
    ),
    (
        "identify with a fractional userId",
        "",
        {"type": "identify", "userId": 4.5},
        "identify",
        "invalid_field",
    ),
    ("identify with a numeric name", "", identify({"name": 7}), "identify", "invalid_field"),
    (
        "identify with an unparseable createdAt",
        "",
        identify({"createdAt": "soon"}),
        "identify",
        "invalid_field",
    ),
    (
        "identify with a boolean createdAt",
        "",
        identify({"createdAt": True}),
        "identify",
        "invalid_field",
    ),
    ("identify with tags not strings", "", identify({"tags": [1, 2]}), "identify", "invalid_field"),
    (
        "identify with unsubscribed 'maybe'",
        "",
        identify({"unsubscribed": "maybe"}),
        "identify",
        "invalid_field",
    ),
    (
        "identify with a numeric ip",
        "",
        identify({}, context={"ip": 1}),
        "identify",
        "invalid_field",
    ),
    (
        "identify with a numeric lastName",
        "",
        identify({"firstName": "A", "lastName": 1}),
        "identify",
        "invalid_field",
    ),
    (
        "invalid_fields: drop still needs an identity",
        "invalid_fields: drop",
        {"type": "identify", "traits": {"plan": "pro"}, "context": {"traits": {"email": ""}}},
        "identify",
        "missing_identity",
    ),
    (
        "a whole float userId (JSON cannot tell 2**64 + 1 from 2**64 as a float)",
        "",
        {"type": "identify", "userId": 42.0},
        "identify",
        "invalid_field",
    ),
    (
        "track without identity",
        "",
        {"type": "track", "event": "E", "anonymousId": "a"},
        "track",
        "missing_identity",
    ),
    ("track without event", "", {"type": "track", "userId": "u-1"}, "track", "missing_event_name"),
    ("track with an empty event", "", track("  "), "track", "missing_event_name"),
    ("track with a numeric event", "", track(5), "track", "invalid_field"),
    ("track with properties not an object", "", track(properties="x"), "track", "invalid_field"),
    (
        "page without identity",
        PAGE_RULES,
        {"type": "page", "name": "P"},
        "page",
        "missing_identity",
    ),
    (
        "group without identity",
        "group: {enabled: true}",
        {"type": "group", "traits": {"a": 1}},
        "group",
        "missing_identity",
    ),
    (
        "alias without previousId",
        "",
        {"type": "alias", "userId": "u-1"},
        "alias",
        "missing_identity",
    ),
    (
        "alias without userId",
        "",
        {"type": "alias", "previousId": "u-1"},
        "alias",
        "missing_identity",
    ),
    (
        "delete without identity",
        "",
        {"type": "delete", "anonymousId": "a"},
        "delete",
        "missing_identity",
    ),
]


@pytest.mark.parametrize(
    ("rules", "message", "message_type", "reason"),
    [case[1:] for case in REJECT_CASES],
    ids=[case[0] for case in REJECT_CASES],
)
def test_rejections(rules: str, message: object, message_type: str, reason: str) -> None:
    result = run(message, rules)
    assert isinstance(result, Rejected), result
    assert (result.message_type, result.reason) == (message_type, reason)
    assert result.reason in REJECT_REASONS
    assert result.detail


def test_a_rejection_does_not_echo_personal_data() -> None:
    result = run(identify({"email": "ada.lovelace-at-example"}))
    assert isinstance(result, Rejected)
    assert "ada" not in result.detail


@pytest.mark.parametrize("written", ["Identify", " IDENTIFY ", "identify"])
def test_a_type_in_another_case_maps_and_reports_the_spec_name(written: str) -> None:
    result = run({**SPEC_IDENTIFY, "type": written})
    assert isinstance(result, Mapped), result
    assert result.message_type == "identify"
    assert result.operations == run(SPEC_IDENTIFY).operations  # type: ignore[union-attr]


def test_an_event_excluded_by_rule_is_skipped() -> None:
    result = run(track("Debug Ping"), "track: {events: {exclude: ['re:debug.*']}}")
    assert result == Skipped("track", "event_excluded")
    assert result.reason in SKIP_REASONS


# what every operation carries ----------------------------------------------------------


def test_every_operation_keeps_the_message_id_and_timestamp() -> None:
    rules = """
    {page: {enabled: true}, group: {enabled: true},
     tags: {traits: [{untag: t, when: {traits.p: 1}}], events: [{event: '*', tag: t}]}}
    """
    stamp = {"messageId": "m-7", "timestamp": TS}
    messages = [
        identify({"p": 1}, **stamp),
        track(**stamp),
        audience_track(True, **stamp),
        {"type": "page", "userId": "u", **stamp},
        {"type": "group", "userId": "u", "traits": {"a": 1}, **stamp},
        {"type": "alias", "userId": "u", "previousId": "p", **stamp},
        {"type": "delete", "userId": "u", **stamp},
    ]
    for message in messages:
        ops = operations(message, rules)
        assert ops
        for op in ops:
            assert (op.message_id, op.timestamp) == ("m-7", TS_EPOCH), (message["type"], op)


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [
        ({"timestamp": TS}, TS_EPOCH),
        ({"timestamp": None, "originalTimestamp": TS}, TS_EPOCH),
        ({"receivedAt": TS}, TS_EPOCH),
        ({"timestamp": "2026-11-01T12:00:00.250+00:00"}, TS_EPOCH + 0.25),
        ({"timestamp": "2026-11-01T12:00:00"}, TS_EPOCH),
        ({"timestamp": 1793534400}, TS_EPOCH),
        ({"timestamp": 1793534400000}, TS_EPOCH),
        ({}, None),
    ],
)
def test_operation_timestamps(stamp: dict[str, Any], expected: float | None) -> None:
    (op,) = operations({"type": "delete", "userId": "u-1", **stamp})
    assert op.timestamp == expected


def test_a_numeric_message_id_is_kept_as_a_string() -> None:
    (op,) = operations({"type": "delete", "userId": "u-1", "messageId": 12})
    assert op.message_id == "12"


def test_identities_key_on_the_lower_cased_email() -> None:
    (op,) = operations(SPEC_IDENTIFY)
    assert op.identities == ("u:u-42", "e:ada@example.com")


def test_the_mapper_keeps_no_state_between_messages() -> None:
    first = run(SPEC_IDENTIFY)
    run(AUDIENCE_IDENTIFY)
    run(SPEC_TRACK)
    assert run(SPEC_IDENTIFY) == first


# what the mapping accepts: identity ----------------------------------------------------


def rejected(message: object, rules_yaml: str = "") -> Rejected:
    result = run(message, rules_yaml)
    assert isinstance(result, Rejected), result
    assert result.reason in REJECT_REASONS
    return result


def parsed(json_text: str) -> Any:
    """What the consumer hands the mapper: the message as orjson parses it."""
    return orjson.loads(json_text)


def test_a_userid_beyond_64_bits_is_rejected_not_rounded() -> None:
    # orjson reads it as the float 1.8446744073709552e19, which would print as
    # 18446744073709551616: two users would merge.
    message = parsed('{"type": "identify", "userId": 18446744073709551617}')
    result = rejected(message)
    assert (result.reason, result.message_type) == ("invalid_field", "identify")
    assert "userId" in result.detail


@pytest.mark.parametrize(
    ("user_id", "sent"),
    [
        (2**64 - 1, "18446744073709551615"),
        (-(2**63), "-9223372036854775808"),
        (0, "0"),
        (" u-1 ", " u-1 "),  # sent as written: only a blank id is not an id
        ("x" * 255, "x" * 255),
    ],
)
def test_user_ids_that_are_sent(user_id: Any, sent: str) -> None:
    assert contact({"type": "identify", "userId": user_id}) == {"user_id": sent}


@pytest.mark.parametrize(
    "user_id",
    [42.0, 4.5, 1e300, True, False, 2**64, -(2**63) - 1, "x" * 256, [1], {"id": 1}],
    ids=repr,
)
@pytest.mark.parametrize("rules", ["", "invalid_fields: drop"])
def test_user_ids_that_are_rejected_whatever_invalid_fields_says(user_id: Any, rules: str) -> None:
    message = {"type": "identify", "userId": user_id, "traits": {"email": "a@x.io"}}
    result = rejected(message, rules)
    assert result.reason == "invalid_field"
    assert result.detail.startswith("userId ")
    assert "x" * 20 not in result.detail


@pytest.mark.parametrize("blank", ["", "   ", "\t\n"])
def test_a_blank_user_id_is_no_identity(blank: str) -> None:
    assert rejected({"type": "identify", "userId": blank}).reason == "missing_identity"
    assert contact({"type": "identify", "userId": blank, "traits": {"email": "a@x.io"}}) == {
        "email": "a@x.io"
    }


def test_every_path_the_identity_rules_read_is_checked() -> None:
    rules = "identity: {user_id: [userId, traits.id]}"
    assert rejected({"type": "identify", "traits": {"id": 7.0}}, rules).detail.startswith(
        "traits.id "
    )
    assert contact({"type": "identify", "userId": " ", "traits": {"id": 7}}, rules) == {
        "user_id": "7"
    }


@pytest.mark.parametrize(
    "message",
    [
        {"type": "alias", "previousId": 1.5, "userId": "u-1"},
        {"type": "alias", "previousId": "p", "userId": 2.0},
        {"type": "track", "event": "E", "userId": 2.0},
        {"type": "delete", "userId": True},
    ],
    ids=["previousId", "alias userId", "track", "delete"],
)
def test_identity_checks_hold_for_every_type(message: dict[str, Any]) -> None:
    assert rejected(message).reason == "invalid_field"


def test_a_blank_previous_id_is_no_identity() -> None:
    message = {"type": "alias", "previousId": "  ", "userId": "u-1"}
    assert rejected(message).reason == "missing_identity"


# what the mapping accepts: email -------------------------------------------------------

VALID_EMAILS = [
    "ada@example.com",
    "Ada.Lovelace+newsletter@mail.example.co.uk",
    "o'brien_x-y=z{1}@example-1.io",
    "!#$%&'*+/=?^_`{|}~-@example.com",
    "a" * 64 + "@example.com",
    "a@" + ".".join(["b" * 63] * 3) + ".com",  # 248 characters
    "josé@bücher.example",  # internationalised (RFC 6531 / IDNA) addresses
]

INVALID_EMAILS = [
    "ada",
    "ada@",
    "@example.com",
    "ada@example",  # no dot: not a domain Gist can mail
    "ada@@example.com",
    "a@b@example.com",
    "ada lovelace@example.com",
    "ada@exa mple.com",
    "ada@example..com",
    "ada@.example.com",
    "ada@example.com.",
    ".ada@example.com",
    "ada.@example.com",
    "ada..l@example.com",
    "ada@-example.com",
    "ada@example-.com",
    "ada@example.123",
    "ada@[203.0.113.7]",
    '"ada"@example.com',
    "ada(comment)@example.com",
    "ada@exam_ple.com",
    "a\x00da@example.com",
    "ada@example.com\x07",
    "ada\u00a0l@example.com",
    "a" * 65 + "@example.com",
    "a@" + "b" * 64 + ".com",
    "a@" + ".".join(["b" * 63] * 4),  # 257 characters
    "a" * 100_000 + "@example.com",
]


@pytest.mark.parametrize("email", VALID_EMAILS, ids=lambda e: e[:30])
def test_valid_emails_are_sent(email: str) -> None:
    assert contact(identify({"email": email}))["email"] == email
    assert contact(identify({"email": f"  {email} "}))["email"] == email


@pytest.mark.parametrize("email", INVALID_EMAILS, ids=lambda e: repr(e[:30]))
def test_invalid_emails_are_rejected(email: str) -> None:
    result = rejected(identify({"email": email}))
    assert result.reason == "invalid_field"
    assert result.detail.startswith("traits.email ")
    assert email.strip() not in result.detail


def test_an_email_has_at_most_254_characters() -> None:
    local = "a" * 64
    domain = ".".join(["b" * 60] * 3) + ".co"  # 185 characters
    ok = f"{local}@{domain}"
    assert len(ok) == 250
    assert contact(identify({"email": ok}))["email"] == ok
    too_long = f"{local}@{'b' * 4}.{domain}"
    assert len(too_long) == 255
    assert rejected(identify({"email": too_long})).reason == "invalid_field"


@pytest.mark.parametrize("email", ["nope", "a@b", "x" * 300 + "@example.com"])
def test_an_invalid_email_is_dropped_under_drop_but_never_leaves_no_identity(email: str) -> None:
    drop = "invalid_fields: drop"
    assert contact(identify({"email": email, "plan": "pro"}), drop) == {
        "user_id": "u-1",
        "custom_properties": {"plan": "pro"},
    }
    # The only identity was the bad email: dropping it leaves nobody to send to.
    result = rejected({"type": "identify", "traits": {"email": email}}, drop)
    assert result.reason == "invalid_field"
    assert result.detail.startswith("traits.email ")
    track_result = rejected({"type": "track", "event": "E", "properties": {"email": email}}, drop)
    assert track_result.detail.startswith("properties.email ")


def test_a_track_email_is_checked_too() -> None:
    message = {"type": "track", "event": "E", "context": {"traits": {"email": "a@b"}}}
    assert rejected(message).detail.startswith("context.traits.email ")


# what the mapping accepts: reserved and colliding property names -----------------------

GIST_CONTACT_FIELDS = [
    "id", "email", "user_id", "name", "phone", "signed_up_at", "last_seen_ip",
    "last_seen_user_agent", "unsubscribed_from_emails", "tags", "custom_properties",
    "created_at", "updated_at", "type", "last_seen_at", "last_contacted_at",
    "session_count", "avatar", "landing_url", "original_referrer", "location_data",
    "segments", "subscription_types", "social_profiles",
]  # fmt: skip


@pytest.mark.parametrize(
    ("trait", "field"),
    [
        ("Email", "email"),
        ("NAME", "name"),
        ("user_id", "user_id"),
        ("userId", "user_id"),
        ("Tags", "tags"),
        ("id", "id"),
        ("updatedAt", "updated_at"),
        ("custom properties", "custom_properties"),
        ("avatar", "avatar"),
    ],
)
def test_a_trait_named_like_a_contact_field_is_rejected(trait: str, field: str) -> None:
    no_renames = "identify:\n  traits:\n    rename: {}\n"  # id and avatar have defaults
    result = rejected(identify({trait: "x", "plan": "pro"}), no_renames)
    assert result.reason == "invalid_field"
    assert f"traits.{trait}" in result.detail
    assert repr(field) in result.detail
    # Under invalid_fields: drop the trait is dropped and the rest is sent.
    dropping = no_renames + "invalid_fields: drop\n"
    assert contact(identify({trait: "x", "plan": "pro"}), dropping) == {
        "user_id": "u-1",
        "custom_properties": {"plan": "pro"},
    }


def test_segments_id_and_avatar_traits_are_renamed_by_default() -> None:
    """Segment's spec has two traits named like Gist contact fields; the shipped rules
    rename them rather than reject every identify that carries them."""
    sent = contact(identify({"id": "db-42", "avatar": "https://x.io/a.png", "plan": "pro"}))
    assert sent["custom_properties"] == {
        "segment_id": "db-42",
        "avatar_url": "https://x.io/a.png",
        "plan": "pro",
    }


def test_a_nested_trait_that_flattens_to_a_contact_field_is_rejected() -> None:
    result = rejected(identify({"last": {"seen": {"ip": "203.0.113.7"}}}))
    assert "traits.last.seen.ip" in result.detail
    assert "'last_seen_ip'" in result.detail


@pytest.mark.parametrize("field", GIST_CONTACT_FIELDS)
def test_no_custom_property_takes_a_contact_field_name(field: str) -> None:
    result = run(identify({field: "x"}, context={}))
    if isinstance(result, Mapped):
        (upsert,) = result.operations
        assert isinstance(upsert, ContactUpsert)
        assert field not in upsert.contact.get("custom_properties", {})
    else:
        assert isinstance(result, Rejected)
        assert result.reason == "invalid_field"


def test_traits_the_rules_read_as_contact_fields_are_not_custom_properties() -> None:
    traits = {"email": "a@x.io", "name": "Ada", "phone": "+44", "tags": ["a"], "created_at": 0}
    assert contact(identify(traits)) == {
        "user_id": "u-1",
        "email": "a@x.io",
        "name": "Ada",
        "phone": "+44",
        "tags": ["a"],
        "signed_up_at": 0,
    }
    rules = "identity: {user_id: [traits.user_id]}"
    assert contact({"type": "identify", "traits": {"user_id": "u-9"}}, rules) == {"user_id": "u-9"}


def test_a_contact_field_turned_off_leaves_its_trait_to_be_renamed() -> None:
    rules = "identify: {fields: {phone: []}, traits: {rename: {phone: mobile}}}"
    assert contact(identify({"phone": "+1 555"}), rules) == {
        "user_id": "u-1",
        "custom_properties": {"mobile": "+1 555"},
    }
    phone_off = "identify: {fields: {phone: []}}"
    assert "'phone'" in rejected(identify({"phone": "+1"}), phone_off).detail


def test_group_traits_never_take_a_contact_field_name() -> None:
    message = {"type": "group", "userId": "u-1", "groupId": "g-1", "traits": {"name": "Acme"}}
    result = rejected(message, "group: {enabled: true, prefix: ''}")
    assert result.reason == "invalid_field"
    assert "'name'" in result.detail or "'id'" in result.detail
    dropped = run(message, "{invalid_fields: drop, group: {enabled: true, prefix: ''}}")
    assert dropped == Skipped("group", "nothing_to_send")
    # Event properties are not contact properties: any name goes.
    assert event(track(properties={"phone": "p", "name": "n", "id": 1}))["properties"] == {
        "phone": "p",
        "name": "n",
        "id": 1,
    }


COLLISION_CASES: list[tuple[str, dict[str, Any], tuple[str, str]]] = [
    # (id, message, the two source names the detail gives)
    ("traits", identify({"Plan Type": "a", "plan_type": "b"}), ("Plan Type", "plan_type")),
    ("camelCase", identify({"planType": "a", "Plan Type": "b"}), ("planType", "Plan Type")),
    (
        "flattened",
        identify({"address": {"city": "Paris"}, "address_city": "Lyon"}),
        ("address.city", "address_city"),
    ),
    (
        "a rename onto another trait",
        identify({"plan": "a", "tier": "b"}),
        ("plan", "tier"),
    ),
    ("value types", identify({"Seats": 1, "seats": True}), ("Seats", "seats")),
    ("a null", identify({"Seats": None, "seats": 1}), ("Seats", "seats")),
    ("track", track(properties={"Order ID": "o-1", "order_id": "o-2"}), ("Order ID", "order_id")),
    (
        "page",
        {"type": "page", "userId": "u", "properties": {"URL": "a", "url": "b"}},
        ("URL", "url"),
    ),
    (
        "screen",
        {"type": "screen", "userId": "u", "properties": {"a.b": 1, "a_b": 2}},
        ("a.b", "a_b"),
    ),
    (
        "group",
        {"type": "group", "userId": "u", "traits": {"Plan": "a", "plan": "b"}},
        ("Plan", "plan"),
    ),
]

COLLISION_RULES = """
identify: {traits: {rename: {plan: tier}}}
page: {enabled: true}
screen: {enabled: true}
group: {enabled: true}
"""


@pytest.mark.parametrize(
    ("message", "names"),
    [case[1:] for case in COLLISION_CASES],
    ids=[case[0] for case in COLLISION_CASES],
)
def test_names_that_collide_with_different_values_are_rejected(
    message: dict[str, Any], names: tuple[str, str]
) -> None:
    result = rejected(message, COLLISION_RULES)
    assert result.reason == "invalid_field"
    for name in names:
        assert name in result.detail
    # Under drop neither value is sent: which one is right is anyone's guess.
    dropped = run(message, COLLISION_RULES + "invalid_fields: drop")
    if isinstance(dropped, Mapped):
        (op,) = dropped.operations
        sent = op.contact if isinstance(op, ContactUpsert) else op.event  # type: ignore[union-attr]
        properties = sent.get("custom_properties", sent.get("properties", {}))
        assert not properties, properties
    else:
        assert dropped == Skipped("group", "nothing_to_send")


def test_names_that_collide_with_equal_values_are_sent_once() -> None:
    traits = {"Plan Type": "pro", "plan_type": "pro", "planType": "pro", "x": 1}
    assert contact(identify(traits)) == {
        "user_id": "u-1",
        "custom_properties": {"plan_type": "pro", "x": 1},
    }
    properties = {"Order ID": "o-1", "order_id": "o-1", "at": TS, "At": 1793534400}
    assert event(track(properties=properties))["properties"] == {
        "order_id": "o-1",
        "at": 1793534400,
    }


def test_a_collision_under_drop_keeps_the_other_properties() -> None:
    traits = {"Plan Type": "a", "plan_type": "b", "PLAN TYPE": "a", "seats": 3}
    assert contact(identify(traits), "invalid_fields: drop") == {
        "user_id": "u-1",
        "custom_properties": {"seats": 3},
    }


# what the mapping accepts: Engage audience keys ----------------------------------------


def audience_identify(key: str, rules: str = "") -> MapResult:
    message = {
        "type": "identify",
        "userId": "u-42",
        "traits": {"email": "a@x.io", key: True, "plan": "pro"},
        "context": {"personas": {"computation_class": "audience", "computation_key": key}},
    }
    return run(message, rules)


@pytest.mark.parametrize(("key", "problem"), [("$$", "no property name"), ("Email", "'email'")])
def test_an_audience_key_that_names_no_custom_property_is_rejected(key: str, problem: str) -> None:
    rules = "identify: {traits: {include: [plan]}}"  # so only the audience sets it
    result = audience_identify(key, rules)
    assert isinstance(result, Rejected), result
    assert result.reason == "invalid_field"
    assert "context.personas.computation_key" in result.detail
    assert problem in result.detail
    dropped = audience_identify(key, rules + "\ninvalid_fields: drop")
    assert isinstance(dropped, Mapped)
    (upsert,) = dropped.operations
    assert isinstance(upsert, ContactUpsert)
    assert upsert.contact["custom_properties"] == {"plan": "pro"}


def test_an_audience_key_of_a_trait_read_as_a_contact_field_is_rejected() -> None:
    # traits.name is the contact's name, so the trait filters skip it, but the audience
    # would still set a custom property "name".
    message = {
        "type": "identify",
        "userId": "u-42",
        "traits": {"name": "true"},
        "context": {"personas": {"computation_class": "audience", "computation_key": "name"}},
    }
    assert "'name'" in rejected(message).detail


@pytest.mark.parametrize(("key", "problem"), [("", "no property name"), ("User ID", "'user_id'")])
def test_an_audience_track_key_that_names_no_custom_property_is_rejected(
    key: str, problem: str
) -> None:
    message = audience_track(True)
    message["properties"] = {"audience_key": key, key: True}
    result = rejected(message)
    assert result.reason == "invalid_field"
    assert "properties.audience_key" in result.detail
    assert problem in result.detail


def test_an_audience_key_that_is_not_a_string_is_rejected() -> None:
    message = audience_track(True)
    message["properties"] = {"audience_key": 7}
    assert "properties.audience_key" in rejected(message).detail


def test_a_computed_trait_named_like_a_contact_field_is_rejected() -> None:
    message = {
        "type": "track",
        "userId": "u-42",
        "event": "Trait Computed",
        "properties": {"phone": "+44"},
        "context": {"personas": {"computation_class": "trait", "computation_key": "phone"}},
    }
    result = rejected(message)
    assert "context.personas.computation_key" in result.detail
    assert "'phone'" in result.detail


# the demo's sample stream --------------------------------------------------------------


def test_the_sample_stream_maps_as_before() -> None:
    from destination.devtools.sample import sample_stream

    outcomes: dict[str, int] = {}
    for record in sample_stream(users=200):
        if isinstance(record.value, bytes):
            continue
        result = run(record.value)
        if isinstance(result, Mapped):
            label = "Mapped"
        else:
            label = f"{type(result).__name__}/{result.reason}"
        outcomes[label] = outcomes.get(label, 0) + 1
    # Only the two records the sample breaks on purpose are not mapped.
    assert outcomes.pop("Rejected/missing_identity") == 1
    assert outcomes.pop("Rejected/unknown_type") == 1
    assert set(outcomes) == {"Mapped"}


# what the mapping accepts: timestamps --------------------------------------------------

TIME_ACCEPTED: list[tuple[Any, float]] = [
    # (a timestamp as written, its epoch seconds)
    (TS, TS_EPOCH),
    ("2026-11-01T12:00:00", TS_EPOCH),  # no zone: UTC
    ("2026-11-01T14:00:00+02:00", TS_EPOCH),
    ("20261101T120000Z", TS_EPOCH),  # ISO 8601's basic format
    ("2026-11-01", TS_EPOCH - 12 * 3600),
    (1793534400, TS_EPOCH),
    (1793534400.5, TS_EPOCH + 0.5),
    (1793534400000, TS_EPOCH),  # above 1e11: milliseconds
    ("1793534400", TS_EPOCH),
    (" 1793534400 ", TS_EPOCH),
    ("1793534400000", TS_EPOCH),
    ("1793534400.25", TS_EPOCH + 0.25),
    ("1970-01-01T00:00:00Z", 0.0),
    (0, 0.0),
    ("9999-12-31T23:59:59Z", 253402300799.0),
    (253402300799999, 253402300799.999),
]

TIME_REJECTED: list[Any] = [
    "yesterday",
    "Wed, 01 Nov 2026 12:00:00 GMT",  # RFC 2822: not one of the accepted forms
    "2026-13-01T00:00:00Z",
    "0001-01-01T00:00:00Z",  # before 1970
    "1969-12-31T23:59:59Z",
    "9999-12-31T23:59:59-01:00",  # after 9999-12-31
    -1,
    "-1793534400",
    1e300,
    float("inf"),
    "1" * 400,
    2**70,
    253402300800000,
    True,
    [TS],
    {"iso": TS},
    "",
    "  ",
]


@pytest.mark.parametrize(("written", "seconds"), TIME_ACCEPTED, ids=repr)
def test_timestamps_that_are_accepted(written: Any, seconds: float) -> None:
    sent = event(track(timestamp=written))
    assert sent["occurred_at"] == int(seconds)
    (op,) = operations(track(timestamp=written))
    assert op.timestamp == pytest.approx(seconds)
    upsert = contact(identify({"createdAt": written}))
    assert upsert["signed_up_at"] == int(seconds)


@pytest.mark.parametrize("written", TIME_REJECTED, ids=lambda v: repr(v)[:30])
def test_timestamps_that_are_rejected(written: Any) -> None:
    for field in ("timestamp", "originalTimestamp", "sentAt", "receivedAt"):
        result = rejected(track(**{field: written}))
        assert result.reason == "invalid_field"
        assert result.detail.startswith(f"{field} must be ")
    result = rejected(identify({"createdAt": written}))
    assert result.detail.startswith("traits.createdAt must be ")
    # Under invalid_fields: drop the field is dropped: no occurred_at, no signed_up_at.
    assert event(track(timestamp=written), "invalid_fields: drop") == {
        "event_name": "Order Completed",
        "user_id": "u-1",
    }
    assert contact(identify({"createdAt": written}), "invalid_fields: drop") == {
        "user_id": "u-1"
    }


def test_a_bad_timestamp_is_reported_though_a_later_one_is_good() -> None:
    message = track(timestamp="yesterday", originalTimestamp=TS)
    assert rejected(message).detail.startswith("timestamp must be ")
    # Dropped, it leaves the next one.
    assert event(message, "invalid_fields: drop")["occurred_at"] == int(TS_EPOCH)


def test_timestamps_after_the_one_used_are_not_read() -> None:
    message = track(timestamp=TS, sentAt="junk", receivedAt=-5)
    assert event(message)["occurred_at"] == int(TS_EPOCH)


def test_a_null_or_absent_timestamp_gives_no_occurred_at() -> None:
    assert "occurred_at" not in event(track(timestamp=None))
    assert "occurred_at" not in event(track())
    assert event(track(timestamp=None, receivedAt=TS))["occurred_at"] == int(TS_EPOCH)


def test_every_type_checks_its_timestamp() -> None:
    for message in (
        {"type": "delete", "userId": "u-1"},
        {"type": "alias", "previousId": "a", "userId": "b"},
        identify({}),
    ):
        assert rejected({**message, "timestamp": 1e300}).detail.startswith("timestamp ")


# what the mapping accepts: numbers -----------------------------------------------------


@pytest.mark.parametrize("number", [2**63 - 1, -(2**63), 1e300, -1.5e-300])
def test_numbers_gist_can_store_are_sent(number: Any) -> None:
    assert contact(identify({"n": number}))["custom_properties"] == {"n": number}
    assert event(track(properties={"n": number}))["properties"] == {"n": number}


@pytest.mark.parametrize("number", [2**63, 2**64 - 1, 2**64, 2**200, -(2**63) - 1])
def test_integers_beyond_signed_64_bits_are_rejected(number: int) -> None:
    traits = {"plan": "pro", "stats": {"n": number}}
    result = rejected(identify(traits))
    assert result.reason == "invalid_field"
    assert result.detail.startswith("traits.stats.n must be ")
    assert str(number) not in result.detail
    assert rejected(track(properties={"n": number})).detail.startswith("properties.n ")
    assert rejected(track(properties={"n": [1, number]})).detail.startswith("properties.n ")
    assert contact(identify(traits), "invalid_fields: drop") == {
        "user_id": "u-1",
        "custom_properties": {"plan": "pro"},
    }
    assert "properties" not in event(track(properties={"n": number}), "invalid_fields: drop")


def test_a_computed_trait_beyond_64_bits_is_rejected() -> None:
    message = {
        "type": "identify",
        "userId": "u-42",
        "traits": {"score": 2**64},
        "context": {"personas": {"computation_class": "trait", "computation_key": "score"}},
    }
    assert rejected(message).detail.startswith("traits.score ")


def test_a_detail_shows_a_long_field_name_cut_short() -> None:
    # The detail becomes a dead-letter header: a name from the message may be anything.
    name = "n" * 10_000
    result = rejected(identify({name: 2**64, "plan": "pro"}))
    assert result.detail.startswith("traits.nnn")
    assert len(result.detail) < 200
    result = rejected(identify({name: "a", name.upper(): "b"}))
    assert len(result.detail) < 300
