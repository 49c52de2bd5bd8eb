"""Every Prometheus metric the worker exports, declared once, each with what it tells.

Names share the ``gist_destination_`` prefix. The Grafana dashboard and the alerting
rules in ``deploy/`` use these names; a test checks that each one they use exists.
"""

from __future__ import annotations

import platform
from typing import TypeVar

from prometheus_client import Counter, Gauge, Histogram, Info

_P = "gist_destination_"

_M = TypeVar("_M", Counter, Gauge, Histogram)
_children: dict[tuple[object, tuple[str, ...]], object] = {}


def child(metric: _M, *values: str) -> _M:
    """``metric.labels(*values)``, looked up once: for the per-message counters, whose
    label values are few (message types, reasons) and whose series are never removed."""
    key = (metric, values)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*values)
    return found  # type: ignore[return-value]


# --- the stream ---------------------------------------------------------------------
MESSAGES_CONSUMED = Counter(
    _P + "messages_consumed",
    "Messages read from Kafka (after batch envelopes are opened).",
    ["type"],
)
MESSAGES_DELIVERED = Counter(
    _P + "messages_delivered",
    "Messages whose every Gist operation Gist accepted.",
    ["type"],
)
MESSAGES_DEAD_LETTERED = Counter(
    _P + "messages_dead_lettered",
    "Messages written to the dead-letter topic, by reason.",
    ["type", "reason"],
)
MESSAGES_SKIPPED = Counter(
    _P + "messages_skipped",
    "Messages deliberately not sent (integrations switch off, type or event off by rule).",
    ["type", "reason"],
)
FIELDS_DROPPED = Counter(
    _P + "fields_dropped",
    "Fields left out of messages that are sent, counted as messages are mapped, by message "
    "type and why: list_objects, lists (the rules drop them), too_deep (nested beyond 8 "
    "levels), no_name (a name without letters or digits), invalid_field (invalid_fields: "
    "drop). Each field once.",
    ["type", "reason"],
)
MESSAGES_IN_FLIGHT = Gauge(
    _P + "messages_in_flight",
    "Messages consumed but not yet delivered or dead-lettered.",
)
READ_AHEAD = Gauge(
    _P + "read_ahead_messages",
    "The bound in force on messages not yet sent ('in_flight'): what the budget sends in "
    "READ_AHEAD_SECONDS (at most MAX_INFLIGHT_MESSAGES). What is held once sent is bounded "
    "by MAX_INFLIGHT_BYTES.",
    ["held"],
)
BYTES_IN_FLIGHT = Gauge(
    _P + "in_flight_bytes",
    "What is held for messages not ended: record bytes, contacts' bodies and each "
    "message's bookkeeping (the MAX_INFLIGHT_BYTES bound).",
)
MESSAGES_AWAITING_IMPORT = Gauge(
    _P + "messages_awaiting_import",
    "Messages whose contacts are in batches Gist accepted but has not finished importing.",
)
PARTITION_PAUSED = Gauge(
    _P + "partition_paused",
    "1 while consumption of the partition is paused (backpressure).",
    ["topic", "partition"],
)
CONSUMER_LAG = Gauge(
    _P + "consumer_lag",
    "Records between the partition's end offset and the last committed offset.",
    ["topic", "partition"],
)
COMMITTED_OFFSET = Gauge(
    _P + "committed_offset",
    "The last offset committed for the partition.",
    ["topic", "partition"],
)
OLDEST_UNFINISHED_AGE = Gauge(
    _P + "oldest_unfinished_seconds",
    "Age of the partition's oldest record not yet ended (what holds its commit back).",
    ["topic", "partition"],
)
DELIVERY_DELAY = Histogram(
    _P + "delivery_delay_seconds",
    "End-to-end delay from the message's timestamp to its delivery to Gist.",
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600, 21600),
)

