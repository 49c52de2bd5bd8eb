"""The worker in-process on the Kafka twin, Gist at the HTTP edge: the ways a hostile
producer and a misbehaving API broke "every message ends, and only then is it
committed", each as it was reproduced."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import uuid
import weakref
from typing import Any

import httpx
import orjson
import pytest
from aiokafka.structs import TopicPartition
from structlog.testing import capture_logs

from destination import worker as worker_module
from destination.devtools.local_kafka import LocalKafkaClients
from destination.gist import GistError
from destination.pipeline import consume
from destination.pipeline.inflight import Ledger
from destination.settings import load_settings
from destination.worker import EXIT_CONFIG, Worker
from tests.contract.backends import Member
from tests.pipeline.harness import (
    Group,
    ModelGist,
    dead_letters,
    header,
    make_broker,
    produce,
)


def names() -> tuple[str, str]:
    token = uuid.uuid4().hex[:6]
    return f"segment-{token}", f"dlq-{token}"


def identify(user: str, **traits: Any) -> dict[str, Any]:
    return {
        "type": "identify",
        "userId": user,
        "messageId": uuid.uuid4().hex,
        "traits": {"email": f"{user}@example.com", **traits},
    }


def track(user: str, event: str = "Signed Up") -> dict[str, Any]:
    return {"type": "track", "userId": user, "event": event, "messageId": uuid.uuid4().hex}


async def until(condition: Any, within: float = 10.0) -> None:
    """Poll ``condition`` (state of other tasks: no event to wait on)."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - polling a condition on others' state
            await asyncio.sleep(0.02)


async def test_an_envelope_is_not_committed_before_all_its_messages_ended() -> None:
    """Regression (loss): an envelope whose first message is skipped, then a track and an
    identify, while Gist answers 5xx: the offset was committed at once and SIGTERM
    exited, so the track and the identify were neither in Gist nor in the DLQ."""
    topic, dlq = names()
    broker = make_broker(topic, dlq, partitions=1)
    gist = ModelGist(__import__("random").Random(1))
    gist.mode = "down"
    group = Group(broker, topic, dlq, gist, shutdown_timeout=0.5)
    envelope = {"batch": [{"type": "page", "userId": "u1", "name": "Home"}, track("u1"),
                          identify("u1", plan="pro")]}  # fmt: skip
    await produce(broker, topic, [(b"u1", envelope)])
    await group.start_worker()
    await asyncio.sleep(0.5)
    assert group.committed() == {0: 0}
    assert await group.stop_worker(1) == 0
    assert group.committed() == {0: 0}  # SIGTERM did not give it up as done
    assert dead_letters(broker, dlq) == []

    gist.mode = "healthy"
    await group.start_worker()
    await group.until_committed()
    await group.stop_all()
    assert [e["event_name"] for e in gist.events] == ["Signed Up"]
    assert gist.contacts["u1"]["custom_properties"]["plan"] == "pro"
    # Each message of the envelope ended once in the second worker, one way.
    assert sorted((k, v[-1][1]) for k, v in group.ends.log.items() if v[-1][0] == 2) == [
        ((0, 0, 0), "skipped"),
        ((0, 0, 1), "delivered"),
        ((0, 0, 2), "delivered"),
    ]


@pytest.mark.parametrize(
    "poison",
    [
        {"timestamp": 1e300},
        {"traits": {"email": "u1@example.com", "createdAt": 1e30}},
    ],
    ids=["timestamp-1e300", "createdAt-1e30"],
)
async def test_a_number_out_of_range_is_dead_lettered_and_the_contact_goes_on(
    poison: dict[str, Any],
) -> None:
    """Regression (stall): a number that maps beyond 64 bits made the client raise, the
    delivery task died, and the message, its contact's later work and its batch hung
    forever (and again after a restart)."""
    topic, dlq = names()
    broker = make_broker(topic, dlq, partitions=1)
    gist = ModelGist(__import__("random").Random(2))
    group = Group(broker, topic, dlq, gist)
    bad = {**identify("u1"), **poison}
    await produce(broker, topic, [(b"u1", bad), (b"u1", track("u1", "Later")),
                                  (b"u2", identify("u2"))])  # fmt: skip
    worker = await group.start_worker()
    await group.until_committed()
    assert worker._broken() is None
    await group.stop_all()
    (letter,) = dead_letters(broker, dlq)
    assert header(letter, "gist-dlq-reason") in (b"invalid_field", b"internal_error")
    assert [e["event_name"] for e in gist.events] == ["Later"]
    assert "u2" in gist.contacts


async def test_a_record_too_large_for_the_dead_letter_topic_is_written_truncated() -> None:
    """Regression (stall): a 1.2 MB rejected record got MessageSizeTooLargeError on every
    attempt; the partition never moved on."""
    topic, dlq = names()
    broker = make_broker(topic, dlq, partitions=1)
    group = Group(broker, topic, dlq, ModelGist(__import__("random").Random(3)))
    huge = {"type": "track", "event": "X", "properties": {"pad": "x" * 1_200_000}}  # no id
    await produce(broker, topic, [(b"k", huge), (b"u1", identify("u1"))])
    await group.start_worker()
    await group.until_committed()
    await group.stop_all()
    (letter,) = dead_letters(broker, dlq)
    assert letter.value == b""
    assert letter.key == b"k"
    assert header(letter, "gist-dlq-reason") == b"missing_identity"
    assert header(letter, "gist-dlq-value-omitted") == b"too_large"


