"""structlog set-up: JSON lines in production, readable console output on a terminal.

Our own events go through structlog; the standard library's logging (aiokafka, asyncio,
and ``warnings``) goes through structlog's ``ProcessorFormatter`` with the same
processors, so every line is one JSON object in production, whoever logged it.

No log line names a contact. E-mail addresses in logged values are masked unless
``log_emails`` is on, in nested values, exception text and tracebacks too, and whether
the address is written plainly or encoded (``%40`` in a URL, ``\\u0040`` in JSON, an
HTML entity), so that a field added later (or an exception message that quotes an
input) cannot leak one by accident. Other trait values cannot be told from other text,
so the lines that would carry them are not written: httpx and httpcore log each
request's URL (its query holds the contact's e-mail or user id) and are kept to
warnings, the Gist client logging its own ``gist.request`` line at DEBUG instead, with
the endpoint and never the path's values or the query; aiokafka's DEBUG lines hold every
request and response, record values included (a dead letter's whole message), and are
not written either (its INFO and above, rebalances and connection trouble, are).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog

QUIET_LOGGERS = {"httpx": logging.WARNING, "httpcore": logging.WARNING, "aiokafka": logging.INFO}
"""Third-party loggers and the least level they write whatever ``LOG_LEVEL`` says: below
it their lines carry request URLs (the contact a request names) or record values."""

_AT = r"(?:@|%40|%2540|\\{1,2}u0040|\\{1,2}x40|&#0*64;|&#x0*40;)"
"""The at sign, plain or as URL encoding (once or twice), JSON / Python escapes and
HTML entities write it."""

_EMAIL = re.compile(
    rf"(?P<local>[^\s@\"'<>,;:]+?){_AT}(?P<domain>[^\s@\"'<>,;:%\\&]+\.[A-Za-z]{{2,}})",
    re.IGNORECASE,
)


def mask_email(text: str) -> str:
    """``text`` with each e-mail address in it, in any of the encodings above, as its first
    character, ``***@`` and its domain."""
    return _EMAIL.sub(lambda m: m.group("local")[0] + "***@" + m.group("domain"), text)


def _masked(value: Any) -> Any:
    if isinstance(value, str):
        return mask_email(value)
    if isinstance(value, dict):
        return {key: _masked(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_masked(item) for item in value]
    return value


def _redact_emails(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        event[key] = _masked(value)
    return event


def configure_logging(fmt: str = "auto", level: str = "INFO", log_emails: bool = False) -> None:
    """``fmt``: ``json``, ``console``, or ``auto`` (console on a terminal, else JSON)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Exceptions become text first, so that the masking below sees them too.
    rendering: list[Any] = [structlog.processors.format_exc_info]
    if not log_emails:
        rendering.append(_redact_emails)
    if use_json:
        rendering.append(
            structlog.processors.JSONRenderer(serializer=lambda o, **_: orjson.dumps(o).decode())
        )
    else:
        rendering.append(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[*shared, *rendering],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    # The standard library's records: the same processors, a "logger" field for where.
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *rendering],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    for name, least in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(max(least, logging.getLevelName(level)))
    logging.captureWarnings(True)
