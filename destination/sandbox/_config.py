"""The sandbox's settings: what it accepts, how fast it lets you go, what it breaks."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_API_KEY = "sandbox-key"


def _default_keys() -> frozenset[str]:
    return frozenset({DEFAULT_API_KEY})


@dataclass
class SandboxConfig:
    """Settings of one sandbox.

    The object is live: a running sandbox reads it on every request, so a test may change
    a knob directly (``sandbox.config.error_rate = 1.0``) as well as through
    ``POST /_sandbox/faults``. ``force_429`` counts down as the forced 429s are served.
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
    seed: int | None = None

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