async def test_huge_envelopes_never_put_more_in_flight_than_the_limit() -> None:
    """Regression (memory): backpressure was checked once per fetch turn and every
    message of a record opened at once: three 1 MB envelopes put 44,610 messages in
    flight against a limit of 20,000."""
    topic, dlq = names()
    broker = make_broker(topic, dlq, partitions=1)
    group = Group(
        broker,
        topic,
        dlq,
        ModelGist(__import__("random").Random(4)),
        max_inflight_messages=500,
        max_inflight_per_partition=500,
        gist_batch_size=200,
    )
    envelopes = [(b"k", {"batch": [identify(f"u{e}-{i}") for i in range(3000)]}) for e in range(3)]
    assert all(len(orjson.dumps(v)) > 300_000 for _, v in envelopes)
    await produce(broker, topic, envelopes)
    highest = 0
    opened = Ledger.open_message

    def watched(self: Ledger, *args: Any, **kwargs: Any) -> Any:
        nonlocal highest
        message = opened(self, *args, **kwargs)
        highest = max(highest, self.messages)
        return message

    Ledger.open_message = watched  # type: ignore[method-assign]
    try:
        await group.start_worker()
        await group.until_committed(within=60)
        await group.stop_all()
    finally:
        Ledger.open_message = opened  # type: ignore[method-assign]
    assert highest <= 500
    assert len(group.gist.contacts) == 9000