# --- spending the budget only on changes ---------------------------------------------
SUPPRESSED_IDENTITIES = Gauge(
    _P + "suppressed_identities",
    "Identities (user ids, e-mails) of people deleted within SUPPRESS_DELETED_DAYS, as this "
    "worker knows them: their messages are skipped (suppressed).",
)
DUPLICATES = Counter(
    _P + "duplicates",
    "Messages skipped because their messageId was delivered within DEDUP_WINDOW.",
    ["type"],
)
REQUESTS_SAVED = Counter(
    _P + "requests_saved",
    "Gist requests not made (estimated: an event one each, a contact its share of a batch "
    "import and poll), by what saved them: duplicate, unchanged, tag_batch.",
    ["feature"],
)
REQUESTS_FOR_MESSAGES = Counter(
    _P + "requests_for_messages",
    "Gist requests made, shared among the messages they were for, by message type (a batch "
    "import or poll: 1/contacts each): over messages_delivered_total, requests per message.",
    ["type"],
)
COMMERCE_WRITES = Counter(
    _P + "commerce_writes",
    "E-commerce writes (orders, carts) by action (order, order_update, cart, cart_add, "
    "cart_remove) and outcome: written, unchanged, cart_unknown (a line for a cart not "
    "known for sure: skipped until the next whole cart).",
    ["action", "outcome"],
)
COMMERCE_REQUESTS = Counter(
    _P + "commerce_requests",
    "Gist requests made for e-commerce writes (customers, products, variants, orders, "
    "carts), by the write's action: over commerce_writes_total, requests per write.",
    ["action"],
)
TIME_TO_DRAIN = Gauge(
    _P + "time_to_drain_seconds",
    "The lag (records) over the throughput the budget allows at the recent messages per "
    "request: how long the backlog takes at the rate limit.",
)
UNCHANGED_FIELDS = Counter(
    _P + "unchanged_fields",
    "Contact fields left out of an upsert because Gist already holds their values.",
)

