"""Every reason a message ends without being delivered: the one catalogue.

A message ends exactly once (``pipeline.outcome``): **delivered**, **dead-lettered** with
one of the ``DEAD_LETTER`` reasons below, or **skipped** with one of the ``SKIP`` reasons.
The codes are stable: they are metric labels (``messages_dead_lettered_total{reason}``,
``messages_skipped_total{reason}``) and the ``gist-dlq-reason`` header, so the set is
closed and small. Add a code here, with its description, and nowhere else: the README's
table of reasons is checked against ``DEAD_LETTER`` and ``SKIP`` by a test.

    dead-lettered
     ├── the record            empty_value, invalid_json
     ├── the mapping           not_an_object, batch_envelope, unknown_type, missing_identity,
     │                         missing_event_name, invalid_field, mapping_error, ...
     └── delivery to Gist      gist_rejected, batch_contact_error, retries_exhausted,
                               batch_timeout, batch_failed, gist_unexpected_answer,
                               internal_error
    skipped                    integration_off, type_off, event_excluded, no_event_name,
                               nothing_to_send, duplicate, unchanged, no_consent,
                               suppressed
"""

from __future__ import annotations

from typing import Final

# --- dead-lettered: the record ---------------------------------------------------------
EMPTY_VALUE: Final = "empty_value"
INVALID_JSON: Final = "invalid_json"

# --- dead-lettered: the mapping (a data problem) ---------------------------------------
NOT_AN_OBJECT: Final = "not_an_object"
BATCH_ENVELOPE: Final = "batch_envelope"
UNKNOWN_TYPE: Final = "unknown_type"
MISSING_IDENTITY: Final = "missing_identity"
MISSING_EVENT_NAME: Final = "missing_event_name"
INVALID_FIELD: Final = "invalid_field"
MAPPING_ERROR: Final = "mapping_error"

# --- dead-lettered: delivery to Gist ---------------------------------------------------
GIST_REJECTED: Final = "gist_rejected"
BATCH_CONTACT_ERROR: Final = "batch_contact_error"
RETRIES_EXHAUSTED: Final = "retries_exhausted"
BATCH_TIMEOUT: Final = "batch_timeout"
BATCH_FAILED: Final = "batch_failed"
GIST_UNEXPECTED_ANSWER: Final = "gist_unexpected_answer"
INTERNAL_ERROR: Final = "internal_error"
NO_CUSTOMER_EMAIL: Final = "no_customer_email"

# --- skipped (deliberately not sent; never an error) -----------------------------------
INTEGRATION_OFF: Final = "integration_off"
TYPE_OFF: Final = "type_off"
EVENT_EXCLUDED: Final = "event_excluded"
NO_EVENT_NAME: Final = "no_event_name"
NOTHING_TO_SEND: Final = "nothing_to_send"
DUPLICATE: Final = "duplicate"
UNCHANGED: Final = "unchanged"
NO_CONSENT: Final = "no_consent"
SUPPRESSED: Final = "suppressed"
CART_UNKNOWN: Final = "cart_unknown"

RECORD: Final[dict[str, str]] = {
    EMPTY_VALUE: "the record has no value (or only white space)",
    INVALID_JSON: "the record's value is not JSON",
}
"""Reasons found before any message is read out of the record."""

REJECT: Final[dict[str, str]] = {
    NOT_AN_OBJECT: "the message is not a JSON object",
    BATCH_ENVELOPE: 'a {"batch": [...]} envelope inside an envelope',
    UNKNOWN_TYPE: "type is missing, not a string, or not a Segment message type",
    MISSING_IDENTITY: "no usable userId or email where one is needed "
    "(alias: previousId and userId)",
    MISSING_EVENT_NAME: "a track without a usable event name",
    INVALID_FIELD: "a field has the wrong type or a value Gist cannot store "
    "(the detail names the field)",
    MAPPING_ERROR: "the mapper met an input it did not foresee (a bug: report it)",
}
"""Reasons the mapping rejects a message (``Rejected.reason``)."""

DELIVERY: Final[dict[str, str]] = {
    GIST_REJECTED: "Gist refused the request for good (400/404/405/422 and other 4xx)",
    BATCH_CONTACT_ERROR: "a completed batch import reports the contact as not imported",
    RETRIES_EXHAUSTED: "a transient failure (5xx, 429, time-out) outlasted "
    "GIST_RETRY_MAX_DURATION",
    BATCH_TIMEOUT: "whether Gist imported the contact is unknown: an import of it may have "
    "landed (it did not complete within GIST_BATCH_DEADLINE, Gist no longer knew it, it "
    "completed without saying which contacts failed, or its answer was lost), and the one "
    "sent again did not complete either, or failed",
    BATCH_FAILED: "Gist reported the contact's batch import as failed (FAILED, ERROR, "
    "CANCELLED, in any case), and again when it was sent a second time",
    GIST_UNEXPECTED_ANSWER: "Gist kept answering with something the reference does not "
    "describe (e.g. a batch import accepted without a batch_id)",
    INTERNAL_ERROR: "an unexpected error in the worker while delivering the message "
    "(a bug: the error log has the traceback)",
    NO_CUSTOMER_EMAIL: "an e-commerce event for a user whose e-mail neither the message nor "
    "the Gist contact gives (a Gist customer needs one): replay it once the user is "
    "identified with an e-mail",
}
"""Reasons delivery to Gist dead-letters a message."""

DEAD_LETTER: Final[dict[str, str]] = {**RECORD, **REJECT, **DELIVERY}
"""Every reason a message is dead-lettered, with what it means."""

SKIP: Final[dict[str, str]] = {
    INTEGRATION_OFF: "the message's integrations switch turns Gist off",
    TYPE_OFF: "the rules turn this message type off (page, screen and group by default)",
    EVENT_EXCLUDED: "a track whose event the rules exclude (and no tag rule matched)",
    NO_EVENT_NAME: "a page or screen for which no event-name template applies",
    NOTHING_TO_SEND: "a group with no traits left to copy, or an alias onto the same id",
    DUPLICATE: "its messageId was delivered within DEDUP_WINDOW (a producer's retry, a "
    "replay); a copy of a message in flight ends as that message ends",
    UNCHANGED: "a contact update whose every field Gist already holds (as it last "
    "confirmed, within CONTACT_MEMORY_TTL)",
    NO_CONSENT: "the message's consent preferences (context.consent.categoryPreferences) "
    "deny a category the rules require (consent.required), or it has none and the rules "
    "say to skip those",
    SUPPRESSED: "the message is about a person deleted within SUPPRESS_DELETED_DAYS (a "
    "delete suppresses every identity it carries)",
    CART_UNKNOWN: "a Product Added / Removed for a customer whose Gist cart this worker does "
    "not know for sure (after a start, a rebalance or a cart write that failed): the cart "
    "is rebuilt from the next whole one (Cart Viewed, Checkout Started) or order, never "
    "guessed; the plain event is still sent",
}
"""Every reason a message is skipped, with what it means."""
