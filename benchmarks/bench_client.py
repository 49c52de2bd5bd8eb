"""How much of Gist's request budget one ``GistClient`` uses under a sustained backlog.

    .venv/bin/python benchmarks/bench_client.py [--seconds 60] [--workers 32]
        [--margin 0.1] [--connections N] [--no-pace] [--in-process] [--dump PATH]

The Gist sandbox runs with the REAL limit (100 requests in any 10 s), by default as a
``gist-destination sandbox`` subprocess (``--in-process`` serves it on this event loop
instead). One client, with the default limiter (margin 0.1 s) and connection pool, is
kept saturated by ``--workers`` concurrent requesters (32, the worker's default
``GIST_MAX_CONCURRENT_REQUESTS``): a quarter send ``import_contacts`` batches of 100 and
poll ``batch_status`` every second until COMPLETED, the rest send ``track_event`` one
after another. Every request waits for the limiter, so there is always a queue.

The figures come from the sandbox's own log (``/_sandbox/requests``: arrival times on its
monotonic clock and statuses), over ``--seconds`` from the first request: accepted
requests per 10-s window, the most in any sliding 10-s interval, the budget utilisation
(accepted / (limit * seconds / window)) and the 429s, with the long-run rate (window /
median time from request i to request i + limit) beside them. The target is >= 97%
utilisation and no 429; the recorded figure needs ``--seconds`` >= 60.

``--no-pace`` is an experiment, not the client's behaviour: it turns the limiter's pacing
off, so each window's budget leaves in one burst, to show what bursts cost (see
benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from processes import sandbox_subprocess

from destination.gist import (
    ContactPayload,
    GistClient,
    GistError,
    Grant,
    Priority,
    RateLimit,
    RateLimiter,
    RetryPolicy,
)
from destination.gist._client import DEFAULT_LIMITS

LIMIT = 100
WINDOW = 10.0
TARGET = 0.97
KEY = "sandbox-key"
EVENTS = ["Order Completed", "Product Viewed", "Signed In", "Feature Used", "Plan Upgraded"]


@dataclass
class Tally:
    ops: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    completed_batches: int = 0


class RecordingLimiter(RateLimiter):
    """The client's limiter, keeping the time of each grant (to tell our pacing apart from
    what reaches the sandbox)."""

    def __init__(self, rate: RateLimit) -> None:
        super().__init__(rate)
        self.grants: list[float] = []
        self.wait_sum = 0.0

    async def acquire(self, priority: Priority = Priority.NORMAL) -> Grant:
        grant = await super().acquire(priority)
        self.grants.append(grant.at)  # the limiter's clock reading for this grant
        self.wait_sum += grant.waited
        return grant


@contextlib.asynccontextmanager
async def sandbox_out_of_process(batch_delay: float) -> AsyncIterator[str]:
    async with sandbox_subprocess(
        api_key=KEY, rate_limit=LIMIT, rate_window=WINDOW, batch_delay=batch_delay
    ) as sandbox:
        yield sandbox.url


@contextlib.asynccontextmanager
async def sandbox_in_process(batch_delay: float) -> AsyncIterator[str]:
    from destination.devtools.sandbox import SandboxConfig, running_sandbox

    config = SandboxConfig(rate_limit=LIMIT, rate_window=WINDOW, batch_delay=batch_delay)
    async with running_sandbox(config) as sandbox:
        yield sandbox.url


async def importer(gist: GistClient, tally: Tally, ids: itertools.count[int]) -> None:
    while True:
        batch: list[ContactPayload] = []
        for _ in range(100):
            n = next(ids)
            batch.append(
                {
                    "email": f"user{n}@bench.example",
                    "user_id": f"u-{n}",
                    "name": f"User {n}",
                    "custom_properties": {"plan": "pro", "seats": n % 50},
                }
            )
        try:
            accepted = await gist.import_contacts(batch)
            tally.ops["import_contacts"] += 1
            while True:
                await asyncio.sleep(1.0)
                status = await gist.batch_status(accepted.batch_id)
                tally.ops["batch_status"] += 1
                if status.completed:
                    tally.completed_batches += 1
                    break
        except GistError as error:
            tally.errors[type(error).__name__] += 1


async def tracker(gist: GistClient, tally: Tally, rng: random.Random) -> None:
    while True:
        n = rng.randrange(1_000_000)
        try:
            await gist.track_event(
                {
                    "event_name": rng.choice(EVENTS),
                    "email": f"visitor{n}@bench.example",
                    "properties": {"value": rng.randrange(1000), "source": "bench"},
                }
            )
            tally.ops["track_event"] += 1
        except GistError as error:
            tally.errors[type(error).__name__] += 1


def max_in_any_window(times: list[float], window: float) -> int:
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


@dataclass
class Run:
    limiter: RecordingLimiter
    tally: Tally
    log: list[dict[str, Any]]
    """The sandbox's request log: ``t`` (its monotonic clock), method, path, status."""
    backlog: list[int]
    """The limiter's queue length, sampled every 0.25 s."""


