"""Segment's E-commerce Spec (v2) events as Gist e-commerce writes (``CommerceWrite``).

Which event does what (v1 names too):

- ``Order Completed``: the order, paid, with its line items and totals; the cart cleared;
- ``Order Updated``: what the message gives of the order (totals, lines) changes;
- ``Order Refunded``: ``refund_amount`` (``total``, else ``revenue``, else ``value``) and
  the status ``refunded`` (``partially_refunded`` when the refund lists products, as
  Segment's spec sends a partial refund);
- ``Order Cancelled``: status ``cancelled``, ``cancelled_at`` the message's time, and
  ``refund_amount`` its total where it gives one (Gist lowers the contact's lifetime
  value by ``refund_amount``);
- ``Product Added`` / ``Product Removed``: a line more or less in the customer's cart;
- ``Cart Viewed`` / ``Checkout Started``: the customer's whole cart.

Amounts are Segment's decimal currency units, sent as they are (a decimal string becomes
its number); a missing order total is the sum of the lines, rounded to the currency's
minor unit. Ids are sent as strings; times are the message's, ISO 8601. A field Gist
cannot take (a negative amount, a quantity that is not a positive whole number, a line
without a product id, an order event without an order id) is an invalid field: the
message is rejected, or with ``invalid_fields: drop`` the field (the line, the e-commerce
write) is left out and counted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from destination.gist._limiter import Priority
from destination.mapping._syntax import event_key
from destination.operations import CommerceAction, CommerceItem, CommerceWrite

_EVENTS: Final[tuple[tuple[tuple[str, ...], CommerceAction], ...]] = (
    (("Order Completed", "Completed Order"), "order"),
    (("Order Updated", "Updated Order"), "order_update"),
    (("Order Refunded", "Refunded Order"), "order_update"),
    (("Order Cancelled", "Cancelled Order"), "order_update"),
    (("Product Added", "Added Product"), "cart_add"),
    (("Product Removed", "Removed Product"), "cart_remove"),
    (("Cart Viewed", "Viewed Cart"), "cart"),
    (("Checkout Started", "Started Checkout", "Started Order"), "cart"),
)
_ACTIONS: Final[dict[str, CommerceAction]] = {
    event_key(name): action for names, action in _EVENTS for name in names
}
_REFUNDED: Final = {event_key("Order Refunded"), event_key("Refunded Order")}
_CANCELLED: Final = {event_key("Order Cancelled"), event_key("Cancelled Order")}

_ZERO_DECIMALS: Final = frozenset(
    [
        "BIF",
        "CLP",
        "DJF",
        "GNF",
        "ISK",
        "JPY",
        "KMF",
        "KRW",
        "PYG",
        "RWF",
        "UGX",
        "UYI",
        "VND",
        "VUV",
        "XAF",
        "XOF",
        "XPF",
    ]
)
_THREE_DECIMALS: Final = frozenset(["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"])
_CURRENCY: Final = re.compile(r"[A-Z]{3}")


def minor_unit(currency: str | None) -> int:
    """Decimals of ``currency``'s minor unit (ISO 4217): 2 but for a few."""
    if currency in _ZERO_DECIMALS:
        return 0
    if currency in _THREE_DECIMALS:
        return 3
    return 2


def line_total(items: Sequence[CommerceItem], currency: str | None) -> int | float:
    """The sum of ``price x quantity`` over the lines, rounded to the currency's minor
    unit (decimal arithmetic: 3 x 19.99 is 59.97, not 59.970000000000006)."""
    total = sum(
        (Decimal(str(item.price)) * item.quantity for item in items if item.price is not None),
        Decimal(0),
    )
    rounded = total.quantize(Decimal(1).scaleb(-minor_unit(currency)))
    return int(rounded) if rounded == rounded.to_integral_value() else float(rounded)


def is_commerce(key: str) -> bool:
    return key in _ACTIONS


Invalid = Callable[[str, str], None]
"""``Mapper._invalid``: rejects the message, or (``invalid_fields: drop``) returns."""


