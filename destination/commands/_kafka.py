"""What the operator commands that talk to Kafka (``replay``, ``plan``, ``produce``)
share: the worker's connection settings as options, clients stopped whatever happens,
and Kafka's failures said in one line."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiokafka.errors import KafkaConnectionError


def quiet_kafka_logs() -> None:
    """aiokafka logs each failed connection itself (Python's last-resort handler prints it
    when nothing is configured); the command says what failed once, in its own line."""
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


@asynccontextmanager
async def started(client: Any) -> AsyncIterator[Any]:
    """``client`` started, and stopped on the way out, also when ``start`` fails (else
    aiokafka warns of an unclosed client at exit)."""
    try:
        await client.start()
        yield client
    finally:
        await client.stop()


def kafka_failure(command: str, bootstrap: str, error: BaseException) -> str:
    """The one line a command prints when Kafka fails it (exit 1)."""
    if isinstance(error, KafkaConnectionError):
        return (
            f"gist-destination {command}: cannot reach Kafka at {bootstrap} (set "
            "KAFKA_BOOTSTRAP_SERVERS or --bootstrap-servers, and KAFKA_SECURITY_PROTOCOL, "
            "KAFKA_SASL_* and KAFKA_SSL_* as for run)"
        )
    return f"gist-destination {command}: Kafka failed: {type(error).__name__}: {error}"
