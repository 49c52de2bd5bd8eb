"""Replicas of the worker sharing ONE Gist budget, measured where Gist counts: the sandbox.

    .venv/bin/python benchmarks/bench_replicas.py [--replicas 1|2|3] [--mode redis|share]
        [--load even|skewed] [--seconds 60]
    .venv/bin/python benchmarks/bench_replicas.py --all [--seconds 60]

Each run starts its own embedded broker (Tansu), a ``gist-destination sandbox`` subprocess
enforcing the REAL limit (100 requests in any 10 s, ``--batch-delay 0``), produces a
backlog of ``--records`` tracks with an email (one Gist request each, so the budget is
the bottleneck) to a topic of ``--partitions`` partitions, and only then starts
``--replicas`` ``gist-destination run`` processes in one consumer group, with default
settings (``SHUTDOWN_TIMEOUT=5``: the measurement is over before they stop). Mode
``redis`` gives them ``REDIS_URL`` (one ``redis-server`` per run); ``share`` does not:
each takes its share of the partitions.

Load ``even``: records keyed by userId (2,000 users) over all partitions. ``skewed``:
every record on partition 0, so only the replica that owns it has work.

What is measured: the replicas' logs tell each one's partitions (the times of their
``kafka.partitions_assigned`` / ``revoked`` lines, on this machine's clock). Once every
replica owns partitions and the group has been quiet for 5 s, the group is *settled*;
the measured span starts a window (10.1 s, the limiter's span) and 1 s after the last
assignment, so that every replica is past the hold of a share that grew, and lasts
``--seconds``. Over it, from the sandbox's request log (``GET /_sandbox/requests``,
arrival times): requests per 10-s window, utilisation of the ONE workspace budget (the
mean of those windows / 100), and the busiest sliding 10-s interval, in the span and
over the whole run (start-up and rebalances included; above 100 is a breach). 429s are
counted over the whole run. Requests per replica come from each one's ``/metrics``
(``gist_requests_total``) read at the start and the end of the span.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
from bench_client import max_in_any_window
from bench_mapping import track
from processes import redis_subprocess, sandbox_subprocess
from prometheus_client.parser import text_string_to_metric_families

from destination.devtools.broker import EmbeddedBroker, create_topics, free_port
from destination.devtools.children import die_with_parent

KEY = "bench-key"
TOPIC = "segment-events"
DLQ = "segment-dlq"
SUPPRESSIONS = "segment-suppressions"
GROUP = "gist-destination-bench"
P = "gist_destination_"
LIMIT, WINDOW, SPAN = 100, 10.0, 10.1  # the sandbox's limit; the limiter's span (margin 0.1)
QUIET = 5.0  # seconds without a rebalance before the group counts as settled
USERS = 2_000
# time.time() - time.monotonic(): turns the workers' log times into the sandbox's clock
# (both are this machine's monotonic clock).
WALL_TO_MONO = time.time() - time.monotonic()


# -- the backlog ------------------------------------------------------------------------


async def produce_backlog(bootstrap: str, records: int, load: str) -> Counter[int]:
    """``records`` tracks (bench_mapping's shape, with an email); returns the count per
    partition."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    await producer.start()
    rng = random.Random(17)
    try:
        pending = []
        for i in range(records):
            message = track(rng, rng.randrange(USERS), i)
            pending.append(
                await producer.send(
                    TOPIC,
                    orjson.dumps(message),
                    key=message["userId"].encode(),
                    partition=0 if load == "skewed" else None,
                )
            )
        metadata = await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return Counter(m.partition for m in metadata)


# -- the replicas -----------------------------------------------------------------------


@dataclass
class Replica:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    _offset: int = 0
    partitions: set[int] = field(default_factory=set)
    changes: list[tuple[float, str, list[int]]] = field(default_factory=list)
    """(time on the monotonic clock, "assigned"/"revoked", partitions)."""

    def read_log(self) -> bool:
        """Take in the new log lines; True if the assignment changed."""
        with self.log.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        changed = False
        for line in data[:end].splitlines():
            if b"kafka.partitions_" not in line:
                continue
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            what = entry.get("event", "")
            if what not in ("kafka.partitions_assigned", "kafka.partitions_revoked"):
                continue
            parts = [int(p.rsplit(":", 1)[1]) for p in entry.get("partitions", [])]
            at = datetime.fromisoformat(entry["timestamp"]).timestamp() - WALL_TO_MONO
            kind = what.rsplit("_", 1)[1]
            self.changes.append((at, kind, parts))
            if kind == "assigned":
                self.partitions |= set(parts)
            else:
                self.partitions -= set(parts)
            changed = True
        return changed

    async def metrics(self, http: httpx.AsyncClient) -> dict[str, Any]:
        text = (await http.get(f"http://127.0.0.1:{self.port}/metrics")).text
        out: dict[str, Any] = {"requests": 0.0, "backend": "?", "limit": 0.0}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == P + "gist_requests_total":
                    out["requests"] += s.value
                elif s.name == P + "limiter_backend" and s.value == 1:
                    out["backend"] = s.labels["backend"]
                elif s.name == P + "rate_limit_current":
                    out["limit"] = s.value
        return out


def start_replica(
    workdir: Path, name: str, bootstrap: str, gist_url: str, extra: dict[str, str]
) -> Replica:
    port = free_port()
    env = {
        **os.environ,
        "GIST_API_KEY": KEY,
        "GIST_API_URL": gist_url,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_TOPICS": TOPIC,
        "KAFKA_GROUP_ID": GROUP,
        "KAFKA_DLQ_TOPIC": DLQ,
        "KAFKA_SUPPRESSION_TOPIC": SUPPRESSIONS,
        "METRICS_PORT": str(port),
        "LOG_FORMAT": "json",
        "SHUTDOWN_TIMEOUT": "5",
        **extra,
    }
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "destination", "run"],
            env=env, stdout=out, stderr=out, preexec_fn=die_with_parent,
        )  # fmt: skip
    return Replica(name, process, port, log)