# --- Gist ---------------------------------------------------------------------------
GIST_REQUESTS = Counter(
    _P + "gist_requests",
    "Requests to Gist by endpoint and HTTP status ('error' when no answer came).",
    ["endpoint", "status"],
)
GIST_REQUEST_DURATION = Histogram(
    _P + "gist_request_duration_seconds",
    "Latency of Gist requests (after the limiter).",
    ["endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
GIST_RETRIES = Counter(
    _P + "gist_retries",
    "Gist requests tried again, by endpoint and why.",
    ["endpoint", "reason"],
)
CONTACTS_PER_BATCH = Histogram(
    _P + "contacts_per_batch",
    "Contacts in each batch import request.",
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
)
CONTACT_UPDATES_MERGED = Counter(
    _P + "contact_updates_merged",
    "Contact updates folded into an earlier pending update of the same contact.",
)
BATCHES_PENDING = Gauge(
    _P + "batches_pending",
    "Batch imports Gist accepted that have not completed yet.",
)
BATCH_CONTACT_ERRORS = Counter(
    _P + "batch_contact_errors",
    "Contacts a completed batch import reported as failed.",
)

BATCHES_PAST_DEADLINE = Counter(
    _P + "batches_past_deadline",
    "Batch imports not completed within GIST_BATCH_DEADLINE (or lost by Gist), by what "
    "followed: 'resent' the first time, 'dead_lettered' the second.",
    ["action"],
)
LATE_IMPORTS = Counter(
    _P + "late_imports_watched",
    "Imports given up on past GIST_BATCH_DEADLINE that a delete of one of their contacts "
    "waited for, by their fate: 'landed' (the delete was sent again), 'failed', "
    "'forgotten' (Gist no longer knew them), 'unresolved' (GIST_LATE_IMPORT_WATCH passed: "
    "the delete may yet be undone).",
    ["fate"],
)
DELETES_REPEATED = Counter(
    _P + "deletes_repeated",
    "Deletes sent again because an import of their contact, given up on, landed after.",
)
BATCHES_UNVERIFIED = Counter(
    _P + "batches_unverified",
    "Completed batch imports whose errors could not all be matched to contacts (or that "
    "imported fewer than sent): their contacts are sent again in halves to find out.",
)
OLDEST_PENDING_BATCH_AGE = Gauge(
    _P + "oldest_pending_batch_seconds",
    "Age of the oldest batch import Gist has not completed.",
)

# --- the rate limit -----------------------------------------------------------------
RATE_LIMIT_WAIT = Histogram(
    _P + "rate_limit_wait_seconds",
    "Time a request waited for the workspace's budget.",
    buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60),
)
RATE_LIMIT_UTILISATION = Gauge(
    _P + "rate_limit_utilisation_ratio",
    "Share (0..1) of the workspace's request budget used over the last window.",
)
RATE_LIMIT_CURRENT = Gauge(
    _P + "rate_limit_current",
    "Requests per window the limiter allows now (below the setting after 429s).",
)
LIMITER_BACKEND = Gauge(
    _P + "limiter_backend",
    "1 for the budget in use: 'redis' (shared by every replica), 'dual' (just back on "
    "Redis: held to the local share for a window too), 'fallback' (Redis unavailable: "
    "this replica's partition share), 'local' (no Redis configured: the partition share).",
    ["backend"],
)
LIMITER_GRANTS = Counter(
    _P + "limiter_grants",
    "Requests granted by the shared budget in Redis.",
    ["backend"],
)
LIMITER_FALLBACKS = Counter(
    _P + "limiter_fallbacks",
    "Times Redis did not answer (in time) and the replica fell back on its partition share.",
)
LIMITER_REDIS_ERRORS = Counter(
    _P + "limiter_redis_errors",
    "Redis calls of the limiter that failed without a fallback: a release or a write of "
    "what the log owes (written again once Redis answers), an ask or a cooldown whose "
    "check found Redis answering.",
    ["operation"],
)
WORKSPACE_BUDGET_USED = Gauge(
    _P + "workspace_budget_used_ratio",
    "Share (0..1) of the workspace's budget in use over the last window by every replica, "
    "as Redis sees it (absent without Redis).",
)
RATE_LIMITED = Counter(
    _P + "rate_limited",
    "429 answers from Gist (the budget is shared with someone else).",
)

# --- the dead-letter topic ----------------------------------------------------------
DEAD_LETTER_WRITE_RETRIES = Counter(
    _P + "dead_letter_write_retries",
    "Dead letters Kafka did not take, tried again (by error): the partition waits.",
    ["error"],
)
DEAD_LETTERS_TRUNCATED = Counter(
    _P + "dead_letters_truncated",
    "Dead letters written without their value ('too_large', 'gone') or, still too large, "
    "without the original headers or key.",
    ["how"],
)

# --- health -------------------------------------------------------------------------
BUILD = Info(
    _P + "build",
    "The running build: versions of gist-destination and of Python.",
)
READY = Gauge(_P + "ready", "1 while the worker consumes and Gist accepts its key.")
INTERNAL_ERRORS = Counter(
    _P + "internal_errors",
    "Unexpected exceptions in the worker (bugs), by where; the message concerned is "
    "dead-lettered with reason internal_error.",
    ["where"],
)
TASKS_FAILED = Counter(
    _P + "tasks_failed",
    "Pipeline components that stopped on an unexpected exception (/healthz turns 503).",
    ["component"],
)
CREDENTIALS_REJECTED = Counter(
    _P + "credentials_rejected",
    "401/403 answers from Gist: the key or workspace was refused.",
)


# --- series that exist before their first event -------------------------------------
MESSAGE_TYPES = ("identify", "track", "page", "screen", "group", "alias", "delete", "unknown")
COMPONENTS = ("consume", "housekeeping", "contact-batcher", "batch-poller", "delivery-task")
"""The parts of the pipeline whose crash ``tasks_failed_total`` counts."""
INTERNAL_ERROR_PLACES = (
    "decode", "intake", "submit", "start", "encode", "batcher", "request", "import", "poll",
    "poller", "outcome", "dead_letter", "housekeeping",
)  # fmt: skip
"""Where ``internal_errors_total`` counts an unexpected exception."""


def declare_series() -> None:
    """Create the labelled series alerts watch, at 0, before their first event: a counter
    that appears only with its first increment makes ``increase()`` miss that increment
    (and a crash is usually the only one before the pod restarts)."""
    from destination import __version__, reasons

    BUILD.info({"version": __version__, "python": platform.python_version()})
    for component in COMPONENTS:
        TASKS_FAILED.labels(component)
    for place in INTERNAL_ERROR_PLACES:
        INTERNAL_ERRORS.labels(place)
    for action in ("resent", "dead_lettered"):
        BATCHES_PAST_DEADLINE.labels(action)
    for fate in ("landed", "failed", "forgotten", "unresolved"):
        LATE_IMPORTS.labels(fate)
    for backend in ("local", "redis", "dual", "fallback"):
        LIMITER_BACKEND.labels(backend)
    for how in ("too_large", "gone", "headers_dropped", "key_dropped"):
        DEAD_LETTERS_TRUNCATED.labels(how)
    for kind in MESSAGE_TYPES:
        for reason in reasons.DEAD_LETTER:
            MESSAGES_DEAD_LETTERED.labels(kind, reason)
