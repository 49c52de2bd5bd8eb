"""structlog set-up: JSON lines in production, readable console output on a terminal.

E-mail addresses in logged values are masked unless ``log_emails`` is on, so that a
field added later cannot leak them by accident.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog

_EMAIL = re.compile(r"[^\s@\"'<>,;:]+@[^\s@\"'<>,;:]+\.[A-Za-z]{2,}")


def mask_email(text: str) -> str:
    return _EMAIL.sub(lambda m: m.group(0)[0] + "***@" + m.group(0).rsplit("@", 1)[1], text)


def _redact_emails(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if isinstance(value, str) and "@" in value:
            event[key] = mask_email(value)
    return event


def configure_logging(fmt: str = "auto", level: str = "INFO", log_emails: bool = False) -> None:
    """``fmt``: ``json``, ``console``, or ``auto`` (console on a terminal, else JSON)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if not log_emails:
        processors.append(_redact_emails)
    if use_json:
        processors += [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=lambda o, **_: orjson.dumps(o).decode()),
        ]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
