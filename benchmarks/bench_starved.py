"""The real limit on a starved machine: grant-to-arrival delays, the busiest window and 429s.

    .venv/bin/python benchmarks/bench_starved.py [--seconds 60] [--hogs 4] [--nice N]
        [--pin] [--busy MS] [--limiter both|current|old]

Recorded (benchmarks/RESULTS.md): ``--pin --hogs 2 --nice 5`` and ``--hogs 4 --nice 5``.

bench_client.py's load (one ``GistClient``, 32 requesters: 8 importers polling their
batches every second, 24 event senders) against a ``gist-destination sandbox``
subprocess with the REAL limit (100 requests in any 10 s), while the machine is
saturated:

- ``--hogs N`` processes spin ``while True: pass`` for the whole run;
- ``--nice N`` runs the client's process at that niceness (the hogs stay at 0), so it
  gets a small share of a CPU, as in a pod over its CPU quota;
- ``--pin`` puts the client and the hogs on CPU 0 and the sandbox on the other CPU (so
  the sandbox, standing in for Gist, is less starved than the client);
- ``--busy MS`` adds CPU work to the client's own event loop: a task that computes for
  MS milliseconds at a time, as the worker's mapping and Kafka work do, so a granted
  request waits for the loop as well as for the CPU.

The client runs in a child process (so niceness and affinity apply to it alone). It
records every grant (the limiter's clock reading, ``time.monotonic()``) and the path
of the request it was granted for; the sandbox's request log gives each arrival on the
same clock (one machine). Grant-to-arrival: batch-status polls carry their batch id in
the path and are matched one to one; events and imports are matched by rank within
their endpoint (the k-th grant to the k-th arrival), which can only understate the
largest delay. Reported per limiter, over ``--seconds`` from the first request: accepted
requests per 10-s window, the busiest sliding 10 s (above 100 is what Gist refuses),
429s, the closest request i to i + 100 at the sandbox, and how long the client waited
for a CPU (``/proc/<pid>/schedstat``).

``--limiter old`` emulates the limiter before requests held their slot until answered:
each grant is released as soon as it is made, so its slot comes free a window after
the grant (the client's own release then does nothing). ``current`` is the limiter as
it is. ``both`` (the default) runs old, then current, each with a fresh sandbox.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import itertools
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import orjson
from bench_client import RecordingLimiter, Tally, importer, max_in_any_window, tracker
from processes import cpu_hogs, sandbox_subprocess

from destination.gist import GistClient, Grant, Priority, RateLimit, RetryPolicy
from destination.gist._client import DEFAULT_LIMITS

LIMIT, WINDOW = 100, 10.0
KEY = "sandbox-key"

_GRANT: contextvars.ContextVar[float | None] = contextvars.ContextVar("grant", default=None)


# -- the client (child process) ---------------------------------------------------------


class TaggingLimiter(RecordingLimiter):
    """Records each grant and hands its time to the transport through a context
    variable (the request is sent in the task that acquired)."""

    async def acquire(self, priority: Priority = Priority.NORMAL) -> Grant:
        grant = await super().acquire(priority)
        _GRANT.set(grant.at)
        return grant


class ReleasedAtGrant(TaggingLimiter):
    """The old rule, emulated: a slot comes free a window after its GRANT."""

    async def acquire(self, priority: Priority = Priority.NORMAL) -> Grant:
        grant = await super().acquire(priority)
        self.release(grant)  # the client's own release, after the answer, is a no-op
        return grant


class RecordingTransport(httpx.AsyncBaseTransport):
    """The default transport, noting for each request its grant, when httpx handed it
    over, when the answer came, and its path."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport(limits=DEFAULT_LIMITS)
        self.sent: list[tuple[float | None, float, float, str, str, int]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        entered = time.monotonic()
        response = await self._inner.handle_async_request(request)
        self.sent.append(
            (_GRANT.get(), entered, time.monotonic(), request.method, request.url.path,
             response.status_code)
        )  # fmt: skip
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


def schedstat() -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of this process's
    threads together."""
    run = wait = 0
    for task in Path("/proc/self/task").iterdir():
        with open(task / "schedstat") as f:
            fields = f.read().split()
        run += int(fields[0])
        wait += int(fields[1])
    return run / 1e9, wait / 1e9


async def busy(ms: float) -> None:
    """CPU work on the client's loop: ``ms`` of computing, then a yield, forever."""
    while True:
        end = time.perf_counter() + ms / 1000
        while time.perf_counter() < end:
            pass
        await asyncio.sleep(0)


async def client(args: argparse.Namespace) -> dict[str, Any]:
    rate = RateLimit(limit=LIMIT, window=WINDOW, margin=0.1)
    limiter = ReleasedAtGrant(rate) if args.child_limiter == "old" else TaggingLimiter(rate)
    transport = RecordingTransport()
    tally = Tally()
    retry = RetryPolicy(base=0.5, cap=5.0, max_elapsed=120.0)
    async with GistClient(KEY, base_url=args.url, limiter=limiter, retry=retry,
                          transport=transport) as gist:  # fmt: skip
        ids = itertools.count()
        rng = random.Random(1)
        importers = max(1, args.workers // 4)
        tasks = [asyncio.create_task(importer(gist, tally, ids)) for _ in range(importers)]
        tasks += [
            asyncio.create_task(tracker(gist, tally, rng)) for _ in range(args.workers - importers)
        ]
        if args.busy > 0:
            tasks.append(asyncio.create_task(busy(args.busy)))
        cpu0 = schedstat()
        started = time.monotonic()
        lag: list[float] = []  # how late a 0.1-s sleep wakes: the loop's latency
        while time.monotonic() - started < args.seconds + 2.0:
            before = time.monotonic()
            await asyncio.sleep(0.1)
            lag.append(time.monotonic() - before - 0.1)
        cpu1 = schedstat()
        wall = time.monotonic() - started
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "sent": transport.sent,
        "grants": limiter.grants,
        "rate_limited": limiter.rate_limited,
        "ops": dict(tally.ops),
        "errors": dict(tally.errors),
        "wall": wall,
        "cpu": cpu1[0] - cpu0[0],
        "runqueue": cpu1[1] - cpu0[1],
        "loop_lag": lag,
        "nice": os.nice(0),
        "cpus": sorted(os.sched_getaffinity(0)),
    }


# -- the run (parent process) -----------------------------------------------------------


def quantiles(values: list[float]) -> str:
    if not values:
        return "none"
    values = sorted(values)

    def q(p: float) -> float:
        return values[min(len(values) - 1, int(p * len(values)))] * 1000

    return (f"median {q(0.5):.0f} ms, p90 {q(0.9):.0f}, p99 {q(0.99):.0f}, "
            f"max {values[-1] * 1000:.0f} (n={len(values)})")  # fmt: skip


def endpoint(method: str, path: str) -> str:
    if path.startswith("/contacts/batch/"):
        return "status"
    return f"{method} {path}"


def match(sent: list[list[Any]], log: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """Grant-to-arrival delays: (polls matched one to one, everything rank-matched within
    its endpoint; polls included)."""
    grants: dict[tuple[str, str], list[float]] = defaultdict(list)
    arrivals: dict[tuple[str, str], list[float]] = defaultdict(list)
    for grant, _, _, method, path, _ in sent:
        if grant is not None:
            grants[(method, path)].append(grant)
    for r in log:
        arrivals[(r["method"], r["path"])].append(r["t"])
    exact: list[float] = []
    by_kind_g: dict[str, list[float]] = defaultdict(list)
    by_kind_a: dict[str, list[float]] = defaultdict(list)
    for key, gs in grants.items():
        kind = endpoint(*key)
        arr = arrivals.get(key, [])
        if kind == "status":
            # One path per batch, polled a second apart at least: in order, one to one.
            exact += [a - g for g, a in zip(sorted(gs), sorted(arr), strict=False)]
        by_kind_g[kind] += gs
        by_kind_a[kind] += arr
    ranked: list[float] = []
    for kind, gs in by_kind_g.items():
        ranked += [a - g for g, a in zip(sorted(gs), sorted(by_kind_a[kind]), strict=False)]
    return exact, ranked


async def run_variant(args: argparse.Namespace, variant: str, workdir: Path) -> dict[str, Any]:
    out = workdir / f"client-{variant}.json"
    sandbox_cpus = {1} if args.pin and (os.cpu_count() or 1) > 1 else None
    with (workdir / f"sandbox-{variant}.log").open("wb") as sandbox_log:
        async with sandbox_subprocess(
            api_key=KEY, rate_limit=LIMIT, rate_window=WINDOW, batch_delay=args.batch_delay,
            stderr=sandbox_log,
        ) as sandbox:  # fmt: skip
            if sandbox_cpus:
                os.sched_setaffinity(sandbox.pid, sandbox_cpus)
            with cpu_hogs(args.hogs, {0} if args.pin else None):
                await asyncio.sleep(1.0)  # let the hogs take the CPUs
                load = os.getloadavg()[0]
                command = [
                    sys.executable, __file__, "--child", sandbox.url, "--child-limiter",
                    variant, "--child-out", str(out), "--seconds", str(args.seconds),
                    "--workers", str(args.workers), "--busy", str(args.busy),
                ]  # fmt: skip
                nice, pin = args.nice, args.pin

                def starve() -> None:  # in the child, before exec
                    if nice:
                        os.nice(nice)
                    if pin:
                        os.sched_setaffinity(0, {0})

                child = await asyncio.create_subprocess_exec(*command, preexec_fn=starve)
                code = await child.wait()
                if code != 0:
                    raise RuntimeError(f"the client exited with {code}")
                load_end = os.getloadavg()[0]
            async with httpx.AsyncClient(timeout=60) as http:
                log: list[dict[str, Any]] = (
                    await http.get(f"{sandbox.url}/_sandbox/requests")
                ).json()
    (workdir / f"requests-{variant}.json").write_bytes(orjson.dumps(log))
    data: dict[str, Any] = orjson.loads(out.read_bytes())
    data["log"] = sorted(log, key=lambda r: r["t"])
    data["load"] = (load, load_end)
    return data


def report(args: argparse.Namespace, variant: str, d: dict[str, Any]) -> dict[str, Any]:
    log = d["log"]
    t0 = log[0]["t"]
    span = [r for r in log if r["t"] < t0 + args.seconds]
    accepted = [r["t"] for r in span if r["status"] != 429]
    all_ok = [r["t"] for r in log if r["status"] != 429]
    windows = [
        sum(1 for t in accepted if t0 + k * WINDOW <= t < t0 + (k + 1) * WINDOW)
        for k in range(int(args.seconds // WINDOW))
    ]
    limited = sum(1 for r in log if r["status"] == 429)
    gaps = [b - a for a, b in zip(all_ok, all_ok[LIMIT:], strict=False)]
    # The same once the first window is over (a cold start opens connections on a
    # starved CPU: the first requests reach the sandbox late).
    warm = [b - a for a, b in zip(all_ok, all_ok[LIMIT:], strict=False) if a >= t0 + WINDOW]
    exact, ranked = match(d["sent"], log)
    to_transport = [entered - g for g, entered, *_ in d["sent"] if g is not None]
    answer_to_hold = [answered - entered for _, entered, answered, *_ in d["sent"]]
    name = {"old": "old (slot freed a window after the grant)",
            "current": "current (slot held until a window after the answer)"}[variant]  # fmt: skip
    print(f"\n{name}")
    print(f"  client: nice {d['nice']}, CPUs {d['cpus']}; {d['cpu']:.1f} CPU s in "
          f"{d['wall']:.0f} s, {d['runqueue']:.1f} s runnable waiting for a CPU "
          f"({d['runqueue'] / d['wall']:.0%} of the time); load average "
          f"{d['load'][0]:.1f} -> {d['load'][1]:.1f}")  # fmt: skip
    print(f"  loop lag (0.1-s sleep woke late by)  {quantiles(d['loop_lag'])}")
    print(f"  accepted per 10-s window    {windows}")
    print(f"  busiest sliding 10 s        {max_in_any_window(all_ok, WINDOW)} (whole run)")
    when = "".join(f"; at +{r['t'] - t0:.1f} s" for r in log if r["status"] == 429)[:200]
    print(f"  429 answers                 {limited}   (client saw {d['rate_limited']}){when}")
    if gaps:
        print(f"  request i to i+{LIMIT} at the sandbox: min {min(gaps):.3f} s (from the "
              f"second window on: {min(warm, default=float('nan')):.3f} s), median "
              f"{statistics.median(gaps):.3f} s")  # fmt: skip
    print(f"  grant to arrival, polls 1:1 {quantiles(exact)}")
    print(f"  grant to arrival, by rank   {quantiles(ranked)}")
    print(f"  grant to httpx transport    {quantiles(to_transport)}")
    print(f"  transport to answer         {quantiles(answer_to_hold)}")
    print(f"  client operations           {d['ops']}, errors {d['errors'] or 'none'}")
    return {
        "variant": variant,
        "windows": windows,
        "busiest": max_in_any_window(all_ok, WINDOW),
        "limited": limited,
        "min_gap": min(gaps) if gaps else float("nan"),
        "min_warm": min(warm, default=float("nan")),
        "exact": exact,
        "ranked": ranked,
        "utilisation": sum(windows) / (LIMIT * len(windows)) if windows else 0.0,
        "runqueue": d["runqueue"] / d["wall"],
    }


def ms(values: list[float], p: float) -> str:
    if not values:
        return "-"
    values = sorted(values)
    return f"{values[min(len(values) - 1, int(p * len(values)))] * 1000:.0f}"


async def parent(args: argparse.Namespace, workdir: Path) -> int:
    starve = [f"{args.hogs} CPU hogs"]
    if args.nice:
        starve.append(f"client at nice {args.nice}")
    if args.pin:
        starve.append("client and hogs on CPU 0, sandbox on CPU 1")
    if args.busy:
        starve.append(f"client loop busy in {args.busy:g}-ms chunks")
    print(
        f"the real limit on a starved machine: {LIMIT} per {WINDOW:g} s at the sandbox "
        f"(subprocess), {args.workers} requesters, {args.seconds:g} s measured; "
        f"{', '.join(starve)}; Python {platform.python_version()}, {os.cpu_count()} CPUs",
        flush=True,
    )
    variants = ["old", "current"] if args.limiter == "both" else [args.limiter]
    rows = []
    for variant in variants:
        rows.append(report(args, variant, await run_variant(args, variant, workdir)))
    print()
    print(
        "| limiter | accepted per 10-s window | busiest 10 s | 429s "
        "| closest i to i+100 (after the first window) "
        "| grant to arrival p50 / p99 / max (ms), rank-matched | polls 1:1 p99 / max (ms) "
        "| client waiting for a CPU |"
    )
    print("|---|---|---:|---:|---|---|---|---:|")
    for r in rows:
        ranked, exact = r["ranked"], r["exact"]
        print(
            f"| {r['variant']} | {', '.join(map(str, r['windows']))} | {r['busiest']} "
            f"| {r['limited']} | {r['min_gap']:.3f} s ({r['min_warm']:.3f} s) "
            f"| {ms(ranked, 0.5)} / {ms(ranked, 0.99)} / {ms(ranked, 1.0)} "
            f"| {ms(exact, 0.99)} / {ms(exact, 1.0)} | {r['runqueue']:.0%} |"
        )
    current = [r for r in rows if r["variant"] == "current"]
    ok = all(r["limited"] == 0 and r["busiest"] <= LIMIT for r in current)
    if current:
        print(f"\ncurrent limiter: {'meets' if ok else 'MISSES'} the aim (0 x 429, busiest "
              f"window <= {LIMIT})")  # fmt: skip
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="measured span")
    parser.add_argument("--hogs", type=int, default=4, help="CPU-spinning processes")
    parser.add_argument("--nice", type=int, default=0, help="the client's niceness")
    parser.add_argument("--pin", action="store_true",
                        help="client and hogs on CPU 0, the sandbox on CPU 1")  # fmt: skip
    parser.add_argument("--busy", type=float, default=0.0,
                        help="ms chunks of CPU work on the client's loop (0: none)")  # fmt: skip
    parser.add_argument("--limiter", choices=["both", "current", "old"], default="both")
    parser.add_argument("--workers", type=int, default=32, help="concurrent requesters")
    parser.add_argument("--batch-delay", type=float, default=0.5,
                        help="seconds a sandbox batch stays QUEUED, then IN_PROGRESS")  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=None, help="keep logs and dumps here")
    parser.add_argument("--child", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--child-limiter", default="current", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.url = args.child
        result = asyncio.run(client(args))
        args.child_out.write_bytes(orjson.dumps(result))
        return 0
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return asyncio.run(parent(args, args.workdir))
    with tempfile.TemporaryDirectory(prefix="bench-starved-") as tmp:
        return asyncio.run(parent(args, Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
