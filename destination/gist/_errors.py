"""Errors of the Gist client, split by what the caller must do.

    GistError
     ├── RetryableError      try again later: 429, 5xx, time-outs, connection errors
     │    ├── RateLimitedError   429: the workspace's budget is spent (``retry_after``)
     │    └── UnexpectedAnswerError  a 2xx the call cannot use; tried a few times only
     ├── PermanentError      this request will never succeed: 400/404/405/422 and other 4xx;
     │                       dead-letter the message (``status``, ``body_excerpt``)
     └── CredentialsError    401/403: the key is missing, invalid or the workspace disabled;
                             nothing will succeed until an operator acts: halt, keep the stream

httpx's exceptions are translated here and never leak. No error carries the API key:
only the method, the path (which may hold a query's e-mail, so ``str()`` omits the
query), the status and a short excerpt of Gist's answer.
"""

from __future__ import annotations

BODY_EXCERPT_CHARS = 300


class GistError(Exception):
    def __init__(
        self,
        message: str,
        *,
        method: str = "",
        endpoint: str = "",
        status: int | None = None,
        body_excerpt: str = "",
        attempts: int = 1,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.method = method
        self.endpoint = endpoint
        self.status = status
        self.body_excerpt = body_excerpt[:BODY_EXCERPT_CHARS]
        self.attempts = attempts

    def __str__(self) -> str:
        where = self.endpoint or self.method
        status = f" -> {self.status}" if self.status is not None else ""
        return f"{self.message} ({where}{status}, attempts={self.attempts})"


class RetryableError(GistError):
    """A transient failure; the same request may succeed later."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        method: str = "",
        endpoint: str = "",
        status: int | None = None,
        body_excerpt: str = "",
        attempts: int = 1,
    ) -> None:
        super().__init__(
            message,
            method=method,
            endpoint=endpoint,
            status=status,
            body_excerpt=body_excerpt,
            attempts=attempts,
        )
        self.retry_after = retry_after


class RateLimitedError(RetryableError):
    """Gist answered 429: the workspace's request budget is spent."""


class UnexpectedAnswerError(RetryableError):
    """Gist answered 2xx with something the call cannot use (not JSON, no ``batch_id``):
    the request may or may not have taken effect. Tried again a few times only
    (``UNEXPECTED_ANSWER_ATTEMPTS``), then the caller dead-letters."""


UNEXPECTED_ANSWER_ATTEMPTS = 3


class PermanentError(GistError):
    """Gist rejected this request for what it contains; retrying cannot help."""


class CredentialsError(GistError):
    """Gist rejected the API key (401) or the workspace (403)."""


def error_for_status(
    status: int,
    *,
    method: str,
    endpoint: str,
    body: str,
    retry_after: float | None,
) -> GistError:
    """The error a non-2xx answer means, by status alone."""
    if status == 429:
        return RateLimitedError(
            "Gist rate limit exceeded",
            retry_after=retry_after,
            status=status,
            body_excerpt=body,
            method=method,
            endpoint=endpoint,
        )
    if status in (401, 403):
        reason = "API key missing or invalid" if status == 401 else "forbidden or workspace off"
        return CredentialsError(
            f"Gist rejected the credentials: {reason}",
            status=status,
            body_excerpt=body,
            method=method,
            endpoint=endpoint,
        )
    if status >= 500 or status == 408:
        return RetryableError(
            f"Gist server error {status}",
            retry_after=retry_after,
            status=status,
            body_excerpt=body,
            method=method,
            endpoint=endpoint,
        )
    return PermanentError(
        f"Gist rejected the request with {status}",
        status=status,
        body_excerpt=body,
        method=method,
        endpoint=endpoint,
    )
