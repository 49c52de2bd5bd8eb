"""Property names and values as Gist takes them, times as epoch seconds, and the checks
on what Gist can store (user ids, emails, times, integers, property names).

All of it runs per message, so it is written for speed: exact-type checks first, and
small bounded caches for what repeats from message to message (property names and the
include/exclude decision for each name).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final, Literal

import orjson

from destination.mapping._reasons import (
    INVALID_FIELD_DROPPED,
    LIST_OBJECTS,
    LISTS,
    NO_NAME,
    TOO_DEEP,
)
from destination.mapping._schema import PropertySelection, Values
from destination.mapping._syntax import Matcher

DROP: Final[Any] = type("Drop", (), {"__repr__": lambda self: "DROP"})()
"""What converting a value gives when it is not sent."""

MAX_DEPTH: Final = 8
"""Objects nested deeper than this are dropped (and reported) rather than flattened
further."""

Dropped = list[tuple[str, str]]
"""What was left out of a message's properties: (the field, why: a code of
``_reasons.FIELD_DROPS``), in the order found."""

CACHE_LIMIT: Final = 8192
"""Entries per cache before it is cleared (names repeat; this only bounds a flood of
distinct names)."""

_MS_THRESHOLD: Final = 1e11
"""A numeric time above this is in milliseconds (1e11 s is the year 5138)."""

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1

INTEGER_RULE: Final = "an integer within signed 64 bits (what Gist stores)"
"""What an integer property value must be, for a rejection's detail."""

_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_SEPARATORS = re.compile(r"[\W_]+")


def field_name(path: Any) -> str:
    """A field's path as a rejection's detail shows it: cut short (the name comes from
    the message: it may be anything, and the detail becomes a dead-letter header)."""
    text = str(path)
    return text if len(text) <= 60 else text[:57] + "..."


class Unsendable(Exception):
    """A value Gist cannot store; ``rule`` says what it must be."""

    def __init__(self, rule: str) -> None:
        super().__init__(rule)
        self.rule = rule


