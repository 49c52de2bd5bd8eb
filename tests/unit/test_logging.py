"""Every log line is JSON in production, whoever logged it, and e-mails are masked
everywhere, exception text included."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import orjson
import pytest
import structlog

from destination.observability.logging import configure_logging


@pytest.fixture
def json_logs(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """JSON logging for the test; configured by ``start`` during the test itself (the
    capture of standard error is the test's only then)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield capsys
    root.handlers, root.level = handlers, level
    logging.captureWarnings(False)
    structlog.reset_defaults()


def start() -> None:
    configure_logging("json", "INFO", log_emails=False)


def lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in capsys.readouterr().err.splitlines() if line]


def test_the_standard_librarys_logs_are_json_lines(json_logs: pytest.CaptureFixture[str]) -> None:
    start()
    logging.getLogger("aiokafka.consumer").warning("heartbeat failed for %s", "group-1")
    (line,) = lines(json_logs)
    assert line["event"] == "heartbeat failed for group-1"
    assert line["logger"] == "aiokafka.consumer"
    assert line["level"] == "warning"


def test_emails_are_masked_in_exception_text_too(json_logs: pytest.CaptureFixture[str]) -> None:
    start()
    try:
        raise ValueError("not valid: ada@example.com")
    except ValueError:
        structlog.get_logger("worker").exception("worker.internal_error")
        logging.getLogger("asyncio").exception("Task exception was never retrieved")
    ours, theirs = lines(json_logs)
    for line in (ours, theirs):
        assert "ada@example.com" not in str(line)
        assert "a***@example.com" in str(line["exception"])
