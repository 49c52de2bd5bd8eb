"""Typed request and response shapes of the Gist API calls the destination makes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Required, TypeAlias, TypedDict

JSONValue: TypeAlias = Any
"""A value orjson can serialise (str, int, float, bool, None, list, dict)."""


class ContactPayload(TypedDict, total=False):
    """The writable fields of a Gist contact, as sent to ``POST /contacts`` or inside
    ``POST /contacts/batch``. Absent keys are left untouched by Gist; a key present with
    ``None`` clears the value."""

    id: str
    email: str
    user_id: str
    name: str | None
    phone: str | None
    signed_up_at: int | None
    last_seen_ip: str | None
    last_seen_user_agent: str | None
    unsubscribed_from_emails: bool
    tags: list[str]
    custom_properties: dict[str, JSONValue]


class EventPayload(TypedDict, total=False):
    """The body of ``POST /events``: a name and one of ``user_id`` / ``email`` / ``id``."""

    event_name: Required[str]
    user_id: str
    email: str
    id: str
    properties: dict[str, JSONValue]
    occurred_at: int


class ContactRef(TypedDict, total=False):
    """Identifies one contact in a tag request (``POST /tags``)."""

    id: str
    email: str
    user_id: str
    untag: bool


ContactKey: TypeAlias = Literal["id", "user_id", "email"]


@dataclass(frozen=True, slots=True)
class BatchAccepted:
    """Gist queued a batch import; its outcome is known only once ``batch_status`` says
    ``COMPLETED``."""

    batch_id: str
    queued_contacts: int
    status: str = "QUEUED"


@dataclass(frozen=True, slots=True)
class BatchContactError:
    """One contact of a completed batch that Gist did not import.

    ``index`` is the contact's position in the submitted batch when Gist reports it;
    ``email`` / ``user_id`` identify it otherwise."""

    message: str
    index: int | None = None
    email: str | None = None
    user_id: str | None = None


@dataclass(frozen=True, slots=True)
class BatchStatus:
    """Where a batch import stands. ``status`` is what Gist said (``QUEUED``,
    ``IN_PROGRESS``, ``COMPLETED`` in the reference; anything else, or ``UNREADABLE``
    for an answer that was not a JSON object, counts as not completed)."""

    status: str
    imported_contacts: int | None = None
    errors: tuple[BatchContactError, ...] = ()

    @property
    def completed(self) -> bool:
        return self.status == "COMPLETED"


@dataclass(frozen=True, slots=True)
class TokenInfo:
    workspace_id: str
    token_type: str | None = None
    app_id: str | None = None
    scope: str | None = None
    raw: dict[str, JSONValue] = field(default_factory=dict, repr=False)
