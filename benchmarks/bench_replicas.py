"""Replicas of the worker sharing ONE Gist budget, measured where Gist counts: the sandbox.

    .venv/bin/python benchmarks/bench_replicas.py [--replicas 1|2|3] [--mode redis|share]
        [--load even|skewed] [--seconds 60]
    .venv/bin/python benchmarks/bench_replicas.py --all [--seconds 60]
    .venv/bin/python benchmarks/bench_replicas.py --scenario roll|failover --mode both

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

Transitions (``--scenario roll|failover [--mode redis|share|both] [--repeat N]``), each
on the same set-up, with every worker default (``SHUTDOWN_TIMEOUT`` 20 s) and a backlog
of even load (2,000 tracks for a roll, 1,200 for a failover), started once the group has
settled and a window has passed:

- ``roll``: three replicas; SIGTERM the first, wait for its exit, start its replacement,
  wait until that owns partitions (its ``kafka.partitions_assigned`` line, every
  partition owned once by the live group), then the next. The span is the roll's wall
  time: the first SIGTERM to the last replacement owning partitions.
- ``failover``: two replicas; SIGKILL one, wait until the survivor owns every partition;
  the span is the 20 s after that. The tracks the killed process had delivered at or
  above the group's commit (read just after the kill) are what the survivor may send
  again.

Reported for both: budget use over the span (requests the sandbox accepted / 100 per
10 s of the span), requests per 10-s window, 429s over the whole run, how long the
members rejoined in each rebalance (revocation to assignment: they own nothing then, but
go on sending what they had opened), and, once every track is in the sandbox (or
nothing came for 60 s): lost tracks (neither in the sandbox nor in the dead-letter
topic, read from its start) and duplicated tracks (in the sandbox more than once; each
track carries ``properties.bench_seq``). The sandbox's request log is kept in the
workdir (``requests.json``) with every process's log.
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
SEQ = "bench_seq"  # the property numbering each track of the backlog
NOTED = frozenset({  # log lines the transitions report (and every warning or error)
    "worker.ready", "worker.stopping", "worker.stopped", "worker.shutdown_abandoned",
    "kafka.revoked_work_abandoned", "kafka.partitions_revoked",
})  # fmt: skip
# time.time() - time.monotonic(): turns the workers' log times into the sandbox's clock
# (both are this machine's monotonic clock).
WALL_TO_MONO = time.time() - time.monotonic()


# -- the backlog ------------------------------------------------------------------------


async def produce_backlog(
    bootstrap: str, records: int, load: str
) -> tuple[Counter[int], list[tuple[int, int]]]:
    """``records`` tracks (bench_mapping's shape, with an email), track ``i`` carrying
    ``properties.bench_seq = i`` (the sandbox keeps an event's properties, so lost and
    duplicated tracks can be counted); returns the count per partition and each track's
    (partition, offset)."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    await producer.start()
    rng = random.Random(17)
    try:
        pending = []
        for i in range(records):
            message = track(rng, rng.randrange(USERS), i)
            message["properties"][SEQ] = i
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
    return Counter(m.partition for m in metadata), [(m.partition, m.offset) for m in metadata]


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
    events: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    """(time on the monotonic clock, log line) of the lines named in ``NOTED``."""

    def read_log(self) -> bool:
        """Take in the new log lines; True if the assignment changed."""
        with self.log.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        changed = False
        for line in data[:end].splitlines():
            if not line.startswith(b"{"):
                continue
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            what = entry.get("event", "")
            if what in NOTED or entry.get("level") in ("warning", "error", "critical"):
                at = datetime.fromisoformat(entry["timestamp"]).timestamp() - WALL_TO_MONO
                self.events.append((at, entry))
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
        out: dict[str, Any] = {"requests": 0.0, "backend": "?", "limit": 0.0, "in_flight": 0.0}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == P + "gist_requests_total":
                    out["requests"] += s.value
                elif s.name == P + "limiter_backend" and s.value == 1:
                    out["backend"] = s.labels["backend"]
                elif s.name == P + "rate_limit_current":
                    out["limit"] = s.value
                elif s.name == P + "messages_in_flight":
                    out["in_flight"] = s.value
        return out


def start_replica(
    workdir: Path,
    name: str,
    bootstrap: str,
    gist_url: str,
    extra: dict[str, str],
    shutdown_timeout: str | None = "5",
) -> Replica:
    """A ``gist-destination run`` process; ``shutdown_timeout`` None keeps the default."""
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
        **({"SHUTDOWN_TIMEOUT": shutdown_timeout} if shutdown_timeout else {}),
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
        backlog, _ = await produce_backlog(bootstrap, args.records, load)
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


# -- transitions: a rolling restart, a failover -------------------------------------------

AFTER_TAKEOVER = 20.0  # s measured after the survivor of a SIGKILL owns every partition
TRANSITION_BOUND = 120.0  # s any one step of a transition may take before the run fails


@dataclass
class Tally:
    """The backlog's tracks as the sandbox holds them: events per ``bench_seq``."""

    counts: Counter[int]
    records: int
    dead: frozenset[int] = frozenset()  # tracks in the dead-letter topic

    @property
    def delivered(self) -> int:
        return len(self.counts)

    @property
    def lost(self) -> list[int]:
        """Tracks neither in the sandbox nor dead-lettered (the worker logs no skip per
        message, but no track of this backlog has a reason to be skipped: a skip of a
        copy of a delivered track, reason ``duplicate``, leaves the track delivered)."""
        return [i for i in range(self.records) if not self.counts[i] and i not in self.dead]

    @property
    def duplicated(self) -> list[int]:
        return sorted(i for i, n in self.counts.items() if n > 1)

    @property
    def extra(self) -> int:
        """Events beyond the first of each track."""
        return sum(n - 1 for n in self.counts.values() if n > 1)


async def tally(
    http: httpx.AsyncClient, url: str, records: int, dead: frozenset[int] = frozenset()
) -> Tally:
    state = (await http.get(f"{url}/_sandbox/state")).json()
    counts: Counter[int] = Counter()
    for event in state["events"]:
        seq = event["properties"].get(SEQ)
        if isinstance(seq, int) and 0 <= seq < records:
            counts[seq] += 1
    return Tally(counts, records, dead)


async def watch(replicas: list[Replica], seconds: float) -> None:
    """Sleep ``seconds`` reading the replicas' logs; fail if one of them exits."""
    end = time.monotonic() + seconds
    while True:
        for r in replicas:
            r.read_log()
            if r.process.poll() is not None:
                raise RuntimeError(f"{r.name} exited with {r.process.returncode}: see {r.log}")
        left = end - time.monotonic()
        if left <= 0:
            return
        await asyncio.sleep(min(left, 0.1))


async def wait_owned(new: Replica, live: list[Replica], partitions: int) -> float:
    """Until ``new`` owns partitions and the live group covers every partition once;
    returns when ``new`` logged that assignment."""
    started = time.monotonic()
    while not (new.partitions and group_settled(live, partitions)):
        if time.monotonic() - started > TRANSITION_BOUND:
            raise RuntimeError(f"{new.name} did not own partitions in {TRANSITION_BOUND:g} s")
        await watch(live, 0.05)
    return max(at for at, kind, parts in new.changes if kind == "assigned" and parts)


async def committed_offsets(bootstrap: str, partitions: set[int]) -> dict[int, int | None]:
    """The group's committed offsets (read without joining the group)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=GROUP, enable_auto_commit=False
    )
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(TOPIC, p)) for p in partitions}
    finally:
        await consumer.stop()


async def dead_letters(bootstrap: str) -> tuple[int, frozenset[int]]:
    """The dead-letter topic read from its start until nothing came for 3 s (the broker's
    end offsets are not trusted): its record count and the tracks among them."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        DLQ, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    count, seqs = 0, set()
    try:
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 3.0:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                quiet_since = time.monotonic()
                for record in records:
                    count += 1
                    with contextlib.suppress(Exception):
                        seq = orjson.loads(record.value)["properties"][SEQ]
                        if isinstance(seq, int):
                            seqs.add(seq)
    finally:
        await consumer.stop()
    return count, frozenset(seqs)


@dataclass
class Stop:
    """One step of a rolling restart."""

    name: str
    replacement: str
    signalled: float
    exited: float
    code: int | None
    owned: float  # when the replacement logged its first assignment
    partitions: list[int]  # the replacement's
    notes: str  # what the stopped replica logged while stopping
    paused: float  # longest rejoin of one of the others in this step (revoked to assigned)


def paused_since(r: Replica, since: float, until: float) -> float:
    """Seconds ``r`` owned no partition between ``since`` and ``until``: from each of its
    revocations of partitions to its next assignment (a rebalance in which it sends
    nothing)."""
    total, revoked_at = 0.0, None
    for at, kind, parts in r.changes:
        if at < since or at > until:
            continue
        if kind == "revoked" and parts and revoked_at is None:
            revoked_at = at
        elif kind == "assigned" and revoked_at is not None:
            total += at - revoked_at
            revoked_at = None
    if revoked_at is not None:
        total += until - revoked_at
    return total


def stop_notes(r: Replica, since: float) -> str:
    """What a replica logged from ``since`` on: its stop, abandoned work, warnings."""
    out = []
    for at, e in r.events:
        if at < since:
            continue
        what = e.get("event", "")
        if what == "worker.stopping":
            out.append(f"stopping with {e.get('in_flight')} in flight")
        elif what in ("worker.shutdown_abandoned", "kafka.revoked_work_abandoned"):
            count = e.get("in_flight", e.get("messages"))
            out.append(f"{what} {count} at +{at - since:.1f} s")
        elif what == "worker.stopped":
            out.append(f"stopped at +{at - since:.1f} s")
        elif e.get("level") in ("warning", "error", "critical"):
            out.append(f"{e.get('level')} {what}")
    return "; ".join(out)


async def roll(
    live: list[Replica], partitions: int, start_next: Any
) -> tuple[list[Stop], list[Replica]]:
    """SIGTERM the first replica, wait for its exit, start its replacement, wait until
    that owns partitions; then the next, until each of the first replicas is replaced."""
    stops = []
    for _ in range(len(live)):
        old, others = live[0], live[1:]
        signalled = time.monotonic()
        old.process.send_signal(signal.SIGTERM)
        while old.process.poll() is None:
            if time.monotonic() - signalled > TRANSITION_BOUND:
                old.process.kill()
            await watch(others, 0.02)
        exited = time.monotonic()
        old.read_log()
        new = start_next()
        live = [*others, new]
        owned = await wait_owned(new, live, partitions)
        paused = max(paused_since(o, signalled, owned) for o in others)
        stop = Stop(
            old.name, new.name, signalled, exited, old.process.returncode, owned,
            sorted(new.partitions), stop_notes(old, signalled), paused,
        )  # fmt: skip
        stops.append(stop)
        print(
            f"  {old.name}: SIGTERM; exit {stop.code} after {exited - signalled:.1f} s "
            f"({stop.notes}); {new.name} owns {stop.partitions} "
            f"{owned - exited:.1f} s after that; the others rejoined for {paused:.1f} s",
            flush=True,
        )
    return stops, live


@dataclass
class Kill:
    """A SIGKILL of one of two replicas."""

    victim: str
    partitions: list[int]  # the victim's at the kill
    killed: float
    owned: float  # when the survivor logged that it owns every partition
    in_flight: float  # the victim's messages_in_flight just before the kill
    requests: float  # the victim's gist_requests_total just before the kill
    above_commit: set[int]
    """Tracks of the victim's partitions delivered at the kill, at or above the group's
    commit: what the next owner reads again."""
    committed: dict[int, int | None]
    paused: float  # seconds the survivor rejoined (revoked to assigned) before the takeover


async def failover(
    http: httpx.AsyncClient,
    live: list[Replica],
    partitions: int,
    bootstrap: str,
    sandbox_url: str,
    where: list[tuple[int, int]],
) -> tuple[Kill, list[Replica]]:
    victim, survivor = live
    before = await victim.metrics(http)
    owned_by_victim = sorted(victim.partitions)
    killed = time.monotonic()
    victim.process.kill()
    victim.process.wait()
    at_kill = await tally(http, sandbox_url, len(where))
    committed = await committed_offsets(bootstrap, set(owned_by_victim))
    above = set()
    for seq in at_kill.counts:
        partition, offset = where[seq]
        if partition in committed:
            mark = committed[partition]
            if mark is None or offset >= mark:
                above.add(seq)
    everything = set(range(partitions))
    while survivor.partitions != everything:
        if time.monotonic() - killed > TRANSITION_BOUND:
            raise RuntimeError(f"{survivor.name} did not take over in {TRANSITION_BOUND:g} s")
        await watch([survivor], 0.05)
    owned = max(at for at, kind, _ in survivor.changes if kind == "assigned")
    kill = Kill(
        victim.name, owned_by_victim, killed, owned, before["in_flight"],
        before["requests"], above, committed, paused_since(survivor, killed, owned),
    )  # fmt: skip
    print(
        f"  {victim.name} {owned_by_victim}: SIGKILL with {before['in_flight']:.0f} messages "
        f"in flight, {len(above)} tracks delivered at or above the commit {committed}; "
        f"{survivor.name} owns every partition {owned - killed:.1f} s later (having rejoined "
        f"for {kill.paused:.1f} s of them)",
        flush=True,
    )
    return kill, [survivor]


@dataclass
class Transition:
    scenario: str
    mode: str
    backlog: Counter[int]
    load: tuple[float, float]  # load average at the start and at the end
    settled_after: float
    begin: float  # the first SIGTERM / the SIGKILL
    start: float  # of the measured span
    end: float
    windows: list[int]  # accepted requests per 10-s window from ``start``
    tail: tuple[int, float] | None  # (requests, seconds) of a last, partial window
    accepted: int  # in the span
    idle: float  # the longest time in the span without an accepted request
    next_window: int  # accepted requests in the 10 s after the span
    before: list[int]  # failover: per 10-s window from the kill to the takeover
    busiest_span: int
    busiest_run: int
    limited: int
    limited_span: int
    left_at_end: int  # tracks not delivered yet when the span ended
    final: Tally
    dead: int
    drained_after: float | None  # s from the replicas' start until all were delivered
    stops: list[Stop] = field(default_factory=list)
    kill: Kill | None = None
    exit_codes: list[int | None] = field(default_factory=list)
    warnings: dict[str, Counter[str]] = field(default_factory=dict)
    dup_partitions: Counter[int] = field(default_factory=Counter)

    @property
    def use(self) -> float:
        return self.accepted / (LIMIT * (self.end - self.start) / WINDOW)


def per_window(
    times: list[float], start: float, end: float
) -> tuple[list[int], tuple[int, float] | None]:
    whole = int((end - start) // WINDOW)
    windows = [
        sum(1 for t in times if start + k * WINDOW <= t < start + (k + 1) * WINDOW)
        for k in range(whole)
    ]
    rest = end - (start + whole * WINDOW)
    if rest < 0.05:
        return windows, None
    return windows, (sum(1 for t in times if start + whole * WINDOW <= t < end), rest)


async def run_transition(
    args: argparse.Namespace, scenario: str, mode: str, workdir: Path
) -> Transition:
    n = 3 if scenario == "roll" else 2
    load_start = os.getloadavg()[0]
    print(f"\n== {scenario}, {n} replicas, {mode} (load average {load_start:.2f})", flush=True)
    records = args.records or DEFAULT_RECORDS[scenario]
    with EmbeddedBroker(log_file=workdir / "broker.log") as broker:
        bootstrap = broker.bootstrap_servers
        await create_topics(bootstrap, [TOPIC], args.partitions)
        await create_topics(bootstrap, [DLQ, SUPPRESSIONS], 1)
        backlog, where = await produce_backlog(bootstrap, records, "even")
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
            started: list[Replica] = []

            def start_next() -> Replica:
                replica = start_replica(
                    workdir, f"w{len(started)}", bootstrap, sandbox.url, extra, None
                )
                started.append(replica)
                return replica

            launched = time.monotonic()
            live = [start_next() for _ in range(n)]
            stops: list[Stop] = []
            kill: Kill | None = None
            try:
                settled = await wait_settled(live, args.partitions, launched)
                # As the steady measurement: every share that grew is in force.
                await watch(live, settled + SPAN + 1.0 - time.monotonic())
                begin = time.monotonic()
                if scenario == "roll":
                    stops, live = await roll(live, args.partitions, start_next)
                    start, end = begin, stops[-1].owned
                else:
                    kill, live = await failover(
                        http, live, args.partitions, bootstrap, sandbox.url, where
                    )
                    start, end = kill.owned, kill.owned + AFTER_TAKEOVER
                await watch(live, end - time.monotonic())
                at_end = await tally(http, sandbox.url, records)
                drained_at = await wait_drained(http, sandbox.url, records, live)
                log: list[dict[str, Any]] = (
                    await http.get(f"{sandbox.url}/_sandbox/requests")
                ).json()
                (workdir / "requests.json").write_bytes(orjson.dumps(log))
                dead, dead_seqs = await dead_letters(bootstrap)
                final = await tally(http, sandbox.url, records, dead_seqs)
            finally:
                codes = await stop_replicas(started)
    log.sort(key=lambda r: r["t"])
    accepted = [r["t"] for r in log if r["status"] != 429]
    in_span = [t for t in accepted if start <= t < end]
    windows, tail = per_window(accepted, start, end)
    before: list[int] = []
    if kill is not None:  # per 10 s from the kill, the last window cut at the takeover
        whole, rest = per_window(accepted, begin, start)
        before = whole + ([rest[0]] if rest else [])
    warnings = {}
    for r in started:
        r.read_log()
        found = Counter(
            e.get("event", "?") for _, e in r.events
            if e.get("level") in ("warning", "error", "critical")
        )  # fmt: skip
        if found:
            warnings[r.name] = found
    result = Transition(
        scenario=scenario,
        mode=mode,
        backlog=backlog,
        load=(load_start, os.getloadavg()[0]),
        settled_after=settled - launched,
        begin=begin,
        start=start,
        end=end,
        windows=windows,
        tail=tail,
        accepted=len(in_span),
        idle=max(b - a for a, b in itertools.pairwise([start, *in_span, end])),
        next_window=sum(1 for t in accepted if end <= t < end + WINDOW),
        before=before,
        busiest_span=max_in_any_window(in_span, WINDOW),
        busiest_run=max_in_any_window(accepted, WINDOW),
        limited=sum(1 for r in log if r["status"] == 429),
        limited_span=sum(1 for r in log if r["status"] == 429 and start <= r["t"] < end),
        left_at_end=records - at_end.delivered,
        final=final,
        dead=dead,
        drained_after=None if drained_at is None else drained_at - launched,
        stops=stops,
        kill=kill,
        exit_codes=codes,
        warnings=warnings,
        dup_partitions=Counter(where[seq][0] for seq in final.duplicated),
    )
    report_transition(result)
    return result


DEFAULT_RECORDS = {"matrix": 6_000, "roll": 2_000, "failover": 1_200}
"""Enough that the budget binds until the measured span ends, few enough to drain."""


async def wait_drained(
    http: httpx.AsyncClient, url: str, records: int, live: list[Replica]
) -> float | None:
    """Until every track is in the sandbox and no event came for 5 s (copies sent again
    come right behind); None if the sandbox took no event for 60 s before that."""
    last, quiet_since = -1, time.monotonic()
    while True:
        await watch(live, 2.0)
        now = time.monotonic()
        t = await tally(http, url, records)
        total = sum(t.counts.values())
        if total != last:
            last, quiet_since = total, now
        if t.delivered == records and now - quiet_since >= 5.0:
            return quiet_since
        if now - quiet_since >= 60.0:
            return None


def _seqs(seqs: list[int], limit: int = 12) -> str:
    shown = ", ".join(map(str, seqs[:limit]))
    return shown + (f" … ({len(seqs)})" if len(seqs) > limit else "")


def report_transition(r: Transition) -> None:
    f = r.final
    span = r.end - r.start
    windows = ", ".join(map(str, r.windows))
    if r.tail:
        windows += f" + {r.tail[0]} in the last {r.tail[1]:.1f} s"
    print(f"  settled after              {r.settled_after:.1f} s")
    if r.scenario == "roll":
        print(f"  span                       {span:.1f} s: the first SIGTERM to the last "
              "replacement owning partitions")  # fmt: skip
        stops = ", ".join(f"{s.name} {s.exited - s.signalled:.1f} s ({s.code})" for s in r.stops)
        print(f"  stop times (exit codes)    {stops}")
        for s in r.stops:
            print(f"    {s.name} -> {s.replacement}: SIGTERM at +{s.signalled - r.start:.1f} s, "
                  f"exit at +{s.exited - r.start:.1f} s, {s.replacement} owns {s.partitions} "
                  f"at +{s.owned - r.start:.1f} s; the others rejoined for "
                  f"{s.paused:.1f} s")  # fmt: skip
    else:
        k = r.kill
        assert k is not None
        print(f"  takeover                   {k.owned - k.killed:.1f} s from the SIGKILL of "
              f"{k.victim} {k.partitions} until the survivor owns every partition (it rejoined "
              f"for {k.paused:.1f} s of them)")  # fmt: skip
        print(f"  requests kill -> takeover  {r.before} (per 10 s from the kill)")
        print(f"  killed process             {k.in_flight:.0f} messages in flight, "
              f"{len(k.above_commit)} of its tracks delivered at or above the commit "
              f"{k.committed}")  # fmt: skip
    print(f"  requests per 10-s window   {windows}")
    unused = LIMIT * span / WINDOW - r.accepted
    print(f"  budget use                 {r.use:.1%} ({r.accepted} accepted in {span:.1f} s; "
          f"{unused:.0f} requests, {unused * WINDOW / LIMIT:.1f} s of the budget, "
          "unused)")  # fmt: skip
    print(f"  longest time without a request {r.idle:.1f} s; {r.next_window} requests in the "
          "10 s after the span")  # fmt: skip
    print(f"  busiest sliding 10 s       {r.busiest_span} in the span, {r.busiest_run} over "
          "the whole run")  # fmt: skip
    print(f"  429 answers                {r.limited} over the whole run ({r.limited_span} in "
          "the span)")  # fmt: skip
    print(f"  backlog left at span end   {r.left_at_end} tracks")
    print(f"  lost tracks                {len(f.lost)}" + (f": {_seqs(f.lost)}" if f.lost else "")
          + f"; dead letters {r.dead}")  # fmt: skip
    dup = f.duplicated
    line = f"  duplicated tracks          {len(dup)} ({f.extra} extra events)"
    if dup:
        line += f": {_seqs(dup)}; per partition {dict(sorted(r.dup_partitions.items()))}"
        if r.kill is not None:
            inside = sum(1 for s in dup if s in r.kill.above_commit)
            line += f"; {inside} of them among the killed process's delivered above the commit"
    print(line)
    drained = "not all" if r.drained_after is None else f"{r.drained_after:.0f} s after the start"
    print(f"  all tracks delivered       {drained}")
    for name, found in r.warnings.items():
        print(f"  {name} warnings             {dict(found)}")
    print(f"  exit codes at the end      {r.exit_codes}; load average {r.load[0]:.2f} -> "
          f"{r.load[1]:.2f}", flush=True)  # fmt: skip


def transition_table(results: list[Transition]) -> str:
    if results[0].scenario == "roll":
        lines = [
            "| budget | span | requests per 10-s window | budget use | busiest 10 s: span / "
            "run | 429s | lost | duplicated | stop times (exit codes) | others rejoining, "
            "per step | longest without a request | requests in the 10 s after | load |",
            "|---|---:|---|---:|---|---:|---:|---:|---|---|---:|---:|---|",
        ]
        for r in results:
            windows = ", ".join(map(str, r.windows)) + (
                f" + {r.tail[0]} in {r.tail[1]:.1f} s" if r.tail else ""
            )
            stops = ", ".join(f"{s.exited - s.signalled:.1f} s ({s.code})" for s in r.stops)
            paused = ", ".join(f"{s.paused:.1f} s" for s in r.stops)
            lines.append(
                f"| {r.mode} | {r.end - r.start:.1f} s | {windows} | {r.use:.1%} "
                f"| {r.busiest_span} / {r.busiest_run} | {r.limited} | {len(r.final.lost)} "
                f"| {len(r.final.duplicated)} | {stops} | {paused} | {r.idle:.1f} s "
                f"| {r.next_window} | {r.load[0]:.1f}-{r.load[1]:.1f} |"
            )
        return "\n".join(lines)
    lines = [
        "| budget | kill → survivor owns all (of it rejoining) | per 10 s, kill → "
        "takeover | per 10 s, the 20 s after | budget use, 20 s after | 429s | lost "
        "| duplicated | killed: in flight / delivered above the commit | load |",
        "|---|---:|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        k = r.kill
        assert k is not None
        lines.append(
            f"| {r.mode} | {k.owned - k.killed:.1f} s ({k.paused:.1f} s) "
            f"| {', '.join(map(str, r.before))} "
            f"| {', '.join(map(str, r.windows))} | {r.use:.1%} | {r.limited} "
            f"| {len(r.final.lost)} | {len(r.final.duplicated)} "
            f"| {k.in_flight:.0f} / {len(k.above_commit)} | {r.load[0]:.1f}-{r.load[1]:.1f} |"
        )
    return "\n".join(lines)


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
    records = args.records or DEFAULT_RECORDS[args.scenario]
    print(
        f"replicas sharing one budget ({args.scenario}): limit {LIMIT} per {WINDOW:g} s at "
        f"the sandbox, {records:,} tracks, {args.partitions} partitions"
        + (f", {args.seconds:g} s measured" if args.scenario == "matrix" else "")
        + (f", sandbox latency {args.latency:g} s" if args.latency else "")
        + "; "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f}",
        flush=True,
    )
    modes = ("redis", "share") if args.mode == "both" else (args.mode,)
    if args.scenario != "matrix":
        return await run_transitions(args, workdir, modes)
    args.records = records
    if args.all:
        cases = list(itertools.product((1, 2, 3), ("redis", "share"), ("even", "skewed")))
    else:
        cases = [(args.replicas, mode, args.load) for mode in modes]
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


async def run_transitions(args: argparse.Namespace, workdir: Path, modes: tuple[str, ...]) -> int:
    """``--repeat`` runs of the scenario in each mode; exit 1 if a target was missed."""
    results = []
    for k in range(args.repeat):
        for mode in modes:
            run_dir = workdir / f"{args.scenario}-{mode}-{k + 1}"
            run_dir.mkdir(parents=True, exist_ok=True)
            results.append(await run_transition(args, args.scenario, mode, run_dir))
    print()
    print(transition_table(results))
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    missed = []
    for r in results:
        name = f"{r.scenario} {r.mode}"
        if r.use < 0.9:
            missed.append(f"{name}: budget use {r.use:.1%} < 90%")
        if r.limited:
            missed.append(f"{name}: {r.limited} x 429")
        if r.final.lost:
            missed.append(f"{name}: {len(r.final.lost)} tracks lost")
        if r.mode == "redis" and r.final.duplicated:
            missed.append(f"{name}: {len(r.final.duplicated)} tracks duplicated with Redis")
        if r.kill is not None:
            outside = [s for s in r.final.duplicated if s not in r.kill.above_commit]
            if outside:
                missed.append(f"{name}: {len(outside)} duplicates beyond the killed "
                              "process's uncommitted deliveries")  # fmt: skip
    for line in missed:
        print(f"target missed: {line}")
    return 1 if missed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=["matrix", "roll", "failover"],
                        default="matrix", help="matrix: steady state (--replicas, --load, "
                        "--all); roll: a rolling restart of 3 replicas; failover: a SIGKILL "
                        "of one of 2")  # fmt: skip
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--mode", choices=["redis", "share", "both"], default="redis")
    parser.add_argument("--repeat", type=int, default=1,
                        help="roll, failover: runs in each mode")  # fmt: skip
    parser.add_argument("--load", choices=["even", "skewed"], default="even")
    parser.add_argument("--all", action="store_true",
                        help="1, 2, 3 replicas x redis, share x even, skewed")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=60.0, help="measured span")
    parser.add_argument("--records", type=int, default=None,
                        help="tracks in the backlog (matrix 6,000, roll 2,000, failover "
                        "1,200)")  # fmt: skip
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
