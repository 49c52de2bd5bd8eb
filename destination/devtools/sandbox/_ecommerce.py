"""The sandbox's e-commerce: stores, their customers, products (with variants),
categories, carts and orders, as the E-Commerce section of the Gist reference describes
them, and the lifetime value (LTV) orders give the contacts their customers are tied to.

How strict, for every endpoint (the path is checked before the body; a request that
fails changes nothing):

- 404 ``<kind>_not_found`` (``store``, ``customer``, ``product``, ``product_variant``,
  ``category``, ``order``, ``cart``) for an unknown record the path names, then for one
  the body names: an order's ``customer_id``, a line item's ``product_id`` /
  ``product_variant_id`` (the reference: items "need to be created as Products so you can
  add the items to a Cart or an Order"), a product's ``categories``.
- 400 ``bad_request``: the body is not a JSON object, a field the reference marks
  required is absent or null, a field has the wrong JSON type (the reference's types: a
  string, an id as a string or an integer, an object, a list), or an update's body names
  another id than its path.
- 422 ``invalid_amount``: a total, price or ``refund_amount`` that is not a number (a
  price may also be a decimal string, as the reference types it), is negative, or is not
  an amount of its currency (more decimals than the ISO 4217 minor unit: 2 for USD, 0
  for JPY, 3 for KWD); a ``refund_amount`` above the ``order_total``.
- 422 ``invalid_value``: a currency code that is not three capital letters, a status
  outside the reference's list, a time that is not ISO 8601, a quantity that is not a
  positive integer, an ``abandon_cart_interval`` not above 0, a ``domain`` with a space
  or with nothing but a scheme.
- 422 ``<kind>_exists``: a create (POST) of an id the store already has, a store for a
  domain the workspace already has. Updates are PATCH, and only of what exists.

Fields are stored as sent: amounts and ids keep their JSON type, addresses keep every
key. Keys the reference does not know are ignored (Gist ignores them) and listed per
record as ``ignored_fields`` in ``GET /_sandbox/state``, so a test can see them.

Where the reference is open, the sandbox reads it so:

- Units: a line item's ``price`` (2000 in the examples, beside an ``order_total`` of 234)
  is stored as sent, never converted, summed or compared with the totals.
- LTV, per contact and per currency (never converted): an order counts
  ``order_total - refund_amount`` on the contact of its customer's e-mail, whatever its
  status. ``refund_amount`` (named by the LTV paragraph, not the field table) is the
  order's whole refunded amount, so sending an update again changes nothing; a
  cancellation lowers LTV through ``refund_amount`` only, as the reference words it.
  "An order with an order_total of $100 increments LTV by $100; updated to $105, +$5;
  refunded with a refund_amount of $105, -$105." A deleted contact's LTV goes with it.
- A field both marked required and given a default (a store's ``name``,
  ``abandon_cart_interval``) is required: a client that sends it works either way.
- A store's ``domain`` is unique in the workspace, compared without scheme, ``www.``,
  case or trailing ``/``; there is no look-up by domain but the list.
- Creating or updating a customer creates the contact of its ``email_address`` when
  there is none, and sets the contact's ``name`` from ``first_name`` / ``last_name``
  when either is sent. A store's ``contact_tags`` are stored, not applied (the reference
  ties them to WooCommerce).
- A cart is deleted at ``DELETE .../customers/{customer_id}/cart`` (the endpoint line;
  the example's ``/carts/{id}`` is not routed: a cart has no id). Orders leave carts be.
- An address may hold ``postcode`` (the customer table) or ``postal_code`` (the order
  table); ``financial_status`` also takes ``failed`` (in the table, not the paragraph).
- ``line_items`` may be empty; a line item naming a ``product_variant_id`` needs its
  ``product_id``. An optional time may be ``""`` (unset), as the reference's
  ``cancelled_at`` example shows.
- Timeline activity is recorded (``activity`` in the state): "Created a cart", "Updated
  a cart", "Placed an order" (pending) and "Paid an order" (paid) as the reference names
  them, "Order <status>" (the sandbox's own words) for the other statuses, when an
  order is created and whenever its ``financial_status`` changes.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Final, Protocol, TypeVar

from destination.devtools.sandbox._checks import JSON, ApiError, bad_request, not_found
from destination.devtools.sandbox._fields import Body, invalid_amount, invalid_value

if TYPE_CHECKING:
    from destination.devtools.sandbox._store import Contact

STORE_STATUSES: Final = ("connected", "disconnected")
FINANCIAL_STATUSES: Final = (
    "pending",
    "on-hold",
    "partially_paid",
    "paid",
    "partially_refunded",
    "refunded",
    "cancelled",
    "failed",
)
FULFILLMENT_STATUSES: Final = ("partially_fulfilled", "fulfilled")
_STORE_FIELDS: Final = (
    "name",
    "domain",
    "status",
    "currency_code",
    "abandon_cart_interval",
    "contact_tags",
)
_CUSTOMER_FIELDS: Final = (
    "customer_id",
    "email_address",
    "first_name",
    "last_name",
    "billing_address",
    "shipping_address",
)
_ITEM_FIELDS: Final = (
    "title",
    "description",
    "product_url",
    "vendor",
    "image_url",
    "price",
    "sku",
    "inventory_quantity",
    "backorders",
)
_CART_FIELDS: Final = (
    "checkout_url",
    "currency_code",
    "order_total",
    "discount_total",
    "created_at",
    "updated_at",
    "line_items",
)
_ORDER_FIELDS: Final = (
    "order_id",
    "customer_id",
    "currency_code",
    "order_total",
    "discount_total",
    "tax_total",
    "shipping_total",
    "refund_amount",
    "financial_status",
    "fulfillment_status",
    "order_url",
    "tracking_number",
    "tracking_carrier",
    "tracking_url",
    "processed_at",
    "updated_at",
    "cancelled_at",
    "billing_address",
    "shipping_address",
    "line_items",
    "cart_id",
)
_SCHEME: Final = re.compile(r"^[a-z][a-z0-9+.-]*://")
_ZERO: Final = Decimal(0)


def _now() -> int:
    return int(time.time())


_T = TypeVar("_T")


def _given(value: _T | None) -> _T:
    """A required field's value (``Body`` raised already if it was absent)."""
    assert value is not None
    return value


