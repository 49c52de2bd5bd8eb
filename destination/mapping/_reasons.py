"""The mapping's reasons, from the one catalogue (``destination.reasons``).

The mapper writes ``reasons.INVALID_FIELD`` and so on; the codes and what they mean are
declared in ``destination/reasons.py`` only.
"""

from __future__ import annotations

from typing import Final

from destination.reasons import (
    BATCH_ENVELOPE,
    EVENT_EXCLUDED,
    INTEGRATION_OFF,
    INVALID_FIELD,
    MAPPING_ERROR,
    MISSING_EVENT_NAME,
    MISSING_IDENTITY,
    NO_CONSENT,
    NO_EVENT_NAME,
    NOT_AN_OBJECT,
    NOTHING_TO_SEND,
    REJECT,
    SKIP,
    TYPE_OFF,
    UNKNOWN_TYPE,
)

REJECT_REASONS: Final = tuple(REJECT)
SKIP_REASONS: Final = tuple(SKIP)

# Why a field of a message that is sent is left out of it. Not a message's outcome (the
# message is delivered), so not in ``destination.reasons``: ``fields_dropped_total``
# counts these, and ``map`` shows them per message.
LIST_OBJECTS: Final = "list_objects"
LISTS: Final = "lists"
TOO_DEEP: Final = "too_deep"
NO_NAME: Final = "no_name"
INVALID_FIELD_DROPPED: Final = "invalid_field"

FIELD_DROPS: Final[dict[str, str]] = {
    LIST_OBJECTS: "objects or lists inside a list, under values.list_objects: drop",
    LISTS: "a list, under values.lists: drop",
    TOO_DEEP: "an object nested deeper than 8 levels",
    NO_NAME: 'a field whose name has no letter or digit ("$$"): it names no property',
    INVALID_FIELD_DROPPED: "a field Gist cannot take, under invalid_fields: drop",
}
"""Each reason a field is dropped, and what it means (the README's metrics section)."""

__all__ = [
    "BATCH_ENVELOPE",
    "EVENT_EXCLUDED",
    "FIELD_DROPS",
    "INTEGRATION_OFF",
    "INVALID_FIELD",
    "INVALID_FIELD_DROPPED",
    "LISTS",
    "LIST_OBJECTS",
    "MAPPING_ERROR",
    "MISSING_EVENT_NAME",
    "MISSING_IDENTITY",
    "NOTHING_TO_SEND",
    "NOT_AN_OBJECT",
    "NO_CONSENT",
    "NO_EVENT_NAME",
    "NO_NAME",
    "REJECT_REASONS",
    "SKIP_REASONS",
    "TOO_DEEP",
    "TYPE_OFF",
    "UNKNOWN_TYPE",
]