async def stop_replicas(replicas: list[Replica]) -> list[int | None]:
    for r in replicas:
        if r.process.poll() is None:
            r.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 60
    for _ in range(600):
        if all(r.process.poll() is not None for r in replicas) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    for r in replicas:
        if r.process.poll() is None:
            r.process.kill()
    return [r.process.wait() for r in replicas]


# -- one run ----------------------------------------------------------------------------


@dataclass
class Result:
    replicas: int
    mode: str
    load: str
    backlog: Counter[int]
    settled_after: float  # s from the replicas' start to the last assignment
    windows: list[int]  # requests per 10-s window over the span, as the sandbox counted
    busiest_span: int
    busiest_run: int
    limited: int  # 429s over the whole run
    limited_span: int
    per_replica: list[tuple[str, int, list[int], str, int]]
    """(name, requests in the span, partitions, limiter backend, limit in force)."""
    late_changes: int  # rebalances inside the span (there should be none)
    exit_codes: list[int | None]

    @property
    def utilisation(self) -> float:
        return sum(self.windows) / (LIMIT * len(self.windows)) if self.windows else 0.0


def group_settled(replicas: list[Replica], partitions: int) -> bool:
    owned = [r.partitions for r in replicas]
    union = set().union(*owned)
    return all(owned) and union == set(range(partitions)) and sum(map(len, owned)) == len(union)


@contextlib.asynccontextmanager
async def maybe_redis(mode: str, workdir: Path) -> AsyncIterator[str | None]:
    if mode != "redis":
        yield None
        return
    async with redis_subprocess(workdir) as server:
        yield server.url


@contextlib.asynccontextmanager
async def sandbox_log(workdir: Path) -> AsyncIterator[Any]:
    with (workdir / "sandbox.log").open("wb") as log:
        yield log