def domain_key(domain: str) -> str:
    """A domain as compared: no scheme, no ``www.``, no trailing ``/``, lower case."""
    key = _SCHEME.sub("", domain.strip().lower()).rstrip("/")
    return key.removeprefix("www.")


def json_number(amount: Decimal) -> int | float:
    """A Decimal as a JSON number: an int when whole."""
    return int(amount) if amount == amount.to_integral_value() else float(amount)


class ContactBook(Protocol):
    """What e-commerce needs of the workspace's contacts (``Store`` provides it)."""

    contacts: dict[int, Contact]
    lifetime_values: dict[int, dict[str, Decimal]]

    def find_contact(
        self, *, id: int | None = None, user_id: str | None = None, email: str | None = None
    ) -> Contact | None: ...

    def upsert_contact(self, raw: object) -> Contact: ...


def check_items(shop: EcommerceStore, named: list[tuple[str, str | None]]) -> None:
    """404 for a line item naming a product or variant the store does not have."""
    for product_id, variant_id in named:
        product = shop.product(product_id)
        if variant_id is not None:
            product.variant(variant_id)


def _merge_ignored(before: list[str], new: Iterable[str]) -> list[str]:
    return list(dict.fromkeys([*before, *new]))


def _view(fields: dict[str, JSON], names: Iterable[str]) -> dict[str, JSON]:
    return {name: fields.get(name) for name in names}


# -- the records ---------------------------------------------------------------------------


@dataclass(slots=True)
class Category:
    id: str
    fields: dict[str, JSON]
    ignored_fields: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, JSON]:
        return _view(self.fields, ("category_id", "name"))


@dataclass(slots=True)
class Variant:
    id: str
    product_id: JSON
    """The product's id as it was sent."""
    fields: dict[str, JSON]
    ignored_fields: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, JSON]:
        return {
            "product_id": self.product_id,
            "product_variant_id": self.fields.get("product_variant_id"),
            **_view(self.fields, _ITEM_FIELDS),
        }


