"""The whole worker, as an operator runs it: Kafka backlog in, Gist sandbox out.

    .venv/bin/python benchmarks/bench_worker.py drain  [--records N] [--stream contacts|mix]
                                              [--baseline COMMIT --rounds R]
    .venv/bin/python benchmarks/bench_worker.py budget [--seconds 60] [--stream contacts|mix]
    .venv/bin/python benchmarks/bench_worker.py lean   [--records N] [--stream contacts|mix]

Every run starts its own embedded broker (Tansu, memory storage) and a
``gist-destination sandbox`` subprocess, produces a backlog of ``--records`` Segment
messages (the realistic shapes of bench_mapping.py, keyed by userId) to a topic of
``--partitions`` partitions, and only then starts ``gist-destination run`` as its own
process with the default settings. The worker's figures come from its ``/metrics`` and
``/proc/<pid>`` (CPU time, resident memory); the sandbox's from its request log.

``drain --baseline COMMIT``: the same backlog drained in turns by COMMIT's worker and
this checkout's (``--rounds`` each), in one run; prints each one's messages per CPU
second and the ratio of the medians (this machine's speed varies 2-3x from day to day:
only figures measured side by side compare).

``drain``: the sandbox has NO rate limit and the worker's limiter is set far above what
the sandbox can serve (20,000 requests per second), so the figure is the worker's own
speed: messages per wall second from the first consumed message to the last delivered
one (contacts count as delivered when their batch import has COMPLETED), the worker's
CPU seconds over that span and messages per CPU second (the one-core figure), peak
resident memory (VmHWM) and RSS samples along the drain. ``--stream contacts`` is
identifies only (batched, 500 a request); ``mix`` is the bench_mapping mix, where half
the messages are events, one Gist request each. Ends by checking that the sandbox holds
one contact per distinct user and that nothing was dead-lettered.

``budget``: the sandbox enforces the REAL limit (100 requests in any 10 s) and the worker
runs with its defaults. Over ``--seconds`` from the worker's first request: requests per
10-s window, budget utilisation, 429s, requests by kind, contacts per batch import and
contacts per request (all requests, status polls included), messages delivered.

The sandbox imports batches one at a time, like Gist, each QUEUED then IN_PROGRESS for
``--batch-delay`` seconds: at 0.5 s (the budget default) it completes at most two
batches a second, so Gist's import speed, not the budget, can be what binds;
``--batch-delay 0`` leaves only the budget.

``lean``: the whole backlog drained at the REAL limit with the worker's defaults, its RSS
sampled about every 5 s from start to end (does it stay flat, and how high), budget
utilisation over the steady part, 429s.

``--set NAME=VALUE`` passes any worker setting (e.g. ``--set GIST_BATCH_SIZE=2000``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from bench_client import max_in_any_window
from bench_mapping import MIX, identify
from processes import sandbox_subprocess

from destination.devtools.broker import EmbeddedBroker, create_topics, free_port
from destination.devtools.children import die_with_parent
from destination.devtools.demo import metric_totals, stop_worker

KEY = "bench-key"
TOPIC = "segment-events"
DLQ = "segment-dlq"
SUPPRESSIONS = "segment-suppressions"
P = "gist_destination_"
LIMIT, WINDOW = 100, 10.0
TICKS = os.sysconf("SC_CLK_TCK")


# -- the backlog ------------------------------------------------------------------------


def messages(count: int, stream: str, users: int, seed: int = 11) -> Iterator[tuple[str, bytes]]:
    """``(userId, JSON)`` pairs: identifies only, or the bench_mapping mix."""
    rng = random.Random(seed)
    makers = [make for _, _, make in MIX]
    weights = [share for _, share, _ in MIX]
    for i in range(count):
        make = identify if stream == "contacts" else rng.choices(makers, weights)[0]
        message = make(rng, rng.randrange(users), i)
        yield message["userId"], orjson.dumps(message)


async def produce_backlog(bootstrap: str, args: argparse.Namespace) -> tuple[int, int, int, int]:
    """Produce the backlog; returns (records, bytes, distinct users, events to expect)."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=512 * 1024
    )
    await producer.start()
    count = size = events = 0
    contacts: set[str] = set()
    started = time.monotonic()
    try:
        pending: list[asyncio.Future[Any]] = []
        for user, value in messages(args.records, args.stream, args.users):
            pending.append(await producer.send(TOPIC, value, key=user.encode()))
            contacts.add(user)  # every message of the mix names its user and an email
            # Audience Entered / Exited become contact properties, not events (default rules).
            events += b'"type":"track"' in value and b'"event":"Audience ' not in value
            count += 1
            size += len(value)
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    took = time.monotonic() - started
    print(
        f"  backlog: {count:,} records, {size / count:.0f} bytes each on average, "
        f"{len(contacts):,} distinct contacts, {args.partitions} partitions "
        f"(produced in {took:.0f} s)",
        flush=True,
    )
    return count, size, len(contacts), events


