"""Talking to Gist: the API client, its rate limiter and its errors."""

from destination.gist._client import (
    DEFAULT_BASE_URL,
    USER_AGENT,
    Dispatch,
    GistClient,
    Withdrawn,
)
from destination.gist._errors import (
    CredentialsError,
    GistError,
    PermanentError,
    RateLimitedError,
    RetryableError,
    UnexpectedAnswerError,
)
from destination.gist._limiter import (
    LANE_SHARES,
    RESERVE,
    Budget,
    Grant,
    Lanes,
    Priority,
    RateLimit,
    RateLimiter,
    SlidingWindow,
)
from destination.gist._models import (
    BatchAccepted,
    BatchContactError,
    BatchStatus,
    ContactPayload,
    ContactRef,
    EventPayload,
    TokenInfo,
)
from destination.gist._retry import NO_RETRY, RetryPolicy

__all__ = [
    "DEFAULT_BASE_URL",
    "LANE_SHARES",
    "NO_RETRY",
    "RESERVE",
    "USER_AGENT",
    "BatchAccepted",
    "BatchContactError",
    "BatchStatus",
    "Budget",
    "ContactPayload",
    "ContactRef",
    "CredentialsError",
    "Dispatch",
    "EventPayload",
    "GistClient",
    "GistError",
    "Grant",
    "Lanes",
    "PermanentError",
    "Priority",
    "RateLimit",
    "RateLimitedError",
    "RateLimiter",
    "RetryPolicy",
    "RetryableError",
    "SlidingWindow",
    "TokenInfo",
    "UnexpectedAnswerError",
    "Withdrawn",
]
