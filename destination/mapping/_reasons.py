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

__all__ = [
    "BATCH_ENVELOPE",
    "EVENT_EXCLUDED",
    "INTEGRATION_OFF",
    "INVALID_FIELD",
    "MAPPING_ERROR",
    "MISSING_EVENT_NAME",
    "MISSING_IDENTITY",
    "NOTHING_TO_SEND",
    "NOT_AN_OBJECT",
    "NO_EVENT_NAME",
    "REJECT_REASONS",
    "SKIP_REASONS",
    "TYPE_OFF",
    "UNKNOWN_TYPE",
]
