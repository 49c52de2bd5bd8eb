"""What a Segment message turns into: the Gist operations the pipeline delivers.

The mapper (``destination.mapping``) produces these; the pipeline batches, orders and
sends them. Every operation keeps the source message's ``messageId`` and ``timestamp``
(epoch seconds) for de-duplication, ordering and end-to-end delay.

``identities`` names the Gist contact an operation touches (``"u:<user_id>"``,
``"e:<lower-cased email>"``); the pipeline orders operations that share one.

``priority`` (the last field of each, so positional construction keeps working) is the
lane its requests take at the rate limiter when requests wait (``Priority``; the rules'
``priorities`` section sets it): contact upserts default to ``HIGH``, the rest to
``NORMAL``. It orders requests only; nothing is dropped for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from destination.gist._limiter import Priority
from destination.gist._models import Amount, ContactPayload, EventPayload


def user_identity(user_id: str) -> str:
    return "u:" + user_id


def email_identity(email: str) -> str:
    return "e:" + email.lower()


def _identities(user_id: str | None, email: str | None) -> tuple[str, ...]:
    if user_id is not None and email is not None:
        return (user_identity(user_id), email_identity(email))
    if user_id is not None:
        return (user_identity(user_id),)
    if email is not None:
        return (email_identity(email),)
    return ()


@dataclass(frozen=True, slots=True)
class ContactUpsert:
    """Create or update one contact (sent through the batch import)."""

    contact: ContactPayload
    message_id: str | None = None
    timestamp: float | None = None
    priority: Priority = Priority.HIGH

    @property
    def identities(self) -> tuple[str, ...]:
        return _identities(self.contact.get("user_id"), self.contact.get("email"))


@dataclass(frozen=True, slots=True)
class EventTrack:
    """Record one event on a contact (``POST /events``)."""

    event: EventPayload
    message_id: str | None = None
    timestamp: float | None = None
    priority: Priority = Priority.NORMAL

    @property
    def identities(self) -> tuple[str, ...]:
        return _identities(self.event.get("user_id"), self.event.get("email"))


@dataclass(frozen=True, slots=True)
class ContactDelete:
    """Delete the contact under each identity given: by ``user_id`` and by e-mail (Gist
    may hold a lead made by the e-mail alone beside the user's contact)."""

    user_id: str | None = None
    email: str | None = None
    message_id: str | None = None
    timestamp: float | None = None
    priority: Priority = Priority.NORMAL

    @property
    def identities(self) -> tuple[str, ...]:
        return _identities(self.user_id, self.email)


@dataclass(frozen=True, slots=True)
class ContactAlias:
    """Move the contact known by ``previous_id`` (a user_id) to ``user_id``."""

    previous_id: str
    user_id: str
    message_id: str | None = None
    timestamp: float | None = None
    priority: Priority = Priority.NORMAL

    @property
    def identities(self) -> tuple[str, ...]:
        return (user_identity(self.previous_id), user_identity(self.user_id))


@dataclass(frozen=True, slots=True)
class TagChange:
    """Tag (or, with ``untag``, untag) one contact."""

    tag: str
    user_id: str | None = None
    email: str | None = None
    untag: bool = False
    message_id: str | None = None
    timestamp: float | None = None
    priority: Priority = Priority.NORMAL

    @property
    def identities(self) -> tuple[str, ...]:
        return _identities(self.user_id, self.email)


@dataclass(frozen=True, slots=True)
class SubscriptionChange:
    """Subscribe (or unsubscribe) one contact to a Gist subscription type, by its name
    (``POST /subscription_types/{id}``; the id is looked up by name once)."""

    subscription_type: str
    subscribed: bool
    user_id: str | None = None
    email: str | None = None
    message_id: str | None = None
    timestamp: float | None = None
    priority: Priority = Priority.HIGH

    @property
    def identities(self) -> tuple[str, ...]:
        return _identities(self.user_id, self.email)


@dataclass(frozen=True, slots=True)
class CommerceItem:
    """One product line of a Segment e-commerce event, as Gist's products and line items
    need it. ``variant_id`` is None for a product without variants (its line item names
    the product only)."""

    product_id: str
    title: str
    variant_id: str | None = None
    variant_title: str | None = None
    price: Amount | None = None
    """The unit price, as Segment sent it (never converted)."""
    quantity: int = 1
    sku: str | None = None
    url: str | None = None
    image_url: str | None = None
    vendor: str | None = None

    @property
    def key(self) -> tuple[str, str | None]:
        return (self.product_id, self.variant_id)


CommerceAction = Literal["order", "order_update", "cart", "cart_add", "cart_remove"]


@dataclass(frozen=True, slots=True)
class CommerceWrite:
    """One Segment e-commerce event in Gist's e-commerce store: an order created
    (``order``: and the customer's cart cleared) or updated (``order_update``), or the
    customer's cart set whole (``cart``) or changed by a line (``cart_add``,
    ``cart_remove``). The customer, products and variants it names are created first
    where the store may not have them."""

    action: CommerceAction
    user_id: str | None = None
    email: str | None = None
    items: tuple[CommerceItem, ...] = ()
    order_id: str | None = None
    currency: str | None = None
    """None: the store's currency."""
    fields: dict[str, Any] = field(default_factory=dict)
    """The order's (or cart's) other fields as Gist names them: ``order_total``,
    ``discount_total``, ``tax_total``, ``shipping_total``, ``financial_status``,
    ``refund_amount``, ``processed_at``, ``cancelled_at``, ``checkout_url``, ..."""
    customer: dict[str, Any] = field(default_factory=dict)
    """The customer's names (``first_name``, ``last_name``), where the message has them."""
    message_id: str | None = None
    timestamp: float | None = None
    priority: Priority = Priority.NORMAL

    @property
    def identities(self) -> tuple[str, ...]:
        return _identities(self.user_id, self.email)

    @property
    def customer_id(self) -> str:
        """The Gist customer: the user's id, else the lower-cased e-mail."""
        if self.user_id is not None:
            return self.user_id
        assert self.email is not None
        return self.email.lower()


Operation = (
    ContactUpsert
    | EventTrack
    | ContactDelete
    | ContactAlias
    | TagChange
    | SubscriptionChange
    | CommerceWrite
)


@dataclass(frozen=True, slots=True)
class Mapped:
    """The message maps to these operations (possibly none, e.g. an identify whose
    every trait was filtered out still upserts the contact's identity)."""

    message_type: str
    operations: tuple[Operation, ...]


@dataclass(frozen=True, slots=True)
class Skipped:
    """The message is deliberately not sent (integrations switch, a rule turned the
    type off, an event dropped by rule). Counted as skipped, never as an error."""

    message_type: str
    reason: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """The message cannot be mapped. ``reason`` is a stable machine-readable code
    (``not_an_object``, ``unknown_type``, ``missing_identity``, ...); ``detail`` says what
    was wrong for a human, without echoing personal data."""

    message_type: str
    reason: str
    detail: str


MapResult = Mapped | Skipped | Rejected
