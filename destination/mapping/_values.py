"""Property names and values as Gist takes them, and times as epoch seconds.

All of it runs per message, so it is written for speed: exact-type checks first, and
small bounded caches for what repeats from message to message (property names and the
include/exclude decision for each name).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from destination.mapping._schema import PropertySelection, Values
from destination.mapping._syntax import Matcher

DROP: Final[Any] = type("Drop", (), {"__repr__": lambda self: "DROP"})()
"""What converting a value gives when it is not sent."""

MAX_DEPTH: Final = 8
"""Objects nested deeper than this are dropped rather than flattened further."""

_CACHE_LIMIT: Final = 8192
"""Entries per cache before it is cleared (names repeat; this only bounds a flood of
distinct names)."""

_MS_THRESHOLD: Final = 1e11
"""A numeric time above this is in milliseconds (1e11 s is the year 5138)."""

_INT64_MIN: Final = -(2**63)
_UINT64_MAX: Final = 2**64 - 1

_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_SEPARATORS = re.compile(r"[\W_]+")


# Times -------------------------------------------------------------------------------


def _looks_like_date(text: str) -> bool:
    return (
        10 <= len(text) <= 40
        and text[4] == "-"
        and text[7] == "-"
        and text[:4].isascii()
        and text[:4].isdigit()
    )


def iso_seconds(text: str) -> float | None:
    """Epoch seconds of an ISO-8601 date or date-time (no zone = UTC), else ``None``."""
    if not _looks_like_date(text):
        return None
    try:
        parsed = datetime.fromisoformat(text)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.timestamp()
    except (ValueError, OverflowError):
        return None


def number_seconds(value: int | float) -> float | None:
    """Epoch seconds from a number (seconds, or milliseconds when it is that large)."""
    seconds = float(value)
    if not math.isfinite(seconds):
        return None
    return seconds / 1000.0 if abs(seconds) > _MS_THRESHOLD else seconds


def message_time(message: Mapping[str, Any]) -> float | None:
    """When the message happened, in epoch seconds: ``timestamp``, else
    ``originalTimestamp``, ``sentAt``, ``receivedAt``; ``None`` if none parses."""
    for key in ("timestamp", "originalTimestamp", "sentAt", "receivedAt"):
        value = message.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            seconds = iso_seconds(value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            seconds = number_seconds(value)
        else:
            seconds = None
        if seconds is not None:
            return seconds
    return None


# Names -------------------------------------------------------------------------------


class PropertyNames:
    """Makes a name safe the way Gist names properties: lower case, runs of spaces and
    other separators as one ``_``, no ``.`` or ``$``, no leading/trailing ``_``; with
    ``snake_case`` a camelCase boundary is a separator too (``planType`` -> ``plan_type``).
    A name with nothing left (``"$$"``) gives ``""``: the property is dropped."""

    __slots__ = ("_cache", "_snake")

    def __init__(self, style: str) -> None:
        self._snake = style == "snake_case"
        self._cache: dict[str, str] = {}

    def __call__(self, name: str) -> str:
        safe = self._cache.get(name)
        if safe is None:
            text = _CAMEL_BOUNDARY.sub("_", name) if self._snake else name
            safe = _SEPARATORS.sub("_", text.lower()).strip("_")
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[name] = safe
        return safe


# Values ------------------------------------------------------------------------------


class ValueConverter:
    """Turns one property value into what is sent, or ``DROP``.

    Strings that are ISO-8601 dates become unix seconds (``dates: unix``); lists of
    scalars are kept, joined with ``,`` or dropped (``lists``); objects and lists inside a
    list are dropped or JSON-encoded (``list_objects``); ``null`` is kept or dropped
    (``nulls``). Integers beyond 64 bits become strings (JSON cannot carry them)."""

    __slots__ = ("_dates", "_join", "_json_items", "_keep_lists", "_keep_nulls")

    def __init__(self, values: Values) -> None:
        self._dates = values.dates == "unix"
        self._keep_lists = values.lists != "drop"
        self._join = values.lists == "join"
        self._json_items = values.list_objects == "json"
        self._keep_nulls = values.nulls == "keep"

    def __call__(self, value: Any) -> Any:
        kind = type(value)
        if kind is str:
            if self._dates:
                seconds = iso_seconds(value)
                if seconds is not None:
                    return int(seconds)
            return value
        if kind is bool or kind is float:
            return value
        if kind is int:
            return value if _INT64_MIN <= value <= _UINT64_MAX else str(value)
        if value is None:
            return None if self._keep_nulls else DROP
        if kind is list:
            return self._list(value) if self._keep_lists else DROP
        return self._unusual(value)

    def _list(self, items: list[Any]) -> Any:
        out: list[Any] = []
        for item in items:
            if isinstance(item, dict | list):
                if not self._json_items:
                    continue
                converted: Any = _json_text(item)
            else:
                converted = self(item)
            if converted is not DROP:
                out.append(converted)
        if self._join:
            return ",".join(
                "" if v is None else v if isinstance(v, str) else _json_text(v) for v in out
            )
        return out

    def _unusual(self, value: Any) -> Any:
        """Subclasses of JSON types (from Python callers); anything else is dropped."""
        if isinstance(value, str):
            return self(str(value))
        if isinstance(value, bool):
            return bool(value)
        if isinstance(value, int):
            return self(int(value))
        if isinstance(value, float):
            return float(value)
        if isinstance(value, list | tuple):
            return self(list(value))
        return DROP


def _json_text(value: Any) -> Any:
    try:
        return orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        return DROP


# Objects to flat properties ----------------------------------------------------------


class PropertyShaper:
    """Copies an object's fields into flat properties: nested objects flattened with
    ``_`` (``address.city`` -> ``address_city``), names made safe, values converted,
    ``include`` / ``exclude`` / ``rename`` applied to the names as sent (nested names
    dotted). ``skip`` names fields used elsewhere (e.g. traits mapped to contact fields).
    """

    __slots__ = (
        "_convert", "_decisions", "_exclude", "_include", "_names", "_open", "_prefix",
        "_rename", "_skip",
    )  # fmt: skip

    def __init__(
        self,
        selection: PropertySelection,
        names: PropertyNames,
        convert: ValueConverter,
        *,
        skip: frozenset[str] = frozenset(),
        prefix: str = "",
    ) -> None:
        self._include = Matcher(selection.include)
        self._exclude = Matcher(selection.exclude)
        self._rename = {name.lower(): target for name, target in selection.rename.items()}
        self._open = self._include.matches_all and self._exclude.matches_none and not self._rename
        self._names = names
        self._convert = convert
        self._skip = skip
        self._prefix = prefix
        self._decisions: dict[str, tuple[bool, bool, str | None]] = {}

    def shape(self, source: Mapping[Any, Any], out: dict[str, Any]) -> None:
        """Add ``source``'s properties to ``out``."""
        self._walk(source, out, "", self._prefix, self._open, 0)

    def _decide(self, path: str) -> tuple[bool, bool, str | None]:
        """(excluded, included by a pattern, renamed to) for a name as sent."""
        decision = self._decisions.get(path)
        if decision is None:
            decision = (
                self._exclude(path),
                self._include(path),
                self._rename.get(path.lower()),
            )
            if len(self._decisions) >= _CACHE_LIMIT:
                self._decisions.clear()
            self._decisions[path] = decision
        return decision

    def _walk(
        self,
        source: Mapping[Any, Any],
        out: dict[str, Any],
        path_prefix: str,
        key_prefix: str,
        included: bool,
        depth: int,
    ) -> None:
        for name, value in source.items():
            if not isinstance(name, str):
                continue
            path = path_prefix + name
            if path in self._skip:
                continue
            inside = included
            key = None
            if not self._open:
                excluded, matched, key = self._decide(path)
                if excluded:
                    continue
                inside = included or matched or key is not None
            if key is None:
                safe = self._names(name)
                if not safe:
                    continue
                key = key_prefix + safe
            if isinstance(value, dict):
                if depth < MAX_DEPTH:
                    self._walk(value, out, path + ".", key + "_", inside, depth + 1)
            elif inside:
                converted = self._convert(value)
                if converted is not DROP:
                    out[key] = converted
