"""Consent: Segment's categories skip what Gist may not have, and e-mail consent changes
become ``unsubscribed_from_emails`` and subscription types."""

from __future__ import annotations

from typing import Any

import pytest

from destination.mapping import Mapper
from destination.mapping._schema import Rules
from destination.operations import (
    ContactDelete,
    ContactUpsert,
    EventTrack,
    Mapped,
    Skipped,
    SubscriptionChange,
)


def mapper(**consent: Any) -> Mapper:
    return Mapper(Rules.model_validate({"consent": consent}))


def message(kind: str = "identify", prefs: dict[str, Any] | None = None, **fields: Any) -> Any:
    out: dict[str, Any] = {"type": kind, "userId": "u1", **fields}
    if kind == "identify":
        out.setdefault("traits", {"email": "ada@example.com", "plan": "pro"})
    if kind == "track":
        out.setdefault("event", "Viewed")
    if prefs is not None:
        out["context"] = {"consent": {"categoryPreferences": prefs}}
    return out


@pytest.mark.parametrize("kind", ["identify", "track", "page", "group", "alias"])
def test_a_message_denying_a_required_category_is_skipped(kind: str) -> None:
    m = mapper(required=["Marketing"])
    result = m.map(message(kind, {"marketing": False, "Analytics": True}, previousId="u0"))
    assert result == Skipped(kind, "no_consent")


def test_a_message_granting_every_required_category_goes() -> None:
    m = mapper(required=["Marketing", "Analytics"])
    result = m.map(message("identify", {"Marketing": True, "Analytics": True, "Ads": False}))
    assert isinstance(result, Mapped)


def test_a_delete_always_goes() -> None:
    m = mapper(required=["Marketing"], without_consent_data="skip")
    denied = {"consent": {"categoryPreferences": {"Marketing": False}}}
    result = m.map({"type": "delete", "userId": "u1", "context": denied})
    assert isinstance(result, Mapped)
    assert isinstance(result.operations[0], ContactDelete)
    assert isinstance(m.map({"type": "delete", "userId": "u1"}), Mapped)


@pytest.mark.parametrize(("rule", "outcome"), [("send", Mapped), ("skip", Skipped)])
def test_a_message_without_consent_data_follows_the_rules(rule: str, outcome: type) -> None:
    m = mapper(required=["Marketing"], without_consent_data=rule)
    assert isinstance(m.map(message("identify")), outcome)
    # With no category required there is nothing to check: it goes.
    assert isinstance(mapper(without_consent_data=rule).map(message("identify")), Mapped)


def test_by_default_consent_data_changes_nothing() -> None:
    result = Mapper(Rules()).map(message("identify", {"Marketing": False, "Email": False}))
    assert isinstance(result, Mapped)
    (upsert,) = result.operations
    assert isinstance(upsert, ContactUpsert)
    assert "unsubscribed_from_emails" not in upsert.contact


def test_e_mail_consent_on_an_identify_sets_unsubscribed_and_subscription_types() -> None:
    m = mapper(email="Email", subscription_types={"Newsletter": "Email", "Offers": "Ads"})
    result = m.map(message("identify", {"email": False, "Ads": True}))
    assert isinstance(result, Mapped)
    upsert, *changes = result.operations
    assert isinstance(upsert, ContactUpsert)
    assert upsert.contact["unsubscribed_from_emails"] is True
    high = upsert.priority
    assert changes == [
        SubscriptionChange("Newsletter", False, "u1", "ada@example.com", priority=high),
        SubscriptionChange("Offers", True, "u1", "ada@example.com", priority=high),
    ]
    assert all(change.priority == upsert.priority for change in changes)


def test_segments_consent_event_becomes_the_contacts_e_mail_consent() -> None:
    m = mapper(email="Email")
    result = m.map(
        message("track", {"Email": True}, event="Segment Consent Preference Updated")
    )
    assert isinstance(result, Mapped)
    upsert, event = result.operations
    assert isinstance(upsert, ContactUpsert)
    assert upsert.contact == {"user_id": "u1", "unsubscribed_from_emails": False}
    assert isinstance(event, EventTrack)


def test_other_tracks_carrying_consent_data_change_no_contact() -> None:
    """Consent data rides on every message; only a change (Segment's consent event, or an
    identify) costs requests."""
    m = mapper(email="Email", subscription_types={"Newsletter": "Email"})
    result = m.map(message("track", {"Email": False}))
    assert isinstance(result, Mapped)
    assert [type(op) for op in result.operations] == [EventTrack]