async def test_a_start_on_a_backlog_opens_in_turns_and_lets_the_event_loop_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression (a cold start): the consume loop opened every message the limits let
    in at once, tens of thousands on a backlog, and the limiter's grants, answers and
    polls waited for it (0.25-0.3 s stalls in the first window at the real limit). It
    yields every OPEN_AT_ONCE messages: another task runs between the turns."""
    monkeypatch.setattr(consume, "OPEN_AT_ONCE", 50)
    topic, dlq = names()
    broker = make_broker(topic, dlq, partitions=1)
    group = Group(broker, topic, dlq, ModelGist(__import__("random").Random(5)))
    await produce(broker, topic, [(b"k", identify(f"u{i}")) for i in range(1000)])
    seen: list[int] = []  # messages opened so far, each time the ticker ran
    opened = 0
    open_message = Ledger.open_message

    def counted(self: Ledger, *args: Any, **kwargs: Any) -> Any:
        nonlocal opened
        opened += 1
        return open_message(self, *args, **kwargs)

    async def ticker() -> None:
        while True:
            seen.append(opened)
            await asyncio.sleep(0)

    monkeypatch.setattr(Ledger, "open_message", counted)
    ticking = asyncio.create_task(ticker())
    try:
        await group.start_worker()
        await group.until_committed(within=60)
        await group.stop_all()
    finally:
        ticking.cancel()
    assert len(group.gist.contacts) == 1000
    # The ticker saw the opening part-way, in steps of at most two turns (a loop's last
    # turn and, when a fetch is ready at once, the next loop's first).
    steps = [b - a for a, b in itertools.pairwise(seen) if b > a]
    assert len([n for n in seen if 0 < n < 1000]) >= 10
    assert max(steps) <= 2 * 50


async def test_envelopes_count_for_their_decoded_size_and_open_one_at_a_time() -> None:
    """Regression (repro f7): every fetched record was decoded at once, before any bound
    applied, and an envelope counted for its bytes while its messages were held decoded
    (a 1 MB envelope of small messages decodes to some 25 MB). Now a record is decoded
    only when opened, counts for its decoded size, and opens only within the bound (or
    alone)."""
    topic, dlq = names()
    broker = make_broker(topic, dlq, partitions=1)
    bound = 1024 * 1024
    group = Group(
        broker,
        topic,
        dlq,
        ModelGist(__import__("random").Random(5)),
        max_inflight_bytes=bound,
        max_inflight_messages=100_000,
        max_inflight_per_partition=100_000,
    )
    envelopes = [(b"k", {"batch": [track(f"u{e}") for _ in range(4000)]}) for e in range(3)]
    sizes = [len(orjson.dumps(v)) for _, v in envelopes]
    assert all(size < bound for size in sizes)  # each fits in bytes, not decoded
    await produce(broker, topic, envelopes)
    decoded = 0
    most_decoded = 0
    largest_open = 0
    real_decode = __import__("destination.pipeline.consume", fromlist=["x"]).decode_record

    class Tracked(list):  # type: ignore[type-arg]
        def __del__(self) -> None:
            nonlocal decoded
            decoded -= 1

    def tracked_decode(value: bytes | None) -> tuple[list[Any], bool]:
        nonlocal decoded, most_decoded
        messages, enveloped = real_decode(value)
        decoded += 1
        most_decoded = max(most_decoded, decoded)
        return Tracked(messages), enveloped

    opened = Ledger.open_record

    def watched(self: Ledger, *args: Any, **kwargs: Any) -> Any:
        nonlocal largest_open
        record = opened(self, *args, **kwargs)
        largest_open = max(largest_open, self.bytes)
        return record

    consume = __import__("destination.pipeline.consume", fromlist=["x"])
    consume.decode_record = tracked_decode
    Ledger.open_record = watched  # type: ignore[method-assign]
    try:
        await group.start_worker()
        await group.until_committed(within=120)
        await group.stop_all()
    finally:
        consume.decode_record = real_decode
        Ledger.open_record = opened  # type: ignore[method-assign]
    estimate = __import__("destination.pipeline.decode", fromlist=["x"]).decoded_size(
        orjson.dumps(envelopes[0][1])
    )
    assert estimate > bound  # so each opened alone: the bound is passed by one record
    assert largest_open <= estimate + 1024, (largest_open, estimate)
    assert most_decoded == 1  # never two envelopes decoded at once
    assert len(group.gist.events) == 12_000


async def test_a_revoked_partition_sends_nothing_more_from_its_old_owner() -> None:
    """Regression (duplicates, stale writes): revoking a partition only flagged its work;
    the old owner kept sending (retries for hours) while the new owner sent the same."""
    topic, dlq = names()
    broker = make_broker(topic, dlq, partitions=2)
    seen: list[tuple[str, Any]] = []  # (worker, user) per event request
    held = asyncio.Event()
    gist = ModelGist(__import__("random").Random(5))

    class Tagged:
        def __init__(self, name: str) -> None:
            self.name = name

        async def __call__(self, request: httpx.Request) -> httpx.Response:
            if request.url.path == "/events":
                user = orjson.loads(request.content).get("user_id")
                seen.append((self.name, user))
                if self.name == "first" and not held.is_set():
                    return httpx.Response(503, json={"errors": []})  # retried, and again
            return gist(request)

    settings = {"rebalance_timeout": 0.3, "gist_retry_base": 0.05, "gist_retry_cap": 0.05}
    group = Group(broker, topic, dlq, gist, **settings)
    await produce(broker, topic, [(b"a", track("a"))], partition=0)
    await produce(broker, topic, [(b"b", track("b"))], partition=1)

    def worker(name: str) -> Worker:
        return Worker(
            load_settings(**group.settings),
            group.mapper,
            "model-key",
            kafka=LocalKafkaClients(broker),
            gist_transport=httpx.MockTransport(Tagged(name)),
        )

    first = worker("first")
    first_task = asyncio.create_task(first.serve())
    await until(lambda: len(seen) >= 4)  # both events failing and retried by "first"
    second = worker("second")
    second_task = asyncio.create_task(second.serve())
    await until(lambda: any(w == "second" for w, _ in seen))
    revoked_at = len(seen)
    owned = {tp.partition for tp in first.stream.consumer.assignment()} if first.stream else set()
    await asyncio.sleep(0.5)  # several retry intervals
    late = [user for w, user in seen[revoked_at:] if w == "first"]
    partition_of = {"a": 0, "b": 1}
    assert len(owned) == 1  # the other one went to the second worker
    (gone,) = {user for user, p in partition_of.items() if p not in owned}
    assert ("first", gone) in seen[:revoked_at]  # it was being retried before...
    assert gone not in late  # ...and not one request after the revocation
    held.set()
    first.request_stop()
    second.request_stop()
    assert await first_task == 0
    assert await second_task == 0


class _SlowToRejoin(Member):
    """A group member whose revocation takes ``delay`` seconds (so the group's rejoin
    does), counting the event requests Gist received meanwhile."""

    def __init__(self, broker: Any, group_id: str, seen: list[Any]) -> None:
        from destination.devtools.local_kafka import LocalConsumer

        super().__init__(
            "slow",
            LocalConsumer(
                broker,
                group_id=group_id,
                client_id="slow",
                partition_assignment_strategy=(consume.sticky_assignor(),),
            ),
        )
        self.seen = seen
        self.broker, self.group_id = broker, group_id
        self.delay = 0.0
        self.during: list[int] = []  # requests received while it held the rejoin
        self.commits: list[tuple[Any, Any]] = []  # the group's commits before, after
        self.watch: Any = None  # the partition whose commits to watch
        self.opened = asyncio.Event()

    async def on_partitions_revoked(self, revoked: set[Any]) -> None:
        await super().on_partitions_revoked(revoked)
        if revoked and self.delay:
            self.opened.set()  # the gate opens as the rebalance begins
            await asyncio.sleep(0.1)  # what was on the wire has answered by now
            before = len(self.seen)
            committed = self.broker.committed(self.group_id, self.watch)
            await asyncio.sleep(self.delay)
            self.during.append(len(self.seen) - before)
            self.commits.append((committed, self.broker.committed(self.group_id, self.watch)))


async def _rejoin_slowly(send_through: float, expel: bool = False) -> tuple[Any, ...]:
    """A worker with 40 tracks in each of two partitions held at Gist's door; a slow
    member joins and takes one (sticky: the worker keeps the other); a rebalance whose
    rejoin the slow member holds 1.5 s (``expel``: begun by expelling the worker, as
    Kafka does when its session times out); the gate opens as it begins. Returns (event
    requests during the rejoin, the kept partition's users in event requests, their
    prefix)."""
    topic, dlq = names()
    broker = make_broker(topic, dlq, partitions=2)
    gist = ModelGist(__import__("random").Random(7))
    gate = asyncio.Event()
    seen: list[Any] = []

    async def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/events":
            await gate.wait()
            seen.append(orjson.loads(request.content)["user_id"])
        return gist(request)

    group = Group(
        broker, topic, dlq, gist, rebalance_timeout=0.3, rebalance_send_through=send_through
    )
    for partition in (0, 1):
        tracks = [(b"k", track(f"p{partition}-{i}")) for i in range(40)]
        await produce(broker, topic, tracks, partition=partition)
    worker = Worker(
        load_settings(**group.settings),
        group.mapper,
        "model-key",
        kafka=LocalKafkaClients(broker),
        gist_transport=httpx.MockTransport(answer),
    )
    task = asyncio.create_task(worker.serve())
    await until(lambda: worker.stream is not None and bool(worker.stream.ledger.partitions))
    assert worker.stream is not None
    slow = _SlowToRejoin(broker, group.settings["kafka_group_id"], seen)
    await slow.join(topic)
    await broker.wait_stable(group.settings["kafka_group_id"])
    (kept,) = [tp.partition for tp in worker.stream.ledger.partitions]  # sticky: one kept
    slow.watch = TopicPartition(topic, kept)
    slow.delay = 1.5
    if expel:
        broker.expel(worker.stream.consumer)
    else:
        broker.rebalance(group.settings["kafka_group_id"])
    await slow.opened.wait()
    gate.set()
    await broker.wait_stable(group.settings["kafka_group_id"])
    mine = f"p{kept}-"
    await until(lambda: sum(1 for u in seen if u.startswith(mine)) >= 40, within=20)
    worker.request_stop()
    assert await task == 0
    await slow.consumer.stop()
    # Not one commit while the group rejoined (Kafka refuses it, and aiokafka then rejoins
    # once more); the work that ended meanwhile was committed after the assignment.
    assert all(before == after for before, after in slow.commits), slow.commits
    assert broker.committed(group.settings["kafka_group_id"], slow.watch) == 40
    return slow.during, sorted(u for u in seen if u.startswith(mine)), mine


async def test_a_member_goes_on_sending_while_the_group_rejoins() -> None:
    """Regression (issue 18, a rolling restart at 62 % of the budget): at a revocation
    the worker stopped sending until the assignment, and each rejoin (5-10 s on Tansu,
    a heartbeat interval and more on Kafka) sent nothing at all. Now what was opened goes
    on being sent while the group rejoins; the partition kept, nothing is read again."""
    during, seen, mine = await _rejoin_slowly(send_through=20.0)
    assert during, "the slow member never held a rejoin"
    assert during[0] >= 20, during  # most of the 40 went out during the rejoin
    assert seen == sorted(f"{mine}{i}" for i in range(40))  # each once


async def test_sending_through_a_rejoin_stops_after_send_through() -> None:
    """A rejoin longer than REBALANCE_SEND_THROUGH (0 here, as an operator without
    Redis may choose): Kafka could expel the member and give its partitions away, so
    sending stops (as if they went) until the assignment, which resumes the partition
    kept: nothing lost, nothing sent twice."""
    during, seen, mine = await _rejoin_slowly(send_through=0.0)
    assert during[0] == 0, during  # nothing sent while the slow member held the rejoin
    assert seen == sorted(f"{mine}{i}" for i in range(40))


async def test_an_expelled_member_stops_sending_at_once() -> None:
    """A member Kafka expelled (its session timed out: a Kafka it could not reach, a
    stalled process) learns it at the next rebalance: its partitions are another's
    already, or soon, and sending through the rejoin would have two owners write the
    same contacts at once. It stops at the revocation; the assignment resumes what it
    keeps, nothing lost, nothing sent twice."""
    during, seen, mine = await _rejoin_slowly(send_through=20.0, expel=True)
    assert during, "the slow member never held a rejoin"
    assert during[0] == 0, during
    assert seen == sorted(f"{mine}{i}" for i in range(40))


async def test_a_replica_taking_released_partitions_uses_its_share_without_a_window() -> None:
    """Regression (issue 18, a rolling restart without Redis at 73 % of the budget): a
    replica that took partitions held its share of the budget for a whole window after
    its assignment, even when their previous owner had stopped long before. A stopping
    worker's last commit now says when it released them; the next owner's share grows a
    window after that. A killed owner releases nothing: its successor waits
    ``GROWTH_DELAY``, or the window when shorter (1 s here)."""
    from destination.gist._limiter import RESERVE
    from destination.pipeline.consume import RELEASED

    topic, dlq = names()
    broker = make_broker(topic, dlq, partitions=2)
    gist = ModelGist(__import__("random").Random(8))
    group = Group(broker, topic, dlq, gist, gist_rate_window=1.0)
    for partition in (0, 1):
        await produce(broker, topic, [(b"k", track(f"u{partition}"))], partition=partition)
    await group.start_worker()
    await group.until_committed(within=10)
    assert await group.stop_worker(1) == 0
    tps = [TopicPartition(topic, p) for p in range(2)]
    group_offsets = broker._groups[group.group_id].committed
    assert all(group_offsets[tp].metadata.startswith(RELEASED) for tp in tps)
    await asyncio.sleep(2.2)  # more than a window (and the clock skew allowed) since
    second = await group.start_worker()
    whole = second.settings.gist_rate_limit - RESERVE
    assert second.limiter.current_limit == whole  # at once, not a window later
    assert all(group_offsets[tp].metadata == "" for tp in tps)  # the release is taken
    await group.crash_worker(2)
    await asyncio.sleep(2.2)
    third = await group.start_worker()
    assert third.limiter.current_limit == RESERVE  # a kill: nothing says when it stopped
    await group.stop_all()


async def test_every_release_found_is_cleared_even_when_not_all_partitions_had_one() -> None:
    """A new owner of partitions some of which were released, some never consumed, waits
    for its share as if none were (it cannot say when all were quiet) but clears the
    releases it found: one left behind would tell a later owner that a partition was
    quiet while this one sent for it."""
    from destination.pipeline.consume import RELEASED

    topic, dlq = names()
    broker = make_broker(topic, dlq, partitions=2)
    gist = ModelGist(__import__("random").Random(10))
    group = Group(broker, topic, dlq, gist)
    await produce(broker, topic, [(b"k", track("only-0"))], partition=0)
    await group.start_worker()
    await group.until_committed(within=10)
    assert await group.stop_worker(1) == 0
    offsets = broker._groups[group.group_id].committed
    p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    assert offsets[p0].metadata.startswith(RELEASED)
    assert p1 not in offsets  # never consumed: nothing committed, nothing released
    await group.start_worker()
    assert offsets[p0].metadata == ""
    await group.stop_all()


async def test_a_partition_taken_from_a_live_member_opens_after_the_rebalance_timeout() -> None:
    """A member sends through the rejoin and stops at the assignment, its requests on the
    wire then get REBALANCE_TIMEOUT to answer: the new owner of a partition it loses
    opens nothing before that, or two owners would write the same contacts at once (the
    older write could land last). A partition nobody consumed opens at once."""
    topic, dlq = names()
    broker = make_broker(topic, dlq, partitions=2)
    gist = ModelGist(__import__("random").Random(9))
    sent: list[tuple[int, str, float]] = []  # (worker, user, when)
    loop = asyncio.get_running_loop()

    def transport(worker_id: int) -> httpx.MockTransport:
        def answer(request: httpx.Request) -> httpx.Response:
            if request.url.path == "/events":
                user = orjson.loads(request.content)["user_id"]
                sent.append((worker_id, user, loop.time()))
            return gist(request)

        return httpx.MockTransport(answer)

    group = Group(broker, topic, dlq, gist, transport_for=transport, rebalance_timeout=1.0)
    for partition in (0, 1):
        await produce(broker, topic, [(b"k", track(f"first-{partition}"))], partition=partition)
    first = await group.start_worker()  # nobody consumed these: they open at once
    await group.until_committed(within=10)
    assert {user for _, user, _ in sent} == {"first-0", "first-1"}
    await group.start_worker()
    assigned = loop.time()
    (kept,) = [tp.partition for tp in first.stream.ledger.partitions] if first.stream else [None]
    moved = 1 - kept
    await produce(broker, topic, [(b"k", track("later"))], partition=moved)
    await until(lambda: any(user == "later" for _, user, _ in sent), within=10)
    ((worker, _, when),) = [s for s in sent if s[1] == "later"]
    assert worker == 2
    # The hold starts inside the assignment callback; start_worker sees it end within
    # 10 ms of polling.
    assert when - assigned >= 0.95, when - assigned
    await group.stop_all()


async def test_a_missing_dead_letter_topic_stops_start_up_with_a_clear_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    topic, dlq = names()
    broker = make_broker(topic, dlq, partitions=1)
    settings = {**Group(broker, topic, dlq, ModelGist(__import__("random").Random(6))).settings}
    settings["kafka_dlq_topic"] = "no-such-topic"
    worker = Worker(
        load_settings(**settings),
        Group(broker, topic, dlq, ModelGist(__import__("random").Random(6))).mapper,
        "model-key",
        kafka=LocalKafkaClients(broker),
        gist_transport=httpx.MockTransport(ModelGist(__import__("random").Random(6))),
    )
    assert await worker.serve() == EXIT_CONFIG
    assert "KAFKA_DLQ_TOPIC" in capsys.readouterr().err
    broker.create_topic("forbidden-dlq", 1)
    broker.forbid("forbidden-dlq")
    settings["kafka_dlq_topic"] = "forbidden-dlq"
    worker = Worker(
        load_settings(**settings),
        Group(broker, topic, dlq, ModelGist(__import__("random").Random(6))).mapper,
        "model-key",
        kafka=LocalKafkaClients(broker),
        gist_transport=httpx.MockTransport(ModelGist(__import__("random").Random(6))),
    )
    assert await worker.serve() == EXIT_CONFIG
    assert "not authorised" in capsys.readouterr().err


async def test_cycles_are_freed_while_the_worker_runs_even_with_automatic_collections_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression (memory): with the worker's collector thresholds a full collection
    came minutes apart, and aiokafka leaves the fetched records of each partition paused
    by backpressure in a cycle that keeps the whole fetch response (~5 MB with Tansu):
    RSS grew 1.5 MB/s at the real limit. Housekeeping runs a full collection every
    ``Worker.full_collection_every`` seconds."""

    class Buffer:
        def __init__(self) -> None:
            self.itself = self  # a cycle: reference counting alone never frees it

    topic, dlq = names()
    broker = make_broker(topic, dlq, partitions=1)
    group = Group(broker, topic, dlq, ModelGist(__import__("random").Random(5)))
    monkeypatch.setattr(Worker, "full_collection_every", 0.2)
    gc.collect()
    gc.disable()
    try:
        await group.start_worker()
        buffer = Buffer()
        freed = weakref.ref(buffer)
        del buffer
        await until(lambda: freed() is None, within=5)
        assert await group.stop_worker(1) == 0
    finally:
        gc.enable()
        await group.stop_all_quietly()


