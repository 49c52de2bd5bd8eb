"""The machine-readable reasons a message is rejected or skipped.

They are stable codes: the pipeline counts them (as metric labels) and writes them into
dead letters, so the set is closed and small. Add a code here, never inline.
"""

from __future__ import annotations

from typing import Final

# Rejected: the message cannot be mapped (a data problem; the pipeline dead-letters it).
NOT_AN_OBJECT: Final = "not_an_object"
"""The message is not a JSON object."""
BATCH_ENVELOPE: Final = "batch_envelope"
"""A ``{"batch": [...]}`` envelope reached the mapper unsplit."""
UNKNOWN_TYPE: Final = "unknown_type"
"""``type`` is missing, not a string, or not a Segment message type."""
MISSING_IDENTITY: Final = "missing_identity"
"""No userId and no email where one is needed (alias: previousId and userId)."""
MISSING_EVENT_NAME: Final = "missing_event_name"
"""A track without a usable ``event``."""
INVALID_FIELD: Final = "invalid_field"
"""A field has the wrong type (``traits`` not an object, a numeric name, a bad email...)."""
MAPPING_ERROR: Final = "mapping_error"
"""The mapper met an input it did not foresee; it never raises, it says this instead."""

REJECT_REASONS: Final = (
    NOT_AN_OBJECT,
    BATCH_ENVELOPE,
    UNKNOWN_TYPE,
    MISSING_IDENTITY,
    MISSING_EVENT_NAME,
    INVALID_FIELD,
    MAPPING_ERROR,
)

# Skipped: deliberately not sent (counted as skipped, never as an error).
INTEGRATION_OFF: Final = "integration_off"
"""The message's ``integrations`` switch turns Gist off."""
TYPE_OFF: Final = "type_off"
"""The rules turn this message type off (page, screen and group by default)."""
EVENT_EXCLUDED: Final = "event_excluded"
"""A track whose event the rules exclude (and no tag rule matched)."""
NO_EVENT_NAME: Final = "no_event_name"
"""A page or screen for which no event-name template applies."""
NOTHING_TO_SEND: Final = "nothing_to_send"
"""A group with no traits left to copy, or an alias onto the same id."""

SKIP_REASONS: Final = (INTEGRATION_OFF, TYPE_OFF, EVENT_EXCLUDED, NO_EVENT_NAME, NOTHING_TO_SEND)