# -- the processes ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def sandbox(
    workdir: Path, rate_limit: int, batch_delay: float
) -> AsyncIterator[tuple[str, int]]:
    """``gist-destination sandbox`` on a free port, its log in ``workdir``; yields its
    URL and pid."""
    with (workdir / "sandbox.log").open("wb") as log:
        async with sandbox_subprocess(
            api_key=KEY, rate_limit=rate_limit, rate_window=WINDOW, batch_delay=batch_delay,
            stderr=log,
        ) as process:  # fmt: skip
            yield process.url, process.pid


def start_worker(
    workdir: Path,
    bootstrap: str,
    gist_url: str,
    port: int,
    extra: dict[str, str],
    code: Path | None = None,
) -> subprocess.Popen[bytes]:
    """``gist-destination run`` (``python -m destination run``): this checkout's, or with
    ``code`` another checkout's package (run from its directory, found first on the path)."""
    env = {
        **os.environ,
        "GIST_API_KEY": KEY,
        "GIST_API_URL": gist_url,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_TOPICS": TOPIC,
        "KAFKA_GROUP_ID": "gist-destination-bench",
        "KAFKA_DLQ_TOPIC": DLQ,
        "KAFKA_SUPPRESSION_TOPIC": SUPPRESSIONS,
        "METRICS_PORT": str(port),
        "LOG_FORMAT": "json",
        **extra,
    }
    if code is not None:
        env["PYTHONPATH"] = str(code)
    with (workdir / "worker.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "destination", "run"],
            env=env, stdout=log, stderr=log, preexec_fn=die_with_parent,
            cwd=code,
        )  # fmt: skip


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident set) of a live process, in KiB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0])
    return found


@dataclass
class Sample:
    t: float
    consumed: int
    finished: int  # delivered + dead-lettered + skipped
    in_flight: int
    rss_kib: int
    cpu: float


@dataclass
class Watch:
    samples: list[Sample] = field(default_factory=list)
    first: Sample | None = None  # the first sample with a consumed message
    last: dict[str, float] = field(default_factory=dict)


async def watch(
    worker: subprocess.Popen[bytes],
    port: int,
    until: Any,
    within: float,
    interval: float = 0.25,
) -> Watch:
    """Scrape the worker until ``until(watch)`` is true; raise if it dies or times out."""
    seen = Watch()
    url = f"http://127.0.0.1:{port}/metrics"
    started = time.monotonic()
    last_print = started
    async with httpx.AsyncClient(timeout=5) as http:
        while True:
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited with {worker.returncode}; see worker.log")
            if time.monotonic() - started > within:
                raise RuntimeError(f"not done after {within:.0f} s")
            try:
                t = metric_totals((await http.get(url)).text)
            except httpx.HTTPError:
                await asyncio.sleep(interval)
                continue
            now = time.monotonic()
            sample = Sample(
                now,
                int(t.get(P + "messages_consumed_total", 0)),
                int(
                    t.get(P + "messages_delivered_total", 0)
                    + t.get(P + "messages_dead_lettered_total", 0)
                    + t.get(P + "messages_skipped_total", 0)
                ),
                int(t.get(P + "messages_in_flight", 0)),
                memory_kib(worker.pid)["VmRSS"],
                cpu_seconds(worker.pid),
            )
            seen.samples.append(sample)
            seen.last = t
            if seen.first is None and sample.consumed > 0:
                seen.first = sample
            if now - last_print >= 10:
                print(
                    f"  [{now - started:4.0f} s] consumed {sample.consumed:,}  finished "
                    f"{sample.finished:,}  in flight {sample.in_flight:,}  "
                    f"RSS {sample.rss_kib / 1024:.0f} MiB",
                    flush=True,
                )
                last_print = now
            if until(seen):
                return seen
            await asyncio.sleep(interval)