@dataclass(slots=True)
class Product:
    id: str
    fields: dict[str, JSON]
    category_ids: list[str] = field(default_factory=list)
    variants: dict[str, Variant] = field(default_factory=dict)
    ignored_fields: list[str] = field(default_factory=list)

    def variant(self, variant_id: str) -> Variant:
        found = self.variants.get(variant_id)
        if found is None:
            raise not_found("product_variant", f"product {self.id} has no variant {variant_id!r}")
        return found

    def to_json(self, categories: dict[str, Category]) -> dict[str, JSON]:
        return {
            "product_id": self.fields.get("product_id"),
            **_view(self.fields, _ITEM_FIELDS),
            "categories": [categories[c].to_json() for c in self.category_ids if c in categories],
            "product_published_at": self.fields.get("product_published_at"),
        }


@dataclass(slots=True)
class Cart:
    fields: dict[str, JSON]
    ignored_fields: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, JSON]:
        return _view(self.fields, _CART_FIELDS)


@dataclass(slots=True)
class Customer:
    id: str
    email: str
    """``email_address`` down-cased: the contact it is tied to."""
    fields: dict[str, JSON]
    cart: Cart | None = None
    order_ids: list[str] = field(default_factory=list)
    ignored_fields: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, JSON]:
        return _view(self.fields, _CUSTOMER_FIELDS)

    def cart_json(self) -> dict[str, JSON]:
        assert self.cart is not None
        return {"customer": self.to_json(), **self.cart.to_json()}


@dataclass(slots=True)
class Order:
    id: str
    customer_id: str
    fields: dict[str, JSON]
    currency: str
    order_total: Decimal
    refund_amount: Decimal
    counted: Decimal = _ZERO
    """What the order adds to an LTV now: ``order_total - refund_amount``."""
    counted_on: tuple[int, str] | None = None
    """The contact id and currency ``counted`` was added to."""
    ignored_fields: list[str] = field(default_factory=list)

    @property
    def financial_status(self) -> str:
        status = self.fields.get("financial_status")
        return status if isinstance(status, str) else "pending"

    def to_json(self) -> dict[str, JSON]:
        answer = _view(self.fields, _ORDER_FIELDS)
        answer["financial_status"] = self.financial_status
        return answer


@dataclass(slots=True)
class EcommerceStore:
    """One e-commerce store of the workspace (Gist's ``ecommerce_store``)."""

    id: int
    fields: dict[str, JSON]
    customers: dict[str, Customer] = field(default_factory=dict)
    products: dict[str, Product] = field(default_factory=dict)
    categories: dict[str, Category] = field(default_factory=dict)
    orders: dict[str, Order] = field(default_factory=dict)
    ignored_fields: list[str] = field(default_factory=list)

    @property
    def domain(self) -> str:
        return str(self.fields["domain"])

    @property
    def currency(self) -> str:
        return str(self.fields["currency_code"])

    def to_json(self) -> dict[str, JSON]:
        answer: dict[str, JSON] = {"store_id": self.id, **_view(self.fields, _STORE_FIELDS)}
        answer["status"] = answer["status"] or "disconnected"
        return answer

    def customer(self, customer_id: str) -> Customer:
        found = self.customers.get(customer_id)
        if found is None:
            raise not_found("customer", f"store {self.id} has no customer {customer_id!r}")
        return found

    def product(self, product_id: str) -> Product:
        found = self.products.get(product_id)
        if found is None:
            raise not_found("product", f"store {self.id} has no product {product_id!r}")
        return found

    def category(self, category_id: str) -> Category:
        found = self.categories.get(category_id)
        if found is None:
            raise not_found("category", f"store {self.id} has no category {category_id!r}")
        return found

    def order(self, order_id: str) -> Order:
        found = self.orders.get(order_id)
        if found is None:
            raise not_found("order", f"store {self.id} has no order {order_id!r}")
        return found


@dataclass(slots=True)
class Activity:
    """One entry of a contact's timeline, as Gist would show it."""

    name: str
    contact_id: int
    email: str
    store_id: int
    customer_id: str
    order_id: str | None
    at: int

    def to_json(self) -> dict[str, JSON]:
        return {
            "name": self.name,
            "contact_id": self.contact_id,
            "email": self.email,
            "store_id": self.store_id,
            "customer_id": self.customer_id,
            "order_id": self.order_id,
            "at": self.at,
        }


