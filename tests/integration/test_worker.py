"""The worker end to end: a real Kafka-protocol broker, the Gist sandbox over HTTP, and
``gist-destination run`` as a separate process, observed only from outside."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.abc import ConsumerRebalanceListener

from destination.devtools.broker import EmbeddedBroker
from tests.integration.harness import (
    SandboxProcess,
    WorkerProcess,
    committed_offsets,
    forms_of_the_address,
    list_topics,
    make_topics,
    make_worker_topics,
    produce,
    read_topic,
    unique,
    wait_for,
    worker_env,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def sandbox_process(tmp_path: Path) -> AsyncIterator[SandboxProcess]:
    sb = SandboxProcess(tmp_path, "--batch-delay", "0.2")
    await sb.ready()
    yield sb
    await sb.close()


class Stream:
    """A topic, its dead-letter topic and a consumer group, fresh for each test."""

    def __init__(self, bootstrap: str, partitions: int = 1) -> None:
        self.bootstrap = bootstrap
        self.topic = unique("segment")
        self.dlq = unique("dlq")
        self.group = unique("group")
        self.partitions = partitions

    async def create(self) -> Stream:
        await make_topics(self.bootstrap, self.topic, partitions=self.partitions)
        await make_worker_topics(self.bootstrap, self.dlq)
        return self

    def env(self, sandbox_process: SandboxProcess, **more: str) -> dict[str, str]:
        return worker_env(
            self.bootstrap, sandbox_process.url, self.topic, self.group, self.dlq, **more
        )

    async def committed(self) -> dict[int, int | None]:
        return await committed_offsets(self.bootstrap, self.group, self.topic, self.partitions)


def identify(user: str, email: str | None = None, **traits: Any) -> dict[str, Any]:
    t: dict[str, Any] = dict(traits)
    if email:
        t["email"] = email
    return {
        "type": "identify",
        "messageId": unique("m"),
        "userId": user,
        "traits": t,
        "timestamp": "2026-11-01T12:00:00.000Z",
    }


def track(user: str, event: str, **properties: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "messageId": unique("m"),
        "userId": user,
        "event": event,
        "properties": properties,
        "timestamp": "2026-11-01T12:01:00.000Z",
    }


def by_user(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["user_id"]: c for c in state["contacts"] if c.get("user_id")}


def event_names(state: dict[str, Any], user: str) -> list[str]:
    return sorted(e["name"] for e in state["events"] if e.get("user_id") == user)


async def test_mixed_stream_arrives_as_expected(
    kafka_bootstrap: str, sandbox_process: SandboxProcess, tmp_path: Path
) -> None:
    stream = await Stream(kafka_bootstrap, partitions=2).create()
    audience = {
        "computation_class": "audience",
        "computation_key": "vip_buyers",
        "computation_id": "aud_1",
        "space_id": "spa_1",
    }
    messages: list[Any] = [
        identify("u1", "Ada@Example.com", firstName="Ada", lastName="Lovelace", plan="free"),
        track("u1", "Order Completed", revenue=42.5),  # right after a new user's identify
        identify("u1", plan="pro"),  # the last value must win
        identify("u2", "grace@example.com", name="Grace"),
        {
            "type": "identify",
            "messageId": "aud-1",
            "userId": "u2",
            "traits": {"email": "grace@example.com", "vip_buyers": True},
            "context": {"personas": audience},
            "integrations": {"All": False, "Gist": True},
        },
        {
            "type": "track",
            "messageId": "aud-2",
            "userId": "u1",
            "event": "Audience Entered",
            "properties": {"audience_key": "vip_buyers", "vip_buyers": True},
            "context": {"personas": audience, "traits": {"email": "ada@example.com"}},
        },
        track("u2", "Signed.Up"),
        {
            "type": "track",
            "messageId": "skip-1",
            "userId": "u2",
            "event": "Hidden",
            "integrations": {"Gist": False},
        },
        b"{not json",  # poison
        {"type": "identify", "messageId": "bad-1", "traits": {"plan": "x"}},  # no identity
        {"type": "mystery", "messageId": "bad-2", "userId": "u1"},  # unknown type
        track("ghost", "Nobody Home"),  # user_id of no contact: Gist answers 404
        {  # a contact never imported: Gist answers 404, the delete is done all the same
            "type": "delete",
            "messageId": "del-1",
            "context": {"traits": {"email": "Secret.Person@example.com"}},
        },
    ]
    await produce(kafka_bootstrap, stream.topic, messages)
    worker = WorkerProcess(tmp_path, stream.env(sandbox_process))
    try:

        async def delivered() -> bool:
            state = await sandbox_process.state()
            users = by_user(state)
            return (
                users.get("u1", {}).get("custom_properties", {}).get("plan") == "pro"
                and users.get("u1", {}).get("custom_properties", {}).get("vip_buyers") is True
                and users.get("u2", {}).get("custom_properties", {}).get("vip_buyers") is True
                and len(state["events"]) >= 2
            )

        await wait_for(delivered, 60, what="the stream to reach the sandbox")
        dead = await read_topic(kafka_bootstrap, stream.dlq, expect=4)
        assert sorted(dict(r.headers)["gist-dlq-reason"].decode() for r in dead) == sorted(
            ["invalid_json", "missing_identity", "unknown_type", "gist_rejected"]
        )
        ghost = next(r for r in dead if dict(r.headers)["gist-dlq-reason"] == b"gist_rejected")
        assert dict(ghost.headers)["gist-dlq-http-status"] == b"404"
        assert b"sandbox-key" not in b"".join(v for r in dead for _, v in r.headers)

        async def all_committed() -> bool:
            committed = await stream.committed()
            return sum(o or 0 for o in committed.values()) == len(messages)

        await wait_for(all_committed, 30, what="every offset to be committed")
        state = await sandbox_process.state()
        users = by_user(state)
        assert users["u1"]["email"] == "ada@example.com"
        assert users["u1"]["name"] == "Ada Lovelace"
        assert users["u1"]["type"] == "user"
        assert users["u2"]["name"] == "Grace"
        assert event_names(state, "u1") == ["Order Completed"]
        assert event_names(state, "u2") == ["Signed-Up"]
        assert not any(e["name"] == "Hidden" for e in state["events"])
        metrics = await worker.metrics()
        assert "gist_destination_messages_skipped_total{reason=" in metrics
        log = worker.output().lower()
        assert '"event":"gist.' in log
        for address in ("Secret.Person@example.com", "grace@example.com", "Ada@Example.com"):
            leaked = [form for form in forms_of_the_address(address) if form.lower() in log]
            assert leaked == [], f"the worker's log names {address}"
        assert "gist_destination_messages_dead_lettered_total" in metrics
    finally:
        worker.signal(signal.SIGTERM)
        assert await worker.exited(60) == 0, worker.output()[-3000:]


async def test_wrong_key_halts_without_dead_letters(
    kafka_bootstrap: str, sandbox_process: SandboxProcess, tmp_path: Path
) -> None:
    stream = await Stream(kafka_bootstrap).create()
    await produce(kafka_bootstrap, stream.topic, [identify("u1", "a@example.com")])
    worker = WorkerProcess(tmp_path, stream.env(sandbox_process, GIST_API_KEY="not-the-key"))
    code = await worker.exited(60)
    assert code == 3
    output = worker.output()
    assert "gist.credentials_rejected" in output
    assert "not-the-key" not in output
    assert await read_topic(kafka_bootstrap, stream.dlq, expect=0, within=3) == []
    assert (await stream.committed()) == {0: None}
    assert (await sandbox_process.state())["contacts"] == []


async def test_a_mistyped_dead_letter_topic_stops_start_up_and_is_not_created(
    kafka_bootstrap: str, sandbox_process: SandboxProcess, tmp_path: Path
) -> None:
    stream = await Stream(kafka_bootstrap).create()
    typo = stream.dlq + "-typo"  # Tansu creates any topic a metadata request names
    worker = WorkerProcess(tmp_path, {**stream.env(sandbox_process), "KAFKA_DLQ_TOPIC": typo})
    assert await worker.exited(60) == 2, worker.output()[-3000:]
    assert f"KAFKA_DLQ_TOPIC: no topic '{typo}'" in worker.output()
    assert typo not in await list_topics(kafka_bootstrap)
    assert (await stream.committed()) == {0: None}


async def test_key_revoked_mid_stream_keeps_the_stream(
    kafka_bootstrap: str, sandbox_process: SandboxProcess, tmp_path: Path
) -> None:
    stream = await Stream(kafka_bootstrap).create()
    await produce(kafka_bootstrap, stream.topic, [identify("u1", "a@example.com")])
    worker = WorkerProcess(tmp_path, stream.env(sandbox_process))

    async def first_delivered() -> bool:
        return "u1" in by_user(await sandbox_process.state())

    await wait_for(first_delivered, 60, what="the first contact")
    await wait_for(lambda: _committed_at_least(stream, 1), 30, what="the first commit")
    await sandbox_process.faults(disabled=True)
    await produce(kafka_bootstrap, stream.topic, [track("u1", "After Revocation")] * 3)
    assert await worker.exited(60) == 3
    assert await read_topic(kafka_bootstrap, stream.dlq, expect=0, within=3) == []
    assert (await stream.committed())[0] == 1  # nothing past the revocation


async def _committed_at_least(stream: Stream, count: int) -> bool:
    return sum(o or 0 for o in (await stream.committed()).values()) >= count


async def test_sandbox_faults_end_with_everything_delivered(
    kafka_bootstrap: str, sandbox_process: SandboxProcess, tmp_path: Path
) -> None:
    stream = await Stream(kafka_bootstrap, partitions=2).create()
    users = [f"f{i}" for i in range(40)]
    messages = [identify(u, f"{u}@example.com", n=1) for u in users]
    messages += [track(u, "Faulty Times") for u in users]
    await produce(kafka_bootstrap, stream.topic, messages)
    await sandbox_process.faults(error_rate=0.3, latency=0.05, force_429=15)
    worker = WorkerProcess(tmp_path, stream.env(sandbox_process))
    try:

        async def everything() -> bool:
            state = await sandbox_process.state()
            return len(by_user(state)) == len(users) and {
                e["user_id"] for e in state["events"]
            } >= set(users)

        await wait_for(everything, 120, what="delivery through the faults")
        await wait_for(lambda: _committed_at_least(stream, len(messages)), 30, what="commits")
        stats = (await sandbox_process.state())["stats"]
        assert stats["rate_limited"] >= 15
        assert any(s.startswith("5") for s in stats["by_status"])
        assert await read_topic(kafka_bootstrap, stream.dlq, expect=0, within=3) == []
        assert "gist_destination_gist_retries_total" in await worker.metrics()
    finally:
        worker.signal(signal.SIGTERM)
        assert await worker.exited(60) == 0


async def test_poison_records_are_dead_lettered_while_the_rest_flows(
    kafka_bootstrap: str, sandbox_process: SandboxProcess, tmp_path: Path
) -> None:
    stream = await Stream(kafka_bootstrap).create()
    messages: list[Any] = []
    for i in range(30):
        messages.append(identify(f"p{i}", f"p{i}@example.com"))
        messages.append(b"\xff\xfe garbage" if i % 3 == 0 else [1, 2, 3] if i % 3 == 1 else 7)
    envelope = {"batch": [identify("env1", "env1@example.com"), {"type": "track"}]}
    messages.append(envelope)
    await produce(kafka_bootstrap, stream.topic, messages)
    worker = WorkerProcess(tmp_path, stream.env(sandbox_process))
    try:

        async def flowed() -> bool:
            return len(by_user(await sandbox_process.state())) == 31

        await wait_for(flowed, 60, what="the good messages")
        dead = await read_topic(kafka_bootstrap, stream.dlq, expect=31)
        assert len(dead) == 31
        from_envelope = [r for r in dead if "gist-dlq-envelope-index" in dict(r.headers)]
        assert len(from_envelope) == 1
        assert dict(from_envelope[0].headers)["gist-dlq-envelope-index"] == b"1"
        assert from_envelope[0].value == b'{"type":"track"}'
        await wait_for(lambda: _committed_at_least(stream, len(messages)), 30, what="commits")
    finally:
        worker.signal(signal.SIGTERM)
        assert await worker.exited(60) == 0


async def test_sigkill_mid_stream_then_restart_loses_nothing(
    kafka_bootstrap: str, sandbox_process: SandboxProcess, tmp_path: Path
) -> None:
    stream = await Stream(kafka_bootstrap, partitions=2).create()
    users = [f"k{i}" for i in range(300)]
    messages = []
    for u in users:
        messages.append(identify(u, f"{u}@example.com", version=1))
        messages.append(track(u, "Checked In"))
        messages.append(identify(u, version=2))
    await produce(kafka_bootstrap, stream.topic, messages)
    env = stream.env(sandbox_process, GIST_BATCH_SIZE="50")
    first = WorkerProcess(tmp_path, env, name="first")

    async def some_delivered() -> bool:
        return len((await sandbox_process.state())["contacts"]) >= 30

    await wait_for(some_delivered, 60, what="some contacts")
    first.signal(signal.SIGKILL)
    assert await first.exited(10) == -signal.SIGKILL
    second = WorkerProcess(tmp_path, env, name="second")
    try:

        async def all_there() -> bool:
            state = await sandbox_process.state()
            contacts = by_user(state)
            return (
                len(contacts) == len(users)
                and all(c["custom_properties"].get("version") == 2 for c in contacts.values())
                and {e["user_id"] for e in state["events"]} == set(users)
            )

        await wait_for(all_there, 120, what="every message after the restart")
        await wait_for(lambda: _committed_at_least(stream, len(messages)), 30, what="commits")
        assert await read_topic(kafka_bootstrap, stream.dlq, expect=0, within=3) == []
    finally:
        second.signal(signal.SIGTERM)
        assert await second.exited(60) == 0


async def test_two_workers_share_the_partitions(
    kafka_bootstrap: str, sandbox_process: SandboxProcess, tmp_path: Path
) -> None:
    stream = await Stream(kafka_bootstrap, partitions=4).create()
    env = stream.env(sandbox_process)
    workers = [WorkerProcess(tmp_path, env, name=f"w{i}") for i in range(2)]
    try:

        async def both_assigned() -> bool:
            owned = [_latest_assignment(w) for w in workers]
            return all(owned) and set().union(*owned) == set(range(4)) and not (owned[0] & owned[1])

        await wait_for(both_assigned, 90, what="both workers to own partitions")
        users = [f"s{i}" for i in range(100)]
        await produce(
            kafka_bootstrap, stream.topic, [identify(u, f"{u}@example.com") for u in users]
        )

        async def all_there() -> bool:
            return len(by_user(await sandbox_process.state())) == len(users)

        await wait_for(all_there, 60, what="every contact")
        await wait_for(lambda: _committed_at_least(stream, len(users)), 30, what="commits")
        for w in workers:
            assert 'gist_destination_messages_delivered_total{type="identify"}' in await w.metrics()
    finally:
        for w in workers:
            w.signal(signal.SIGTERM)
        for w in workers:
            assert await w.exited(60) == 0


def _latest_assignment(worker: WorkerProcess) -> set[int]:
    lines = [ln for ln in worker.output().splitlines() if "kafka.partitions_assigned" in ln]
    if not lines:
        return set()
    return {int(p.rsplit(":", 1)[1]) for p in orjson.loads(lines[-1])["partitions"]}


async def test_graceful_shutdown_commits_exactly_what_was_delivered(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    slow = SandboxProcess(tmp_path, "--batch-delay", "1.5")
    await slow.ready()
    try:
        stream = await Stream(kafka_bootstrap).create()
        users = [f"g{i}" for i in range(60)]
        await produce(
            kafka_bootstrap, stream.topic, [identify(u, f"{u}@example.com") for u in users]
        )
        # Too short a drain for batches that take ~3 s to import: some stay undelivered.
        worker = WorkerProcess(
            tmp_path,
            stream.env(
                slow, SHUTDOWN_TIMEOUT="0.5", GIST_BATCH_SIZE="10", GIST_MAX_CONCURRENT_REQUESTS="1"
            ),
        )

        async def some() -> bool:
            return len((await slow.state())["contacts"]) >= 10

        await wait_for(some, 60, what="the first batch")
        worker.signal(signal.SIGTERM)
        assert await worker.exited(60) == 0
        committed = (await stream.committed())[0] or 0
        await slow.faults(batch_delay=0.0)
        await _quiet(slow)
        delivered = {c["user_id"] for c in (await slow.state())["contacts"]}
        # Everything below the committed offset reached Gist; the rest was not committed.
        assert set(users[:committed]) <= delivered
        assert committed < len(users), "the drain was meant to be cut short"
        # A restart sends the uncommitted rest again and commits it.
        again = WorkerProcess(tmp_path, stream.env(slow), name="again")
        try:
            await wait_for(lambda: _committed_at_least(stream, len(users)), 60, what="the rest")
            assert len(by_user(await slow.state())) == len(users)
        finally:
            again.signal(signal.SIGTERM)
            assert await again.exited(60) == 0
    finally:
        await slow.close()


async def _quiet(sandbox_process: SandboxProcess) -> None:
    async def settled() -> bool:
        batches = (await sandbox_process.state())["batches"]
        return all(
            b == "COMPLETED" or (isinstance(b, dict) and b.get("status") == "COMPLETED")
            for b in batches.values()
        )

    await wait_for(settled, 30, what="the sandbox's batches to complete")


async def test_contact_errors_reach_the_dlq_even_across_a_restart(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    slow = SandboxProcess(tmp_path, "--batch-delay", "2.0")
    await slow.ready()
    try:
        stream = await Stream(kafka_bootstrap).create()
        # A new contact without an email: Gist queues the batch, then reports the contact
        # as failed only when the import completes.
        no_email = identify("nomail-1", None, plan="pro")
        good = [identify(f"ok{i}", f"ok{i}@example.com") for i in range(5)]
        await produce(kafka_bootstrap, stream.topic, [*good, no_email])
        env = stream.env(slow)
        first = WorkerProcess(tmp_path, env, name="first")

        async def queued() -> bool:
            return len((await slow.state())["batches"]) >= 1

        await wait_for(queued, 60, what="the batch to be queued")
        first.signal(signal.SIGKILL)  # before Gist finished importing
        await first.exited(10)
        second = WorkerProcess(tmp_path, env, name="second")
        try:
            dead = await read_topic(kafka_bootstrap, stream.dlq, expect=1, within=60)
            assert len(dead) == 1
            headers = dict(dead[0].headers)
            assert headers["gist-dlq-reason"] == b"batch_contact_error"
            assert orjson.loads(dead[0].value) == no_email
            assert dead[0].key == b"nomail-1"
            await wait_for(lambda: _committed_at_least(stream, 6), 30, what="commits")
            assert {f"ok{i}" for i in range(5)} <= set(by_user(await slow.state()))
        finally:
            second.signal(signal.SIGTERM)
            assert await second.exited(60) == 0
    finally:
        await slow.close()


async def test_lag_is_reported_before_the_first_commit(
    kafka_bootstrap: str, sandbox_process: SandboxProcess, tmp_path: Path
) -> None:
    stream = await Stream(kafka_bootstrap).create()
    worker = WorkerProcess(tmp_path, stream.env(sandbox_process, SHUTDOWN_TIMEOUT="3"))
    try:
        await wait_for(worker.ready, 60, what="the worker to be ready")
        await sandbox_process.faults(error_rate=1.0)  # Gist fails everything: no commit
        await produce(
            kafka_bootstrap, stream.topic, [identify(f"l{i}", f"l{i}@x.io") for i in range(5)]
        )
        line = f'gist_destination_consumer_lag{{partition="0",topic="{stream.topic}"}} 5.0'

        async def lag_reported() -> bool:
            try:
                return line in await worker.metrics()
            except httpx.HTTPError:
                return False

        await wait_for(lag_reported, 60, what="the lag of a partition with no commit")
        assert (await stream.committed()) == {0: None}
    finally:
        worker.signal(signal.SIGTERM)
        assert await worker.exited(60) == 0


async def test_an_envelope_is_held_while_gist_fails_and_delivered_after(
    kafka_bootstrap: str, sandbox_process: SandboxProcess, tmp_path: Path
) -> None:
    """Regression: an envelope whose first message is skipped, then a track and an
    identify, while Gist answers 5xx: the offset was committed at once, SIGTERM exited
    in 0.3 s, and a new worker never saw the track or the identify."""
    stream = await Stream(kafka_bootstrap).create()
    envelope = {
        "batch": [
            {"type": "page", "userId": "u1", "name": "Home", "messageId": unique("m")},
            track("u1", "Order Completed"),
            identify("u1", "u1@example.com", plan="pro"),
        ]
    }
    env = stream.env(sandbox_process, SHUTDOWN_TIMEOUT="1")
    worker = WorkerProcess(tmp_path, env)
    await wait_for(worker.ready, 60, what="the worker to be ready")
    await sandbox_process.faults(error_rate=1.0)  # after the key check
    await produce(kafka_bootstrap, stream.topic, [envelope])
    await wait_for(lambda: _requests_seen(sandbox_process), 30, what="the worker to try Gist")
    worker.signal(signal.SIGTERM)
    assert await worker.exited(60) == 0, worker.output()[-3000:]
    assert (await stream.committed()) == {0: None}  # nothing given up as done
    assert await read_topic(kafka_bootstrap, stream.dlq, expect=0, within=2) == []

    await sandbox_process.faults(error_rate=0.0)
    worker = WorkerProcess(tmp_path, env, name="second")
    try:

        async def ended() -> bool:
            return await _committed_is(stream, {0: 1})

        await wait_for(ended, 90, what="the envelope to be committed")
        state = await sandbox_process.state()
        assert by_user(state)["u1"]["custom_properties"]["plan"] == "pro"
        # The track came before its user's identify: Gist knows no such user_id yet and
        # answers 404, so it is in the DLQ (with Gist's reason) if not in Gist.
        in_gist = event_names(state, "u1") == ["Order Completed"]
        letters = await read_topic(kafka_bootstrap, stream.dlq, expect=0 if in_gist else 1)
        assert in_gist or [dict(r.headers)["gist-dlq-envelope-index"] for r in letters] == [b"1"]
    finally:
        worker.signal(signal.SIGTERM)
        assert await worker.exited(60) == 0, worker.output()[-3000:]


@pytest.mark.parametrize(
    ("status", "deadline", "reason"),
    [
        ("completed?", "1.5", b"batch_timeout"),  # unknown: waited for until the deadline
        ("FAILED", "3600", b"batch_failed"),  # an explicit failure: not waited for
    ],
)
async def test_a_batch_gist_never_completes_is_sent_again_once_then_dead_lettered(
    kafka_bootstrap: str,
    sandbox_process: SandboxProcess,
    tmp_path: Path,
    status: str,
    deadline: str,
    reason: bytes,
) -> None:
    """Regression: a status the client does not know was polled forever, and a few such
    batches stopped every later one; an explicit FAILED waited for the deadline (an hour)."""
    stream = await Stream(kafka_bootstrap).create()
    await sandbox_process.faults(batch_status=status)
    await produce(kafka_bootstrap, stream.topic, [identify("u1", "u1@example.com")])
    worker = WorkerProcess(tmp_path, stream.env(sandbox_process, GIST_BATCH_DEADLINE=deadline))
    try:
        (letter,) = await read_topic(kafka_bootstrap, stream.dlq, expect=1, within=60)
        assert dict(letter.headers)["gist-dlq-reason"] == reason
        posts = [r for r in await sandbox_process.requests() if r["path"] == "/contacts/batch"]
        assert len(posts) == 2  # the import, and the one re-send
        await wait_for(lambda: _committed_is(stream, {0: 1}), 30, what="the commit")
        await sandbox_process.faults(batch_status=None)
        await produce(kafka_bootstrap, stream.topic, [identify("u2", "u2@example.com")])
        await wait_for(
            lambda: _committed_is(stream, {0: 2}), 30, what="later batches to go through"
        )
    finally:
        worker.signal(signal.SIGTERM)
        assert await worker.exited(60) == 0, worker.output()[-3000:]


async def _requests_seen(sandbox: SandboxProcess) -> bool:
    return any(r["path"].startswith("/contacts") for r in await sandbox.requests())


async def _committed_is(stream: Stream, expected: dict[int, int]) -> bool:
    return await stream.committed() == expected


class _SlowToLetGo(ConsumerRebalanceListener):  # type: ignore[misc]
    """A member that holds its partitions for a minute when asked to give them up, so
    the group's next join stays under way that long (Kafka and Tansu both wait)."""

    def __init__(self) -> None:
        self.assigned = asyncio.Event()

    async def on_partitions_revoked(self, revoked: Any) -> None:
        if self.assigned.is_set():
            await asyncio.sleep(60)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        if assigned:
            self.assigned.set()