async def run_one(
    args: argparse.Namespace, replicas_n: int, mode: str, load: str, workdir: Path
) -> Result:
    print(f"\n== {replicas_n} replica(s), {mode}, {load} load", flush=True)
    with EmbeddedBroker(log_file=workdir / "broker.log") as broker:
        bootstrap = broker.bootstrap_servers
        await create_topics(bootstrap, [TOPIC], args.partitions)
        await create_topics(bootstrap, [DLQ, SUPPRESSIONS], 1)
        backlog = await produce_backlog(bootstrap, args.records, load)
        print(f"  backlog per partition: {dict(sorted(backlog.items()))}", flush=True)
        async with (
            maybe_redis(mode, workdir) as redis_url,
            sandbox_log(workdir) as stderr,
            sandbox_subprocess(
                api_key=KEY, rate_limit=LIMIT, rate_window=WINDOW, batch_delay=0.0,
                stderr=stderr, latency=args.latency,
            ) as sandbox,
            httpx.AsyncClient(timeout=60) as http,
        ):  # fmt: skip
            extra = dict(item.split("=", 1) for item in args.set)
            if redis_url:
                extra["REDIS_URL"] = redis_url
            launched = time.monotonic()
            replicas = [
                start_replica(workdir, f"w{i}", bootstrap, sandbox.url, extra)
                for i in range(replicas_n)
            ]
            try:
                settled = await wait_settled(replicas, args.partitions, launched)
                start = settled + SPAN + 1.0
                end = start + args.seconds
                before = await read_at(http, replicas, start)
                after = await read_at(http, replicas, end)
                log: list[dict[str, Any]] = (
                    await http.get(f"{sandbox.url}/_sandbox/requests")
                ).json()
            finally:
                codes = await stop_replicas(replicas)
    log.sort(key=lambda r: r["t"])
    accepted = [r["t"] for r in log if r["status"] != 429]
    span = [t for t in accepted if start <= t < end]
    windows = [
        sum(1 for t in span if start + k * WINDOW <= t < start + (k + 1) * WINDOW)
        for k in range(int(args.seconds // WINDOW))
    ]
    late = sum(1 for r in replicas for at, _, _ in r.changes if at > settled)
    result = Result(
        replicas=replicas_n,
        mode=mode,
        load=load,
        backlog=backlog,
        settled_after=settled - launched,
        windows=windows,
        busiest_span=max_in_any_window(span, WINDOW),
        busiest_run=max_in_any_window(accepted, WINDOW),
        limited=sum(1 for r in log if r["status"] == 429),
        limited_span=sum(1 for r in log if r["status"] == 429 and start <= r["t"] < end),
        per_replica=[
            (
                r.name,
                round(after[r.name]["requests"] - before[r.name]["requests"]),
                sorted(r.partitions),
                after[r.name]["backend"],
                round(after[r.name]["limit"]),
            )
            for r in replicas
        ],
        late_changes=late,
        exit_codes=codes,
    )
    report(result, args.seconds)
    return result


async def wait_settled(replicas: list[Replica], partitions: int, launched: float) -> float:
    """Until every replica owns partitions and nothing moved for QUIET s; returns the
    time of the last assignment or revocation."""
    last_change = launched
    while True:
        for r in replicas:
            if r.process.poll() is not None:
                raise RuntimeError(f"{r.name} exited with {r.process.returncode}: see {r.log}")
            if r.read_log():
                last_change = max(last_change, *(at for at, _, _ in r.changes))
        now = time.monotonic()
        if group_settled(replicas, partitions) and now - last_change >= QUIET:
            print(
                f"  settled {last_change - launched:.1f} s after the start: "
                + ", ".join(f"{r.name} {sorted(r.partitions)}" for r in replicas),
                flush=True,
            )
            return last_change
        if now - launched > 300:
            raise RuntimeError("the group did not settle in 300 s")
        await asyncio.sleep(0.25)


async def read_at(
    http: httpx.AsyncClient, replicas: list[Replica], at: float
) -> dict[str, dict[str, Any]]:
    """Each replica's metrics at ``at`` (keeps reading their logs meanwhile)."""
    while (left := at - time.monotonic()) > 0:
        await asyncio.sleep(min(left, 1.0))
        for r in replicas:
            r.read_log()
            if r.process.poll() is not None:
                raise RuntimeError(f"{r.name} exited with {r.process.returncode}: see {r.log}")
    values = await asyncio.gather(*(r.metrics(http) for r in replicas))
    return {r.name: v for r, v in zip(replicas, values, strict=True)}


def report(r: Result, seconds: float) -> None:
    print(f"  settled after              {r.settled_after:.1f} s; span {seconds:g} s from "
          f"{SPAN + 1:.1f} s after that")  # fmt: skip
    print(f"  requests per 10-s window   {r.windows}")
    print(f"  utilisation (mean / 100)   {r.utilisation:.1%}")
    print(f"  busiest sliding 10 s       {r.busiest_span} in the span, {r.busiest_run} "
          "over the whole run")  # fmt: skip
    print(f"  429 answers                {r.limited} over the whole run ({r.limited_span} "
          "in the span)")  # fmt: skip
    for name, sent, parts, backend, limit in r.per_replica:
        print(f"  {name}: {sent} requests in the span, partitions {parts}, backend "
              f"{backend}, limit in force {limit}")  # fmt: skip
    if r.late_changes:
        print(f"  WARNING: {r.late_changes} assignment changes after the group settled")
    print(f"  exit codes                 {r.exit_codes}", flush=True)


def table(results: list[Result]) -> str:
    lines = [
        "| replicas | budget | load | requests per 10-s window (steady) | utilisation "
        "| busiest 10 s: span / whole run | 429s | requests per replica in the span "
        "(partitions) |",
        "|---:|---|---|---|---:|---|---:|---|",
    ]
    for r in results:
        per = ", ".join(f"{sent} ({len(parts)})" for _, sent, parts, _, _ in r.per_replica)
        lines.append(
            f"| {r.replicas} | {r.mode} | {r.load} | {', '.join(map(str, r.windows))} "
            f"| {r.utilisation:.1%} | {r.busiest_span} / {r.busiest_run} | {r.limited} "
            f"| {per} |"
        )
    return "\n".join(lines)


async def run_all(args: argparse.Namespace, workdir: Path) -> int:
    print(
        f"replicas sharing one budget: limit {LIMIT} per {WINDOW:g} s at the sandbox, "
        f"{args.records:,} tracks, {args.partitions} partitions, {args.seconds:g} s measured"
        + (f", sandbox latency {args.latency:g} s" if args.latency else "")
        + "; "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f}",
        flush=True,
    )
    if args.all:
        cases = list(itertools.product((1, 2, 3), ("redis", "share"), ("even", "skewed")))
    else:
        cases = [(args.replicas, args.mode, args.load)]
    results = []
    for n, mode, load in cases:
        run_dir = workdir / f"{n}-{mode}-{load}"
        run_dir.mkdir(parents=True, exist_ok=True)
        results.append(await run_one(args, n, mode, load, run_dir))
    print()
    print(table(results))
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    bad = [r for r in results if r.limited or r.busiest_run > LIMIT or r.late_changes]
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--mode", choices=["redis", "share"], default="redis")
    parser.add_argument("--load", choices=["even", "skewed"], default="even")
    parser.add_argument("--all", action="store_true",
                        help="1, 2, 3 replicas x redis, share x even, skewed")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=60.0, help="measured span")
    parser.add_argument("--records", type=int, default=6_000, help="tracks in the backlog")
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--latency", type=float, default=0.0,
                        help="seconds the sandbox waits before counting and answering each "
                        "request (a network's latency)")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a worker setting for every replica (repeatable)")  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep broker, sandbox, redis and replica logs here")  # fmt: skip
    args = parser.parse_args()
    if any("=" not in item for item in args.set):
        raise SystemExit("--set takes NAME=VALUE")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return asyncio.run(run_all(args, args.workdir))
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
        return asyncio.run(run_all(args, Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