class CommerceMapper:
    """The e-commerce part of a track's mapping (built when ``ecommerce`` names a store)."""

    def __init__(self, orders: Priority, carts: Priority, invalid: Invalid) -> None:
        self._orders = orders
        self._carts = carts
        self._invalid = invalid

    def write(
        self,
        key: str,
        message: dict[str, Any],
        properties: dict[str, Any],
        user_id: str | None,
        email: str | None,
        stamp: tuple[str | None, float | None],
    ) -> CommerceWrite | None:
        """The write of the track whose event key is ``key`` (None: not an e-commerce
        event, or the rules dropped what it needs)."""
        action = _ACTIONS.get(key)
        if action is None:
            return None
        seconds = stamp[1]
        when = _iso(seconds)
        currency = self._currency(properties)
        fields: dict[str, Any] = {}
        order_id: str | None = None
        items: tuple[CommerceItem, ...] = ()
        if action in ("order", "order_update"):
            order_id = self._id(properties.get("order_id"), "properties.order_id")
            if order_id is None:
                if properties.get("order_id") is None:
                    self._invalid("properties.order_id", "present: an order event names its order")
                return None
            if action == "order" or "products" in properties:
                items = self._items(properties.get("products"), "properties.products")
            self._amounts(properties, fields)
            if action == "order":
                if "order_total" not in fields:
                    fields["order_total"] = line_total(items, currency)
                fields["financial_status"] = "paid"
                fields["processed_at"] = when
            elif key in _REFUNDED:
                refund = fields.pop("order_total", None)
                if refund is not None:
                    fields["refund_amount"] = refund
                fields["financial_status"] = "partially_refunded" if items else "refunded"
                fields["updated_at"] = when
                items = ()  # the lines refunded, not the order's lines
            elif key in _CANCELLED:
                refund = fields.pop("order_total", None)
                if refund is not None:
                    fields["refund_amount"] = refund
                fields["financial_status"] = "cancelled"
                fields["cancelled_at"] = when
                fields["updated_at"] = when
                items = ()
            else:
                fields["updated_at"] = when
            priority = self._orders
        else:
            if action == "cart":
                items = self._items(properties.get("products"), "properties.products")
                total = self._amount(properties, ("value", "total", "revenue"))
                if total is not None:
                    fields["order_total"] = total
            else:
                item = self._item(properties, "properties", removal=action == "cart_remove")
                if item is None:
                    return None
                items = (item,)
            fields["updated_at"] = when
            priority = self._carts
        return CommerceWrite(
            action,
            user_id,
            email,
            items,
            order_id,
            currency,
            fields,
            _customer(message),
            stamp[0],
            seconds,
            priority,
        )

    # --- pieces -----------------------------------------------------------------------
    def _id(self, value: Any, path: str) -> str | None:
        if isinstance(value, str):
            text = value.strip()
            if text:
                return text
        elif isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if value is not None:
            self._invalid(path, "a non-empty string or an integer")
        return None

    def _currency(self, properties: dict[str, Any]) -> str | None:
        value = properties.get("currency")
        if value is None:
            return None
        if isinstance(value, str) and _CURRENCY.fullmatch(value.strip().upper()):
            return value.strip().upper()
        self._invalid("properties.currency", "an ISO 4217 code (USD)")
        return None

    def _number(self, value: Any, path: str) -> int | float | None:
        """A non-negative amount (a decimal string becomes its number)."""
        if isinstance(value, str):
            try:
                parsed = Decimal(value.strip())
            except InvalidOperation:
                parsed = None
            if parsed is not None and parsed.is_finite():
                value = int(parsed) if parsed == parsed.to_integral_value() else float(parsed)
        if (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value >= 0
        ):
            return value
        if value is not None:
            self._invalid(path, "a non-negative amount")
        return None

    def _amount(self, properties: dict[str, Any], keys: Sequence[str]) -> int | float | None:
        for key in keys:
            if properties.get(key) is not None:
                found = self._number(properties[key], f"properties.{key}")
                if found is not None:
                    return found
        return None

    def _amounts(self, properties: dict[str, Any], fields: dict[str, Any]) -> None:
        total = self._amount(properties, ("total", "revenue", "value"))
        if total is not None:
            fields["order_total"] = total
        for source, name in (
            ("discount", "discount_total"),
            ("tax", "tax_total"),
            ("shipping", "shipping_total"),
        ):
            value = self._amount(properties, (source,))
            if value is not None:
                fields[name] = value

    def _items(self, products: Any, path: str) -> tuple[CommerceItem, ...]:
        if products is None:
            return ()
        if not isinstance(products, list):
            self._invalid(path, "a list of products")
            return ()
        items: list[CommerceItem] = []
        for index, product in enumerate(products):
            where = f"{path}[{index}]"
            if not isinstance(product, dict):
                self._invalid(where, "a product object")
                continue
            item = self._item(product, where)
            if item is not None:
                items.append(item)
        return tuple(items)

    def _item(
        self, product: dict[str, Any], path: str, removal: bool = False
    ) -> CommerceItem | None:
        raw_id = product.get("product_id", product.get("id", product.get("sku")))
        product_id = self._id(raw_id, f"{path}.product_id")
        if product_id is None:
            if raw_id is None:
                self._invalid(f"{path}.product_id", "present: a line names its product")
            return None
        sku = _text(product.get("sku"))
        variant = _text(product.get("variant"))
        variant_id: str | None = None
        if variant is not None:
            variant_id = sku if sku is not None and sku != product_id else f"{product_id}-{variant}"
        price = None
        if product.get("price") is not None:
            price = self._number(product["price"], f"{path}.price")
        quantity = 0 if removal else 1  # a removal without a quantity: the whole line
        raw_quantity = product.get("quantity")
        if raw_quantity is not None:
            if (
                isinstance(raw_quantity, int | float)
                and not isinstance(raw_quantity, bool)
                and math.isfinite(raw_quantity)
                and raw_quantity == int(raw_quantity)
                and raw_quantity > 0
            ):
                quantity = int(raw_quantity)
            else:
                self._invalid(f"{path}.quantity", "a positive whole number")
        return CommerceItem(
            product_id=product_id,
            title=_text(product.get("name")) or product_id,
            variant_id=variant_id,
            variant_title=variant,
            price=price,
            quantity=quantity,
            sku=sku,
            url=_text(product.get("url")),
            image_url=_text(product.get("image_url")),
            vendor=_text(product.get("brand")),
        )


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        value = value.strip()
        return value or None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _iso(seconds: float | None) -> str:
    moment = datetime.now(UTC) if seconds is None else datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _customer(message: dict[str, Any]) -> dict[str, Any]:
    """The customer's names, from the traits the message carries (Segment's ``firstName``
    / ``lastName``, or ``first_name`` / ``last_name``)."""
    context = message.get("context")
    traits = context.get("traits") if isinstance(context, dict) else None
    if not isinstance(traits, dict):
        return {}
    names: dict[str, Any] = {}
    for name, keys in (
        ("first_name", ("firstName", "first_name")),
        ("last_name", ("lastName", "last_name")),
    ):
        for key in keys:
            value = _text(traits.get(key))
            if value is not None:
                names[name] = value
                break
    return names
