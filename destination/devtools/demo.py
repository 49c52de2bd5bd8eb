"""``gist-destination demo``: the whole pipeline on one laptop, with one command.

It starts the embedded Kafka-protocol broker, the Gist sandbox, sends a sample stream of
Segment traffic to a topic, and runs the real worker (``gist-destination run`` in its own
process, talking Kafka and HTTP like in production) until every message is delivered or
dead-lettered, showing live progress from the worker's own ``/metrics``. At the end it
prints what reached the sandbox, what was dead-lettered and why, and where the metrics
were served.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from destination.devtools.broker import BrokerUnavailable, EmbeddedBroker, create_topics, free_port
from destination.devtools.children import die_with_parent
from destination.devtools.produce import produce
from destination.devtools.sample import DEMO_RULES, sample_stream
from destination.devtools.sandbox import DEFAULT_API_KEY, SandboxConfig, running_sandbox

TOPIC = "segment-events"
DLQ = "segment-events-dlq"
SUPPRESSIONS = "segment-events-suppressions"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=int, default=40, help="sample users to generate")
    parser.add_argument(
        "--rate-limit", type=int, default=100, help="the sandbox's requests per 10 s (Gist: 100)"
    )
    parser.add_argument(
        "--batch-delay",
        type=float,
        default=1.0,
        help="seconds a sandbox batch import stays queued, then in progress",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(".demo"),
        help="where the logs of the broker and the worker go",
    )
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the worker, broker and sandbox up until Ctrl-C",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after seconds")


def run(args: argparse.Namespace) -> int:
    args.workdir.mkdir(parents=True, exist_ok=True)
    broker = EmbeddedBroker(log_file=args.workdir / "broker.log")
    try:
        broker.start()
    except BrokerUnavailable as error:
        print(f"gist-destination demo: {error}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(_demo(args, broker))
    except KeyboardInterrupt:
        return 130
    finally:
        broker.stop()


def _say(text: str) -> None:
    print(text, flush=True)


async def _demo(args: argparse.Namespace, broker: EmbeddedBroker) -> int:
    bootstrap = broker.bootstrap_servers
    _say(f"1/4 embedded Kafka-protocol broker (Tansu) on {bootstrap}")
    await create_topics(bootstrap, [TOPIC, DLQ, SUPPRESSIONS], partitions=3)
    config = SandboxConfig(rate_limit=args.rate_limit, batch_delay=args.batch_delay)
    async with running_sandbox(config, port=free_port()) as sandbox:
        _say(f"2/4 Gist sandbox on {sandbox.url} (limit {args.rate_limit} requests / 10 s)")
        records = sample_stream(args.users)
        sent = await produce(bootstrap, TOPIC, records)
        _say(f"3/4 sent {sent} sample Segment messages to topic {TOPIC!r}")
        metrics_port = free_port()
        worker = _start_worker(args, bootstrap, sandbox.url, metrics_port)
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        _say(f"4/4 worker running (pid {worker.pid}); metrics on {metrics_url}")
        try:
            finished = await _watch(worker, metrics_url, sent, args.timeout)
            if args.keep_running and finished:
                _say("\nworker, broker and sandbox stay up; Ctrl-C to stop")
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.Event().wait()
        finally:
            code = await stop_worker(worker)
        await _summary(sandbox.url, bootstrap, metrics_url, args.workdir)
        if not finished:
            _say(f"\nthe worker did not finish (exit {code}); see {args.workdir}/worker.log")
            return 1
        return 0


def _start_worker(
    args: argparse.Namespace, bootstrap: str, gist_url: str, metrics_port: int
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "GIST_API_KEY": DEFAULT_API_KEY,
        "GIST_API_URL": gist_url,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_TOPICS": TOPIC,
        "KAFKA_GROUP_ID": "gist-destination-demo",
        "KAFKA_DLQ_TOPIC": DLQ,
        "KAFKA_SUPPRESSION_TOPIC": SUPPRESSIONS,
        "METRICS_PORT": str(metrics_port),
        "GIST_BATCH_POLL_INTERVAL": "0.5",
        "LOG_FORMAT": "json",
    }
    rules = args.workdir / "demo-rules.yaml"
    rules.write_text(DEMO_RULES, encoding="utf-8")
    env["MAPPING_CONFIG"] = str(rules)
    with (args.workdir / "worker.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "destination", "run"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )


def metric_totals(text: str) -> dict[str, float]:
    """Each sample of a ``/metrics`` page summed over its labels, by sample name."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