def test_a_long_full_collection_spaces_the_next_out() -> None:
    """Regression (budget): a full collection stops the event loop, the limiter's
    grants included; at the real limit with 17,500 events waiting one took 0.4 s, every
    10 s: 4% of the budget. The next comes after a hundred times what the last took
    (within 10-60 s), so collections take at most 1% of the time."""
    assert Worker.collection_spacing(0.02) == Worker.full_collection_every == 10.0
    assert Worker.collection_spacing(0.4) == pytest.approx(40.0)
    assert Worker.collection_spacing(5.0) == Worker.full_collection_most_every == 60.0


class TagsRefused(ModelGist):
    """ModelGist refusing every ``POST /tags`` (400) while ``refuse`` is set."""

    def __init__(self) -> None:
        super().__init__(__import__("random").Random(6))
        self.refuse = True
        self.tags: list[Any] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/tags":
            if self.refuse:
                return httpx.Response(400, json={"errors": [{"code": "invalid"}]})
            self.tags.append(orjson.loads(request.content))
            return httpx.Response(200, json={})
        return super().__call__(request)


async def replay_dead_letters(broker: Any, dlq: str, topic: str) -> int:
    """What ``gist-destination replay`` does with each dead letter (its own ``_copy``)."""
    from destination.commands.replay import Filter, Summary, _copy
    from destination.devtools.local_kafka import LocalProducer

    producer = LocalProducer(broker, max_request_size=8 * 1024 * 1024)
    await producer.start()
    summary = Summary()
    sends = []
    for record in dead_letters(broker, dlq):
        sends += _copy(record, dlq, topic, Filter(), summary, False, producer)
    await asyncio.gather(*sends)
    await producer.stop()
    return sum(summary.copied.values())


