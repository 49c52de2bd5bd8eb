"""The delivery engine with Gist faked at the HTTP edge (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import orjson

from destination.gist import CredentialsError, GistClient, RetryPolicy
from destination.operations import ContactUpsert, EventTrack
from destination.pipeline.deliver import Delivery, DeliverySettings
from destination.pipeline.inflight import Ledger, MessageWork, TopicPartition


class FakeGist:
    """Answers batch imports (400 when a contact's email starts with "bad"), batch status
    (COMPLETED on the second poll) and events; keeps the order of requests."""

    def __init__(self, status_for_all: int | None = None) -> None:
        self.log: list[tuple[str, Any]] = []
        self.batches: dict[str, list[dict[str, Any]]] = {}
        self.polls: dict[str, int] = {}
        self.status_for_all = status_for_all

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content) if request.content else None
        self.log.append((f"{request.method} {request.url.path}", body))
        if self.status_for_all is not None:
            return httpx.Response(self.status_for_all, json={"errors": []})
        if request.url.path == "/contacts/batch":
            contacts = body["contacts"]
            if any(c.get("email", "").startswith("bad") for c in contacts):
                return httpx.Response(400, json={"errors": [{"message": "invalid email"}]})
            batch_id = f"b{len(self.batches)}"
            self.batches[batch_id] = contacts
            return httpx.Response(
                200,
                json={"status": "QUEUED", "queued_contacts": len(contacts), "batch_id": batch_id},
            )
        if request.url.path.startswith("/contacts/batch/"):
            batch_id = request.url.path.rsplit("/", 1)[1]
            self.polls[batch_id] = self.polls.get(batch_id, 0) + 1
            if self.polls[batch_id] < 2:
                return httpx.Response(200, json={"status": "IN_PROGRESS"})
            return httpx.Response(
                200, json={"status": "COMPLETED", "imported_contacts": 1, "errors": []}
            )
        if request.url.path == "/events":
            return httpx.Response(200, json={"event": {"id": 1}})
        return httpx.Response(404, json={})


class Harness:
    def __init__(
        self, gist: Callable[[httpx.Request], Any], batch_max_contacts: int = 10, requests: int = 32
    ) -> None:
        self.settled: list[MessageWork] = []
        self.fatal: list[CredentialsError] = []
        self.changed = asyncio.Event()
        self.ledger = Ledger(on_settled=self._settle)
        self.partition = self.ledger.assign(TopicPartition("t", 0))
        client = GistClient(
            "test-key",
            base_url="http://gist.test",
            transport=httpx.MockTransport(gist),
            retry=RetryPolicy(base=0.01, cap=0.02, max_elapsed=0.1),
        )
        self.delivery = Delivery(
            client,
            DeliverySettings(
                batch_max_contacts=batch_max_contacts,
                batch_max_wait=0.05,
                poll_interval=0.01,
                poll_max_interval=0.02,
                max_concurrent_requests=requests,
            ),
            on_fatal=self._halt,
        )
        self.offset = 0

    def _settle(self, message: MessageWork) -> None:
        self.settled.append(message)
        self.ledger.finish(message)
        self.changed.set()

    def _halt(self, error: CredentialsError) -> None:
        self.fatal.append(error)
        self.changed.set()

    def send(self, *operations: Any) -> MessageWork:
        record = self.ledger.open_record(self.partition, self.offset, None, b"{}", [])
        self.offset += 1
        message = self.ledger.open_message(record, None, "identify", None)
        self.delivery.submit(message, operations)
        self.ledger.close_record(record)
        return message

    async def until(self, done: Callable[[], bool]) -> None:
        async with asyncio.timeout(5):
            while not done():
                self.changed.clear()
                await self.changed.wait()

    async def until_settled(self, count: int) -> None:
        await self.until(lambda: len(self.settled) >= count)


def upsert(user: str, email: str, **props: Any) -> ContactUpsert:
    return ContactUpsert({"user_id": user, "email": email, "custom_properties": props})


async def test_a_rejected_batch_is_halved_until_the_bad_contact_stands_alone() -> None:
    gist = FakeGist()
    h = Harness(gist)
    h.delivery.start()
    try:
        messages = [
            h.send(upsert(f"u{i}", "bad@x.io" if i == 2 else f"u{i}@x.io")) for i in range(4)
        ]
        await h.until_settled(4)
    finally:
        await h.delivery.close()
    failed = [m for m in messages if m.failure is not None]
    assert failed == [messages[2]]
    assert failed[0].failure is not None
    assert failed[0].failure.reason == "gist_rejected"
    assert failed[0].failure.status == 400
    sizes = [len(body["contacts"]) for path, body in gist.log if path == "POST /contacts/batch"]
    assert sorted(sizes) == [1, 1, 2, 2, 4]
    assert h.partition.offsets.committable() == 4


async def test_updates_waiting_for_a_batch_merge_later_values_winning() -> None:
    gist = FakeGist()
    h = Harness(gist)
    h.send(upsert("u1", "a@x.io", plan="free", seats=1))
    h.send(ContactUpsert({"user_id": "u1", "custom_properties": {"plan": "pro"}}))
    h.delivery.start()
    try:
        await h.until_settled(2)
    finally:
        await h.delivery.close()
    batches = [body["contacts"] for path, body in gist.log if path == "POST /contacts/batch"]
    assert batches == [
        [{"user_id": "u1", "email": "a@x.io", "custom_properties": {"plan": "pro", "seats": 1}}]
    ]


async def test_an_event_waits_until_its_contacts_batch_completed() -> None:
    gist = FakeGist()
    h = Harness(gist)
    h.delivery.start()
    try:
        h.send(upsert("u1", "a@x.io"))
        h.send(EventTrack({"event_name": "Signed Up", "user_id": "u1"}))
        await h.until_settled(2)
    finally:
        await h.delivery.close()
    paths = [path for path, _ in gist.log]
    completed_poll = max(i for i, p in enumerate(paths) if p.startswith("GET /contacts/batch/"))
    assert paths.index("POST /events") > completed_poll
    assert all(m.failure is None for m in h.settled)


async def test_rejected_credentials_halt_without_failing_the_message() -> None:
    gist = FakeGist(status_for_all=401)
    h = Harness(gist)
    h.delivery.start()
    try:
        message = h.send(EventTrack({"event_name": "X", "email": "a@x.io"}))
        await h.until(lambda: bool(h.fatal))
    finally:
        await h.delivery.close()
    assert h.fatal[0].status == 401
    assert h.settled == []
    assert message.failure is None
    assert h.partition.offsets.committable() == 0


async def test_a_batch_import_does_not_queue_behind_waiting_events() -> None:
    """Events fill every request slot and Gist is slow to answer them; a contact's batch
    import still goes out at once, in a lane of its own."""
    gist = FakeGist()
    release = asyncio.Event()

    async def slow_events(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/events":
            await release.wait()
        return gist(request)

    h = Harness(slow_events, requests=2)
    h.delivery.start()
    try:
        for i in range(20):
            h.send(EventTrack({"event_name": "Viewed", "email": f"e{i}@x.io"}))
        contact = h.send(upsert("u1", "a@x.io"))
        await h.until_settled(1)
        assert h.settled == [contact]  # imported and completed while every event waits
        release.set()
        await h.until_settled(21)
    finally:
        await h.delivery.close()
    assert all(m.failure is None for m in h.settled)


async def test_due_batches_are_polled_side_by_side() -> None:
    """Gist is slow to answer status polls: the oldest pending batches are polled at the
    same time, not one after another, so polls keep up with imports."""
    gist = FakeGist()
    in_flight = 0
    most = 0
    release = asyncio.Event()

    async def slow_polls(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, most
        if request.url.path.startswith("/contacts/batch/"):
            in_flight += 1
            most = max(most, in_flight)
            if most >= 3:
                release.set()
            await release.wait()
            in_flight -= 1
        return gist(request)

    h = Harness(slow_polls, batch_max_contacts=1)
    h.delivery.start()
    try:
        for i in range(3):
            h.send(upsert(f"u{i}", f"u{i}@x.io"))
        await h.until_settled(3)
    finally:
        await h.delivery.close()
    assert most == 3
    assert all(m.failure is None for m in h.settled)


async def test_a_rejected_key_stops_the_polls() -> None:
    gist = FakeGist()

    def key_revoked_after_import(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/contacts/batch/"):
            gist.log.append(("poll", None))
            return httpx.Response(401, json={"errors": []})
        return gist(request)

    h = Harness(key_revoked_after_import, batch_max_contacts=1)
    h.delivery.start()
    try:
        h.send(upsert("u1", "u1@x.io"))
        await h.until(lambda: bool(h.fatal))
        await asyncio.sleep(0.2)  # ten poll intervals: a poller that went on would poll
    finally:
        await h.delivery.close()
    assert [p for p, _ in gist.log].count("poll") == 1
    assert h.settled == []
