"""Real processes for the worker's integration tests: the Gist sandbox and workers run
as ``python -m destination ...`` subprocesses, talked to over sockets only."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import httpx
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from destination.devtools.broker import create_topics, free_port
from destination.devtools.children import die_with_parent

API_KEY = "sandbox-key"

LIVE: set[subprocess.Popen[bytes]] = set()
"""Every process the harness started; ``reap()`` ends those a failed test left behind."""


def reap() -> None:
    for process in list(LIVE):
        if process.poll() is None:
            process.kill()
            process.wait(10)
        LIVE.discard(process)


def forms_of_the_address(email: str) -> set[str]:
    """The address as it may appear in a log: plain, case-folded, URL-encoded (once and
    twice, ``quote`` and ``quote_plus``), JSON-escaped."""
    forms = {email, email.lower(), email.upper(), email.casefold()}
    for text in list(forms):
        forms |= {quote(text, safe=""), quote_plus(text), quote(quote(text, safe=""), safe="")}
        forms.add(json.dumps(text, ensure_ascii=True)[1:-1])
        forms.add(text.replace("@", "\\u0040"))
        forms.add(text.replace("@", "\\\\u0040"))
    return forms


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def wait_for(
    condition: Callable[[], Awaitable[bool]],
    within: float = 60.0,
    every: float = 0.2,
    what: str = "condition",
) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(every)
    raise AssertionError(f"timed out after {within} s waiting for {what}")


SHORT_WINDOW = "1"
"""The rate window (s) of the harness's sandbox and workers: the real limit's 10 s makes
every wait ten times longer, and the tests here do not test the limit itself."""


class SandboxProcess:
    def __init__(self, tmp: Path, *args: str) -> None:
        if "--rate-window" not in args:
            args = ("--rate-window", SHORT_WINDOW, *args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"sandbox-{self.port}.log"
        with self.log.open("wb") as out:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-m", "destination", "sandbox", "--port", str(self.port), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        LIVE.add(self.process)
        self.http = httpx.AsyncClient(base_url=self.url, timeout=10)

    async def ready(self) -> None:
        async def up() -> bool:
            try:
                return (await self.http.get("/_sandbox/state")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_for(up, 20, what="the sandbox to listen")

    async def state(self) -> dict[str, Any]:
        response = await self.http.get("/_sandbox/state")
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    async def faults(self, **knobs: Any) -> None:
        (await self.http.post("/_sandbox/faults", json=knobs)).raise_for_status()

    async def requests(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = (await self.http.get("/_sandbox/requests")).json()
        return data

    async def close(self) -> None:
        await self.http.aclose()
        self.process.terminate()
        self.process.wait(10)


class WorkerProcess:
    def __init__(self, tmp: Path, env: dict[str, str], name: str = "worker") -> None:
        self.metrics_port = free_port()
        self.log = tmp / f"{name}-{self.metrics_port}.log"
        self.env = {
            **os.environ,
            **env,
            "METRICS_PORT": str(self.metrics_port),
            "LOG_FORMAT": "json",
        }
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "destination", "run"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                preexec_fn=die_with_parent,
            )
        LIVE.add(self.process)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.process.send_signal(sig)

    def wait(self, within: float = 60) -> int:
        return self.process.wait(within)

    async def exited(self, within: float = 60) -> int:
        deadline = time.monotonic() + within
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"worker still running after {within} s")
            await asyncio.sleep(0.1)
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def metrics(self) -> str:
        async with httpx.AsyncClient(timeout=5) as http:
            return (await http.get(f"http://127.0.0.1:{self.metrics_port}/metrics")).text

    async def ready(self) -> bool:
        try:
            async with httpx.AsyncClient(timeout=2) as http:
                r = await http.get(f"http://127.0.0.1:{self.metrics_port}/readyz")
                return r.status_code == 200
        except httpx.TransportError:
            return False


def worker_env(
    bootstrap: str, sandbox_url: str, topic: str, group: str, dlq: str, **more: str
) -> dict[str, str]:
    env = {
        "GIST_API_KEY": API_KEY,
        "GIST_API_URL": sandbox_url,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_TOPICS": topic,
        "KAFKA_GROUP_ID": group,
        "KAFKA_DLQ_TOPIC": dlq,
        "KAFKA_SUPPRESSION_TOPIC": suppressions_of(dlq),
        "GIST_BATCH_WAIT": "0.2",
        "GIST_BATCH_POLL_INTERVAL": "0.1",
        "GIST_BATCH_POLL_MAX_INTERVAL": "0.5",
        "GIST_RETRY_BASE": "0.05",
        "GIST_RETRY_CAP": "0.5",
        "COMMIT_INTERVAL": "0.2",
        "GIST_RATE_WINDOW": SHORT_WINDOW,
    }
    env.update(more)
    return env


async def make_topics(bootstrap: str, *names: str, partitions: int = 1) -> None:
    await create_topics(bootstrap, names, partitions)


def suppressions_of(dlq: str) -> str:
    """The suppression topic a test's worker uses beside its dead-letter topic."""
    return f"{dlq}-suppressions"


async def make_worker_topics(bootstrap: str, dlq: str) -> None:
    """The topics a worker writes to: its dead letters' and its suppressions'."""
    await create_topics(bootstrap, [dlq, suppressions_of(dlq)], 1)


async def list_topics(bootstrap: str) -> set[str]:
    """The broker's topics, asked in a way that creates none."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def produce(
    bootstrap: str,
    topic: str,
    messages: Iterable[Any],
    key: Callable[[Any], bytes | None] | None = None,
    timestamp_ms: int | None = None,
) -> int:
    """Send ``messages``; with ``timestamp_ms``, every record gets that time (as records
    produced at that moment would)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    count = 0
    try:
        for message in messages:
            value = message if isinstance(message, bytes) else orjson.dumps(message)
            k = key(message) if key else _default_key(message)
            await producer.send(topic, value, key=k, timestamp_ms=timestamp_ms)
            count += 1
        await producer.flush()
    finally:
        await producer.stop()
    return count


def _default_key(message: Any) -> bytes | None:
    if isinstance(message, dict):
        user = message.get("userId") or message.get("anonymousId")
        if user is not None:
            return str(user).encode()
    return None


async def read_topic(bootstrap: str, topic: str, expect: int, within: float = 30) -> list[Any]:
    """Every record of ``topic`` (from the start), waiting until ``expect`` are there."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    records: list[Any] = []
    try:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=300)
            for rs in batch.values():
                records.extend(rs)
            if len(records) >= expect and not batch:
                break
    finally:
        await consumer.stop()
    return records


async def committed_offsets(
    bootstrap: str, group: str, topic: str, partitions: int
) -> dict[int, int | None]:
    """The group's committed offsets, read by a consumer of the group (aiokafka's admin
    call for this fails to decode against Tansu)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        await consumer.stop()
