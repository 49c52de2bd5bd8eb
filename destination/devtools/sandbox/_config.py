"""The sandbox's settings: what it accepts, how fast it lets you go, what it breaks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal, get_args

DEFAULT_API_KEY = "sandbox-key"
DEFAULT_SUBSCRIPTION_TYPES: Final[tuple[str, ...]] = ("Announcements", "Newsletter")

BatchErrorFormat = Literal["objects", "strings", "anonymous", "omitted"]
BATCH_ERROR_FORMATS: Final[tuple[str, ...]] = get_args(BatchErrorFormat)


def _default_keys() -> frozenset[str]:
    return frozenset({DEFAULT_API_KEY})


@dataclass
class SandboxConfig:
    """Settings of one sandbox.

    The object is live: a running sandbox reads it on every request, so a test may change
    a knob directly (``sandbox.config.error_rate = 1.0``) as well as through
    ``POST /_sandbox/faults``. ``force_429`` counts down as the forced 429s are served.

    The ``batch_*`` and ``non_json_rate`` knobs make the sandbox answer the way the Gist
    reference does not describe, so the worker can be tested against it; each is off by
    default. They change answers only: ``GET /_sandbox/state`` and ``store`` keep the
    truth, and the request log records the status each request was really answered.
    """

    api_keys: frozenset[str] = field(default_factory=_default_keys)
    workspace_id: str = "sandbox-workspace"
    rate_limit: int = 100
    """Accepted API requests allowed in any ``rate_window``-second interval; 0 disables."""
    rate_window: float = 10.0
    batch_delay: float = 0.5
    """Seconds a batch stays QUEUED, then the same again IN_PROGRESS, before COMPLETED."""
    max_batch_size: int = 10_000
    error_rate: float = 0.0
    """Fraction of API requests answered with a random 500/502/503."""
    latency: float = 0.0
    """Seconds added to every API request."""
    force_429: int = 0
    """The next N API requests get a 429 (counts down)."""
    retry_after: bool = True
    """Whether 429 answers carry a ``Retry-After`` header."""
    disabled: bool = False
    """Every API request gets 403 ``workspace_disabled``."""
    batch_status: str | None = None
    """When set, ``GET /contacts/batch/{id}`` answers ``{"status": batch_status}`` (no
    ``imported_contacts``, no ``errors``) for every batch, completed ones included,
    e.g. ``"FAILED"``, ``"completed"``, ``"IN_PROGRESS"``. While it is set, batch
    processing pauses rather than carrying on underneath: no batch contact is applied and
    no batch completes (one caught mid-import stops between chunks of 500 contacts). Set
    it back to None and the paused batches resume where they were and complete."""
    batch_stuck: bool = False
    """Batches never complete: the one at the head of the queue goes IN_PROGRESS and stays
    there, those behind it stay QUEUED, none is applied (the same pause as
    ``batch_status``, with truthful status answers). Set it back and they resume."""
    batch_errors: BatchErrorFormat = "objects"
    """How a COMPLETED batch answer lists its per-contact errors: ``"objects"`` (the
    default, ``{"index", "email", "user_id", "message"}``), ``"strings"`` (each a plain
    string, ``"contact 2: email is not a valid email address: 'x'"``), ``"anonymous"``
    (``{"message", "contact_ref"}``, the ref an opaque token naming no index, email or
    user_id) or ``"omitted"`` (``errors`` is ``[]`` though contacts failed;
    ``imported_contacts`` stays the true, lower count). Applied when answering, so it
    changes the answers for batches that completed before it was set too."""
    batch_id_missing: bool = False
    """``POST /contacts/batch`` answers 200 ``{"status": "QUEUED", "queued_contacts": N}``
    without ``batch_id``; the batch is still queued and applied as usual (its id shows in
    ``GET /_sandbox/state``)."""
    batch_poll_status: int | None = None
    """When set (400..599), every ``GET /contacts/batch/{id}`` that gets past auth and the
    rate limit answers this status with a Gist-style error body (no ``Retry-After``, even
    for 429). The batches themselves carry on and complete underneath. Checked before
    ``batch_status``."""
    non_json_rate: float = 0.0
    """Fraction of otherwise-successful (2xx) API answers, ``/token/info`` excepted,
    replaced by a 200 ``text/html`` body that is not JSON:
    ``<html><body>oops</body></html>``. The request was applied all the same (the event
    recorded, the contact saved, the batch queued): only the answer is lost. Drawn from
    the ``seed``-ed RNG."""
    subscription_types: tuple[str, ...] = DEFAULT_SUBSCRIPTION_TYPES
    """The names of the workspace's subscription types (ids 1, 2, ... in this order);
    Gist's API cannot create them, ``POST /_sandbox/subscription_types`` adds more."""
    seed: int | None = None
    """Seeds the sandbox's RNG: the random faults (``error_rate``, ``non_json_rate``) and
    batch ids are the same from run to run for the same sequence of requests."""

    def __post_init__(self) -> None:
        self.api_keys = frozenset(self.api_keys)
        if not self.api_keys:
            raise ValueError("api_keys must hold at least one key")
        if self.rate_limit < 0:
            raise ValueError("rate_limit must be >= 0 (0 disables the limit)")
        if self.rate_limit and self.rate_window <= 0:
            raise ValueError("rate_window must be > 0 when rate_limit is set")
        if self.batch_delay < 0:
            raise ValueError("batch_delay must be >= 0")
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError("error_rate must be between 0 and 1")
        if self.latency < 0:
            raise ValueError("latency must be >= 0")
        if self.force_429 < 0:
            raise ValueError("force_429 must be >= 0")
        if self.batch_status is not None and not isinstance(self.batch_status, str):
            raise ValueError("batch_status must be a string or None")
        if self.batch_errors not in BATCH_ERROR_FORMATS:
            raise ValueError(f"batch_errors must be one of {', '.join(BATCH_ERROR_FORMATS)}")
        if self.batch_poll_status is not None and not 400 <= self.batch_poll_status <= 599:
            raise ValueError("batch_poll_status must be an HTTP error status (400..599)")
        if not 0.0 <= self.non_json_rate <= 1.0:
            raise ValueError("non_json_rate must be between 0 and 1")
        self.subscription_types = tuple(self.subscription_types)
        names = [name.strip().lower() for name in self.subscription_types]
        if not all(names) or len(set(names)) != len(names):
            raise ValueError("subscription_types must be distinct, non-empty names")