def parse_sets(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--set takes NAME=VALUE, not {item!r}")
        out[name] = value
    return out


# -- drain ------------------------------------------------------------------------------


@dataclass
class Drained:
    """One drain of the backlog by one worker."""

    label: str
    wall: float
    cpu: float
    peak_kib: int
    ok: bool

    def per_cpu_second(self, count: int) -> float:
        return count / self.cpu


async def drain(args: argparse.Namespace, workdir: Path) -> int:
    print(
        f"worker drain, unlimited sandbox: {args.records:,} records, stream {args.stream!r}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs",
        flush=True,
    )
    extra = {
        "GIST_RATE_LIMIT": "20000",
        "GIST_RATE_WINDOW": "1",
        "GIST_RATE_MARGIN": "0",
        **parse_sets(args.set),
    }
    code_dirs: list[tuple[str, Path | None]] = [("HEAD", None)]
    if args.baseline:
        code_dirs.insert(0, baseline_tree(args.baseline, workdir))
    runs: list[Drained] = []
    with EmbeddedBroker(log_file=workdir / "broker.log") as broker:
        bootstrap = broker.bootstrap_servers
        await create_topics(bootstrap, [TOPIC, DLQ, SUPPRESSIONS], args.partitions)
        count, size, contacts, events = await produce_backlog(bootstrap, args)
        # The variants take turns (baseline, HEAD, baseline, ...): this machine's speed
        # drifts over minutes, so only figures measured side by side compare.
        for round_ in range(args.rounds):
            for label, code in code_dirs:
                print(f"-- {label} (round {round_ + 1} of {args.rounds})", flush=True)
                group = f"gist-destination-bench-{len(runs)}"
                runs.append(
                    await drain_once(
                        args, workdir, bootstrap, extra, label, code, group,
                        count, size, contacts, events,
                    )
                )  # fmt: skip
    if len(code_dirs) > 1:
        print("summary (messages per CPU second, median of the rounds):")
        medians = {}
        for label, _ in code_dirs:
            mine = [r.per_cpu_second(count) for r in runs if r.label == label]
            medians[label] = statistics.median(mine)
            each = ", ".join(f"{x:,.0f}" for x in mine)
            print(f"  {label:<12} {medians[label]:>10,.0f}  ({each})")
        base = medians[code_dirs[0][0]]
        print(f"  ratio HEAD / {code_dirs[0][0]}: {medians['HEAD'] / base:.2f}")
    return 0 if all(r.ok for r in runs) else 1


def baseline_tree(commit: str, workdir: Path) -> tuple[str, Path]:
    """A checkout of ``commit`` (a git worktree, detached) to run the worker from: the same
    Python and dependencies, that commit's ``destination`` package; with its label, the
    commit's short hash (``--baseline HEAD``, the last commit against the working tree's
    changes, must not share this checkout's label "HEAD")."""
    root = Path(__file__).resolve().parents[1]
    commit = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", commit],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    tree = workdir / f"baseline-{commit}"
    if not tree.exists():
        subprocess.run(
            ["git", "-C", str(root), "worktree", "add", "--detach", str(tree), commit],
            check=True, capture_output=True,
        )  # fmt: skip
    return commit, tree


async def drain_once(
    args: argparse.Namespace,
    workdir: Path,
    bootstrap: str,
    extra: dict[str, str],
    label: str,
    code: Path | None,
    group: str,
    count: int,
    size: int,
    contacts: int,
    events: int,
) -> Drained:
    async with sandbox(workdir, 0, args.batch_delay) as (url, sandbox_pid):
        port = free_port()
        sandbox_cpu0 = cpu_seconds(sandbox_pid)
        worker = start_worker(
            workdir, bootstrap, url, port, {**extra, "KAFKA_GROUP_ID": group}, code=code
        )
        try:
            seen = await watch(
                worker, port, lambda w: bool(w.samples) and w.samples[-1].finished >= count,
                within=args.timeout,
            )  # fmt: skip
            peak = memory_kib(worker.pid)["VmHWM"]
            sandbox_cpu = cpu_seconds(sandbox_pid) - sandbox_cpu0
        finally:
            code_ = await stop_worker(worker)
        state = await sandbox_totals(url) if args.verify else None
    assert seen.first is not None
    first, end = seen.first, seen.samples[-1]
    wall = end.t - first.t
    cpu = end.cpu - first.cpu
    t = seen.last
    dead = int(t.get(P + "messages_dead_lettered_total", 0))
    skipped = int(t.get(P + "messages_skipped_total", 0))
    batches = t.get(P + "contacts_per_batch_count", 0.0)
    batch_contacts = t.get(P + "contacts_per_batch_sum", 0.0)
    print(f"  drained {count:,} records ({size / 1e6:.0f} MB) in {wall:.1f} s")
    print(f"  throughput        {count / wall:,.0f} msg/s (wall, first consumed to last finished)")
    print(f"  worker CPU        {cpu:.1f} s over the drain: {count / cpu:,.0f} msg per CPU second")
    print(f"  sandbox CPU       {sandbox_cpu:.1f} s (the other core)")
    print(
        f"  peak RSS (VmHWM)  {peak / 1024:.0f} MiB; RSS along the drain: "
        + ", ".join(f"{q}% {rss_at(seen, count, q) / 1024:.0f}" for q in (10, 25, 50, 75, 90))
        + " MiB"
    )
    print(
        f"  in flight         median {statistics.median(s.in_flight for s in seen.samples):,.0f}"
        f", max {max(s.in_flight for s in seen.samples):,}"
    )
    print(
        f"  batch imports     {batches:,.0f}, {batch_contacts / max(batches, 1):.0f} contacts "
        f"each; merged updates {t.get(P + 'contact_updates_merged_total', 0):,.0f}"
    )
    print(f"  dead-lettered     {dead}, skipped {skipped}; worker exit code {code_}")
    ok = dead == 0 and code_ == 0
    if state is not None:
        print(f"  sandbox holds     {state['contacts']:,} contacts (expected {contacts:,}), "
              f"{state['events']:,} events (expected {events:,})")  # fmt: skip
        ok = ok and (state["contacts"], state["events"]) == (contacts, events)
    print("  check:", "ok" if ok else "FAILED", flush=True)
    return Drained(label, wall, cpu, peak, ok)


def rss_at(seen: Watch, count: int, percent: int) -> int:
    """RSS at the first sample with ``percent`` of the records finished."""
    for sample in seen.samples:
        if sample.finished >= count * percent / 100:
            return sample.rss_kib
    return seen.samples[-1].rss_kib


async def sandbox_totals(url: str) -> dict[str, int]:
    async with httpx.AsyncClient(timeout=300) as http:
        state = orjson.loads((await http.get(f"{url}/_sandbox/state")).content)
    return {"contacts": len(state["contacts"]), "events": len(state["events"])}


# -- at the real limit: budget and lean --------------------------------------------------


async def at_real_limit(
    args: argparse.Namespace,
    workdir: Path,
    until: Any,
    within: float,
    interval: float = 0.25,
) -> tuple[int, Watch, list[dict[str, Any]], int, int]:
    """The backlog produced, the sandbox at the real limit, the worker run with its
    defaults (and ``--set``) until ``until(watch, backlog size)``: the backlog size, what
    was watched, the sandbox's request log, the worker's exit code and its peak RSS in
    KiB."""
    with EmbeddedBroker(log_file=workdir / "broker.log") as broker:
        bootstrap = broker.bootstrap_servers
        await create_topics(bootstrap, [TOPIC, DLQ, SUPPRESSIONS], args.partitions)
        count, *_ = await produce_backlog(bootstrap, args)
        async with sandbox(workdir, LIMIT, args.batch_delay) as (url, _):
            port = free_port()
            worker = start_worker(workdir, bootstrap, url, port, parse_sets(args.set))
            try:
                seen = await watch(worker, port, lambda w: until(w, count), within, interval)
                peak = memory_kib(worker.pid)["VmHWM"]
                async with httpx.AsyncClient(base_url=url, timeout=120) as http:
                    log: list[dict[str, Any]] = (await http.get("/_sandbox/requests")).json()
            finally:
                code = await stop_worker(worker)
    return count, seen, log, code, peak


# -- budget -----------------------------------------------------------------------------


async def budget(args: argparse.Namespace, workdir: Path) -> int:
    print(
        f"worker under the real limit ({LIMIT} requests in any {WINDOW:g} s): "
        f"{args.records:,} records, stream {args.stream!r}, {args.seconds:g} s measured",
        flush=True,
    )
    count, seen, log, code, _ = await at_real_limit(
        args, workdir,
        lambda w, _: w.first is not None and w.samples[-1].t - w.first.t >= args.seconds + WINDOW,
        within=args.seconds + 120,
    )  # fmt: skip
    log.sort(key=lambda r: r["t"])
    # Measure from the first request after start-up (the key check is one request).
    api = [r for r in log if not r["path"].startswith("/token/")]
    t0 = api[0]["t"]
    span = [r for r in api if r["t"] < t0 + args.seconds]
    accepted = [r for r in span if r["status"] != 429]
    windows = int(args.seconds // WINDOW)
    per_window = [
        sum(1 for r in accepted if t0 + k * WINDOW <= r["t"] < t0 + (k + 1) * WINDOW)
        for k in range(windows)
    ]
    kinds = Counter(kind(r) for r in accepted)
    t = seen.last
    batches = t.get(P + "contacts_per_batch_count", 0.0)
    contacts = t.get(P + "contacts_per_batch_sum", 0.0)
    first, end = seen.first, seen.samples[-1]
    assert first is not None
    finished = end.finished - first.finished
    limited = sum(1 for r in log if r["status"] == 429)
    all_ok = [r["t"] for r in log if r["status"] != 429]
    print(f"  requests per 10-s window   {per_window}")
    print(f"  most in any sliding 10 s   {max_in_any_window(all_ok, WINDOW)}")
    print(
        f"  budget utilisation         {len(accepted) / (LIMIT * args.seconds / WINDOW):.1%} "
        f"({len(accepted)} accepted in {args.seconds:g} s)"
    )
    print(f"  429 answers                {limited}")
    print(f"  requests by kind           {dict(kinds)}")
    print(
        f"  contacts per batch import  {contacts / max(batches, 1):.0f} "
        f"({batches:.0f} imports in the run)"
    )
    per_import = contacts / max(batches, 1)
    print(
        f"  contacts per request       "
        f"{per_import * kinds['batch import'] / max(1, len(accepted)):.0f} "
        f"(imports in the span x contacts per import / every accepted request)"
    )
    print(
        f"  messages finished          {finished:,} in {end.t - first.t:.0f} s "
        f"({finished / (end.t - first.t):,.0f}/s), of a backlog of {count:,}"
    )
    dead = int(t.get(P + "messages_dead_lettered_total", 0))
    print(f"  dead-lettered              {dead}; worker exit code {code}")
    ok = limited == 0 and code == 0 and dead == 0
    print("  check:", "ok" if ok else "FAILED")
    return 0 if ok else 1


# -- lean: the whole drain at the real limit, memory along it ----------------------------


async def lean(args: argparse.Namespace, workdir: Path) -> int:
    print(
        f"worker draining a backlog at the real limit ({LIMIT} requests in any {WINDOW:g} s) "
        f"with its defaults: {args.records:,} records, stream {args.stream!r}, sandbox "
        f"batch delay {args.batch_delay:g} s",
        flush=True,
    )
    count, seen, log, code, peak = await at_real_limit(
        args, workdir,
        lambda w, count: bool(w.samples) and w.samples[-1].finished >= count,
        within=args.timeout, interval=1.0,
    )  # fmt: skip
    assert seen.first is not None
    start, end = seen.samples[0], seen.samples[-1]
    every = [s for s in seen.samples if (s.t - start.t) % 5.0 < 1.0]  # ~ every 5 s
    series = [(round(s.t - start.t), s.rss_kib // 1024) for s in every]
    after_20 = [rss for t, rss in series if t >= 20]
    rise = (max(after_20) - after_20[0]) if after_20 else 0
    api = sorted(r["t"] for r in log if not r["path"].startswith("/token/") and r["status"] != 429)
    limited = sum(1 for r in log if r["status"] == 429)
    busy = [t for t in api if api[0] + WINDOW <= t <= api[-1] - WINDOW]  # the steady part
    steady = (api[-1] - api[0] - 2 * WINDOW) if len(api) > 1 else 0.0
    utilisation = len(busy) / (LIMIT * steady / WINDOW) if steady > 0 else 0.0
    wall = end.t - seen.first.t
    print(f"  RSS every ~5 s (s, MiB) {series}")
    print(f"  peak RSS (VmHWM)        {peak / 1024:.0f} MiB; rise after the first 20 s: {rise} MiB")
    print(f"  drained                 {count:,} records in {wall:.0f} s ({count / wall:,.0f}/s)")
    print(
        f"  budget utilisation      {utilisation:.1%} over the steady part "
        f"({len(busy)} requests in {steady:.0f} s); most in any 10 s "
        f"{max_in_any_window(api, WINDOW)}; 429 answers {limited}"
    )
    t = seen.last
    dead = int(t.get(P + "messages_dead_lettered_total", 0))
    print(f"  dead-lettered           {dead}; worker exit code {code}")
    ok = limited == 0 and code == 0 and dead == 0
    print("  check:", "ok" if ok else "FAILED")
    return 0 if ok else 1


def kind(request: dict[str, Any]) -> str:
    path = request["path"]
    if path.startswith("/contacts/batch/"):
        return "batch status"
    return {"/contacts/batch": "batch import", "/events": "event"}.get(path, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=["drain", "budget", "lean"])
    parser.add_argument("--records", type=int, default=None,
                        help="backlog size (drain: 200,000; budget: 300,000)")  # fmt: skip
    parser.add_argument("--stream", choices=["contacts", "mix"], default="contacts")
    parser.add_argument("--users", type=int, default=None,
                        help="distinct users (default: half the records)")  # fmt: skip
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=60.0, help="budget: measured span")
    parser.add_argument("--batch-delay", type=float, default=None,
                        help="seconds the sandbox keeps each batch QUEUED, then IN_PROGRESS; "
                        "it imports batches one at a time (drain: 0, budget: 0.5)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=1800.0, help="drain: give up after")
    parser.add_argument("--baseline", metavar="COMMIT", default=None,
                        help="drain: also drain with this commit's worker, in turns, and "
                        "print the ratio of messages per CPU second")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1,
                        help="drain: turns of each worker (the median is compared)")  # fmt: skip
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="drain: skip counting the sandbox's contacts at the end")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a worker setting (repeatable)")  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep broker, sandbox and worker logs here")  # fmt: skip
    args = parser.parse_args()
    if args.records is None:
        args.records = 200_000 if args.scenario == "drain" else 300_000
    if args.batch_delay is None:
        args.batch_delay = 0.0 if args.scenario == "drain" else 0.5
    if args.users is None:
        args.users = max(1, args.records // 2)
    scenario = {"drain": drain, "budget": budget, "lean": lean}[args.scenario]
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return asyncio.run(scenario(args, args.workdir))
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
        return asyncio.run(scenario(args, Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
