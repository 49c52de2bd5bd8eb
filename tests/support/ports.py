"""Ports for the servers the tests start (embedded broker, sandbox and worker processes,
redis-server, Prometheus), which no other test process can be handed at the same moment.

``destination.devtools.broker.free_port`` asks the kernel for a free port (bind to 0),
closes it and hands the number on: the server binds it a moment later. In one process
that is safe enough; with the suite on several xdist workers, another worker's
``free_port`` can be given the same port in that moment (the kernel's own choice, from
the ephemeral range, is random), and its server then fails to bind or, worse, a test
talks to another test's server. So the tests take their ports below the ephemeral range,
where the kernel hands out none by itself, each xdist worker from its own block, in
order; a port is given only after it was found free (a bind without ``SO_REUSEADDR``,
so a port still in TIME_WAIT is passed over too)."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import socket
import threading
import uuid
from collections.abc import Iterator

BLOCK = 600
"""Ports per xdist worker: more than one worker's tests take in a run, so a port is not
handed out twice before a wrap-around (and would be checked free again then)."""

FIRST = 10_000
"""Where the blocks start: above the well-known and registered services most machines
run, below the ephemeral range (Linux's default starts at 32768; checked below)."""


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def _worker_index() -> int:
    """``gw3`` -> 3; the controller, or a run without xdist, is 0."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    digits = name.removeprefix("gw")
    return int(digits) if digits.isdigit() else 0


def _block() -> range:
    """This worker's block. Which block each worker takes turns with the run (the id all
    workers of an xdist run share), so that two runs on one machine seldom share one."""
    blocks = max(1, (_ephemeral_start() - FIRST) // BLOCK)
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or uuid.uuid4().hex
    turn = int(hashlib.sha256(run.encode()).hexdigest(), 16)
    start = FIRST + ((turn + _worker_index()) % blocks) * BLOCK
    return range(start, start + BLOCK)


_lock = threading.Lock()
_candidates: Iterator[int] | None = None


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A port on 127.0.0.1 free now and given to no other test of this run."""
    global _candidates
    with _lock:
        if _candidates is None:  # on first use: the xdist worker's variables are set
            block = _block()
            first = random.randrange(len(block))
            _candidates = itertools.cycle([*block[first:], *block[:first]])
        for _ in range(BLOCK):
            port = next(_candidates)
            if _free(port):
                return port
    raise RuntimeError("no free port left in this test worker's block")
