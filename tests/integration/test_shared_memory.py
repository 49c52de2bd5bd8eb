"""Contact memory shared through a real redis-server: records any replica may trust, and
every way they could go stale (a failed write, an owner killed, Redis losing its data,
a hand-over at another offset) ending in "send", never in "skip"."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from destination.gist._redis import redis_client
from destination.pipeline.inflight import PartitionWork, TopicPartition
from destination.pipeline.memory import ContactMemory, SharedContactMemory
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.integration

TP = TopicPartition("segment", 0)
ALICE = {"user_id": "alice", "email": "alice@example.com", "custom_properties": {"plan": "free"}}
IDENTITIES = ("u:alice", "e:alice@example.com")


class Flaky:
    """A redis client whose pipelines fail while ``down`` (a blip, a time-out)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.down = False

    def pipeline(self, transaction: bool = True) -> Any:
        pipe = self.real.pipeline(transaction=transaction)
        if not self.down:
            return pipe

        class Failing:
            def __getattr__(self, name: str) -> Any:
                attr = getattr(pipe, name)
                if name != "execute":
                    return attr

                async def execute() -> Any:
                    raise ConnectionError("Redis blip")

                return execute

        return Failing()


class Replica:
    """One process's contact memory on the shared Redis."""

    def __init__(self, redis: Any) -> None:
        self.redis = Flaky(redis)
        self.memory = ContactMemory(3600.0, 1000, stable=True)
        self.memory.shared = SharedContactMemory(self.redis, "test:w1", timeout=0.5)
        self.partition = PartitionWork(TP)

    async def take_over(self, committed: int | None) -> None:
        self.partition = PartitionWork(TP)
        self.partition.committed = committed
        assert self.memory.shared is not None
        await self.memory.shared.take_over({TP: committed})

    async def hand_over(self, committed: int | None) -> None:
        self.memory.revoke([self.partition])
        assert self.memory.shared is not None
        await self.memory.shared.handover({TP: committed})

    async def strip(self, payload: dict[str, Any]) -> Any:
        identities = tuple(
            i for i in IDENTITIES if (i[0] == "u" and "user_id" in payload)
            or (i[0] == "e" and "email" in payload)
        )  # fmt: skip
        await self.memory.load([(identities, self.partition)])
        stripped, note, _ = self.memory.strip(payload, identities, self.partition)  # type: ignore[arg-type]
        return stripped, note

    async def confirmed(self, payload: dict[str, Any]) -> None:
        _, note = await self.strip(payload)
        self.memory.confirm(note)
        assert self.memory.shared is not None
        await self.memory.shared.flush()


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Any]:
    client = redis_client(redis_server.url, None, 0.5)
    yield client
    await client.aclose()


async def test_a_clean_hand_over_keeps_what_the_old_owner_confirmed(redis: Any) -> None:
    a, b = Replica(redis), Replica(redis)
    await a.take_over(None)
    await a.confirmed(ALICE)
    await a.hand_over(7)
    await b.take_over(7)
    stripped, _ = await b.strip(ALICE)
    assert stripped is None  # Gist holds it: the new owner does not send it again


@pytest.mark.parametrize("committed", [None, 8], ids=["killed", "another_offset"])
async def test_an_owner_that_did_not_hand_over_at_the_offset_is_not_trusted(
    redis: Any, committed: int | None
) -> None:
    """A killed owner hands nothing over; one that handed over at another offset than
    the group's commit may have written more since: its records are not trusted."""
    a, b = Replica(redis), Replica(redis)
    await a.take_over(None)
    await a.confirmed(ALICE)
    if committed is not None:
        await a.hand_over(committed - 1)
    await b.take_over(committed if committed is not None else 7)
    stripped, _ = await b.strip(ALICE)
    assert stripped == ALICE


async def test_a_delete_whose_forget_failed_is_never_followed_by_a_skip(redis: Any) -> None:
    """Regression (repro f2 d): with Redis, a delete whose forget-write failed once left
    the old memory there, so a re-identify of the deleted contact was skipped and it was
    never created again."""
    a, b = Replica(redis), Replica(redis)
    await a.take_over(None)
    await a.confirmed(ALICE)
    a.redis.down = True
    a.memory.invalidate(IDENTITIES, a.partition)  # the delete, before its request goes
    assert a.memory.shared is not None
    assert not await a.memory.shared.flush()
    a.redis.down = False
    stripped, _ = await a.strip(ALICE)  # the same replica: not sure, so it sends
    assert stripped == ALICE
    await a.memory.shared.flush()  # Redis answers again: the partition's records age out
    stripped, _ = await a.strip(ALICE)
    assert stripped == ALICE
    await a.hand_over(9)
    await b.take_over(9)
    stripped, _ = await b.strip(ALICE)  # nor does the next owner trust the old record
    assert stripped == ALICE


async def test_a_record_write_that_failed_is_not_trusted_by_anyone(redis: Any) -> None:
    a = Replica(redis)
    await a.take_over(None)
    await a.confirmed({**ALICE, "custom_properties": {"plan": "free"}})
    a.redis.down = True
    _, note = await a.strip({**ALICE, "custom_properties": {"plan": "pro"}})
    a.memory.confirm(note)  # Gist holds plan=pro; Redis did not hear of it
    assert a.memory.shared is not None
    assert not await a.memory.shared.flush()
    a.redis.down = False
    a.memory.revoke([a.partition])  # say the local copy is gone (evicted)
    a.partition = PartitionWork(TP)
    await a.memory.shared.flush()
    stripped, _ = await a.strip({**ALICE, "custom_properties": {"plan": "free"}})
    assert stripped is not None  # the old plan=free in Redis is not trusted


async def test_redis_losing_its_data_costs_a_send_not_a_skip(redis: Any) -> None:
    a, b = Replica(redis), Replica(redis)
    await a.take_over(None)
    await a.confirmed(ALICE)
    await a.hand_over(3)
    await redis.flushall()
    await b.take_over(3)
    stripped, _ = await b.strip(ALICE)
    assert stripped == ALICE


async def test_shared_records_serve_only_writes_with_their_identities(redis: Any) -> None:
    a, b = Replica(redis), Replica(redis)
    await a.take_over(None)
    await a.confirmed({"email": "alice@example.com", "custom_properties": {"plan": "free"}})
    await a.confirmed(ALICE | {"custom_properties": {"plan": "pro"}})
    await a.hand_over(5)
    await b.take_over(5)
    lead = {"email": "alice@example.com", "custom_properties": {"plan": "free"}}
    stripped, _ = await b.strip(lead)
    assert stripped is not None
    stripped, _ = await b.strip(ALICE | {"custom_properties": {"plan": "pro"}})
    assert stripped is None
