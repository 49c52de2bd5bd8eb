"""An identify's traits are ``traits`` merged over ``context.traits`` (the message's own
win): RudderStack's SDKs send identify traits only in ``context.traits``."""

from __future__ import annotations

import textwrap
from typing import Any

from destination.mapping import Mapper, Rules, parse_rules
from destination.operations import ContactUpsert, Mapped, Rejected, TagChange

# What rudder-sdk-python 2.x sends for
# identify("u-7", {"email": ..., "name": ..., "plan": ..., "address": ...}).
RUDDERSTACK_IDENTIFY = {
    "type": "identify",
    "userId": "u-7",
    "anonymousId": None,
    "messageId": "m-7",
    "channel": "server",
    "integrations": {"All": True},
    "timestamp": "2026-11-01T12:00:00+00:00",
    "context": {
        "traits": {
            "email": "ada@example.com",
            "name": "Ada Lovelace",
            "plan": "pro",
            "createdAt": "2024-03-01T10:00:00Z",
            "address": {"city": "London"},
        },
        "library": {"name": "analytics-python", "version": "2.1.0"},
    },
}


def mapped(message: dict[str, Any], rules: str = "") -> Mapped:
    parsed = parse_rules(textwrap.dedent(rules)) if rules else Rules()
    result = Mapper(parsed).map(message)
    assert isinstance(result, Mapped), result
    return result


def contact(message: dict[str, Any], rules: str = "") -> dict[str, Any]:
    (upsert, *_) = mapped(message, rules).operations
    assert isinstance(upsert, ContactUpsert)
    return dict(upsert.contact)


def test_a_rudderstack_identify_sends_every_trait() -> None:
    assert contact(RUDDERSTACK_IDENTIFY) == {
        "user_id": "u-7",
        "email": "ada@example.com",
        "name": "Ada Lovelace",
        "signed_up_at": 1709287200,
        "custom_properties": {"plan": "pro", "address_city": "London"},
    }


def test_the_messages_own_traits_win_key_by_key() -> None:
    message = {
        "type": "identify",
        "userId": "u-1",
        "traits": {"plan": "team", "address": {"country": "UK"}, "email": "new@x.io"},
        "context": {
            "traits": {"plan": "pro", "address": {"city": "Paris"}, "email": "old@x.io",
                       "seats": 3},
        },
    }  # fmt: skip
    assert contact(message) == {
        "user_id": "u-1",
        "email": "new@x.io",
        # a trait of the message replaces the one of context whole (no deep merge)
        "custom_properties": {"plan": "team", "address_country": "UK", "seats": 3},
    }


def test_the_rules_paths_into_traits_read_the_merged_traits() -> None:
    rules = """
        identify:
          fields: {phone: [traits.contact.phone]}
        tags:
          traits:
            - tag: "plan-{traits.plan}"
            - untag: trial
              when: {traits.plan: pro}
        """
    message = {**RUDDERSTACK_IDENTIFY, "context": {"traits": {
        "email": "ada@example.com", "plan": "pro", "contact": {"phone": "+44 1"}}}}  # fmt: skip
    upsert, untag = mapped(message, rules).operations
    assert isinstance(upsert, ContactUpsert)
    assert upsert.contact["phone"] == "+44 1"
    assert upsert.contact["tags"] == ["plan-pro"]
    assert isinstance(untag, TagChange)
    assert (untag.tag, untag.untag) == ("trial", True)


def test_a_trait_repeating_the_user_id_is_the_identity_not_a_property() -> None:
    # RudderStack's mobile SDKs copy the user id into context.traits.
    message = {
        "type": "identify",
        "userId": "u-7",
        "context": {"traits": {"userId": "u-7", "anonymousId": "a-1", "plan": "pro"}},
    }
    assert contact(message) == {
        "user_id": "u-7",
        "custom_properties": {"anonymous_id": "a-1", "plan": "pro"},
    }
    numeric = {"type": "identify", "userId": 42, "traits": {"user_id": 42}}
    assert contact(numeric) == {"user_id": "42"}
    # Another id there is still a trait named like a contact field.
    other = {"type": "identify", "userId": "u-7", "context": {"traits": {"userId": "u-8"}}}
    result = Mapper(Rules()).map(other)
    assert isinstance(result, Rejected)
    assert result.reason == "invalid_field"
    assert "traits.userId" in result.detail


def test_context_traits_that_are_not_an_object_are_ignored() -> None:
    for known in (None, "x", [], {}):
        message = {"type": "identify", "userId": "u-1", "traits": {"plan": "pro"},
                   "context": {"traits": known}}  # fmt: skip
        assert contact(message) == {"user_id": "u-1", "custom_properties": {"plan": "pro"}}


def test_a_groups_traits_are_the_companys_and_are_not_merged() -> None:
    message = {
        "type": "group",
        "userId": "u-1",
        "groupId": "g-1",
        "traits": {"name": "Acme"},
        "context": {"traits": {"plan": "pro"}},
    }
    assert contact(message, "group: {enabled: true}")["custom_properties"] == {
        "company_id": "g-1",
        "company_name": "Acme",
    }


def test_the_message_is_left_as_it_came() -> None:
    message = {"type": "identify", "userId": "u-7",
               "context": {"traits": {"userId": "u-7", "plan": "pro"}}}  # fmt: skip
    before = repr(message)
    contact(message)
    assert repr(message) == before


def test_a_groups_email_trait_is_the_companys_not_the_users() -> None:
    message = {
        "type": "group",
        "userId": "u-1",
        "groupId": "g-1",
        "traits": {"name": "Acme", "email": "billing@acme.io"},
        "context": {"traits": {"email": "ada@example.com"}},
    }
    sent = contact(message, "group: {enabled: true}")
    assert sent["email"] == "ada@example.com"
    assert sent["custom_properties"]["company_email"] == "billing@acme.io"
    del message["context"]
    assert "email" not in contact(message, "group: {enabled: true}")
    anonymous = {"type": "group", "groupId": "g-1", "traits": {"email": "billing@acme.io"}}
    result = Mapper(parse_rules("group: {enabled: true}")).map(anonymous)
    assert isinstance(result, Rejected)
    assert result.reason == "missing_identity"
