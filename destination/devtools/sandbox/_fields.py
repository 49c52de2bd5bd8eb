"""Checking a JSON object field by field, as the sandbox's e-commerce endpoints do.

``Body`` reads one object: each check names the field (with its path, e.g.
``line_items[0].price``), raises the ``ApiError`` the field deserves and keeps the value
as sent in ``kept``. The statuses (see ``_ecommerce`` for the whole rule): 400 for a
required field absent or null and for a wrong JSON type; 422 ``invalid_amount`` for an
amount that is not a non-negative number of its currency; 422 ``invalid_value`` for a
value of the right type the reference does not allow.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from decimal import Decimal
from typing import Final

from destination.devtools.sandbox._checks import JSON, ApiError, bad_request, check_email

ADDRESS_FIELDS: Final = (
    "name",
    "address1",
    "address2",
    "city",
    "state",
    "postcode",
    "postal_code",
    "country",
    "phone",
    "company_name",
)

_MINOR_UNITS: Final = {
    **dict.fromkeys(("BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG"), 0),
    **dict.fromkeys(("RWF", "UGX", "UYI", "VND", "VUV", "XAF", "XOF", "XPF"), 0),
    **dict.fromkeys(("BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"), 3),
    **dict.fromkeys(("CLF", "UYW"), 4),
}
"""ISO 4217 currencies whose minor unit is not 2 decimals."""
_CURRENCY: Final = re.compile(r"^[A-Z]{3}$")
_DECIMAL_TEXT: Final = re.compile(r"^[0-9]+(\.[0-9]+)?$")


def invalid_amount(message: str) -> ApiError:
    return ApiError(422, "invalid_amount", message)


def invalid_value(message: str) -> ApiError:
    return ApiError(422, "invalid_value", message)


_MISSING: Final = object()


class Body:
    """One JSON object being checked field by field: ``kept`` is what is stored (as
    sent), ``known`` every field the reference names that was asked for."""

    def __init__(self, raw: object, where: str = "") -> None:
        if not isinstance(raw, dict):
            raise bad_request(f"{where.rstrip('.') or 'the body'} must be a JSON object")
        self.raw: dict[str, JSON] = raw
        self.where = where
        self.kept: dict[str, JSON] = {}
        self.known: set[str] = set()

    def name(self, field_name: str) -> str:
        return f"{self.where}{field_name}"

    def ignored(self) -> list[str]:
        return [self.name(k) for k in self.raw if k not in self.known]

    def _value(self, field_name: str, required: bool) -> JSON:
        """The value to check, or ``_MISSING`` when absent or null (a null is kept)."""
        self.known.add(field_name)
        value = self.raw.get(field_name)
        if value is None:
            if required:
                raise bad_request(f"{self.name(field_name)} is required")
            if field_name in self.raw:
                self.kept[field_name] = None
            return _MISSING
        return value

    def string(self, field_name: str, *, required: bool = False) -> str | None:
        value = self._value(field_name, required)
        if value is _MISSING:
            return None
        if not isinstance(value, str):
            raise bad_request(f"{self.name(field_name)} must be a string")
        if required and not value.strip():
            raise bad_request(f"{self.name(field_name)} is required (got an empty string)")
        self.kept[field_name] = value
        return value

    def ident(self, field_name: str, *, required: bool = False) -> str | None:
        """An id (a string or an integer), kept as sent; returned as the text it is
        looked up by."""
        value = self._value(field_name, required)
        if value is _MISSING:
            return None
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise bad_request(f"{self.name(field_name)} must be a string or an integer")
        key = str(value)
        if not key.strip():
            raise bad_request(f"{self.name(field_name)} must not be empty")
        self.kept[field_name] = value
        return key

    def email(self, field_name: str, *, required: bool = False) -> str | None:
        value = self._value(field_name, required)
        if value is _MISSING:
            return None
        email = check_email(value, self.name(field_name))
        self.kept[field_name] = value
        return email

    def currency(self, field_name: str, *, required: bool = False) -> str | None:
        value = self._value(field_name, required)
        if value is _MISSING:
            return None
        if not isinstance(value, str):
            raise bad_request(f"{self.name(field_name)} must be a string")
        if not _CURRENCY.match(value):
            raise invalid_value(
                f"{self.name(field_name)} must be an ISO 4217 code (three capital letters),"
                f" got {value!r}"
            )
        self.kept[field_name] = value
        return value

    def amount(
        self, field_name: str, currency: str, *, required: bool = False, text: bool = False
    ) -> Decimal | None:
        """A non-negative amount of ``currency``; ``text``: a decimal string will do."""
        value = self._value(field_name, required)
        if value is _MISSING:
            return None
        amount = _amount(value, self.name(field_name), currency, text)
        self.kept[field_name] = value
        return amount

    def integer(self, field_name: str) -> int | None:
        value = self._value(field_name, False)
        if value is _MISSING:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad_request(f"{self.name(field_name)} must be an integer")
        self.kept[field_name] = value
        return value

    def quantity(self, field_name: str) -> int | None:
        value = self._value(field_name, False)
        if value is _MISSING:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad_request(f"{self.name(field_name)} must be a number")
        if not math.isfinite(value) or value != int(value) or value < 1:
            raise invalid_value(f"{self.name(field_name)} must be a positive integer, got {value}")
        self.kept[field_name] = value
        return int(value)

    def interval(self, field_name: str, *, required: bool = False) -> float | None:
        value = self._value(field_name, required)
        if value is _MISSING:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad_request(f"{self.name(field_name)} must be a number (hours)")
        if not value > 0:
            raise invalid_value(f"{self.name(field_name)} must be above 0, got {value}")
        self.kept[field_name] = value
        return float(value)

    def time(self, field_name: str, *, required: bool = False) -> str | None:
        """An ISO 8601 time, kept as sent; ``""`` stands for unset unless required."""
        value = self._value(field_name, required)
        if value is _MISSING:
            return None
        if not isinstance(value, str):
            raise bad_request(f"{self.name(field_name)} must be an ISO 8601 string")
        if value == "" and not required:
            self.kept[field_name] = value
            return None
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise invalid_value(
                f"{self.name(field_name)} is not an ISO 8601 time: {value!r}"
            ) from None
        self.kept[field_name] = value
        return value

    def choice(
        self, field_name: str, options: tuple[str, ...], *, required: bool = False
    ) -> str | None:
        value = self._value(field_name, required)
        if value is _MISSING:
            return None
        if not isinstance(value, str):
            raise bad_request(f"{self.name(field_name)} must be a string")
        if value not in options:
            raise invalid_value(
                f"{self.name(field_name)} must be one of {', '.join(options)}, got {value!r}"
            )
        self.kept[field_name] = value
        return value

    def address(self, field_name: str) -> None:
        value = self._value(field_name, False)
        if value is _MISSING:
            return
        address = Body(value, f"{self.name(field_name)}.")
        for key in ADDRESS_FIELDS:
            address.string(key)
        self.kept[field_name] = value  # every key, listed or not: it is the customer's

    def same_id(self, field_name: str, key: str) -> None:
        """An update's body may repeat its path's id, not name another."""
        self.known.add(field_name)
        value = self.raw.get(field_name)
        if value is not None and str(value) != key:
            raise bad_request(
                f"{self.name(field_name)} {value!r} is not the {field_name} of the path ({key})"
            )

    def line_items(self, field_name: str, currency: str) -> list[tuple[str, str | None]]:
        """The line items checked; returns the (product, variant) each names, for
        ``check_items`` once the whole body is checked."""
        value = self._value(field_name, True)
        if not isinstance(value, list):
            raise bad_request(f"{self.name(field_name)} must be a list of line items")
        named: list[tuple[str, str | None]] = []
        for index, raw in enumerate(value):
            item = Body(raw, f"{self.name(field_name)}[{index}].")
            product_id = item.ident("product_id")
            variant_id = item.ident("product_variant_id")
            item.quantity("quantity")
            item.amount("price", currency)
            if variant_id is not None and product_id is None:
                raise bad_request(f"{item.name('product_variant_id')} needs a product_id")
            if product_id is not None:
                named.append((product_id, variant_id))
        self.kept[field_name] = value
        return named

    def categories(self, field_name: str) -> list[str]:
        """The category ids, for ``EcommerceStore.category`` once the body is checked."""
        value = self._value(field_name, False)
        if value is _MISSING:
            return []
        if not isinstance(value, list):
            raise bad_request(f"{self.name(field_name)} must be a list of category ids")
        for index, category_id in enumerate(value):
            if isinstance(category_id, bool) or not isinstance(category_id, str | int):
                raise bad_request(
                    f"{self.name(field_name)}[{index}] must be a category id "
                    "(a string or an integer)"
                )
        self.kept[field_name] = value
        return [str(c) for c in value]


def _amount(value: JSON, name: str, currency: str, text: bool) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise invalid_amount(f"{name} must be a number, got {value!r}")
    if isinstance(value, str):
        if not text:
            raise invalid_amount(f"{name} must be a number, not a string: {value!r}")
        if not _DECIMAL_TEXT.match(value):
            raise invalid_amount(f"{name} is not a decimal amount: {value!r}")
        amount = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise invalid_amount(f"{name} must be a finite number")
        amount = Decimal(repr(value))
    else:
        amount = Decimal(value)
    if amount < 0:
        raise invalid_amount(f"{name} must not be negative, got {value!r}")
    digits = _MINOR_UNITS.get(currency, 2)
    exponent = amount.normalize().as_tuple().exponent
    if isinstance(exponent, int) and exponent < -digits:
        raise invalid_amount(
            f"{name} {value!r} is not an amount of {currency} "
            f"(at most {digits} decimal{'s' if digits != 1 else ''})"
        )
    return amount
