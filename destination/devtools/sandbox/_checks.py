"""What every sandbox endpoint shares: the error answer and the checks of identifiers.

An ``ApiError`` raised anywhere under a handler becomes Gist's error shape,
``{"errors": [{"code": code, "message": message}]}``, with its status.
"""

from __future__ import annotations

import re
from typing import Any, Final

JSON = Any

_EMAIL: Final = re.compile(r"^[^@\s]+@[^@\s.]+(\.[^@\s.]+)+$")


class ApiError(Exception):
    """An error answer: ``{"errors": [{"code": code, "message": message}]}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> dict[str, JSON]:
        return {"errors": [{"code": self.code, "message": self.message}]}


def bad_request(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


def not_found(kind: str, message: str) -> ApiError:
    """404 ``<kind>_not_found``, e.g. ``contact_not_found``, ``store_not_found``."""
    return ApiError(404, f"{kind}_not_found", message)


def check_email(value: object, field_name: str = "email") -> str:
    """A valid e-mail address, stripped and down-cased (as Gist stores it)."""
    if not isinstance(value, str):
        raise bad_request(f"{field_name} must be a string")
    email = value.strip().lower()
    if not _EMAIL.match(email):
        raise bad_request(f"{field_name} is not a valid email address: {value!r}")
    return email


def check_user_id(value: object, field_name: str = "user_id") -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise bad_request(f"{field_name} must be a string or an integer")
    user_id = str(value)
    if not user_id.strip():
        raise bad_request(f"{field_name} must not be empty")
    return user_id


def check_contact_id(value: object, field_name: str = "id") -> int | None:
    """A Gist contact id (a string or an int); None when it cannot name any contact."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise bad_request(f"{field_name} must be a string or an integer")
    if isinstance(value, int):
        return value
    return int(value) if value.isdigit() else None
