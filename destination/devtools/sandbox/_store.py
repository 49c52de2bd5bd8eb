"""The sandbox's in-memory workspace: contacts, tags, events, batches, subscription types,
e-commerce (``_ecommerce``) and request stats.

Everything runs on one event loop, so nothing here locks. Contacts are indexed by id,
``user_id`` and down-cased email, so no request scans the stored data. Every mutating
method validates the whole request before it changes anything: a 400 leaves no trace.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Final, Literal

from destination.devtools.sandbox._checks import (
    JSON,
    ApiError,
    bad_request,
    check_contact_id,
    check_email,
    check_user_id,
    not_found,
)
from destination.devtools.sandbox._config import DEFAULT_SUBSCRIPTION_TYPES
from destination.devtools.sandbox._ecommerce import Commerce
from destination.devtools.sandbox._subscriptions import (
    SubscriptionType,
    parse_subscription_request,
)

__all__ = ["JSON", "ApiError", "Batch", "Contact", "Event", "Store", "Tag", "bad_request"]

BatchState = Literal["QUEUED", "IN_PROGRESS", "COMPLETED"]

REQUEST_LOG_SIZE: Final = 100_000

_NULLABLE_STRINGS: Final = ("name", "phone", "last_seen_ip", "last_seen_user_agent")
_LOCATION_DATA: Final = (
    "city_name",
    "region_name",
    "country_name",
    "country_code",
    "continent_name",
    "continent_code",
    "latitude",
    "longitude",
    "postal_code",
    "time_zone",
    "utc_offset",
)


def _now() -> int:
    return int(time.time())


@dataclass(slots=True)
class Tag:
    id: int
    name: str

    def to_json(self) -> dict[str, JSON]:
        return {"id": self.id, "name": self.name}


@dataclass(slots=True)
class Contact:
    id: int
    email: str
    created_at: int
    updated_at: int
    user_id: str | None = None
    name: str | None = None
    phone: str | None = None
    signed_up_at: int | None = None
    last_seen_ip: str | None = None
    last_seen_user_agent: str | None = None
    unsubscribed_from_emails: bool = False
    tag_ids: dict[int, None] = field(default_factory=dict)
    """An insertion-ordered set of tag ids."""
    custom_properties: dict[str, JSON] = field(default_factory=dict)

    @property
    def type(self) -> str:
        return "lead" if self.user_id is None else "user"

    def to_json(
        self,
        tags: dict[int, Tag],
        subscription_types: dict[int, SubscriptionType] | None = None,
    ) -> dict[str, JSON]:
        types = subscription_types or {}  # few: a look in each is cheaper than a set each
        return {
            "type": self.type,
            "id": self.id,
            "name": self.name,
            "email": self.email,
            "user_id": self.user_id,
            "phone": self.phone,
            "created_at": self.created_at,
            "signed_up_at": self.signed_up_at,
            "last_seen_at": self.created_at,
            "last_contacted_at": None,
            "updated_at": self.updated_at,
            "session_count": None,
            "avatar": None,
            "landing_url": None,
            "original_referrer": None,
            "last_seen_ip": self.last_seen_ip,
            "last_seen_user_agent": self.last_seen_user_agent,
            "location_data": dict.fromkeys(_LOCATION_DATA),
            "segments": [],
            "tags": [tags[t].to_json() for t in self.tag_ids if t in tags],
            "subscription_types": [
                t.ref_json() for t in types.values() if self.id in t.contact_ids
            ],
            "social_profiles": [],
            "custom_properties": dict(self.custom_properties),
            "unsubscribed_from_emails": self.unsubscribed_from_emails,
        }


@dataclass(slots=True)
class Event:
    id: int
    name: str
    """The canonical name: ``.`` and ``$`` replaced with ``-``, first-seen casing."""
    submitted_name: str
    contact_id: int
    user_id: str | None
    email: str
    properties: dict[str, JSON]
    occurred_at: int

    def to_json(self) -> dict[str, JSON]:
        return {
            "id": self.id,
            "name": self.name,
            "contact_id": self.contact_id,
            "user_id": self.user_id,
            "email": self.email,
            "properties": self.properties,
            "occurred_at": self.occurred_at,
        }


@dataclass(slots=True)
class Batch:
    id: str
    contacts: list[JSON]
    queued_at: float
    """``time.monotonic()`` when the batch was accepted."""
    queued_contacts: int = 0
    status: BatchState = "QUEUED"
    imported_contacts: int = 0
    errors: list[dict[str, JSON]] = field(default_factory=list)

    def status_json(self) -> dict[str, JSON]:
        if self.status != "COMPLETED":
            return {"status": self.status}
        return {
            "status": self.status,
            "imported_contacts": self.imported_contacts,
            "errors": self.errors,
        }


# -- validation -------------------------------------------------------------------------


@dataclass(slots=True)
class _ContactRequest:
    """A validated ``POST /contacts`` body."""

    id: int | None = None
    email: str | None = None
    user_id: str | None = None
    fields: dict[str, JSON] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    custom_properties: dict[str, JSON] = field(default_factory=dict)


def _parse_contact(raw: object) -> _ContactRequest:
    if not isinstance(raw, dict):
        raise bad_request("a contact must be a JSON object")
    req = _ContactRequest()
    if "id" in raw and raw["id"] is not None:
        req.id = check_contact_id(raw["id"])
    # Identifiers cannot be cleared: a null one is taken as absent.
    if raw.get("email") is not None:
        req.email = check_email(raw["email"])
    if raw.get("user_id") is not None:
        req.user_id = check_user_id(raw["user_id"])
    for name in _NULLABLE_STRINGS:
        if name in raw:
            value = raw[name]
            if value is not None and not isinstance(value, str):
                raise bad_request(f"{name} must be a string or null")
            req.fields[name] = value
    if "signed_up_at" in raw:
        value = raw["signed_up_at"]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise bad_request("signed_up_at must be an integer (unix seconds) or null")
        req.fields["signed_up_at"] = value
    if "unsubscribed_from_emails" in raw:
        value = raw["unsubscribed_from_emails"]
        if not isinstance(value, bool):
            raise bad_request("unsubscribed_from_emails must be a boolean")
        req.fields["unsubscribed_from_emails"] = value
    if "tags" in raw:
        tags = raw["tags"]
        if not isinstance(tags, list):
            raise bad_request("tags must be a list of tag names")
        for i, tag in enumerate(tags):
            if not isinstance(tag, str) or not tag.strip():
                raise bad_request(f"tags[{i}] must be a non-empty string")
        req.tags = tags
    if "custom_properties" in raw:
        props = raw["custom_properties"]
        if not isinstance(props, dict):
            raise bad_request("custom_properties must be a JSON object")
        for key, value in props.items():
            if isinstance(value, dict | list):
                raise bad_request(
                    f"custom_properties.{key} must be a string, number, boolean or null "
                    "(custom properties are flat)"
                )
        req.custom_properties = props
    return req


def _parse_occurred_at(value: object) -> int:
    if value is None:
        return _now()
    if isinstance(value, bool):
        raise bad_request("occurred_at must be unix seconds, an ISO-8601 string or null")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise bad_request(f"occurred_at is not an ISO-8601 time: {value!r}") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return int(parsed.timestamp())
    raise bad_request("occurred_at must be unix seconds, an ISO-8601 string or null")


def normalise_event_name(name: str) -> str:
    return name.replace(".", "-").replace("$", "-")


def _identify_error(index: int, raw: object, message: str) -> dict[str, JSON]:
    email: JSON = None
    user_id: JSON = None
    if isinstance(raw, dict):
        if isinstance(raw.get("email"), str):
            email = raw["email"]
        value = raw.get("user_id")
        if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
            user_id = str(value)
    return {"index": index, "email": email, "user_id": user_id, "message": message}


# -- the store --------------------------------------------------------------------------


class Store:
    """One workspace's data plus the sandbox's request statistics."""

    def __init__(self, subscription_types: Sequence[str] = DEFAULT_SUBSCRIPTION_TYPES) -> None:
        # Ids keep counting across resets so a stale id never names a new record.
        self._contact_ids = itertools.count(1)
        self._tag_ids = itertools.count(1)
        self._event_ids = itertools.count(1)
        self.contacts: dict[int, Contact] = {}
        self.by_email: dict[str, int] = {}
        self.by_user_id: dict[str, int] = {}
        self.tags: dict[int, Tag] = {}
        self.tags_by_name: dict[str, int] = {}
        self.events: list[Event] = []
        self.event_names: dict[str, str] = {}
        """Lower-cased normalised event name -> canonical (first-seen) name."""
        self.batches: dict[str, Batch] = {}
        self.pending: deque[Batch] = deque()
        """Batches not yet completed, in the order they are processed."""
        self._idle = asyncio.Event()
        self._idle.set()
        self.requests: deque[tuple[float, str, str, int]] = deque(maxlen=REQUEST_LOG_SIZE)
        self.request_count = 0
        self.by_status: Counter[int] = Counter()
        self.rate_limited = 0
        self._subscription_type_ids = itertools.count(1)
        self.subscription_types: dict[int, SubscriptionType] = {}
        for name in subscription_types:
            self.add_subscription_type(name)
        self.lifetime_values: dict[int, dict[str, Decimal]] = {}
        """Contact id -> LTV by currency code, kept by orders (``_ecommerce``). Gist's
        contact object does not show it; ``GET /_sandbox/state`` does. Kept here, not on
        ``Contact``: most contacts have none (a million contacts, a million dicts)."""
        self.ecommerce = Commerce(self)

    def reset(self) -> None:
        """Forget every contact, tag, event, batch (queued ones are dropped), e-commerce
        store, subscription and stat. Subscription types stay, with their ids."""
        self.contacts.clear()
        self.by_email.clear()
        self.by_user_id.clear()
        self.tags.clear()
        self.tags_by_name.clear()
        self.events.clear()
        self.event_names.clear()
        self.batches.clear()
        self.pending.clear()
        self._idle.set()
        self.requests.clear()
        self.request_count = 0
        self.by_status.clear()
        self.rate_limited = 0
        for subscription_type in self.subscription_types.values():
            subscription_type.contact_ids.clear()
        self.lifetime_values.clear()
        self.ecommerce.reset()

    # -- stats ---------------------------------------------------------------------------

    def record_request(self, t: float, method: str, path: str, status: int) -> None:
        self.requests.append((t, method, path, status))
        self.request_count += 1
        self.by_status[status] += 1
        if status == 429:
            self.rate_limited += 1

    def requests_json(self, since: float | None = None) -> list[dict[str, JSON]]:
        return [
            {"t": t, "method": m, "path": p, "status": s}
            for t, m, p, s in self.requests
            if since is None or t >= since
        ]

    def stats_json(self) -> dict[str, JSON]:
        return {
            "requests": self.request_count,
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "rate_limited": self.rate_limited,
        }

    def snapshot(self) -> dict[str, JSON]:
        return {
            "contacts": [self.contact_json(c) for c in self.contacts.values()],
            "events": [e.to_json() for e in self.events],
            "event_names": list(self.event_names.values()),
            "tags": [t.to_json() for t in self.tags.values()],
            "batches": {
                b.id: {"queued_contacts": b.queued_contacts, **b.status_json()}
                for b in self.batches.values()
            },
            "subscription_types": [
                {**t.to_json(), "contact_ids": list(t.contact_ids)}
                for t in self.subscription_types.values()
            ],
            "ecommerce": self.ecommerce.snapshot(),
            "stats": self.stats_json(),
        }

    # -- contacts ------------------------------------------------------------------------

    def find_contact(
        self, *, id: int | None = None, user_id: str | None = None, email: str | None = None
    ) -> Contact | None:
        """The first match in Gist's look-up order: id, then user_id, then email."""
        if id is not None and (found := self.contacts.get(id)) is not None:
            return found
        if user_id is not None and (cid := self.by_user_id.get(user_id)) is not None:
            return self.contacts[cid]
        if email is not None and (cid := self.by_email.get(email.lower())) is not None:
            return self.contacts[cid]
        return None

    def lifetime_value(self, contact: Contact) -> dict[str, Decimal]:
        """The contact's LTV by currency code ({} before its first order)."""
        return dict(self.lifetime_values.get(contact.id, {}))

    def contact_json(self, contact: Contact) -> dict[str, JSON]:
        return contact.to_json(self.tags, self.subscription_types)

    def upsert_contact(self, raw: object) -> Contact:
        """``POST /contacts``: update the contact the body names, or create one."""
        req = _parse_contact(raw)
        contact = self.find_contact(id=req.id, user_id=req.user_id, email=req.email)
        if contact is None:
            if req.email is None:
                raise bad_request("email is required to create a contact")
            now = _now()
            contact = Contact(
                id=next(self._contact_ids), email=req.email, created_at=now, updated_at=now
            )
            self.contacts[contact.id] = contact
            self.by_email[contact.email] = contact.id
        else:
            if req.email is not None and req.email != contact.email:
                other = self.by_email.get(req.email)
                if other is not None and other != contact.id:
                    raise ApiError(
                        400,
                        "contact_conflict",
                        f"email {req.email} already belongs to contact {other}",
                    )
            if req.user_id is not None and req.user_id != contact.user_id:
                other = self.by_user_id.get(req.user_id)
                if other is not None and other != contact.id:
                    raise ApiError(
                        400,
                        "contact_conflict",
                        f"user_id {req.user_id} already belongs to contact {other}",
                    )
            contact.updated_at = _now()
            if req.email is not None and req.email != contact.email:
                del self.by_email[contact.email]
                contact.email = req.email
                self.by_email[req.email] = contact.id
        if req.user_id is not None and req.user_id != contact.user_id:
            if contact.user_id is not None:
                del self.by_user_id[contact.user_id]
            contact.user_id = req.user_id
            self.by_user_id[req.user_id] = contact.id
        for name, value in req.fields.items():
            setattr(contact, name, value)
        for tag_name in req.tags:
            contact.tag_ids[self._tag_for(tag_name).id] = None
        contact.custom_properties.update(req.custom_properties)
        return contact

    def delete_contact(self, contact: Contact) -> None:
        del self.contacts[contact.id]
        self.by_email.pop(contact.email, None)
        if contact.user_id is not None:
            self.by_user_id.pop(contact.user_id, None)
        for subscription_type in self.subscription_types.values():
            subscription_type.contact_ids.pop(contact.id, None)
        self.lifetime_values.pop(contact.id, None)  # its LTV goes with it

    # -- batches -------------------------------------------------------------------------

    def queue_batch(self, batch: Batch) -> None:
        self.batches[batch.id] = batch
        self.pending.append(batch)
        self._idle.clear()

    def batch_done(self) -> None:
        """The batch at the head of ``pending`` has completed."""
        self.pending.popleft()
        if not self.pending:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no batch is queued or in progress."""
        while self.pending:
            self._idle.clear()
            await self._idle.wait()

    def apply_batch_entry(self, batch: Batch, index: int) -> None:
        """Upsert one contact of a batch; an invalid one becomes one of its ``errors``."""
        raw = batch.contacts[index]
        try:
            self.upsert_contact(raw)
        except ApiError as error:
            batch.errors.append(_identify_error(index, raw, error.message))
        else:
            batch.imported_contacts += 1

    # -- events --------------------------------------------------------------------------

    def track_event(self, raw: object) -> Event:
        """``POST /events``: record one event, creating a lead for an unknown email."""
        if not isinstance(raw, dict):
            raise bad_request("the body must be a JSON object")
        name = raw.get("event_name")
        if not isinstance(name, str) or not name.strip():
            raise bad_request("event_name is required and must be a non-empty string")
        contact_id = check_contact_id(raw["id"]) if raw.get("id") is not None else None
        user_id = check_user_id(raw["user_id"]) if raw.get("user_id") is not None else None
        email = check_email(raw["email"]) if raw.get("email") is not None else None
        if contact_id is None and user_id is None and email is None and raw.get("id") is None:
            raise bad_request("one of user_id, email or id is required")
        properties = raw.get("properties")
        if properties is None:
            properties = {}
        elif not isinstance(properties, dict):
            raise bad_request("properties must be a JSON object")
        occurred_at = _parse_occurred_at(raw.get("occurred_at"))
        contact = self.find_contact(id=contact_id, user_id=user_id, email=email)
        if contact is None:
            if email is None:
                raise ApiError(404, "contact_not_found", "no contact matches the given id/user_id")
            contact = self.upsert_contact({"email": email})
        normalised = normalise_event_name(name)
        canonical = self.event_names.setdefault(normalised.lower(), normalised)
        event = Event(
            id=next(self._event_ids),
            name=canonical,
            submitted_name=name,
            contact_id=contact.id,
            user_id=contact.user_id,
            email=contact.email,
            properties=properties,
            occurred_at=occurred_at,
        )
        self.events.append(event)
        return event

    # -- tags ----------------------------------------------------------------------------

    def _tag_for(self, name: str) -> Tag:
        """The tag with this name (case-insensitive), created on first use."""
        key = name.strip().lower()
        tag_id = self.tags_by_name.get(key)
        if tag_id is not None:
            return self.tags[tag_id]
        tag = Tag(id=next(self._tag_ids), name=name.strip())
        self.tags[tag.id] = tag
        self.tags_by_name[key] = tag.id
        return tag

    def find_tag(self, name: str) -> Tag | None:
        tag_id = self.tags_by_name.get(name.strip().lower())
        return None if tag_id is None else self.tags[tag_id]

    def tag_request(self, raw: object) -> Tag:
        """``POST /tags``: create, rename, and tag or untag contacts."""
        if not isinstance(raw, dict):
            raise bad_request("the body must be a JSON object")
        name = raw.get("name")
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise bad_request("name must be a non-empty string")
        tag_id = check_contact_id(raw["id"]) if raw.get("id") is not None else None
        if raw.get("id") is None and name is None:
            raise bad_request("name is required (or the id of an existing tag)")
        refs = raw.get("contacts", [])
        if refs is None:
            refs = []
        if not isinstance(refs, list):
            raise bad_request("contacts must be a list")
        targets: list[tuple[Contact | None, bool]] = []
        for i, ref in enumerate(refs):
            if not isinstance(ref, dict):
                raise bad_request(f"contacts[{i}] must be a JSON object")
            untag = ref.get("untag", False)
            if not isinstance(untag, bool):
                raise bad_request(f"contacts[{i}].untag must be a boolean")
            ref_id = (
                check_contact_id(ref["id"], f"contacts[{i}].id")
                if ref.get("id") is not None
                else None
            )
            ref_user_id = (
                check_user_id(ref["user_id"], f"contacts[{i}].user_id")
                if ref.get("user_id") is not None
                else None
            )
            ref_email = ref.get("email")
            if ref_email is not None and not isinstance(ref_email, str):
                raise bad_request(f"contacts[{i}].email must be a string")
            if (
                ref_id is None
                and ref_user_id is None
                and ref_email is None
                and ref.get("id") is None
            ):
                raise bad_request(f"contacts[{i}] needs one of id, email or user_id")
            found = self.find_contact(id=ref_id, user_id=ref_user_id, email=ref_email)
            targets.append((found, untag))

        if raw.get("id") is not None:
            tag = self.tags.get(tag_id) if tag_id is not None else None
            if tag is None:
                raise ApiError(404, "tag_not_found", f"no tag with id {raw['id']!r}")
            if name is not None and name.strip() != tag.name:
                other = self.tags_by_name.get(name.strip().lower())
                if other is not None and other != tag.id:
                    raise bad_request(f"a tag named {name!r} already exists")
                del self.tags_by_name[tag.name.lower()]
                tag.name = name.strip()
                self.tags_by_name[tag.name.lower()] = tag.id
        else:
            assert name is not None
            tag = self._tag_for(name)
        for contact, untag in targets:
            if contact is None:
                continue
            if untag:
                contact.tag_ids.pop(tag.id, None)
            else:
                contact.tag_ids[tag.id] = None
        return tag

    # -- subscription types ----------------------------------------------------------------

    def add_subscription_type(
        self, name: str, description: str = "", status: str = "published"
    ) -> SubscriptionType:
        subscription_type = SubscriptionType(
            id=next(self._subscription_type_ids),
            name=name,
            description=description,
            display_order=len(self.subscription_types) + 1,
            status=status,
        )
        self.subscription_types[subscription_type.id] = subscription_type
        return subscription_type

    def subscription_type(self, type_id: str) -> SubscriptionType:
        """The type a path names, or 404 ``subscription_type_not_found``."""
        found = self.subscription_types.get(int(type_id)) if type_id.isdigit() else None
        if found is None:
            raise not_found("subscription_type", f"no subscription type with id {type_id!r}")
        return found

    def set_subscription(self, type_id: str, raw: object) -> Contact:
        """``POST /subscription_types/{id}``: subscribe or unsubscribe one contact, found by
        ``user_id``, then ``email``, then ``contact_id``; it is not created."""
        subscription_type = self.subscription_type(type_id)
        req = parse_subscription_request(raw)
        contact = None
        if req.user_id is not None:
            contact = self.find_contact(user_id=req.user_id)
        if contact is None and req.email is not None:
            contact = self.find_contact(email=req.email)
        if contact is None and req.contact_id is not None:
            contact = self.contacts.get(req.contact_id)
        if contact is None:
            raise not_found("contact", "no contact matches the given user_id/email/contact_id")
        if req.subscribed:
            subscription_type.contact_ids[contact.id] = None
        else:
            subscription_type.contact_ids.pop(contact.id, None)
        return contact
