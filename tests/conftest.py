"""The Kafka-protocol broker for every integration test, chosen in one place:
``KAFKA_BOOTSTRAP_SERVERS`` when set, else a testcontainers Kafka where Docker runs,
else the embedded Tansu broker; and how the suite runs in parallel (pytest-xdist).

Each xdist worker is a process with its own session, so each starts its own broker;
tests share nothing else (topics, groups and temporary folders are their own, and the
ports of the servers they start come from their worker's block: tests/support/ports.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.support.ports import free_port
from tests.support.redis_server import RedisServer, RedisUnavailable

WORKERS_PER_CORE, MAX_WORKERS = 2, 4
"""``-n auto`` (pyproject's addopts) runs this many workers: the suite mostly waits on
brokers, group joins and subprocesses, so two a core keep the cores busy; more adds
brokers and load on the tests that measure rates without shortening the longest group."""


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """The number of workers ``-n auto`` starts (``PYTEST_XDIST_AUTO_NUM_WORKERS`` when
    set); ``-n 0`` runs the suite in this process, and ``--pdb`` does so by itself."""
    given = os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS")
    if given:
        return int(given)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(2, min(MAX_WORKERS, WORKERS_PER_CORE * (cores or 1)))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests of an ``xdist_group`` run one after the other on one worker, the longest unit
    of work in the suite: they go first so that they are not left to run alone at the end.
    (The sort is stable: within each part the order stays the collection's.)"""
    items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test whose ``xdist_group`` pytest-xdist did not take fails, instead of running
    beside the others of its group unnoticed."""
    mark = item.get_closest_marker("xdist_group")
    grouping = item.config.getoption("loadgroup", False)  # on the workers of loadgroup
    if mark is not None and grouping and not item.nodeid.endswith(f"@{mark.args[0]}"):
        pytest.fail(
            f"pytest-xdist did not put this test in its group {mark.args[0]!r}: see the "
            "pin of pytest in pyproject.toml (pytest-dev/pytest-xdist#1386)",
            pytrace=False,
        )


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

    broker = EmbeddedBroker(
        port=free_port(), log_file=tmp_path_factory.mktemp("broker") / "tansu.log"
    )
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
