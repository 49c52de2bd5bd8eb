"""structlog set-up: JSON lines in production, readable console output on a terminal.

Our own events go through structlog; the standard library's logging (aiokafka, httpx,
asyncio, and ``warnings``) goes through structlog's ``ProcessorFormatter`` with the same
processors, so every line is one JSON object in production, whoever logged it.

E-mail addresses in logged values are masked unless ``log_emails`` is on, exception text
and tracebacks included, so that a field added later (or an exception message that
quotes an input) cannot leak them by accident.
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
    logging.captureWarnings(True)
