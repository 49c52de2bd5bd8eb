"""The small languages of a rules file, each parsed once into a ready-to-run form.

- A *path* names a field of a message: ``traits.email``, ``context.traits.email``.
- A *pattern* matches names: a glob (``utm_*``) or, prefixed ``re:``, a regular
  expression matched in full. Matching is case-insensitive.
- A *template* builds a name from fields: ``Viewed {name} Page``.
- A *condition* (``when``) compares fields with expected values.

The ``parse_*`` functions raise ``ValueError`` with a message fit for an operator; the
schema calls them to validate, the mapper to compile.
"""

from __future__ import annotations

import fnmatch
import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

MISSING: Final[Any] = type("Missing", (), {"__repr__": lambda self: "MISSING"})()
"""What resolving a path gives when the field is absent (``None`` is a present null)."""

Path = tuple[str, ...]

ROOTS: Final = frozenset(
    {
        "type", "messageId", "userId", "anonymousId", "previousId", "groupId", "event",
        "name", "category", "traits", "properties", "context", "integrations",
        "timestamp", "originalTimestamp", "sentAt", "receivedAt", "channel", "version",
    }
)  # fmt: skip
"""Top-level fields of a Segment message: a path starting elsewhere is a typo."""

_SEGMENT = re.compile(r"[^.{}\s]+")


def parse_path(text: str) -> Path:
    """``"context.traits.email"`` -> ``("context", "traits", "email")``."""
    parts = tuple(text.split("."))
    for part in parts:
        if not _SEGMENT.fullmatch(part):
            raise ValueError(
                f"expected a path like traits.email (dot-separated names without spaces "
                f"or braces), got {text!r}"
            )
    if parts[0] not in ROOTS:
        raise ValueError(
            f"a path starts with a message field ({', '.join(sorted(ROOTS))}), got {parts[0]!r}"
        )
    return parts


def resolve(message: Mapping[str, Any], path: Path) -> Any:
    """The value at ``path``, or ``MISSING``."""
    value: Any = message
    for key in path:
        if not isinstance(value, dict):
            return MISSING
        value = value.get(key, MISSING)
        if value is MISSING:
            return MISSING
    return value


Getter = Callable[[Mapping[str, Any]], Any]


def getter(path: Path) -> Getter:
    """``resolve`` for one path, unrolled for the usual depths (it runs per message)."""
    if len(path) == 1:
        (k0,) = path
        return lambda message: message.get(k0, MISSING)
    if len(path) == 2:
        k0, k1 = path

        def get2(message: Mapping[str, Any]) -> Any:
            value = message.get(k0)
            return value.get(k1, MISSING) if isinstance(value, dict) else MISSING

        return get2
    if len(path) == 3:
        k0, k1, k2 = path

        def get3(message: Mapping[str, Any]) -> Any:
            value = message.get(k0)
            if not isinstance(value, dict):
                return MISSING
            value = value.get(k1)
            return value.get(k2, MISSING) if isinstance(value, dict) else MISSING

        return get3
    return lambda message: resolve(message, path)


def event_key(name: str) -> str:
    """How Gist tells event names apart: case-insensitive, with ``.`` and ``$`` stored as
    ``-``. Rules compare event names by this key."""
    return normalise_event_name(name).lower()


def normalise_event_name(name: str) -> str:
    """The name Gist stores: trimmed, ``.`` and ``$`` replaced with ``-``."""
    return name.strip().replace(".", "-").replace("$", "-")


# Patterns ----------------------------------------------------------------------------


def pattern_regex(text: str, *, event_names: bool = False) -> str:
    """The regular expression for one pattern (raises ``ValueError`` if it is bad).

    Globs for event names are compared by ``event_key``, so their literal text is keyed
    the same way; a ``re:`` pattern sees the key as it is."""
    if text.startswith("re:"):
        body = text[3:]
        if not body:
            raise ValueError("expected a regular expression after 're:'")
        try:
            re.compile(body)
        except re.error as exc:
            raise ValueError(f"bad regular expression {body!r}: {exc}") from None
        return body
    if not text:
        raise ValueError("expected a non-empty pattern")
    return fnmatch.translate(event_key(text) if event_names else text)


class Matcher:
    """Whether a name matches any of a list of patterns (case-insensitive)."""

    __slots__ = ("_matches_all", "_regex")

    def __init__(self, patterns: Sequence[str], *, event_names: bool = False) -> None:
        self._matches_all = "*" in patterns
        joined = "|".join(f"(?:{pattern_regex(p, event_names=event_names)})" for p in patterns)
        self._regex = re.compile(joined, re.IGNORECASE) if joined else None

    def __call__(self, name: str) -> bool:
        if self._matches_all:
            return True
        if self._regex is None:
            return False
        return self._regex.fullmatch(name) is not None


# Templates ---------------------------------------------------------------------------

Part = str | Path


def parse_template(text: str) -> tuple[Part, ...]:
    """``"Viewed {name} Page"`` -> ``("Viewed ", ("name",), " Page")``; ``{{`` and ``}}``
    are literal braces."""
    parts: list[Part] = []
    try:
        pieces = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ValueError(f"bad template {text!r}: {exc} (write {{{{ for a literal brace)") from None
    for literal, field, spec, conversion in pieces:
        if literal:
            parts.append(literal)
        if field is None:
            continue
        if spec or conversion:
            raise ValueError(f"bad template {text!r}: write {{path}}, without ! or : parts")
        if not field:
            raise ValueError(f"bad template {text!r}: {{}} needs a path, e.g. {{name}}")
        parts.append(parse_path(field))
    return tuple(parts)


def text_of(value: Any) -> str | None:
    """A field value as template text: strings, numbers and booleans; else ``None``."""
    if isinstance(value, str):
        value = value.strip()
        return value or None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return None


class Template:
    """Renders to a string, or to ``None`` when one of its fields is absent or empty."""

    __slots__ = ("_parts",)

    def __init__(self, text: str) -> None:
        self._parts = parse_template(text)

    def render(self, message: Mapping[str, Any]) -> str | None:
        out: list[str] = []
        for part in self._parts:
            if isinstance(part, str):
                out.append(part)
                continue
            text = text_of(resolve(message, part))
            if text is None:
                return None
            out.append(text)
        rendered = "".join(out).strip()
        return rendered or None


def first_rendered(templates: Sequence[Template], message: Mapping[str, Any]) -> str | None:
    """The first template of a list that renders."""
    for template in templates:
        rendered = template.render(message)
        if rendered is not None:
            return rendered
    return None


# Conditions --------------------------------------------------------------------------

Scalar = str | int | float | bool | None


def _same(value: Any, expected: Scalar) -> bool:
    # True == 1 in Python; a rule saying `true` must not match the number 1.
    if isinstance(value, bool) or isinstance(expected, bool):
        return value is expected
    if expected is None:
        return value is None or value is MISSING
    if isinstance(value, list | dict):
        return False
    return bool(value == expected)


def compile_condition(when: Mapping[str, Sequence[Scalar]]) -> Callable[[Mapping[str, Any]], bool]:
    """``{"traits.plan": ["pro", "team"]}`` -> a test that every path has one of its values
    (``null`` matches an absent field too)."""
    checks = tuple((parse_path(path), tuple(values)) for path, values in when.items())
    if not checks:
        return lambda message: True

    def holds(message: Mapping[str, Any]) -> bool:
        for path, expected in checks:
            value = resolve(message, path)
            if not any(_same(value, e) for e in expected):
                return False
        return True

    return holds
