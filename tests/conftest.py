"""The Kafka-protocol broker for every integration test, chosen in one place:
``KAFKA_BOOTSTRAP_SERVERS`` when set, else a testcontainers Kafka where Docker runs,
else the embedded Tansu broker."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.support.redis_server import RedisServer, RedisUnavailable


def _docker_runs() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return (
            subprocess.run(
                ["docker", "info"], capture_output=True, timeout=10, check=False
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    given = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if given:
        yield given
        return
    if _docker_runs():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as kafka:
            yield kafka.get_bootstrap_server()
        return
    from destination.devtools.broker import BrokerUnavailable, EmbeddedBroker

    broker = EmbeddedBroker(log_file=tmp_path_factory.mktemp("broker") / "tansu.log")
    try:
        broker.start()
    except BrokerUnavailable as exc:
        pytest.skip(f"no Kafka-protocol broker: {exc}")
    try:
        yield broker.bootstrap_servers
    finally:
        broker.stop()


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server for one test (stop and start it to play an outage)."""
    try:
        server = RedisServer(tmp_path_factory.mktemp("redis"))
        server.start()
    except RedisUnavailable as exc:
        pytest.skip(f"no Redis to test against: {exc}")
    try:
        yield server
    finally:
        server.stop()