@pytest.mark.parametrize("with_id", [True, False], ids=["messageId", "no_messageId"])
async def test_a_replayed_message_that_partly_succeeded_sends_only_the_rest_once(
    tmp_path: Any, with_id: bool
) -> None:
    """Regression: a message whose event was delivered but whose tag change failed was
    dead-lettered whole, and a replay sent the event again; and "replay ... safe to run
    twice" held only for messages with a messageId (one without, replayed twice, made two
    events). Now each operation is recorded under the message's id (one given from where
    it was read when it has none, which replay writes into it): replayed twice, the event
    is not sent again and the tag change goes once."""
    from destination.mapping import Mapper, load_rules

    rules = tmp_path / "rules.yaml"
    rules.write_text('tags:\n  events:\n    - event: "Order Completed"\n      tag: buyer\n')
    topic, dlq = names()
    broker = make_broker(topic, dlq, partitions=1)
    gist = TagsRefused()
    group = Group(broker, topic, dlq, gist)
    group.mapper = Mapper(load_rules(rules))
    message = track("u1", "Order Completed")
    if not with_id:
        del message["messageId"]
    await produce(broker, topic, [(b"u1", message)])
    await group.start_worker()
    await group.until_committed()
    assert [header(r, "gist-dlq-reason") for r in dead_letters(broker, dlq)] == [b"gist_rejected"]
    assert [e["event_name"] for e in gist.events] == ["Order Completed"]
    gist.refuse = False  # the cause is fixed: replay, twice
    for _ in range(2):
        assert await replay_dead_letters(broker, dlq, topic) == 1
        await group.until_committed()
    await group.stop_all()
    assert [e["event_name"] for e in gist.events] == ["Order Completed"]  # not again
    assert gist.tags == [{"name": "buyer", "contacts": [{"user_id": "u1"}]}]


