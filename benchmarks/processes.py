"""The sandbox as the benchmarks start it: its own process, like a real remote API; and
the other processes the benchmarks need (redis-server, CPU hogs)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from destination.devtools.broker import free_port
from destination.devtools.children import die_with_parent


@dataclass(frozen=True)
class SandboxProcess:
    url: str
    pid: int


@contextlib.asynccontextmanager
async def sandbox_subprocess(
    *,
    api_key: str,
    rate_limit: int,
    rate_window: float,
    batch_delay: float,
    stderr: IO[Any] | None = None,
    latency: float = 0.0,
) -> AsyncIterator[SandboxProcess]:
    """``gist-destination sandbox`` on a free port, stopped on exit; ``latency`` seconds
    before each request is counted and answered (a network's way there)."""
    more = ["--latency", str(latency)] if latency > 0 else []
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "destination", "sandbox", "--port", "0",
        "--rate-limit", str(rate_limit), "--rate-window", str(rate_window),
        "--batch-delay", str(batch_delay), "--api-key", api_key, *more,
        stdout=asyncio.subprocess.PIPE, stderr=stderr, preexec_fn=die_with_parent,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        found = re.search(r"listening on (http://\S+)", line)
        if found is None:
            raise RuntimeError(f"the sandbox did not start: {line!r}")
        yield SandboxProcess(found.group(1), proc.pid)
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


@dataclass(frozen=True)
class RedisProcess:
    url: str
    pid: int


@contextlib.asynccontextmanager
async def redis_subprocess(workdir: Path) -> AsyncIterator[RedisProcess]:
    """Debian's ``redis-server`` on a free port, without persistence, stopped on exit
    (the few lines of tests/support/redis_server.py)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (./dev test installs it)")
    port = free_port()
    with (workdir / f"redis-{port}.log").open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(workdir),
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not _redis_answers(port):
            if time.monotonic() > deadline or proc.returncode is not None:
                raise RuntimeError(f"redis-server did not answer on port {port}")
            await asyncio.sleep(0.05)
        yield RedisProcess(f"redis://127.0.0.1:{port}/0", proc.pid)
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def cpu_hogs(count: int, cpus: set[int] | None = None) -> Iterator[list[int]]:
    """``count`` processes spinning ``while True: pass`` (on ``cpus`` only, if given);
    yields their pids and kills exactly those on exit."""
    hogs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            hog = subprocess.Popen(
                [sys.executable, "-c", "while True: pass"], preexec_fn=die_with_parent
            )
            hogs.append(hog)
            if cpus is not None:
                os.sched_setaffinity(hog.pid, cpus)
        yield [hog.pid for hog in hogs]
    finally:
        for hog in hogs:
            if hog.poll() is None:
                hog.kill()
            hog.wait(10)
