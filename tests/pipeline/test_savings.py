"""Spending Gist's budget only on changes, through the whole worker (Kafka twin, Gist at
the HTTP edge): producer retries send no event twice, a replay after a restart neither
(with Redis), and a re-sync of unchanged contacts sends nothing."""

from __future__ import annotations

import random
import uuid
from typing import Any

import pytest

from tests.pipeline.harness import Group, ModelGist, make_broker, produce
from tests.support.redis_server import RedisServer


def names() -> tuple[str, str]:
    token = uuid.uuid4().hex[:6]
    return f"segment-{token}", f"dlq-{token}"


def track(user: str, message_id: str) -> dict[str, Any]:
    return {"type": "track", "userId": user, "event": "Viewed", "messageId": message_id,
            "context": {"traits": {"email": f"{user}@example.com"}}}  # fmt: skip


def stream_with_retries(count: int, retry_share: float, seed: int) -> list[tuple[bytes, Any]]:
    """Tracks of which ``retry_share`` are sent again (the producer retried them)."""
    rng = random.Random(seed)
    records: list[tuple[bytes, Any]] = []
    for n in range(count):
        user = f"u{n % 20}"
        message = track(user, f"m-{seed}-{n}")
        records.append((user.encode(), message))
        if rng.random() < retry_share:
            records.append((user.encode(), message))
    return records


async def test_producer_retries_send_no_event_twice() -> None:
    topic, dlq = names()
    broker = make_broker(topic, dlq, partitions=3)
    gist = ModelGist(random.Random(1))
    group = Group(broker, topic, dlq, gist)
    records = stream_with_retries(200, 0.15, seed=1)
    assert len(records) > 220
    await produce(broker, topic, records)
    await group.start_worker()
    await group.until_committed()
    await group.stop_all()
    assert len(gist.events) == 200
    skipped = [v[-1] for v in group.ends.log.values() if v[-1][1] == "skipped"]
    assert len(skipped) == len(records) - 200
    assert {reason for _, _, reason in skipped} == {"duplicate"}


@pytest.mark.parametrize("shared", [False, True], ids=["process-only", "redis"])
async def test_a_replay_after_a_restart(shared: bool, request: pytest.FixtureRequest) -> None:
    """Kafka replays (a reset offset, a re-produced topic) after the worker restarted:
    with Redis nothing is sent twice; without it, the new process knows no better."""
    topic, dlq = names()
    broker = make_broker(topic, dlq, partitions=2)
    gist = ModelGist(random.Random(2))
    settings: dict[str, Any] = {}
    if shared:
        server: RedisServer = request.getfixturevalue("redis_server")
        settings["redis_url"] = server.url
    group = Group(broker, topic, dlq, gist, **settings)
    # With retries: a replayed message's copies must be caught too (found by the savings
    # benchmark: the first copy used up what Redis said, the next was sent again).
    records = stream_with_retries(60, 0.3, seed=2)
    await produce(broker, topic, records)
    await group.start_worker()
    await group.until_committed()
    await group.stop_all()
    assert len(gist.events) == 60
    await produce(broker, topic, records)  # the same messages again
    await group.start_worker()  # a new process: its own memory is empty
    await group.until_committed()
    await group.stop_all()
    assert len(gist.events) == (60 if shared else 120)


async def test_a_resync_of_unchanged_contacts_sends_no_contact() -> None:
    topic, dlq = names()
    broker = make_broker(topic, dlq, partitions=2)
    gist = ModelGist(random.Random(3))
    group = Group(broker, topic, dlq, gist)

    def audience(user: str, member: bool) -> tuple[bytes, Any]:
        message = {"type": "identify", "userId": user, "messageId": uuid.uuid4().hex,
                   "traits": {"email": f"{user}@example.com", "vip": member}}  # fmt: skip
        return user.encode(), message

    await produce(broker, topic, [audience(f"u{i}", True) for i in range(50)])
    await group.start_worker()
    await group.until_committed()
    imported = sum(len(b["contacts"]) for b in gist.batches.values())
    assert imported == 50
    # An Engage re-sync: the same memberships (new messageIds), and five that changed.
    resync = [audience(f"u{i}", i < 45) for i in range(50)]
    await produce(broker, topic, resync)
    await group.until_committed()
    await group.stop_all()
    again = sum(len(b["contacts"]) for b in gist.batches.values()) - imported
    assert again == 5
    assert [gist.contacts[f"u{i}"]["custom_properties"]["vip"] for i in range(43, 47)] == [
        True, True, False, False,
    ]  # fmt: skip