class HeldImports(ModelGist):
    """ModelGist whose batch imports stay IN_PROGRESS while ``hold`` is set."""

    def __init__(self) -> None:
        super().__init__(__import__("random").Random(7))
        self.hold = True
        self.imports = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/contacts/batch":
            self.imports += 1
        if path.startswith("/contacts/batch/") and self.hold:
            return httpx.Response(200, json={"status": "IN_PROGRESS"})
        return super().__call__(request)


async def test_a_rebalance_keeps_the_work_of_partitions_that_stay() -> None:
    """Regression: every rebalance (aiokafka's eager protocol revokes every partition)
    drained for REBALANCE_TIMEOUT, abandoned what had not ended and read it again:
    contacts imported twice, 20 s at half the budget. Now a member keeps its partitions
    (sticky assignor) and their work: a contact waiting for its import when the group
    rebalances ends once its import completes, without being read or sent again."""
    topic, dlq = names()
    broker = make_broker(topic, dlq, partitions=2)
    gist = HeldImports()
    group = Group(broker, topic, dlq, gist, rebalance_timeout=5.0)
    await produce(broker, topic, [(b"u1", identify("u1", plan="pro")), (b"u2", track("u2"))])
    await group.start_worker()
    await until(lambda: gist.imports == 1 and len(gist.events) == 1)
    opened = sum(1 for seen in group.ends.log.values() for _ in seen)
    broker.rebalance(group.group_id)
    async with asyncio.timeout(10):
        await broker.wait_stable(group.group_id)
    gist.hold = False
    await group.until_committed(within=10)
    await group.stop_all()
    assert gist.imports == 1  # not sent again
    assert len(gist.events) == 1
    ends = [how for seen in group.ends.log.values() for _, how, _ in seen]
    assert ends == ["delivered", "delivered"]  # each message ended once, not read again
    assert opened == 1  # the track had ended before the rebalance, the contact had not
    assert gist.contacts["u1"]["custom_properties"]["plan"] == "pro"


async def test_a_partition_that_goes_is_handed_over_and_its_work_not_sent_twice() -> None:
    """Two workers: the second's arrival moves a partition; the first sends nothing more
    for it once the rebalance begins, and the new owner delivers what had not ended."""
    topic, dlq = names()
    broker = make_broker(topic, dlq, partitions=2)
    gist = HeldImports()
    group = Group(broker, topic, dlq, gist, rebalance_timeout=1.0)
    await produce(broker, topic, [(b"k", identify(f"u{i}")) for i in range(6)], partition=0)
    await produce(broker, topic, [(b"k", identify(f"v{i}")) for i in range(6)], partition=1)
    first = await group.start_worker()
    await until(lambda: gist.imports >= 1)
    await group.start_worker()
    async with asyncio.timeout(20):
        await broker.wait_stable(group.group_id)
    assert len(first.ledger.partitions) == 1  # sticky: it kept one, gave one
    gist.hold = False
    await group.until_committed(within=20)
    await group.stop_all()
    # The first import (both partitions' contacts), and the new owner's of the
    # partition that went: the kept partition's contacts were not sent again.
    assert gist.imports == 2
    for user in [f"u{i}" for i in range(6)] + [f"v{i}" for i in range(6)]:
        assert user in gist.contacts


