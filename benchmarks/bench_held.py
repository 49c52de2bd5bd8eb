"""Bytes per held message, measured with tracemalloc (issue: a lean worker).

Opens N realistic identifies (benchmarks/bench_mapping.py's) the way the consumer does
(record, message, mapping, delivery), against a Gist at the HTTP edge that accepts every
batch import and never completes one: every message ends up *parked* (waiting only for
Gist's import). Reports the traced bytes per message while they are in flight (mapped,
waiting in the batcher) and once parked, and what holds them.

    .venv/bin/python benchmarks/bench_held.py --messages 20000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import sys
import tracemalloc
from pathlib import Path

import httpx
import orjson
from bench_mapping import identify

from destination.gist import GistClient, RateLimit, RateLimiter
from destination.mapping import Mapper, load_rules
from destination.operations import Mapped
from destination.pipeline.deliver import Delivery, DeliverySettings
from destination.pipeline.inflight import Failure, Ledger, MessageWork, TopicPartition
from destination.pipeline.memory import ContactMemory
from destination.pipeline.outcome import Outcomes


class NeverCompletes:
    def __init__(self) -> None:
        self.batches = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/contacts/batch":
            self.batches += 1
            return httpx.Response(200, json={"status": "QUEUED", "batch_id": f"b{self.batches}"})
        return httpx.Response(200, json={"status": "IN_PROGRESS"})


class Sink:
    async def write(self, message: MessageWork, failure: Failure) -> None:
        raise AssertionError(failure)


async def measure(count: int, memory: bool) -> dict[str, float]:
    rng = random.Random(5)
    mapper = Mapper(load_rules(None))
    values = [orjson.dumps(identify(rng, user, user)) for user in range(count)]
    ledger = Ledger()
    outcomes = Outcomes(ledger, Sink())
    partition = ledger.assign(TopicPartition("bench", 0))
    gist = NeverCompletes()
    client = GistClient(
        "k",
        base_url="http://gist.bench",
        transport=httpx.MockTransport(gist),
        limiter=RateLimiter(RateLimit(1_000_000, 1.0, 0.0, pace=False)),
    )
    delivery = Delivery(
        client,
        DeliverySettings(batch_max_contacts=500, batch_max_wait=3600.0, poll_interval=3600.0),
        outcomes,
        on_fatal=lambda error: None,
        memory=ContactMemory(86_400.0, 200_000) if memory else None,
    )
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for offset, value in enumerate(values):
        record = ledger.open_record(partition, offset, None, value, [])
        result = mapper.map(orjson.loads(value))
        assert isinstance(result, Mapped)
        message = ledger.open_message(record, None, result.message_type, None, None, None)
        ledger.seal(record)
        delivery.submit(message, result.operations)
    values.clear()
    gc.collect()
    in_flight = tracemalloc.get_traced_memory()[0] - base
    delivery.start()
    while ledger.parked < count:
        delivery.flush_now()
        await asyncio.sleep(0.01)
    delivery.flush_now(False)
    gc.collect()
    parked = tracemalloc.get_traced_memory()[0] - base
    snapshot = tracemalloc.take_snapshot()
    tracemalloc.stop()
    top = snapshot.statistics("lineno")[:8]
    await delivery.close()

    for stat in top:
        frame = stat.traceback[0]
        print(f"  {stat.size / count:8.1f} B/msg  {Path(frame.filename).name}:{frame.lineno}")
    return {"in_flight": in_flight / count, "parked": parked / count, "batches": gist.batches}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--no-memory", action="store_true", help="CONTACT_MEMORY off")
    args = parser.parse_args()
    result = asyncio.run(measure(args.messages, not args.no_memory))
    print(
        f"{args.messages} identifies: {result['in_flight']:.0f} bytes per message in flight "
        f"(record bytes included), {result['parked']:.0f} bytes per parked message "
        f"({result['batches']} batch imports)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
