"""What spending the budget only on changes saves (issue: dedup, unchanged contacts).

Two measurements, each with the real worker (in-process, its Kafka the in-memory twin so
that only Gist's side is timed) against the sandbox in its own process over HTTP:

1. **An Engage re-sync** of USERS users where 90% are unchanged, at the real limit
   (100 requests / 10 s): a first sync of every user's audience membership, then the
   re-sync (new messageIds; a tenth of the memberships changed). Requests the sandbox
   counted and time to finish the re-sync, with CONTACT_MEMORY on and off.
2. **Producer retries**: a stream of tracks where 15% are sent twice (same messageId),
   through an unlimited sandbox (the count is under test, not the rate): events Gist
   recorded twice, and requests saved; then the same records replayed to a new worker
   process (a restart), without and with Redis.

    .venv/bin/python benchmarks/bench_savings.py --users 100000 --events 2000
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from processes import sandbox_subprocess

from destination.devtools.local_kafka import (
    LocalBroker,
    LocalKafkaClients,
    LocalProducer,
)
from destination.mapping import Mapper, load_rules
from destination.settings import load_settings
from destination.worker import Worker

KEY = "sandbox-key"


class Run:
    """Workers of one group on a twin broker, against a sandbox process."""

    def __init__(self, url: str, **settings: Any) -> None:
        self.url = url
        self.broker = LocalBroker(max_message_bytes=8 * 1024 * 1024)
        token = uuid.uuid4().hex[:6]
        self.topic, self.dlq = f"bench-{token}", f"bench-dlq-{token}"
        self.broker.create_topic(self.topic, 6)
        self.broker.create_topic(self.dlq, 1)
        self.broker.create_topic(f"{self.dlq}-suppressions", 1)
        self.settings = {
            "gist_api_key": KEY,
            "gist_api_url": url,
            "kafka_topics": self.topic,
            "kafka_dlq_topic": self.dlq,
            "kafka_suppression_topic": f"{self.dlq}-suppressions",
            "kafka_group_id": f"bench-{token}",
            "metrics_port": 0,
            "metrics_host": "127.0.0.1",
            "log_level": "WARNING",
            "gist_batch_wait": 0.2,
            "gist_batch_poll_interval": 0.2,
            "gist_batch_poll_max_interval": 1.0,
            "commit_interval": 0.2,
            **settings,
        }
        self.mapper = Mapper(load_rules(None))
        self.worker: Worker | None = None
        self.task: asyncio.Task[int] | None = None

    async def produce(self, records: list[tuple[bytes, Any]]) -> None:
        producer = LocalProducer(self.broker, max_request_size=8 * 1024 * 1024)
        await producer.start()
        for key, value in records:
            await producer.send_and_wait(self.topic, orjson.dumps(value), key=key)
        await producer.stop()

    async def start(self) -> None:
        self.worker = Worker(
            load_settings(**self.settings),
            self.mapper,
            KEY,
            kafka=LocalKafkaClients(self.broker),
        )
        self.task = asyncio.create_task(self.worker.serve())
        while self.worker.stream is None or not self.worker.stream.assigned_once.is_set():  # noqa: ASYNC110 - another task's state
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        assert self.worker is not None
        assert self.task is not None
        self.worker.request_stop()
        await self.task

    async def until_committed(self, within: float = 3600.0) -> float:
        started = time.monotonic()
        from aiokafka.structs import TopicPartition

        while True:
            committed = {
                p: self.broker.committed(
                    self.settings["kafka_group_id"], TopicPartition(self.topic, p)
                )
                or 0
                for p in range(6)
            }
            ends = {p: self.broker.end_offset(self.topic, p) for p in range(6)}
            if committed == ends:
                return time.monotonic() - started
            if time.monotonic() - started > within:
                raise TimeoutError(f"not committed: {committed} of {ends}")
            await asyncio.sleep(0.1)


async def requests(url: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        log: list[dict[str, Any]] = (await http.get("/_sandbox/requests")).json()
        return log


async def state(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        data: dict[str, Any] = (await http.get("/_sandbox/state")).json()
        return data


def audience(user: int, member: bool) -> tuple[bytes, Any]:
    return str(user).encode(), {
        "type": "identify",
        "userId": f"u{user}",
        "messageId": uuid.uuid4().hex,
        "traits": {"email": f"u{user}@bench.example", "vip_buyers": member},
        "context": {"personas": {"computation_class": "audience", "computation_key": "vip_buyers"}},
    }


async def resync(users: int, memory: bool) -> dict[str, Any]:
    async with sandbox_subprocess(
        api_key=KEY, rate_limit=100, rate_window=10.0, batch_delay=0.0
    ) as sandbox:
        run = Run(sandbox.url, contact_memory=memory)
        await run.produce([audience(u, True) for u in range(users)])
        await run.start()
        first = await run.until_committed()
        before = len(await requests(sandbox.url))
        rng = random.Random(3)
        changed = set(rng.sample(range(users), users // 10))
        await run.produce([audience(u, u not in changed) for u in range(users)])
        seconds = await run.until_committed()
        sent = len(await requests(sandbox.url)) - before
        await run.stop()
        contacts = (await state(sandbox.url))["contacts"]
        wrong = sum(
            1
            for c in contacts
            if c["custom_properties"].get("vip_buyers") != (int(c["user_id"][1:]) not in changed)
        )
        return {"memory": memory, "first_sync_s": first, "resync_requests": sent,
                "resync_s": seconds, "contacts": len(contacts), "wrong": wrong}  # fmt: skip


def retried_stream(count: int, share: float, seed: int) -> list[tuple[bytes, Any]]:
    rng = random.Random(seed)
    out: list[tuple[bytes, Any]] = []
    for n in range(count):
        user = f"u{n % 50}"
        message = {"type": "track", "userId": user, "event": "Viewed", "messageId": f"m-{n}",
                   "context": {"traits": {"email": f"{user}@bench.example"}}}  # fmt: skip
        out.append((user.encode(), message))
        if rng.random() < share:
            out.append((user.encode(), message))
    return out


async def retries(events: int, redis_url: str | None) -> dict[str, Any]:
    async with sandbox_subprocess(
        api_key=KEY, rate_limit=0, rate_window=10.0, batch_delay=0.0
    ) as sandbox:
        settings = {"redis_url": redis_url} if redis_url else {}
        run = Run(sandbox.url, **settings)
        records = retried_stream(events, 0.15, seed=9)
        await run.produce(records)
        await run.start()
        await run.until_committed()
        await run.stop()
        first = len((await state(sandbox.url))["events"])
        await run.produce(records)  # the same records again, read by a new process
        await run.start()
        await run.until_committed()
        await run.stop()
        after = len((await state(sandbox.url))["events"])
        return {"redis": bool(redis_url), "records": len(records), "unique": events,
                "events_first_run": first, "events_after_restart": after}  # fmt: skip


async def main(args: argparse.Namespace) -> None:
    print(f"## Engage re-sync of {args.users:,} users, 90% unchanged, at 100 requests / 10 s\n")
    print("| contact memory | re-sync requests | re-sync time | first sync time | wrong values |")
    print("| --- | --- | --- | --- | --- |")
    for memory in (False, True):
        r = await resync(args.users, memory)
        print(f"| {'on' if memory else 'off'} | {r['resync_requests']} | {r['resync_s']:.1f} s "
              f"| {r['first_sync_s']:.1f} s | {r['wrong']} of {r['contacts']} |",
              flush=True)  # fmt: skip
    print(f"\n## {args.events:,} tracks, 15% sent twice by the producer; then replayed to a "
          "new process\n")  # fmt: skip
    print(
        "| Redis | records | events in Gist after the first run "
        "| after the replay to a new process |"
    )
    print("| --- | --- | --- | --- |")
    from processes import redis_subprocess

    with tempfile.TemporaryDirectory() as workdir:
        r = await retries(args.events, None)
        print(f"| no | {r['records']} | {r['events_first_run']} (of {r['unique']} unique) "
              f"| {r['events_after_restart']} |", flush=True)  # fmt: skip
        async with redis_subprocess(Path(workdir)) as redis:
            r = await retries(args.events, redis.url)
        print(f"| yes | {r['records']} | {r['events_first_run']} (of {r['unique']} unique) "
              f"| {r['events_after_restart']} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=2_000)
    asyncio.run(main(parser.parse_args()))