async def drive(args: argparse.Namespace) -> Run:
    starter = sandbox_in_process if args.in_process else sandbox_out_of_process
    rate = RateLimit(limit=LIMIT, window=WINDOW, margin=args.margin, pace=args.pace)
    tally = Tally()
    async with starter(args.batch_delay) as url:
        limiter = RecordingLimiter(rate)
        retry = RetryPolicy(base=0.5, cap=5.0, max_elapsed=120.0)
        limits = (
            DEFAULT_LIMITS
            if args.connections is None
            else httpx.Limits(max_connections=args.connections,
                              max_keepalive_connections=args.connections)
        )  # fmt: skip
        async with GistClient(
            KEY, base_url=url, limiter=limiter, retry=retry, limits=limits
        ) as gist:
            ids = itertools.count()
            rng = random.Random(1)
            importers = max(1, args.workers // 4)
            workers = [asyncio.create_task(importer(gist, tally, ids)) for _ in range(importers)]
            workers += [
                asyncio.create_task(tracker(gist, tally, rng))
                for _ in range(args.workers - importers)
            ]
            started = time.monotonic()
            backlog: list[int] = []
            # Drive a little past the measured span so that it ends inside the backlog.
            while time.monotonic() - started < args.seconds + 1.0:
                await asyncio.sleep(0.25)
                backlog.append(limiter.waiting)
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        async with httpx.AsyncClient(base_url=url, timeout=30) as control:
            log: list[dict[str, Any]] = (await control.get("/_sandbox/requests")).json()
    log.sort(key=lambda r: r["t"])
    return Run(limiter, tally, log, backlog)


def report(args: argparse.Namespace, run: Run) -> None:
    limiter, tally, log, backlog = run.limiter, run.tally, run.log, run.backlog
    t0 = log[0]["t"]
    span = [r for r in log if r["t"] < t0 + args.seconds]
    accepted = [r["t"] for r in span if r["status"] != 429]
    limited = sum(1 for r in log if r["status"] == 429)
    server_errors = sum(1 for r in log if r["status"] >= 500)
    windows = int(args.seconds // WINDOW)
    per_window = [
        sum(1 for t in accepted if t0 + k * WINDOW <= t < t0 + (k + 1) * WINDOW)
        for k in range(windows)
    ]
    utilisation = len(accepted) / (LIMIT * args.seconds / WINDOW)
    all_accepted = [r["t"] for r in log if r["status"] != 429]
    all_arrivals = [r["t"] for r in log]
    gaps = [b - a for a, b in zip(all_accepted, all_accepted[LIMIT:], strict=False)]
    kinds = Counter(
        "batch_status" if "/batch/" in r["path"] else f"{r['method']} {r['path']}" for r in span
    )

    mode = "in-process" if args.in_process else "subprocess"
    print(
        f"Gist client vs sandbox ({mode}), limit {LIMIT} per {WINDOW:g} s, limiter margin "
        f"{args.margin:g} s, {args.workers} workers, "
        f"{args.connections or DEFAULT_LIMITS.max_connections} connections, "
        f"{args.seconds:g} s measured{'' if args.pace else ', NOT paced (experiment)'}"
    )
    print(f"  accepted per 10-s window  {per_window}")
    print(f"  most in any sliding 10 s  {max_in_any_window(all_accepted, WINDOW)}")
    print(
        f"  utilisation               {utilisation:.1%}  "
        f"({len(accepted)} accepted / {LIMIT * args.seconds / WINDOW:g} budget)"
    )
    grants = limiter.grants
    grant_gaps = [b - a for a, b in zip(grants, grants[LIMIT:], strict=False)]
    for label, series in (("at the sandbox", gaps), ("at the limiter", grant_gaps)):
        if series:
            period = statistics.median(series)
            print(
                f"  request i to i+{LIMIT} {label}  median {period:.3f} s, min "
                f"{min(series):.3f} s (long-run rate {WINDOW / period:.1%} of the budget)"
            )
    print(f"  429 answers               {limited}   (limiter saw {limiter.rate_limited})")
    print(f"  5xx answers               {server_errors}")
    print(f"  requests by kind (span)   {dict(kinds)}")
    print(
        f"  client operations (run)   {dict(tally.ops)}, batches completed "
        f"{tally.completed_batches}, errors {dict(tally.errors) or 'none'}"
    )
    print(
        f"  limiter queue (sampled)   min {min(backlog)}  median "
        f"{statistics.median(backlog):g}  max {max(backlog)}"
    )
    print(f"  mean limiter wait         {limiter.wait_sum / max(1, limiter.granted):.2f} s")
    # The first two trains: how long after its grant does each request reach the sandbox?
    for k in range(2):
        g = grants[k * LIMIT : (k + 1) * LIMIT]
        a = all_arrivals[k * LIMIT : (k + 1) * LIMIT]
        if len(g) == LIMIT and len(a) == LIMIT:
            print(
                f"  train {k + 1}: grants spread {g[-1] - g[0]:.3f} s, arrivals spread "
                f"{a[-1] - a[0]:.3f} s, last arrival - last grant {a[-1] - g[-1]:+.3f} s"
            )
    ok = utilisation >= TARGET and limited == 0
    verdict = "meets" if ok else "MISSES"
    print(f"  {verdict} the target: >= {TARGET:.0%} utilisation and no 429")
    if args.seconds < 60:
        print("  (under 60 s: not a figure to record)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="measured span (>= 60)")
    parser.add_argument("--workers", type=int, default=32,
                        help="concurrent requesters (the worker's default "
                        "GIST_MAX_CONCURRENT_REQUESTS is 32)")  # fmt: skip
    parser.add_argument("--margin", type=float, default=RateLimit().margin,
                        help="the limiter's safety margin in seconds")  # fmt: skip
    parser.add_argument("--connections", type=int, default=None,
                        help="the client's connection pool (default: the client's)")  # fmt: skip
    parser.add_argument("--no-pace", dest="pace", action="store_false",
                        help="experiment: grant in bursts instead of evenly spaced")  # fmt: skip
    parser.add_argument("--dump", metavar="PATH",
                        help="write the grant times and the sandbox's log as JSON")  # fmt: skip
    parser.add_argument("--batch-delay", type=float, default=0.5,
                        help="seconds a sandbox batch stays QUEUED, then IN_PROGRESS")  # fmt: skip
    parser.add_argument("--in-process", action="store_true",
                        help="serve the sandbox on this loop, not as a subprocess")  # fmt: skip
    args = parser.parse_args()
    run = asyncio.run(drive(args))
    if args.dump:
        grants = run.limiter.grants
        Path(args.dump).write_bytes(orjson.dumps({"grants": grants, "requests": run.log}))
    report(args, run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
