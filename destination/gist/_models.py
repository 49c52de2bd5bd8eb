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


# --- e-commerce and subscription types ---------------------------------------------------

Amount: TypeAlias = int | float
"""A total, a line item's price, a refund: a JSON number, non-negative, with no more
decimals than its currency's minor unit (2 for USD). Sent as given: Gist's reference
leaves the unit open (its examples show ``price: 2000`` beside ``order_total: 234``)."""

Price: TypeAlias = int | float | str
"""A product's or variant's price: the reference types it a string, its examples send a
number; either is accepted (a string holds a decimal, ``"19.99"``)."""

StoreStatus: TypeAlias = Literal["connected", "disconnected"]
FinancialStatus: TypeAlias = Literal[
    "pending",
    "on-hold",
    "partially_paid",
    "paid",
    "partially_refunded",
    "refunded",
    "cancelled",
    "failed",
]
FulfillmentStatus: TypeAlias = Literal["partially_fulfilled", "fulfilled"]


class Address(TypedDict, total=False):
    """A billing or shipping address. Customers name the postal code ``postcode``,
    orders ``postal_code`` in the reference: either may be sent."""

    name: str | None
    address1: str | None
    address2: str | None
    city: str | None
    state: str | None
    postcode: str | None
    postal_code: str | None
    country: str | None
    phone: str | None
    company_name: str | None


class StorePayload(TypedDict, total=False):
    """``POST /ecommerce/stores``. ``abandon_cart_interval`` is in hours."""

    name: Required[str]
    domain: Required[str]
    currency_code: Required[str]
    abandon_cart_interval: Required[int | float]
    status: StoreStatus
    contact_tags: str


class _CustomerFields(TypedDict, total=False):
    first_name: str | None
    last_name: str | None
    billing_address: Address | None
    shipping_address: Address | None


class CustomerUpdate(_CustomerFields, total=False):
    """``PATCH .../customers/{customer_id}``: what is sent changes, the rest stays."""

    email_address: str


class CustomerPayload(_CustomerFields, total=False):
    """``POST /ecommerce/stores/{store_id}/customers``. The customer is tied to the Gist
    contact of ``email_address`` (created if there is none)."""

    customer_id: Required[str]
    email_address: Required[str]


class _ItemFields(TypedDict, total=False):
    description: str | None
    product_url: str | None
    vendor: str | None
    image_url: str | None
    price: Price | None
    sku: str | None
    inventory_quantity: int | None
    backorders: str | None


class ProductUpdate(_ItemFields, total=False):
    """``PATCH .../products/{product_id}``. ``categories`` are ids of the store's
    categories (the answer lists them as objects)."""

    title: str
    categories: list[str | int]
    product_published_at: str | None


class ProductPayload(_ItemFields, total=False):
    """``POST /ecommerce/stores/{store_id}/products``."""

    product_id: Required[str]
    title: Required[str]
    categories: list[str | int]
    product_published_at: str | None


class VariantUpdate(_ItemFields, total=False):
    """``PATCH .../products/{product_id}/variants/{product_variant_id}``."""

    title: str


class VariantPayload(_ItemFields, total=False):
    """``POST .../products/{product_id}/variants``: a product with one version only
    repeats its ``product_id`` as ``product_variant_id``."""

    product_variant_id: Required[str]
    title: Required[str]


class LineItem(TypedDict, total=False):
    """One line of a cart or an order; the product (and variant) must exist in the
    store first."""

    product_id: str
    product_variant_id: str
    quantity: int
    price: Amount


class CartPayload(TypedDict, total=False):
    """``POST .../customers/{customer_id}/cart``: the whole cart, replacing the one the
    customer had (a field left out is gone). Times are ISO 8601."""

    currency_code: Required[str]
    order_total: Required[Amount]
    line_items: Required[list[LineItem]]
    checkout_url: str | None
    discount_total: Amount | None
    created_at: str | None
    updated_at: str | None


class _OrderFields(TypedDict, total=False):
    discount_total: Amount | None
    tax_total: Amount | None
    shipping_total: Amount | None
    refund_amount: Amount | None
    financial_status: FinancialStatus
    fulfillment_status: FulfillmentStatus | None
    order_url: str | None
    tracking_number: str | None
    tracking_carrier: str | None
    tracking_url: str | None
    updated_at: str | None
    cancelled_at: str | None
    billing_address: Address | None
    shipping_address: Address | None
    cart_id: str | None


class OrderUpdate(_OrderFields, total=False):
    """``PATCH .../orders/{order_id}``: what is sent changes. Gist keeps the contact's
    lifetime value up to date: ``order_total`` moves it by the difference,
    ``refund_amount`` (the order's whole refunded amount) lowers it. Times are ISO 8601."""

    currency_code: str
    order_total: Amount
    processed_at: str
    line_items: list[LineItem]


class OrderPayload(_OrderFields, total=False):
    """``POST /ecommerce/stores/{store_id}/orders``: the customer must exist first;
    ``financial_status`` defaults to ``pending``."""

    order_id: Required[str]
    customer_id: Required[str]
    currency_code: Required[str]
    order_total: Required[Amount]
    processed_at: Required[str]
    line_items: Required[list[LineItem]]


@dataclass(frozen=True, slots=True)
class EcommerceStore:
    """A Gist e-commerce store: ``store_id`` (as text, for paths) is what the other
    e-commerce calls are addressed by."""

    store_id: str
    domain: str
    name: str | None = None
    currency_code: str | None = None
    status: str | None = None
    raw: dict[str, JSONValue] = field(default_factory=dict, repr=False)


@dataclass(frozen=True, slots=True)
class SubscriptionType:
    """A subscription type of the workspace (Gist's API reads them, cannot create them)."""

    id: int
    name: str
    description: str | None = None
    status: str | None = None
    people_count: int | None = None
    display_order: int | None = None
