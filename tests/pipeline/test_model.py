"""A randomised model test of the whole worker: random records, random Gist answers,
random rebalances, and after every step the invariant.

Each seed plays a random program against workers of one consumer group (in-process, on
the Kafka twin, Gist at the HTTP edge, see ``harness``): records are produced (single
messages and envelopes mixing skipped, rejected and valid messages, duplicates, records
that are not JSON, values over a megabyte, numbers out of range), Gist turns healthy,
flaky (5xx, 429, time-outs, bodies that are not JSON), odd (unknown batch statuses,
errors in every shape, imports without a batch id) or down, workers join, leave, crash,
and the group rebalances. After every step:

- every committed offset is below only records whose every message ended;
- no message ended twice in one worker, nor two different ways anywhere (each end is
  one its message may have: delivered, skipped, or dead-lettered with its reason);
- memory counters stay within the limits (messages, bytes plus one record, parked,
  uncommitted records per partition and in total);
- no component crashed.

At the end Gist recovers, and every message must end within a bounded time: the
whole topic is committed, each dead-lettered message is in the dead-letter topic with
its reason, and each user's contact holds the values of its last identify.

``MODEL_SEEDS`` (default 30) and ``MODEL_STEPS`` (default 40) set how much is played;
``MODEL_SEED`` the first seed. The nightly run plays far more:
``MODEL_SEEDS=300 MODEL_STEPS=80 ./dev test tests/pipeline/test_model.py``. A failure
names its seed: ``MODEL_SEED=<seed> MODEL_SEEDS=1`` plays it again.
"""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from destination.devtools.local_kafka import LocalProducer
from tests.pipeline.harness import Group, ModelGist, dead_letters, header, make_broker

SEEDS = int(os.environ.get("MODEL_SEEDS", "30"))
STEPS = int(os.environ.get("MODEL_STEPS", "40"))
FIRST_SEED = int(os.environ.get("MODEL_SEED", "0"))

LIMITS: dict[str, Any] = {
    "max_inflight_messages": 60,
    "max_inflight_per_partition": 40,
    "max_inflight_bytes": 256 * 1024,
    "max_awaiting_import": 50,
    "max_uncommitted_per_partition": 300,
    "max_uncommitted_total": 600,
    "gist_batch_size": 8,
}

Outcome = tuple[str, str | None]
DELIVERED_NOW_OR_BEFORE = {("delivered", None), ("skipped", "duplicate"), ("skipped", "unchanged")}
"""A message to deliver may also end as a duplicate (its id was delivered: a producer's
retry, or the same worker reading it again after a rebalance) or unchanged (Gist already
holds its values)."""
OUT_OF_RANGE = {("dead_lettered", "invalid_field"), ("dead_lettered", "internal_error")}


@dataclass
class Produced:
    """What the test sent, and what each message may end as."""

    expected: dict[tuple[int, int, int], set[Outcome]] = field(default_factory=dict)
    messages_in: dict[tuple[int, int], int] = field(default_factory=dict)  # record -> count
    # user -> the seqs Gist may end with: the last original identify's, and those of any
    # copy of an older one sent after it (without Redis, a worker that did not deliver
    # the original knows no better than to send the copy).
    final_seqs: dict[str, list[int]] = field(default_factory=dict)
    largest: int = 0