_STATUS_ACTIVITY: Final = {"pending": "Placed an order", "paid": "Paid an order"}


# -- the e-commerce side of the workspace ----------------------------------------------------


def _exists(kind: str, message: str) -> ApiError:
    return ApiError(422, f"{kind}_exists", message)


def _patch(raw: object) -> dict[str, JSON]:
    if not isinstance(raw, dict):
        raise bad_request("the body must be a JSON object")
    return raw


class Commerce:
    """The workspace's e-commerce stores and the LTV of the contacts of their customers.

    Each method checks the whole request (``ApiError``) before it changes anything."""

    def __init__(self, contacts: ContactBook) -> None:
        self._contacts = contacts
        # Ids keep counting across resets so a stale id never names a new store.
        self._store_ids = itertools.count(1)
        self.stores: dict[int, EcommerceStore] = {}
        self.by_domain: dict[str, int] = {}
        self.activity: list[Activity] = []

    def reset(self) -> None:
        self.stores.clear()
        self.by_domain.clear()
        self.activity.clear()

    def snapshot(self) -> dict[str, JSON]:
        return {
            "stores": [self._store_state(s) for s in self.stores.values()],
            "lifetime_values": {
                self._contacts.contacts[contact_id].email: {
                    currency: json_number(value) for currency, value in ltv.items()
                }
                for contact_id, ltv in self._contacts.lifetime_values.items()
            },
            "activity": [a.to_json() for a in self.activity],
        }

    def _store_state(self, shop: EcommerceStore) -> dict[str, JSON]:
        def customer(c: Customer) -> dict[str, JSON]:
            contact = self._contacts.find_contact(email=c.email)
            return {
                **c.to_json(),
                "contact_id": None if contact is None else contact.id,
                "cart": None if c.cart is None else c.cart.to_json(),
                "order_ids": list(c.order_ids),
                "ignored_fields": c.ignored_fields,
            }

        def product(p: Product) -> dict[str, JSON]:
            return {
                **p.to_json(shop.categories),
                "variants": [
                    {**v.to_json(), "ignored_fields": v.ignored_fields} for v in p.variants.values()
                ],
                "ignored_fields": p.ignored_fields,
            }

        return {
            **shop.to_json(),
            "ignored_fields": shop.ignored_fields,
            "customers": [customer(c) for c in shop.customers.values()],
            "products": [product(p) for p in shop.products.values()],
            "categories": [
                {**c.to_json(), "ignored_fields": c.ignored_fields}
                for c in shop.categories.values()
            ],
            "orders": [
                {
                    **o.to_json(),
                    "lifetime_value": json_number(o.counted),
                    "ignored_fields": o.ignored_fields,
                }
                for o in shop.orders.values()
            ],
        }

    # -- stores ------------------------------------------------------------------------

    def store(self, store_id: str) -> EcommerceStore:
        """The store a path names, or 404 ``store_not_found``."""
        found = self.stores.get(int(store_id)) if store_id.isdigit() else None
        if found is None:
            raise not_found("store", f"no e-commerce store with id {store_id!r}")
        return found

    def find_store(self, domain: str) -> EcommerceStore | None:
        store_id = self.by_domain.get(domain_key(domain))
        return None if store_id is None else self.stores[store_id]

    @staticmethod
    def _read_store(raw: dict[str, JSON]) -> Body:
        body = Body(raw)
        body.string("name", required=True)
        domain = body.string("domain", required=True)
        if domain is not None and (not domain_key(domain) or any(c.isspace() for c in domain)):
            raise invalid_value(f"domain is not a domain: {domain!r}")
        body.choice("status", STORE_STATUSES)
        body.currency("currency_code", required=True)
        body.interval("abandon_cart_interval", required=True)
        body.string("contact_tags")
        return body

    def _claim_domain(self, domain: str, store_id: int | None) -> str:
        key = domain_key(domain)
        other = self.by_domain.get(key)
        if other is not None and other != store_id:
            raise _exists("store", f"store {other} already has the domain {domain!r}")
        return key

    def create_store(self, raw: object) -> EcommerceStore:
        body = self._read_store(_patch(raw))
        body.known.add("store_id")  # generated by Gist: ignored on create
        key = self._claim_domain(body.kept["domain"], None)
        shop = EcommerceStore(
            id=next(self._store_ids), fields=body.kept, ignored_fields=body.ignored()
        )
        self.stores[shop.id] = shop
        self.by_domain[key] = shop.id
        return shop

    def update_store(self, store_id: str, raw: object) -> EcommerceStore:
        shop = self.store(store_id)
        patch = _patch(raw)
        body = self._read_store({**shop.fields, **patch})
        body.same_id("store_id", str(shop.id))
        key = self._claim_domain(body.kept["domain"], shop.id)
        del self.by_domain[domain_key(shop.domain)]
        self.by_domain[key] = shop.id
        shop.fields = body.kept
        shop.ignored_fields = _merge_ignored(shop.ignored_fields, _unknown(body, patch))
        return shop

    # -- customers -----------------------------------------------------------------------

    @staticmethod
    def _read_customer(raw: dict[str, JSON]) -> tuple[Body, str]:
        body = Body(raw)
        body.ident("customer_id", required=True)
        email = _given(body.email("email_address", required=True))
        body.string("first_name")
        body.string("last_name")
        body.address("billing_address")
        body.address("shipping_address")
        return body, email

    def _tie_contact(self, email: str, fields: dict[str, JSON], sent: dict[str, JSON]) -> None:
        """Add or update the contact of a customer's e-mail; its name is the customer's
        first and last name when the request sent either."""
        contact: dict[str, JSON] = {"email": email}
        if "first_name" in sent or "last_name" in sent:
            parts = [fields.get("first_name"), fields.get("last_name")]
            contact["name"] = " ".join(p.strip() for p in parts if p and p.strip()) or None
        self._contacts.upsert_contact(contact)

    def create_customer(self, shop: EcommerceStore, raw: object) -> Customer:
        body, email = self._read_customer(_patch(raw))
        key = str(body.kept["customer_id"])
        if key in shop.customers:
            raise _exists("customer", f"store {shop.id} already has customer {key!r}")
        customer = Customer(id=key, email=email, fields=body.kept, ignored_fields=body.ignored())
        self._tie_contact(email, body.kept, body.kept)
        shop.customers[key] = customer
        return customer

    def update_customer(self, shop: EcommerceStore, customer_id: str, raw: object) -> Customer:
        customer = shop.customer(customer_id)
        patch = _patch(raw)
        body, email = self._read_customer({**customer.fields, **patch})
        body.same_id("customer_id", customer.id)
        body.kept["customer_id"] = customer.fields["customer_id"]  # as first sent
        self._tie_contact(email, body.kept, patch)
        customer.email = email
        customer.fields = body.kept
        customer.ignored_fields = _merge_ignored(customer.ignored_fields, _unknown(body, patch))
        return customer

    # -- carts ------------------------------------------------------------------------------

    def put_cart(self, shop: EcommerceStore, customer_id: str, raw: object) -> Customer:
        """Create or replace the customer's cart, whole: what the body leaves out is gone."""
        customer = shop.customer(customer_id)
        body = Body(raw)
        body.same_id("customer_id", customer.id)
        currency = _given(body.currency("currency_code", required=True))
        body.string("checkout_url")
        body.amount("order_total", currency, required=True)
        body.amount("discount_total", currency)
        body.time("created_at")
        body.time("updated_at")
        check_items(shop, body.line_items("line_items", currency))
        name = "Created a cart" if customer.cart is None else "Updated a cart"
        customer.cart = Cart(fields=body.kept, ignored_fields=body.ignored())
        self._record(name, shop, customer, None)
        return customer

    def delete_cart(self, shop: EcommerceStore, customer_id: str) -> dict[str, JSON]:
        """Remove the customer's cart; the answer is the cart as it was."""
        customer = shop.customer(customer_id)
        if customer.cart is None:
            raise not_found("cart", f"customer {customer.id} of store {shop.id} has no cart")
        answer = customer.cart_json()
        customer.cart = None
        return answer

    # -- categories ---------------------------------------------------------------------------

    @staticmethod
    def _read_category(raw: dict[str, JSON]) -> Body:
        body = Body(raw)
        body.ident("category_id", required=True)
        body.string("name", required=True)
        return body

    def create_category(self, shop: EcommerceStore, raw: object) -> Category:
        body = self._read_category(_patch(raw))
        key = str(body.kept["category_id"])
        if key in shop.categories:
            raise _exists("category", f"store {shop.id} already has category {key!r}")
        category = Category(id=key, fields=body.kept, ignored_fields=body.ignored())
        shop.categories[key] = category
        return category

    def update_category(self, shop: EcommerceStore, category_id: str, raw: object) -> Category:
        category = shop.category(category_id)
        patch = _patch(raw)
        body = self._read_category({**category.fields, **patch})
        body.same_id("category_id", category.id)
        body.kept["category_id"] = category.fields["category_id"]
        category.fields = body.kept
        category.ignored_fields = _merge_ignored(category.ignored_fields, _unknown(body, patch))
        return category

    # -- products and variants ----------------------------------------------------------------

    @staticmethod
    def _read_item(body: Body, currency: str) -> None:
        """The fields products and variants share."""
        body.string("title", required=True)
        for name in ("description", "product_url", "vendor", "image_url", "sku", "backorders"):
            body.string(name)
        body.amount("price", currency, text=True)
        body.integer("inventory_quantity")

    def _read_product(self, shop: EcommerceStore, raw: dict[str, JSON]) -> tuple[Body, list[str]]:
        body = Body(raw)
        body.ident("product_id", required=True)
        self._read_item(body, shop.currency)
        body.time("product_published_at")
        categories = body.categories("categories")
        for category_id in categories:
            shop.category(category_id)
        return body, categories

    def create_product(self, shop: EcommerceStore, raw: object) -> Product:
        body, categories = self._read_product(shop, _patch(raw))
        key = str(body.kept["product_id"])
        if key in shop.products:
            raise _exists("product", f"store {shop.id} already has product {key!r}")
        product = Product(
            id=key, fields=body.kept, category_ids=categories, ignored_fields=body.ignored()
        )
        shop.products[key] = product
        return product

    def update_product(self, shop: EcommerceStore, product_id: str, raw: object) -> Product:
        product = shop.product(product_id)
        patch = _patch(raw)
        body, categories = self._read_product(shop, {**product.fields, **patch})
        body.same_id("product_id", product.id)
        body.kept["product_id"] = product.fields["product_id"]
        product.fields = body.kept
        product.category_ids = categories
        product.ignored_fields = _merge_ignored(product.ignored_fields, _unknown(body, patch))
        return product

    def _read_variant(self, shop: EcommerceStore, product: Product, raw: dict[str, JSON]) -> Body:
        body = Body(raw)
        body.same_id("product_id", product.id)  # the path says which product
        body.ident("product_variant_id", required=True)
        self._read_item(body, shop.currency)
        return body

    def create_variant(self, shop: EcommerceStore, product_id: str, raw: object) -> Variant:
        product = shop.product(product_id)
        body = self._read_variant(shop, product, _patch(raw))
        key = str(body.kept["product_variant_id"])
        if key in product.variants:
            raise _exists("product_variant", f"product {product.id} already has variant {key!r}")
        variant = Variant(
            id=key,
            product_id=product.fields["product_id"],
            fields=body.kept,
            ignored_fields=body.ignored(),
        )
        product.variants[key] = variant
        return variant

    def update_variant(
        self, shop: EcommerceStore, product_id: str, variant_id: str, raw: object
    ) -> Variant:
        product = shop.product(product_id)
        variant = product.variant(variant_id)
        patch = _patch(raw)
        body = self._read_variant(shop, product, {**variant.fields, **patch})
        body.same_id("product_variant_id", variant.id)
        body.kept["product_variant_id"] = variant.fields["product_variant_id"]
        variant.fields = body.kept
        variant.ignored_fields = _merge_ignored(variant.ignored_fields, _unknown(body, patch))
        return variant

    # -- orders ---------------------------------------------------------------------------------

    @staticmethod
    def _read_order(shop: EcommerceStore, raw: dict[str, JSON]) -> tuple[Body, Order]:
        """The body checked, and an ``Order`` of it (not stored)."""
        body = Body(raw)
        order_id = _given(body.ident("order_id", required=True))
        customer_id = _given(body.ident("customer_id", required=True))
        currency = _given(body.currency("currency_code", required=True))
        total = _given(body.amount("order_total", currency, required=True))
        for name in ("discount_total", "tax_total", "shipping_total"):
            body.amount(name, currency)
        refund = body.amount("refund_amount", currency) or _ZERO
        if refund > total:
            raise invalid_amount(
                f"refund_amount {body.kept['refund_amount']!r} is more than the "
                f"order_total {body.kept['order_total']!r}"
            )
        body.choice("financial_status", FINANCIAL_STATUSES)
        body.choice("fulfillment_status", FULFILLMENT_STATUSES)
        for name in ("order_url", "tracking_number", "tracking_carrier", "tracking_url"):
            body.string(name)
        body.time("processed_at", required=True)
        body.time("updated_at")
        body.time("cancelled_at")
        body.address("billing_address")
        body.address("shipping_address")
        body.ident("cart_id")
        named = body.line_items("line_items", currency)
        shop.customer(customer_id)  # the body's references, once its shape is right
        check_items(shop, named)
        order = Order(
            id=order_id,
            customer_id=customer_id,
            fields=body.kept,
            currency=currency,
            order_total=total,
            refund_amount=refund,
        )
        return body, order

    def create_order(self, shop: EcommerceStore, raw: object) -> Order:
        body, order = self._read_order(shop, _patch(raw))
        if order.id in shop.orders:
            raise _exists("order", f"store {shop.id} already has order {order.id!r}")
        order.ignored_fields = body.ignored()
        customer = shop.customers[order.customer_id]
        shop.orders[order.id] = order
        customer.order_ids.append(order.id)
        self._count(order, customer)
        self._record(_status_activity(order.financial_status), shop, customer, order.id)
        return order

    def update_order(self, shop: EcommerceStore, order_id: str, raw: object) -> Order:
        """Change what the body names; LTV follows the new ``order_total`` and
        ``refund_amount``."""
        order = shop.order(order_id)
        patch = _patch(raw)
        for name, key in (("order_id", order.id), ("customer_id", order.customer_id)):
            if patch.get(name) is not None and str(patch[name]) != key:
                raise bad_request(f"{name} {patch[name]!r} is not this order's ({key})")
        body, new = self._read_order(shop, {**order.fields, **patch})
        for name in ("order_id", "customer_id"):
            new.fields[name] = order.fields[name]  # as first sent
        before = order.financial_status
        order.fields = new.fields
        order.currency = new.currency
        order.order_total = new.order_total
        order.refund_amount = new.refund_amount
        order.ignored_fields = _merge_ignored(order.ignored_fields, _unknown(body, patch))
        customer = shop.customers[order.customer_id]
        self._count(order, customer)
        if order.financial_status != before:
            self._record(_status_activity(order.financial_status), shop, customer, order.id)
        return order

    def _count(self, order: Order, customer: Customer) -> None:
        """Move the order's part of an LTV to what it is now, on the customer's contact."""
        values = self._contacts.lifetime_values
        if order.counted_on is not None:
            contact_id, currency = order.counted_on
            if contact_id in values:  # a deleted contact's LTV went with it
                values[contact_id][currency] -= order.counted
        contact = self._contact_of(customer)
        order.counted = order.order_total - order.refund_amount
        ltv = values.setdefault(contact.id, {})
        ltv[order.currency] = ltv.get(order.currency, _ZERO) + order.counted
        order.counted_on = (contact.id, order.currency)

    def _contact_of(self, customer: Customer) -> Contact:
        found = self._contacts.find_contact(email=customer.email)
        if found is not None:
            return found
        return self._contacts.upsert_contact({"email": customer.email})  # it was deleted

    def _record(
        self, name: str, shop: EcommerceStore, customer: Customer, order_id: str | None
    ) -> None:
        contact = self._contact_of(customer)
        self.activity.append(
            Activity(
                name=name,
                contact_id=contact.id,
                email=contact.email,
                store_id=shop.id,
                customer_id=customer.id,
                order_id=order_id,
                at=_now(),
            )
        )


def _status_activity(status: str) -> str:
    return _STATUS_ACTIVITY.get(status, f"Order {status}")


def _unknown(body: Body, patch: dict[str, JSON]) -> list[str]:
    """The keys of an update's own body the reference does not know."""
    return [k for k in patch if k not in body.known]
