"""The sandbox as the benchmarks start it: its own process, like a real remote API."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import IO, Any


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
) -> AsyncIterator[SandboxProcess]:
    """``gist-destination sandbox`` on a free port, stopped on exit."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "destination", "sandbox", "--port", "0",
        "--rate-limit", str(rate_limit), "--rate-window", str(rate_window),
        "--batch-delay", str(batch_delay), "--api-key", api_key,
        stdout=asyncio.subprocess.PIPE, stderr=stderr,
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