async def _watch(
    worker: subprocess.Popen[bytes], metrics_url: str, expected: int, within: float
) -> bool:
    started = time.monotonic()
    tty = sys.stdout.isatty()
    last_print = float("-inf")
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() - started < within:
            if worker.poll() is not None:
                _say(f"\nthe worker exited with {worker.returncode}")
                return False
            try:
                t = metric_totals((await http.get(metrics_url)).text)
            except httpx.HTTPError:
                await asyncio.sleep(0.5)
                continue
            p = "gist_destination_"
            consumed = int(t.get(p + "messages_consumed_total", 0))
            delivered = int(t.get(p + "messages_delivered_total", 0))
            dead = int(t.get(p + "messages_dead_lettered_total", 0))
            skipped = int(t.get(p + "messages_skipped_total", 0))
            in_flight = int(t.get(p + "messages_in_flight", 0))
            budget = t.get(p + "rate_limit_utilisation_ratio", 0.0)
            line = (
                f"[{time.monotonic() - started:5.1f}s] consumed {consumed}/{expected}  "
                f"delivered {delivered}  dead-lettered {dead}  skipped {skipped}  "
                f"in flight {in_flight}  budget in use {budget:4.0%}"
            )
            done = consumed >= expected and delivered + dead + skipped >= consumed
            if tty:
                print("\r" + line, end="", flush=True)
            elif done or time.monotonic() - last_print >= 2:
                _say(line)
                last_print = time.monotonic()
            if done:
                if tty:
                    print()
                return True
            await asyncio.sleep(0.5)
    _say(f"\ntimed out after {within} s")
    return False


async def stop_worker(worker: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM, up to a minute to drain, then SIGKILL; the exit code."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        for _ in range(600):
            if worker.poll() is not None:
                break
            await asyncio.sleep(0.1)
        else:
            worker.kill()
    return worker.wait()


async def _summary(gist_url: str, bootstrap: str, metrics_url: str, workdir: Path) -> None:
    async with httpx.AsyncClient(timeout=5) as http:
        state: dict[str, Any] = (await http.get(f"{gist_url}/_sandbox/state")).json()
    contacts = state["contacts"]
    kinds = Counter(c.get("type") for c in contacts)
    events = Counter(e["name"] for e in state["events"])
    audiences: Counter[str] = Counter()
    for contact in contacts:
        for key, value in (contact.get("custom_properties") or {}).items():
            if isinstance(value, bool) and key.endswith(("_buyers", "_risk", "_users")):
                audiences[f"{key}={str(value).lower()}"] += 1
    dead = await _dead_letter_reasons(bootstrap)
    _say("\nWhat reached the Gist sandbox:")
    _say(f"  contacts: {len(contacts)} ({', '.join(f'{n} {k}s' for k, n in kinds.items())})")
    _say(
        f"  events:   {sum(events.values())}: "
        + ", ".join(f"{n}x {k}" for k, n in events.most_common())
    )
    _say(
        "  audience properties: "
        + (", ".join(f"{k}: {n}" for k, n in sorted(audiences.items())) or "none")
    )
    for shop in state.get("ecommerce", {}).get("stores", []):
        carts = [c for c in shop["customers"] if c.get("cart")]
        _say(
            f"  e-commerce store {shop.get('name')!r}: {len(shop['customers'])} customers, "
            f"{len(shop['products'])} products, {len(carts)} carts, "
            f"{len(shop['orders'])} orders"
        )
        if shop["orders"]:
            order = shop["orders"][0]
            _say(
                f"  e.g. order {order.get('order_id')}: {order.get('order_total')} "
                f"{order.get('currency_code')}, {len(order.get('line_items') or [])} lines, "
                f"{order.get('financial_status')}"
            )
        if carts:
            cart = carts[0]["cart"]
            _say(
                f"  e.g. cart of {carts[0].get('customer_id')}: "
                f"{len(cart.get('line_items') or [])} lines, {cart.get('order_total')} "
                f"{cart.get('currency_code')}"
            )
    sample = next((c for c in contacts if c.get("custom_properties")), None)
    if sample is not None:
        props = sample["custom_properties"]
        _say(f"  e.g. contact {sample.get('user_id')}: custom_properties {props}")
    _say(
        f"Dead-lettered to {DLQ!r}: {sum(dead.values())} "
        + ("(" + ", ".join(f"{n}x {r}" for r, n in dead.items()) + ")" if dead else "")
    )
    stats = state["stats"]
    _say(f"Gist requests: {stats['requests']} ({stats['rate_limited']} answered 429)")
    _say(f"Metrics were served at {metrics_url}; logs are in {workdir}/")


async def _dead_letter_reasons(bootstrap: str) -> Counter[str]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        DLQ, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    reasons: Counter[str] = Counter()
    try:
        for _ in range(6):
            batch = await consumer.getmany(timeout_ms=300)
            for records in batch.values():
                for record in records:
                    reasons[dict(record.headers).get("gist-dlq-reason", b"?").decode()] += 1
            if not batch and reasons:
                break
    finally:
        await consumer.stop()
    return reasons