async def test_a_stop_with_a_backlog_ends_within_the_shutdown_timeout() -> None:
    """Regression: with a backlog, SIGTERM did not exit within 20 s, and SHUTDOWN_TIMEOUT
    (30 s, Kubernetes' default grace period) bounded the drain alone, so a pod was often
    killed before it committed. SHUTDOWN_TIMEOUT now bounds the whole stop: drain,
    commit, hand-over, clients; what did not end stays uncommitted."""
    topic, dlq = names()
    broker = make_broker(topic, dlq, partitions=2)
    gist = HeldImports()  # imports never complete: the drain cannot finish
    group = Group(broker, topic, dlq, gist, shutdown_timeout=3.0)
    await produce(broker, topic, [(f"u{i}".encode(), identify(f"u{i}")) for i in range(40)])
    await produce(broker, topic, [(b"e", track("e1"))])
    worker_id = max(group.workers) + 1 if group.workers else 1
    await group.start_worker()
    await until(lambda: gist.imports >= 1 and len(gist.events) == 1)
    started = asyncio.get_running_loop().time()
    assert await group.stop_worker(worker_id) == 0
    took = asyncio.get_running_loop().time() - started
    assert took <= 3.0 + 1.0, took
    committed = group.committed()
    ended_offsets = {(p, o) for (p, o, _), seen in group.ends.log.items() if seen}
    # Only ended records are committed; the contacts still importing are not.
    for partition, offset in committed.items():
        assert all((partition, o) in ended_offsets for o in range(offset))
    assert sum(committed.values()) < 41


class SlowEvents(httpx.AsyncBaseTransport):
    """ModelGist behind a transport whose answers to events take ``delay`` seconds."""

    def __init__(self, gist: ModelGist, delay: float) -> None:
        self.gist = gist
        self.delay = delay

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/events":
            await asyncio.sleep(self.delay)
        await request.aread()
        return self.gist(request)


async def test_a_stop_commits_what_was_on_the_wire_when_the_drain_ended() -> None:
    """Regression (duplicates at a rolling deploy without Redis): at the drain's end
    the last commit came first and the requests still on the wire answered after it, in
    the hand-over: Gist had those events, their records were not committed, and the
    next owner sent them again. Now nothing more is sent, what is on the wire answers,
    then the commit: every event Gist holds is below the committed offset."""
    topic, dlq = names()
    broker = make_broker(topic, dlq, partitions=1)
    gist = ModelGist(__import__("random").Random(9))
    group = Group(
        broker,
        topic,
        dlq,
        gist,
        shutdown_timeout=3.0,
        transport_for=lambda _: SlowEvents(gist, 0.3),
    )
    await produce(broker, topic, [(b"k", track(f"e{i}")) for i in range(2000)])
    await group.start_worker()
    await until(lambda: len(gist.events) >= 10)
    assert await group.stop_worker(1) == 0
    committed = group.committed()[0]
    sent = sorted(int(str(e["user_id"])[1:]) for e in gist.events)
    assert 0 < committed < 2000  # the drain could not finish
    assert sent[-1] < committed, (sent[-5:], committed)


class DeletingGist(ModelGist):
    """ModelGist that deletes contacts (DELETE /contacts?user_id=)."""

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "DELETE" and request.url.path == "/contacts":
            user = request.url.params.get("user_id") or request.url.params.get("email")
            if self.contacts.pop(str(user), None) is None:
                return httpx.Response(404, json={"errors": [{"code": "not_found"}]})
            return httpx.Response(200, json={})
        return super().__call__(request)


async def test_a_deleted_person_stays_deleted_through_late_messages_restarts_and_replays() -> None:
    """Regression: a delete removed the contact, and the next replay, group reset or late
    message created it again. Now every identity the delete carried is suppressed for
    SUPPRESS_DELETED_DAYS, in a compacted topic every worker reads at start: later
    messages are skipped (suppressed), also by a new worker reading the topic from the
    start; the topic holds hashes, not the identities."""
    topic, dlq = names()
    broker = make_broker(topic, dlq, partitions=2)
    gist = DeletingGist(__import__("random").Random(8))
    group = Group(broker, topic, dlq, gist)
    person = "Secret.Person@example.com"
    await produce(broker, topic, [
        (b"u1", identify("u1", plan="pro")),
        (b"u1", {"type": "delete", "userId": "u1", "messageId": uuid.uuid4().hex,
                 "context": {"traits": {"email": person}}}),
        (b"u1", identify("u1", plan="late")),
        (b"u1", track("u1", "Came Back")),
    ], partition=0)  # fmt: skip
    await group.start_worker()
    await group.until_committed()
    assert "u1" not in gist.contacts
    assert gist.events == []
    reasons_seen = [r for seen in group.ends.log.values() for _, _, r in seen]
    assert reasons_seen.count("suppressed") == 2
    await group.stop_all()
    # A message by e-mail only, on the other partition, after a restart: suppressed too.
    by_email = {"type": "identify", "messageId": uuid.uuid4().hex, "traits": {"email": person}}
    await produce(broker, topic, [(b"e", by_email)], partition=1)
    await group.start_worker()
    await group.until_committed()
    await group.stop_all()
    assert person.lower() not in gist.contacts
    # The whole topic read again by a new group (a reset): nothing comes back.
    again = Group(broker, topic, dlq, gist)
    again.group_id = f"reset-{topic}"
    again.settings["kafka_group_id"] = again.group_id
    await again.start_worker()
    await again.until_committed()
    await again.stop_all()
    assert "u1" not in gist.contacts
    suppressions = broker.records(f"{dlq}-suppressions", 0)
    assert len({r.key for r in suppressions}) == 2  # the user id and the e-mail
    raw = b"".join((r.key or b"") + (r.value or b"") for r in suppressions)
    assert b"u1" not in raw.replace(b'"u"', b"")
    assert b"example.com" not in raw.lower()