class InvalidField(Exception):
    """A field Gist cannot take: the message is rejected with ``invalid_field``.
    ``detail`` names the field and says what is wrong, never repeating its value."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


# Identities --------------------------------------------------------------------------

MAX_USER_ID: Final = 255
"""The longest user id sent (characters)."""

MAX_EMAIL: Final = 254
"""The longest email sent (RFC 5321's path limit less the angle brackets)."""

MAX_LOCAL_PART: Final = 64
"""The longest part before the @ (RFC 5321)."""

# A practical subset of RFC 5321/5322 (with RFC 6531's non-ASCII letters): a dot-atom
# before the @ (no quoted strings, comments or spaces); after it, two or more DNS labels
# of letters, digits and inner hyphens, at most 63 characters each, the last not all
# digits (no IP literals).
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff"
_LETTERS = r"[A-Za-z0-9\u0080-\U0010ffff]+"
_EMAIL = re.compile(
    rf"(?P<local>[{_ATEXT}]+(?:\.[{_ATEXT}]+)*)"
    rf"@(?P<domain>{_LETTERS}(?:-+{_LETTERS})*(?:\.{_LETTERS}(?:-+{_LETTERS})*)+)"
)
_EMAIL_SHAPE: Final = "an email address (name@domain.tld: one @, no spaces, quotes or comments)"


def email_problem(text: str) -> str | None:
    """``None`` if ``text`` (already trimmed) is an email Gist can take, else what an
    email must be (for a rejection's detail: it never repeats the address)."""
    if len(text) > MAX_EMAIL:
        return f"an email address of at most {MAX_EMAIL} characters"
    match = _EMAIL.fullmatch(text)
    if match is None:
        return _EMAIL_SHAPE
    domain = match["domain"]
    if domain.rpartition(".")[2].isdigit() or not (text.isascii() or text.isprintable()):
        return _EMAIL_SHAPE
    if len(domain) > 63 and any(len(label) > 63 for label in domain.split(".")):
        return "an email address whose domain labels have at most 63 characters"
    if len(match["local"]) > MAX_LOCAL_PART:
        return f"an email address with at most {MAX_LOCAL_PART} characters before the @"
    return None


# Times -------------------------------------------------------------------------------


_NAIVE_EPOCH: Final = datetime(1970, 1, 1)


def iso_seconds(text: str) -> float | None:
    """Epoch seconds of an ISO-8601 date or date-time (no zone = UTC), else ``None``."""
    # A cheap shape check first: most strings are not dates, and this runs per value.
    if not (10 <= len(text) <= 40 and text[4] == "-" and text[7] == "-"):
        return None
    try:
        parsed = datetime.fromisoformat(text)
        if parsed.tzinfo is None:
            return (parsed - _NAIVE_EPOCH).total_seconds()
        return parsed.timestamp()
    except (ValueError, OverflowError):
        return None


def number_seconds(value: int | float) -> float | None:
    """Epoch seconds from a number (seconds, or milliseconds when it is that large)."""
    try:
        seconds = float(value)
    except OverflowError:  # an int beyond float, from a Python caller
        return None
    if not math.isfinite(seconds):
        return None
    return seconds / 1000.0 if abs(seconds) > _MS_THRESHOLD else seconds


TIME_END: Final = 253402300800.0
"""10000-01-01T00:00:00Z: timestamps are before it (and not before 1970-01-01)."""

TIME_RULE: Final = (
    "an ISO-8601 date-time, or epoch seconds or milliseconds (a number or digits), "
    "between 1970-01-01 and 9999-12-31"
)
"""What a timestamp must be, for a rejection's detail."""

_EPOCH_DIGITS = re.compile(r"[0-9]{1,20}(?:\.[0-9]{1,9})?")


def time_seconds(value: Any) -> float | None:
    """Epoch seconds of a timestamp: ISO-8601 text (no zone = UTC), or epoch seconds or
    milliseconds as a number or as digits (above 1e11 it is milliseconds); ``None`` for
    anything else, and for a time outside 1970-01-01 .. 9999-12-31 (Gist keeps unix
    seconds; a negative or 20-digit one is a producer's bug, not a date)."""
    if isinstance(value, str):
        seconds = iso_seconds(value)
        if seconds is None:
            seconds = _text_seconds(str(value))
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = number_seconds(value)
    else:
        return None
    if seconds is None or not 0.0 <= seconds < TIME_END:
        return None
    return seconds


def _text_seconds(text: str) -> float | None:
    """``time_seconds`` for text that is not the usual ISO-8601 shape."""
    text = text.strip()
    if _EPOCH_DIGITS.fullmatch(text):
        return number_seconds(float(text))
    if len(text) > 64:
        return None
    try:  # the basic format (20261101T120000Z), week dates, a space for the T
        parsed = datetime.fromisoformat(text)
        if parsed.tzinfo is None:
            return (parsed - _NAIVE_EPOCH).total_seconds()
        return parsed.timestamp()
    except (ValueError, OverflowError):
        return None


MESSAGE_TIMES: Final = ("timestamp", "originalTimestamp", "sentAt", "receivedAt")
"""Where a message says when it happened, in the order they are read."""


def message_time(
    message: Mapping[str, Any], drop_invalid: bool = False, dropped: Dropped | None = None
) -> float | None:
    """When the message happened, in epoch seconds: the first of ``MESSAGE_TIMES``
    present (not null); ``None`` if none is. One that is present but not a time
    (``time_seconds``) raises ``InvalidField``, or with ``drop_invalid`` is passed over
    for the next (and added to ``dropped``); those after the one used are not read."""
    value = message.get("timestamp")
    if type(value) is str:  # the usual case
        seconds = iso_seconds(value)
        if seconds is not None and 0.0 <= seconds < TIME_END:
            return seconds
    for key in MESSAGE_TIMES:
        value = message.get(key)
        if value is None:
            continue
        seconds = time_seconds(value)
        if seconds is not None:
            return seconds
        if not drop_invalid:
            raise InvalidField(f"{key} must be {TIME_RULE}")
        if dropped is not None:
            dropped.append((key, INVALID_FIELD_DROPPED))
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
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            self._cache[name] = safe
        return safe


# Values ------------------------------------------------------------------------------


class ValueConverter:
    """Turns one property value into what is sent, or ``DROP``.

    Strings that are ISO-8601 dates become unix seconds (``dates: unix``); lists of
    scalars are kept, joined with ``,`` or dropped (``lists``); lists inside a list are
    JSON-encoded unless ``list_objects: drop``, and so are objects in a list that is not
    flattened into columns (``PropertyShaper``: ``list_objects: flatten``, the default)
    unless ``list_objects: drop``; ``null`` is kept or dropped (``nulls``). An integer
    beyond signed 64 bits raises ``Unsendable``: Gist cannot store it, and as a string it
    would change type from one message to the next."""

    __slots__ = (
        "_join", "_json_items", "dates", "drop_objects", "flatten_objects", "keep_lists",
        "keep_nulls",
    )  # fmt: skip

    def __init__(self, values: Values) -> None:
        self.dates = values.dates == "unix"
        self.keep_lists = values.lists != "drop"
        self._join = values.lists == "join"
        self._json_items = values.list_objects != "drop"
        self.drop_objects = values.list_objects == "drop"
        self.flatten_objects = values.list_objects == "flatten" and self.keep_lists
        self.keep_nulls = values.nulls == "keep"

    def __call__(self, value: Any) -> Any:
        kind = type(value)
        if kind is str:
            if self.dates:
                seconds = iso_seconds(value)
                if seconds is not None:
                    return int(seconds)
            return value
        if kind is bool or kind is float:
            return value
        if kind is int:
            if _INT64_MIN <= value <= _INT64_MAX:
                return value
            raise Unsendable(INTEGER_RULE)
        if value is None:
            return None if self.keep_nulls else DROP
        if kind is list:
            return self.convert_list(value)
        return self._unusual(value)

    def convert_list(self, items: list[Any]) -> Any:
        """A list as ``lists`` and ``list_objects`` say."""
        if not self.keep_lists:
            return DROP
        out: list[Any] = []
        for item in items:
            kind = type(item)
            if kind is str:
                if self.dates and len(item) > 9 and item[4] == "-":
                    item = self(item)
                out.append(item)
                continue
            if kind is dict or kind is list or isinstance(item, dict | list):
                if not self._json_items:
                    continue
                converted: Any = _json_text(item)
            else:
                converted = self(item)
            if converted is not DROP:
                out.append(converted)
        return self.column(out)

    def column(self, items: list[Any]) -> Any:
        """A list of values already converted, as ``lists`` says (kept or joined)."""
        if self._join:
            return ",".join(
                "" if v is None else v if isinstance(v, str) else _json_text(v) for v in items
            )
        return items

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

    A list holding objects is, under ``list_objects: flatten``, sent as columns: each
    field of its objects (nested ones flattened) becomes a list property
    ``<list>_<field>`` with one item per object, in order, ``null`` where an object lacks
    the field; a list inside an object is JSON text; the list's other items stay a list
    under its own name. Patterns and renames see a column's field as ``list.field``.

    No property takes a ``reserved`` name, and two fields that give one property name
    must hold the same value (it is then sent once): otherwise ``shape`` raises
    ``InvalidField``, or with ``drop_invalid`` leaves the property out (both values, for
    a collision: which one is right cannot be known).

    Nothing is left out without a word: each field not sent for a reason other than the
    selection (``include`` / ``exclude``) is added to ``dropped`` (the list given, shared
    with the mapper, which empties it per message) with a code of
    ``_reasons.FIELD_DROPS``.

    Everything about a field but its value follows from its path, so what to do with
    each path is worked out once and cached: the per-message loop is a dict look-up and
    a type check per field.
    """

    __slots__ = (
        "_convert", "_dates", "_drop_invalid", "_drop_objects", "_dropped", "_exclude",
        "_flatten", "_include", "_keep_lists", "_keep_nulls", "_keys", "_label", "_names",
        "_nested", "_prefix", "_rename", "_reserved", "_skip",
    )  # fmt: skip

    def __init__(
        self,
        selection: PropertySelection,
        names: PropertyNames,
        convert: ValueConverter,
        *,
        label: str,
        skip: frozenset[str] = frozenset(),
        prefix: str = "",
        reserved: frozenset[str] = frozenset(),
        drop_invalid: bool = False,
        dropped: Dropped | None = None,
    ) -> None:
        self._include = Matcher(selection.include)
        self._exclude = Matcher(selection.exclude)
        self._rename = {name.lower(): target for name, target in selection.rename.items()}
        self._names = names
        self._convert = convert
        self._dates = convert.dates
        self._keep_nulls = convert.keep_nulls
        self._keep_lists = convert.keep_lists
        self._flatten = convert.flatten_objects
        self._drop_objects = convert.drop_objects
        self._label = label
        self._skip = skip
        self._prefix = prefix
        self._reserved = reserved
        self._drop_invalid = drop_invalid
        self._dropped: Dropped = [] if dropped is None else dropped
        self._keys: dict[Any, str | Literal[False]] = {}
        """path -> the property a value there is sent as; "" when it is not sent; False
        when its name is reserved or names nothing (``"$$"``)."""
        self._nested: dict[Any, tuple[str, str, bool] | Literal[False] | None] = {}
        """path -> ``_nested_plan`` for an object (or a list of objects) there."""

    def shape(self, source: Mapping[Any, Any]) -> dict[str, Any]:
        """``source``'s properties (``InvalidField`` for a reserved name or a collision,
        unless ``drop_invalid``)."""
        out: dict[str, Any] = {}
        reported = len(self._dropped)
        if self._walk(source, out, "", self._prefix, False, 0, False) == len(out):
            return out
        # Fewer properties than fields written: two fields gave one name. Again, checking
        # every write (the usual walk does not, to stay lean), and reporting again.
        out = {}
        del self._dropped[reported:]
        try:
            self._walk(source, out, "", self._prefix, False, 0, True)
        except _Collision as collision:
            first = self._first_path(source, collision.key, collision.path)
            raise InvalidField(
                f"{self._label}.{field_name(first)} and "
                f"{self._label}.{field_name(collision.path)} both become "
                f"property {field_name(collision.key)!r}, with different values"
            ) from None
        shaped: dict[str, Any] = {}
        for key, value in out.items():
            if value is _CONFLICT:
                where = f"{self._label} property {field_name(key)}"
                self._dropped.append((where, INVALID_FIELD_DROPPED))
            else:
                shaped[key] = value
        return shaped

    def _decide(
        self, path: Any, name: Any, key_prefix: str, inherited: bool
    ) -> tuple[str | None, bool]:
        """(property name, or None when nothing at ``path`` is sent, or "" when its name
        names nothing (``"$$"``); whether its value is sent) for the field at ``path``
        inside an object whose children are named ``key_prefix...`` and sent or not by
        ``inherited``."""
        if not isinstance(name, str) or path in self._skip or self._exclude(path):
            return None, False
        renamed = self._rename.get(path.lower())
        if renamed is not None:
            return renamed, True
        safe = self._names(name)
        return (key_prefix + safe if safe else ""), inherited or self._include(path)

    def _key(self, path: Any, name: Any, key_prefix: str, inherited: bool) -> str | Literal[False]:
        key, included = self._decide(path, name, key_prefix, inherited)
        plan: str | Literal[False]
        if key is None or not included:
            plan = ""
        elif not key or key in self._reserved:
            plan = False
        else:
            plan = key
        if len(self._keys) >= CACHE_LIMIT:
            self._keys.clear()
        self._keys[path] = plan
        return plan

    def _walk(
        self,
        source: Mapping[Any, Any],
        out: dict[str, Any],
        path_prefix: str,
        key_prefix: str,
        inherited: bool,
        depth: int,
        check: bool,
    ) -> int:
        """Add ``source``'s fields to ``out``; how many were written. A field whose name
        is already there overwrites it, unless ``check``: then the same value is left
        alone and a different one raises ``_Collision`` (or, with ``drop_invalid``, is
        marked ``_CONFLICT``)."""
        keys = self._keys
        nested = self._nested
        dates = self._dates
        written = len(source)  # less each field not written, plus what nested ones write
        for name, value in source.items():
            path = f"{path_prefix}{name}" if path_prefix else name
            kind = type(value)
            if kind is dict:
                written -= 1
                plan = nested.get(path, DROP)
                if plan is DROP:
                    plan = self._nested_plan(path, name, key_prefix, inherited)
                if plan:
                    if depth < MAX_DEPTH:
                        written += self._walk(
                            value, out, plan[0], plan[1], plan[2], depth + 1, check
                        )
                    else:
                        self._drop(path, TOO_DEEP)
                elif plan is False:
                    self._drop(path, NO_NAME)
                continue
            if kind is list and self._flatten and _holds_objects(value):
                written -= 1
                written += self._columns(
                    value, out, path, name, key_prefix, inherited, depth, check
                )
                continue
            key = keys.get(path)
            if key is None:
                key = self._key(path, name, key_prefix, inherited)
            if not key:  # not sent (""), or a reserved name or none (False)
                written -= 1
                if key is False:
                    self._refused(path, name, key_prefix, inherited)
                continue
            if kind is str:
                if dates and len(value) > 9 and value[4] == "-":
                    seconds = iso_seconds(value)
                    if seconds is not None:
                        value = int(seconds)
            elif (
                kind is float or kind is bool or (kind is int and _INT64_MIN <= value <= _INT64_MAX)
            ):
                pass
            elif value is None:
                if not self._keep_nulls:
                    written -= 1
                    continue
            elif kind is list:
                value = self._list(value, path)
                if value is DROP:
                    written -= 1
                    continue
            elif isinstance(value, dict):  # a dict subclass, from a Python caller
                written -= 1
                plan = self._nested_plan(path, name, key_prefix, inherited)
                if plan and depth < MAX_DEPTH:
                    written += self._walk(value, out, plan[0], plan[1], plan[2], depth + 1, check)
                continue
            else:
                try:
                    value = self._convert(value)
                except Unsendable as exc:
                    self._invalid(path, f"must be {exc.rule}")
                    value = DROP
                if value is DROP:
                    written -= 1
                    continue
            if check and key in out:
                self._check(out, key, value, path)
            else:
                out[key] = value
        return written

    def _list(self, items: list[Any], path: Any) -> Any:
        """A list as sent, or ``DROP``; what is left out is reported."""
        if not self._keep_lists:
            self._drop(path, LISTS)
            return DROP
        if self._drop_objects and _holds_containers(items):
            self._drop(path, LIST_OBJECTS)
        try:
            return self._convert.convert_list(items)
        except Unsendable as exc:
            self._invalid(path, f"must be {exc.rule}")
            return DROP

    def _columns(
        self,
        items: list[Any],
        out: dict[str, Any],
        path: Any,
        name: Any,
        key_prefix: str,
        inherited: bool,
        depth: int,
        check: bool,
    ) -> int:
        """Write a list holding objects as columns (see the class); how many properties
        were written."""
        written = 0
        others = [item for item in items if not isinstance(item, dict)]
        if others:
            key = self._keys.get(path)
            if key is None:
                key = self._key(path, name, key_prefix, inherited)
            if key:
                value = self._list(others, path)
                if value is not DROP:
                    self._put(out, key, value, path, check)
                    written += 1
            elif key is False:
                self._refused(path, name, key_prefix, inherited)
        plan = self._nested.get(path, DROP)
        if plan is DROP:
            plan = self._nested_plan(path, name, key_prefix, inherited)
        if not plan:
            if plan is False:
                self._drop(path, NO_NAME)
            return written
        if depth >= MAX_DEPTH:
            self._drop(path, TOO_DEEP)
            return written
        objects = [item for item in items if isinstance(item, dict)]
        columns: dict[str, list[Any]] = {}
        for index, item in enumerate(objects):
            self._column_values(item, columns, index, plan[0], plan[1], plan[2], depth + 1)
        for key, column in columns.items():
            if len(column) < len(objects):
                column.extend([None] * (len(objects) - len(column)))
            self._put(out, key, self._convert.column(column), path, check)
            written += 1
        return written

    def _column_values(
        self,
        item: Mapping[Any, Any],
        columns: dict[str, list[Any]],
        index: int,
        path_prefix: str,
        key_prefix: str,
        inherited: bool,
        depth: int,
    ) -> None:
        """Add the fields of the ``index``-th object of a list to ``columns``."""
        for name, value in item.items():
            path = f"{path_prefix}{name}"
            if isinstance(value, dict):
                plan = self._nested.get(path, DROP)
                if plan is DROP:
                    plan = self._nested_plan(path, name, key_prefix, inherited)
                if plan:
                    if depth < MAX_DEPTH:
                        self._column_values(
                            value, columns, index, plan[0], plan[1], plan[2], depth + 1
                        )
                    else:
                        self._drop(path, TOO_DEEP)
                elif plan is False:
                    self._drop(path, NO_NAME)
                continue
            key = self._keys.get(path)
            if key is None:
                key = self._key(path, name, key_prefix, inherited)
            if not key:
                if key is False:
                    self._refused(path, name, key_prefix, inherited)
                continue
            if isinstance(value, list | tuple):
                value = _json_text(value)
            else:
                try:
                    value = self._convert(value)
                except Unsendable as exc:
                    self._invalid(path, f"must be {exc.rule}")
                    continue
            if value is DROP:  # a null under nulls: drop: the column keeps its place
                value = None
            column = columns.get(key)
            if column is None:
                column = columns[key] = []
            if len(column) > index:  # another field of this object gave the same name
                if not _same_value(column[index], value):
                    self._invalid(
                        path,
                        f"and another field of its object both become property {key!r}, "
                        "with different values",
                    )
                    column[index] = None
                continue
            if len(column) < index:
                column.extend([None] * (index - len(column)))
            column.append(value)

    def _put(self, out: dict[str, Any], key: str, value: Any, path: Any, check: bool) -> None:
        if check and key in out:
            self._check(out, key, value, path)
        else:
            out[key] = value

    def _drop(self, path: Any, reason: str) -> None:
        self._dropped.append((f"{self._label}.{field_name(path)}", reason))

    def _invalid(self, path: Any, problem: str) -> None:
        if not self._drop_invalid:
            raise InvalidField(f"{self._label}.{field_name(path)} {problem}")
        self._drop(path, INVALID_FIELD_DROPPED)

    def _refused(self, path: Any, name: Any, key_prefix: str, inherited: bool) -> None:
        """A field whose name is reserved (invalid) or names no property (dropped)."""
        key, _ = self._decide(path, name, key_prefix, inherited)
        if key:
            self._invalid(
                path, f"becomes custom property {key!r}, the name of a Gist contact field"
            )
        else:
            self._drop(path, NO_NAME)

    def _check(self, out: dict[str, Any], key: str, value: Any, path: Any) -> None:
        """A second field gives ``key``: ``_Collision`` unless its value is the one
        already there (with ``drop_invalid``, the property is marked ``_CONFLICT``)."""
        sent = out[key]
        if sent is not _CONFLICT and _same_value(sent, value):
            return
        if not self._drop_invalid:
            raise _Collision(key, path)
        out[key] = _CONFLICT

    def _first_path(self, source: Mapping[Any, Any], key: str, second: Any) -> Any:
        """The path of the first field of ``source`` sent as ``key`` (for a collision's
        detail; the slow path)."""
        stack: list[tuple[Mapping[Any, Any], str, str, bool, int]] = [
            (source, "", self._prefix, False, 0)
        ]
        while stack:
            fields, path_prefix, key_prefix, inherited, depth = stack.pop(0)
            for name, value in fields.items():
                path = f"{path_prefix}{name}" if path_prefix else name
                if isinstance(value, dict):
                    plan = self._nested_plan(path, name, key_prefix, inherited)
                    if plan and depth < MAX_DEPTH:
                        stack.insert(0, (value, plan[0], plan[1], plan[2], depth + 1))
                    continue
                if path != second and self._key(path, name, key_prefix, inherited) == key:
                    return path
        return "?"

    def _nested_plan(
        self, path: Any, name: Any, key_prefix: str, inherited: bool
    ) -> tuple[str, str, bool] | Literal[False] | None:
        """For the object (or list of objects) at ``path``: (its children's path prefix,
        their name prefix, whether their values are sent unless a pattern says
        otherwise); None when nothing in it is sent; False when it would be sent but its
        name names nothing."""
        key, included = self._decide(path, name, key_prefix, inherited)
        plan: tuple[str, str, bool] | Literal[False] | None
        if key:
            plan = (f"{path}.", key + "_", included)
        elif key == "" and included:
            plan = False
        else:
            plan = None
        if len(self._nested) >= CACHE_LIMIT:
            self._nested.clear()
        self._nested[path] = plan
        return plan


# Loops, not any(): they run for every list of every message, and any()'s generator
# costs more than the loop on the short lists messages hold.
def _holds_objects(items: list[Any]) -> bool:
    for item in items:  # noqa: SIM110 (a loop on purpose: see above)
        if isinstance(item, dict):
            return True
    return False


def _holds_containers(items: list[Any]) -> bool:
    for item in items:  # noqa: SIM110 (a loop on purpose: see above)
        if isinstance(item, dict | list):
            return True
    return False


class _Collision(Exception):
    def __init__(self, key: str, path: Any) -> None:
        super().__init__(key, path)
        self.key = key
        self.path = path


_CONFLICT: Final[Any] = type("Conflict", (), {"__repr__": lambda self: "CONFLICT"})()
"""In a shaper's output while it runs: two fields gave this property different values."""


def _same_value(a: Any, b: Any) -> bool:
    """Equal and of the same JSON type (``1``, ``1.0`` and ``true`` are different values
    to Gist though Python finds them equal)."""
    if type(a) is not type(b):
        return False
    if type(a) is list:
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)