async def test_a_stop_ends_the_worker_while_its_group_join_waits_and_the_broker_is_gone(
    sandbox_process: SandboxProcess, tmp_path: Path
) -> None:
    """Regression: aiokafka's start waits for the first assignment without end; a
    broker gone during the join left a worker deaf to SIGTERM for hours."""
    with EmbeddedBroker(log_file=tmp_path / "broker.log") as broker:
        stream = await Stream(broker.bootstrap_servers).create()
        holder = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap_servers, group_id=stream.group)
        listener = _SlowToLetGo()
        holder.subscribe([stream.topic], listener=listener)
        poller: asyncio.Task[Any] | None = None
        try:
            await holder.start()
            poller = asyncio.create_task(holder.getmany(timeout_ms=120_000))
            await asyncio.wait_for(listener.assigned.wait(), 60)
            worker = WorkerProcess(tmp_path, stream.env(sandbox_process), name="joining")

            async def joining() -> bool:
                return "kafka.partitions_revoked" in worker.output()

            await wait_for(joining, 60, what="the worker to start joining the group")
            broker.stop()  # mid-join: the holder still has the group waiting
            worker.signal(signal.SIGTERM)
            code = await worker.exited(30)  # its own Kafka steps are bounded at 10 s
        finally:
            if poller is not None:
                poller.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(holder.stop(), 5)
    assert code == 0, worker.output()[-2000:]
    assert "worker.stopped" in worker.output()
