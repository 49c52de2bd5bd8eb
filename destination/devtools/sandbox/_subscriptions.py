"""The workspace's subscription types, and who is subscribed to each.

Gist's API reads subscription types and (un)subscribes contacts; it does not create
types. The sandbox seeds them from ``SandboxConfig.subscription_types`` (and
``POST /_sandbox/subscription_types`` adds one); a reset unsubscribes everyone and keeps
the types, with their ids.

How strict ``POST /subscription_types/{id}`` is: 404 ``subscription_type_not_found``
for an unknown type (checked first); 400 when ``subscribed_status`` is absent or not a
JSON boolean (the reference writes ``'true'``, its example sends ``true``: the sandbox
takes the boolean only), or when none of ``user_id``, ``email``, ``contact_id`` is
given; 404 ``contact_not_found`` when none of them names a contact (the contact is not
created). The contact is looked up in the reference's order: ``user_id``, then
``email``, then ``contact_id``. The answer is the contact; its ``subscription_types``
lists ``{"id", "name"}`` of each type it is subscribed to (the shape of its ``tags``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from destination.devtools.sandbox._checks import (
    JSON,
    bad_request,
    check_contact_id,
    check_email,
    check_user_id,
)

SUBSCRIPTION_STATUSES: Final = ("published", "draft", "archived")


@dataclass(slots=True)
class SubscriptionType:
    id: int
    name: str
    description: str
    display_order: int
    status: str = "published"
    contact_ids: dict[int, None] = field(default_factory=dict)
    """An insertion-ordered set of the subscribed contacts' ids."""

    def to_json(self) -> dict[str, JSON]:
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "people_count": len(self.contact_ids),
            "status": self.status,
            "display_order": self.display_order,
        }

    def ref_json(self) -> dict[str, JSON]:
        """How a contact lists it."""
        return {"id": self.id, "name": self.name}


@dataclass(frozen=True, slots=True)
class SubscriptionRequest:
    """A checked ``POST /subscription_types/{id}`` body."""

    subscribed: bool
    user_id: str | None
    email: str | None
    contact_id: int | None


def parse_subscription_request(raw: object) -> SubscriptionRequest:
    if not isinstance(raw, dict):
        raise bad_request("the body must be a JSON object")
    subscribed = raw.get("subscribed_status")
    if subscribed is None:
        raise bad_request("subscribed_status is required (true to add, false to remove)")
    if not isinstance(subscribed, bool):
        raise bad_request(f"subscribed_status must be true or false, got {subscribed!r}")
    user_id = check_user_id(raw["user_id"]) if raw.get("user_id") is not None else None
    email = check_email(raw["email"]) if raw.get("email") is not None else None
    contact_id = (
        check_contact_id(raw["contact_id"], "contact_id")
        if raw.get("contact_id") is not None
        else None
    )
    if user_id is None and email is None and raw.get("contact_id") is None:
        raise bad_request("one of user_id, email or contact_id is required")
    return SubscriptionRequest(
        subscribed=subscribed, user_id=user_id, email=email, contact_id=contact_id
    )


def check_subscription_type(raw: object) -> tuple[str, str, str]:
    """A ``POST /_sandbox/subscription_types`` body: name, description, status."""
    if not isinstance(raw, dict):
        raise bad_request("the body must be a JSON object")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise bad_request("name is required and must be a non-empty string")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise bad_request("description must be a string")
    status = raw.get("status", "published")
    if status not in SUBSCRIPTION_STATUSES:
        raise bad_request(f"status must be one of {', '.join(SUBSCRIPTION_STATUSES)}")
    return name.strip(), description, status