class Traffic:
    """Random Segment traffic with the outcome each message must have."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.seq = 0
        self.sent: list[tuple[bytes | None, bytes, list[set[Outcome]], dict[str, int]]] = []

    def _id(self) -> str:
        return uuid.UUID(int=self.rng.getrandbits(128)).hex

    def message(self) -> tuple[Any, set[Outcome], str | None, dict[str, int]]:
        """(message, its outcomes, the user it is keyed by, seq per user it sets)."""
        rng = self.rng
        self.seq += 1
        kind = rng.choices(
            ["identify", "track", "page", "anonymous", "bad", "reject", "range", "odd"],
            weights=[30, 25, 8, 6, 5, 4, 3, 3],
        )[0]
        if kind == "identify":
            user = f"g{rng.randrange(8)}"
            body = {
                "type": "identify",
                "userId": user,
                "messageId": self._id(),
                "traits": {"email": f"{user}@example.com", "seq": self.seq},
            }
            return body, DELIVERED_NOW_OR_BEFORE, user, {user: self.seq}
        if kind == "track":
            user = f"g{rng.randrange(8)}"
            body = {"type": "track", "userId": user, "event": "Viewed", "messageId": self._id()}
            return body, DELIVERED_NOW_OR_BEFORE, user, {}
        if kind == "page":
            user = f"g{rng.randrange(8)}"
            body = {"type": "page", "userId": user, "name": "Home"}
            return body, {("skipped", "type_off")}, user, {}
        if kind == "anonymous":
            body = {"type": "track", "event": "X", "messageId": self._id()}
            return body, {("dead_lettered", "missing_identity")}, None, {}
        if kind == "bad":  # Gist reports the contact failed inside a completed batch
            user = f"bad{self.seq}"
            body = {"type": "identify", "userId": user, "traits": {"email": f"bad{self.seq}@x.io"}}
            return body, {("dead_lettered", "batch_contact_error")}, user, {}
        if kind == "reject":  # Gist refuses any batch holding it: 400
            user = f"rej{self.seq}"
            traits = {"email": f"reject{self.seq}@x.io"}
            body = {"type": "identify", "userId": user, "traits": traits}
            return body, {("dead_lettered", "gist_rejected")}, user, {}
        if kind == "range":
            user = f"n{self.seq}"
            body = {"type": "identify", "userId": user, "timestamp": 1e300,
                    "traits": {"email": f"n{self.seq}@x.io"}}  # fmt: skip
            return body, OUT_OF_RANGE, user, {}
        body = rng.choice([42, "text", None, [1, 2]])  # not an object
        return body, {("dead_lettered", "not_an_object")}, None, {}

    def record(self) -> tuple[bytes | None, bytes, list[set[Outcome]], dict[str, int]]:
        """(key, value, each message's outcomes, seq per user)."""
        rng = self.rng
        if self.sent and rng.random() < 0.08:  # a producer retry: the same record again
            key, value, outcomes, seqs = rng.choice(self.sent)
            return key, value, outcomes, {user: -seq for user, seq in seqs.items()}
        shape = rng.choices(["single", "envelope", "junk", "huge"], weights=[60, 30, 6, 4])[0]
        if shape == "junk":
            value, outcome = rng.choice(
                [(b"{not json", ("dead_lettered", "invalid_json")),
                 (b"   ", ("dead_lettered", "empty_value"))]
            )  # fmt: skip
            made = (None, value, [{outcome}], {})
        elif shape == "huge":
            body = {"type": "track", "event": "X", "properties": {"pad": "x" * 1_100_000}}
            made = (None, orjson.dumps(body), [{("dead_lettered", "missing_identity")}], {})
        elif shape == "single":
            body, outcomes, user, seqs = self.message()
            key = None if user is None else user.encode()
            made = (key, orjson.dumps(body), [outcomes], seqs)
        else:
            # One user per envelope, so its key orders it with the user's other records.
            user = f"g{rng.randrange(8)}"
            bodies, outcomes, seqs = [], [], {}
            for _ in range(rng.randint(0, 6)):
                body, outcome, _user, seq = self.message()
                if isinstance(body, dict) and body.get("userId", "").startswith("g"):
                    body["userId"] = user
                    if "traits" in body:
                        body["traits"]["email"] = f"{user}@example.com"
                    seq = {user: next(iter(seq.values()))} if seq else {}
                bodies.append(body)
                outcomes.append(outcome)
                seqs.update(seq)
            envelope: dict[str, Any] = {"batch": bodies}
            made = (user.encode(), orjson.dumps(envelope), outcomes, seqs)
        self.sent.append(made)
        return made


class Run:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        token = uuid.UUID(int=self.rng.getrandbits(128)).hex[:6]
        self.topic, self.dlq = f"model-{token}", f"model-dlq-{token}"
        self.broker = make_broker(self.topic, self.dlq, partitions=3)
        self.gist = ModelGist(random.Random(seed + 1))
        self.group = Group(self.broker, self.topic, self.dlq, self.gist, **LIMITS)
        self.traffic = Traffic(self.rng)
        self.produced = Produced()
        self.history: list[str] = []

    async def produce(self, count: int) -> None:
        producer = LocalProducer(self.broker, max_request_size=8 * 1024 * 1024)
        await producer.start()
        for _ in range(count):
            key, value, outcomes, seqs = self.traffic.record()
            meta = await producer.send_and_wait(self.topic, value, key=key)
            where = (meta.partition, meta.offset)
            self.produced.messages_in[where] = len(outcomes)
            self.produced.largest = max(self.produced.largest, len(value))
            for index, outcome in enumerate(outcomes):
                at = -1 if value[:9] != b'{"batch":' else index
                self.produced.expected[(*where, at)] = outcome
            for user, seq in seqs.items():
                if seq > 0:  # an original
                    self.produced.final_seqs[user] = [seq]
                else:  # a copy: Gist may end with it only if no original came after
                    self.produced.final_seqs.setdefault(user, []).append(-seq)
        await producer.stop()

    async def step(self) -> None:
        rng, group = self.rng, self.group
        action = rng.choices(
            ["produce", "wait", "gist", "join", "leave", "crash", "rebalance"],
            weights=[30, 25, 12, 10, 7, 5, 8],
        )[0]
        if action == "join" and len(group.workers) >= 3:
            action = "wait"
        if action in ("leave", "crash") and not group.workers:
            action = "join"
        self.history.append(action)
        if action == "produce":
            await self.produce(rng.randint(1, 12))
        elif action == "wait":
            await asyncio.sleep(rng.uniform(0.01, 0.25))
        elif action == "gist":
            self.gist.mode = rng.choices(
                ["healthy", "flaky", "odd", "down"], weights=[45, 25, 20, 10]
            )[0]
            self.history[-1] += f":{self.gist.mode}"
        elif action == "join":
            await group.start_worker()
        elif action == "leave":
            assert await group.stop_worker(rng.choice(list(group.workers))) == 0
        elif action == "crash":
            await group.crash_worker(rng.choice(list(group.workers)))
        else:
            self.broker.rebalance(group.group_id)
            await asyncio.sleep(0)

    # --- the invariant -----------------------------------------------------------------
    def check(self) -> None:
        ends = self.group.ends.log
        expected = self.produced.expected
        for key, seen in ends.items():
            allowed = expected.get(key)
            assert allowed is not None, f"an end for a message never produced: {key}"
            for worker_id, how, reason in seen:
                assert (how, reason) in allowed, (
                    f"message {key} ended {how}/{reason} in worker {worker_id}; "
                    f"it may only end {sorted(map(str, allowed))}"
                )
        committed = self.group.committed()
        for (partition, offset), count in self.produced.messages_in.items():
            if offset >= committed.get(partition, 0):
                continue
            indices = [-1] if (partition, offset, -1) in expected else range(count)
            for index in indices:
                assert (partition, offset, index) in ends, (
                    f"offset {offset} of partition {partition} is committed "
                    f"({committed[partition]}) but message {index} never ended"
                )
        for worker, _, _ in self.group.workers.values():
            ledger = worker.ledger
            assert ledger.messages <= LIMITS["max_inflight_messages"], ledger.messages
            assert ledger.bytes <= LIMITS["max_inflight_bytes"] + self.produced.largest
            assert ledger.parked <= LIMITS["max_awaiting_import"], ledger.parked
            assert ledger.uncommitted <= LIMITS["max_uncommitted_total"], ledger.uncommitted
            for work in ledger.partitions.values():
                assert work.messages <= LIMITS["max_inflight_per_partition"]
                assert work.offsets.uncommitted <= LIMITS["max_uncommitted_per_partition"]
            assert worker._broken() is None, worker._broken()

    async def finish(self) -> None:
        """Gist recovers: every message must end, and the whole topic be committed."""
        self.gist.mode = "healthy"
        if not self.group.workers:
            await self.group.start_worker()
        await self.group.until_committed(within=60)
        self.check()
        await self.group.stop_all()
        ends = self.group.ends.log
        for key in self.produced.expected:
            assert key in ends, f"message {key} never ended"
        letters = {
            (
                int(header(r, "gist-dlq-source-partition") or b"-1"),
                int(header(r, "gist-dlq-source-offset") or b"-1"),
                int(header(r, "gist-dlq-envelope-index") or b"-1"),
            ): (header(r, "gist-dlq-reason") or b"").decode()
            for r in dead_letters(self.broker, self.dlq)
        }
        for key, seen in ends.items():
            _, how, reason = seen[-1]
            if how == "dead_lettered":
                assert letters.get(key) == reason, f"{key}: {reason} not in the DLQ"
        for user, seqs in self.produced.final_seqs.items():
            stored = self.gist.contacts.get(user, {}).get("custom_properties", {})
            assert stored.get("seq") in seqs, f"{user}: Gist holds {stored}, expected {seqs}"


@pytest.mark.parametrize("seed", range(FIRST_SEED, FIRST_SEED + SEEDS))
async def test_every_message_ends_once_and_only_ended_records_are_committed(seed: int) -> None:
    run = Run(seed)
    with capture_logs() as logs:
        try:
            await run.group.start_worker()
            for _ in range(STEPS):
                await run.step()
                run.check()
            await run.finish()
        except BaseException as error:
            await run.group.stop_all_quietly()
            raise AssertionError(f"seed {seed}, steps {run.history}: {error}") from error
    bugs = [e for e in logs if e["event"] in ("message.ended_twice", "worker.task_failed")]
    assert bugs == [], f"seed {seed}: {bugs[:3]}"