async def test_a_workspace_lookup_gist_cannot_answer_ends_the_start_with_an_error(
    tmp_path: Any,
) -> None:
    """The rules name a subscription type; Gist answers its list with pages of HTML. The
    start ends with the error, logged as ``gist.unreachable`` like a key check that
    could not be answered (it was an unlogged traceback), without the key."""
    topic, dlq = names()
    broker = make_broker(topic, dlq, partitions=1)
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nconsent:\n  email: Email\n  subscription_types: {Newsletter: Email}\n"
    )

    def gist(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token/info":
            return httpx.Response(200, json={"workspace_id": "w-1"})
        if request.url.path == "/subscription_types":
            return httpx.Response(200, text="<html>maintenance</html>")
        return httpx.Response(404, json={"errors": []})

    group = Group(broker, topic, dlq, gist, rules=rules)
    with capture_logs() as logs:
        try:
            await group.start_worker()
        except GistError as error:
            failed: BaseException = error
        else:  # it joined the group before it gave up on the list
            _, task, _ = group.workers.pop(1)
            with pytest.raises(GistError) as caught:
                await task
            failed = caught.value
    assert "not JSON" in str(failed)
    unreachable = [e for e in logs if e["event"] == "gist.unreachable"]
    assert len(unreachable) == 1
    assert "GET /subscription_types" in unreachable[0]["error"]
    assert group.settings["gist_api_key"] not in str(logs)


async def test_a_housekeeping_turn_that_does_not_end_cannot_hold_a_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Housekeeping once lost its cancellation (``asyncio.wait_for`` on Python 3.11) and
    the stop waited for it, up to Kubernetes' SIGKILL. Whatever it awaits, the stop
    goes on after a bounded wait, and the last commit is made."""
    topic, dlq = names()
    broker = make_broker(topic, dlq, partitions=1)
    group = Group(broker, topic, dlq, ModelGist(__import__("random").Random(2)),
                  shutdown_timeout=1.0)  # fmt: skip

    over = asyncio.Event()  # the test's end: the deaf loop may end then

    async def deaf_housekeeping(self: Worker, stream: Any) -> None:
        while not over.is_set():  # a loop that lost its cancellation
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.05)

    monkeypatch.setattr(Worker, "_housekeeping", deaf_housekeeping)
    await produce(broker, topic, [(b"u1", identify("u1", plan="pro"))])
    await group.start_worker()
    await until(lambda: group.ends.log)
    stopped = await _stop_within(group, 1, 1.0 + 6.0, over)
    assert stopped, "the stop waited for a housekeeping turn that did not end"
    assert group.committed() == {0: 1}


async def _stop_within(group: Group, worker_id: int, bound: float, over: asyncio.Event) -> bool:
    """Stop the worker and wait ``bound`` seconds for it; then let its deaf task go
    (``over``) either way, so that a stop it held fails at once, not at pytest's
    time-out. True when it stopped in time, with exit code 0."""
    stopping = asyncio.create_task(group.stop_worker(worker_id))
    try:
        done, _ = await asyncio.wait({stopping}, timeout=bound)
    finally:
        over.set()
    if stopping not in done:
        await asyncio.wait({stopping}, timeout=30)
        return False
    return stopping.result() == 0


async def test_a_consume_loop_that_crashes_in_its_last_turn_still_lets_the_stop_commit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stop asked first, then the loop's last turn raised (a bug): what ended is
    still committed and handed over, and the crash is the stop's result, not lost."""
    topic, dlq = names()
    broker = make_broker(topic, dlq, partitions=1)
    # Commits come only from the stop (what the crash would have skipped).
    group = Group(broker, topic, dlq, ModelGist(__import__("random").Random(3)),
                  shutdown_timeout=1.0, commit_interval=600.0)  # fmt: skip
    run = consume.StreamConsumer.run

    async def run_then_crash(self: consume.StreamConsumer) -> None:
        await run(self)  # ends when the stop is asked
        raise RuntimeError("a bug in the loop's last turn")

    monkeypatch.setattr(consume.StreamConsumer, "run", run_then_crash)
    await produce(broker, topic, [(b"u1", identify("u1", plan="pro"))])
    await group.start_worker()
    await until(lambda: group.ends.log)
    with capture_logs() as logs, pytest.raises(RuntimeError, match="last turn"):
        await group.stop_worker(1)
    assert group.committed() == {0: 1}
    assert any(e["event"] == "worker.task_failed" for e in logs), [e["event"] for e in logs]


async def test_a_start_up_step_deaf_to_its_cancellation_cannot_hold_a_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stop during start-up cancels the step under way (here the workspace's
    preparation); one that does not end on it is waited for a bounded time, then the
    worker closes (the old ``suppress(CancelledError): await`` waited for ever)."""
    topic, dlq = names()
    broker = make_broker(topic, dlq, partitions=1)
    group = Group(broker, topic, dlq, ModelGist(__import__("random").Random(4)),
                  shutdown_timeout=1.0)  # fmt: skip
    over = asyncio.Event()
    preparing = asyncio.Event()

    async def deaf_prepare(*args: Any, **kwargs: Any) -> Any:
        preparing.set()
        while not over.is_set():  # a step that lost its cancellation
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.05)

    monkeypatch.setattr(worker_module, "prepare", deaf_prepare)
    await group.start_worker()
    async with asyncio.timeout(10):
        await preparing.wait()
    stopped = await _stop_within(group, 1, 1.0 + 6.0, over)
    assert stopped, "the stop waited for a start-up step that did not end"
