"""The delivery engine with Gist faked at the HTTP edge (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from destination import reasons
from destination.gist import CredentialsError, GistClient, RetryPolicy
from destination.operations import ContactUpsert, EventTrack, TagChange
from destination.pipeline.deliver import Delivery, DeliverySettings
from destination.pipeline.inflight import (
    ENDED,
    Failure,
    Ledger,
    MessageWork,
    Skip,
    TopicPartition,
)
from destination.pipeline.outcome import Outcomes


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
            imported = len(self.batches[batch_id])
            return httpx.Response(
                200, json={"status": "COMPLETED", "imported_contacts": imported, "errors": []}
            )
        if request.url.path == "/events":
            return httpx.Response(200, json={"event": {"id": 1}})
        return httpx.Response(404, json={})


class Sink:
    """The dead-letter topic's edge: acknowledged at once."""

    def __init__(self) -> None:
        self.written: list[tuple[MessageWork, Failure]] = []

    async def write(self, message: MessageWork, failure: Failure) -> None:
        self.written.append((message, failure))


class Harness:
    def __init__(
        self,
        gist: Callable[[httpx.Request], Any],
        batch_max_contacts: int = 10,
        requests: int = 32,
        **settings: Any,
    ) -> None:
        self.messages: list[MessageWork] = []
        self.fatal: list[CredentialsError] = []
        self.ledger = Ledger()
        self.sink = Sink()
        self.outcomes = Outcomes(self.ledger, self.sink)
        self.partition = self.ledger.assign(TopicPartition("t", 0))
        client = GistClient(
            "test-key",
            base_url="http://gist.test",
            transport=httpx.MockTransport(gist),
            retry=RetryPolicy(base=0.01, cap=0.02, max_elapsed=0.1),
        )
        options: dict[str, Any] = {
            "batch_max_contacts": batch_max_contacts,
            "batch_max_wait": 0.05,
            "poll_interval": 0.01,
            "poll_max_interval": 0.02,
            "max_concurrent_requests": requests,
            **settings,
        }
        self.delivery = Delivery(
            client, DeliverySettings(**options), self.outcomes, on_fatal=self._halt
        )
        self.offset = 0

    def _halt(self, error: CredentialsError) -> None:
        self.fatal.append(error)
        self.ledger.changed.set()

    def send(self, *operations: Any, partition: Any = None) -> MessageWork:
        work = partition or self.partition
        record = self.ledger.open_record(work, self.offset, None, b"{}", [])
        self.offset += 1
        message = self.ledger.open_message(record, None, "identify", None)
        self.ledger.seal(record)
        self.delivery.submit(message, operations)
        self.messages.append(message)
        return message

    @property
    def settled(self) -> list[MessageWork]:
        """Messages that ended, in the order they were sent."""
        return [m for m in self.messages if m.state == ENDED]

    async def until(self, done: Callable[[], bool], within: float = 5) -> None:
        async with asyncio.timeout(within):
            while not done():
                self.ledger.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.ledger.changed.wait(), 0.05)

    async def until_settled(self, count: int, within: float = 5) -> None:
        await self.until(lambda: len(self.settled) >= count, within)

    def reasons(self) -> list[str | None]:
        return [None if m.failure is None else m.failure.reason for m in self.settled]


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
    await h.until(lambda: len(h.sink.written) == 1)
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


# --- every wait has an end, every answer has a meaning ------------------------------


class Misbehaving(FakeGist):
    """FakeGist, then one twist on the answers, set per test."""

    def __init__(self) -> None:
        super().__init__()
        self.status: str | None = None  # batch status to answer instead of the truth
        self.errors: str = "objects"  # how a completed batch names failed contacts
        self.poll_http: int | None = None
        self.no_batch_id = False
        self.stuck: set[str] = set()  # batch ids that never complete
        self.unpolled: set[str] = set()  # batch ids whose polls fail (503)
        self.failing: set[str] = set()  # batch ids Gist reports FAILED
        self.answer_lost: set[str] = set()  # batch ids queued, their answer a 502

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.startswith("/contacts/batch/"):
            batch_id = path.rsplit("/", 1)[1]
            self.log.append((f"GET {path}", None))
            if self.poll_http is not None:
                return httpx.Response(self.poll_http, json={"errors": []})
            if batch_id in self.unpolled:
                return httpx.Response(503, json={"errors": []})
            if batch_id in self.failing:
                return httpx.Response(200, json={"status": "FAILED"})
            if self.status is not None or batch_id in self.stuck:
                return httpx.Response(200, json={"status": self.status or "IN_PROGRESS"})
            contacts = self.batches[batch_id]
            bad = [i for i, c in enumerate(contacts) if c.get("email", "").startswith("bad")]
            shaped: list[Any] = {
                "objects": [{"index": i, "message": "invalid email"} for i in bad],
                "strings": [f"contact {i}: invalid email" for i in bad],
                "omitted": [],
            }[self.errors]
            return httpx.Response(
                200,
                json={
                    "status": "COMPLETED",
                    "imported_contacts": len(contacts) - len(bad),
                    "errors": shaped,
                },
            )
        if path == "/contacts/batch":
            body = orjson.loads(request.content)
            self.log.append((f"POST {path}", body))
            batch_id = f"b{len(self.batches)}"
            self.batches[batch_id] = body["contacts"]
            if batch_id in self.answer_lost:
                return httpx.Response(502, json={"errors": []})
            answer: dict[str, Any] = {"status": "QUEUED", "queued_contacts": 1}
            if not self.no_batch_id:
                answer["batch_id"] = batch_id
            return httpx.Response(200, json=answer)
        return super().__call__(request)

    def imports(self) -> list[list[str]]:
        return [
            [c.get("user_id") for c in body["contacts"]]
            for path, body in self.log
            if path == "POST /contacts/batch"
        ]


async def _run(h: Harness, count: int, within: float = 10) -> None:
    h.delivery.start()
    try:
        await h.until_settled(count, within)
    finally:
        await h.delivery.close()


async def test_batch_errors_that_name_no_contact_are_found_by_sending_halves() -> None:
    """Regression: errors given as plain strings ("contact 2: invalid email") matched no
    contact, and every contact of the batch was counted as delivered."""
    gist = Misbehaving()
    gist.errors = "strings"
    h = Harness(gist, batch_max_contacts=8)
    messages = [h.send(upsert(f"u{i}", "bad@x.io" if i == 5 else f"u{i}@x.io")) for i in range(8)]
    await _run(h, 8)
    assert [m.failure.reason if m.failure else None for m in messages] == [
        None, None, None, None, None, "batch_contact_error", None, None,
    ]  # fmt: skip
    assert messages[5].failure is not None
    assert "invalid email" in messages[5].failure.detail
    assert gist.imports()[0] == [f"u{i}" for i in range(8)]
    assert len(gist.imports()) < 16  # halves, not one request per contact


@pytest.mark.parametrize("errors", ["strings", "omitted"])
async def test_an_error_naming_no_contact_is_not_pinned_on_the_one_left_after_a_revocation(
    errors: str,
) -> None:
    """Regression (model test seed 303 at 80 steps): a batch of a bad contact and a good
    one, of two partitions; the bad one's partition was revoked while Gist imported it;
    Gist completed the batch with an error that named no contact (or imported one fewer),
    and the good contact, the only one left, was dead-lettered ``batch_contact_error``
    with the other's error. Only a batch of one contact pins such an error on it; here
    the good one is sent again on its own, and delivered."""
    gist = Misbehaving()
    gist.errors = errors
    gist.stuck.add("b0")
    h = Harness(gist, batch_max_contacts=2)
    other = h.ledger.assign(TopicPartition("t", 1))
    h.delivery.start()
    try:
        bad = h.send(upsert("u1", "bad@x.io"), partition=other)
        good = h.send(upsert("u0", "u0@x.io"))
        await h.until(lambda: "b0" in gist.batches)
        await h.delivery.revoke([other])
        gist.stuck.discard("b0")
        await h.until(lambda: good.state == ENDED)
    finally:
        await h.delivery.close()
    assert good.failure is None
    assert bad.state != ENDED  # the next owner reads it again
    assert gist.imports() == [["u1", "u0"], ["u0"]]


async def test_a_contact_of_an_unverified_batch_that_then_failed_ends_as_unknown() -> None:
    """Regression (model test seed 25): a batch COMPLETED with errors that named no
    contact (Gist imported some of it), the half holding a good contact was reported
    FAILED twice, and the contact was dead-lettered ``batch_failed``, although the first
    import may well have imported it (it had). Its fate is unknown: ``batch_timeout``."""
    gist = Misbehaving()
    gist.errors = "strings"
    gist.failing = {"b1", "b3"}  # the half [u0], and the same sent again
    h = Harness(gist, batch_max_contacts=2)
    messages = [h.send(upsert("u0", "u0@x.io")), h.send(upsert("u1", "bad@x.io"))]
    await _run(h, 2, within=5)
    assert gist.imports() == [["u0", "u1"], ["u0"], ["u1"], ["u0"]]
    assert [m.failure.reason if m.failure else None for m in messages] == [
        "batch_timeout", "batch_contact_error",
    ]  # fmt: skip


async def test_a_contact_whose_import_answer_was_lost_and_then_failed_ends_as_unknown() -> None:
    """Regression (model test seed 25): the answer to a batch import was lost (Gist had
    queued it: it landed later), the client sent it again, that one and the one after
    were reported FAILED, and the contact was dead-lettered ``batch_failed``. The first
    may have been imported: ``batch_timeout``."""
    gist = Misbehaving()
    gist.answer_lost = {"b0"}
    gist.failing = {"b1", "b2"}
    h = Harness(gist, batch_max_contacts=1)
    message = h.send(upsert("u0", "u0@x.io"))
    await _run(h, 1, within=5)
    assert gist.imports() == [["u0"], ["u0"], ["u0"]]
    assert message.failure is not None
    assert message.failure.reason == "batch_timeout"


async def test_a_batch_that_imported_fewer_than_sent_without_errors_is_checked() -> None:
    """Regression: imported_contacts lower than what was sent, with no errors, counted
    every contact as delivered."""
    gist = Misbehaving()
    gist.errors = "omitted"
    h = Harness(gist, batch_max_contacts=4)
    messages = [h.send(upsert(f"u{i}", "bad@x.io" if i == 1 else f"u{i}@x.io")) for i in range(4)]
    await _run(h, 4)
    assert [m.failure.reason if m.failure else None for m in messages] == [
        None, "batch_contact_error", None, None,
    ]  # fmt: skip


async def test_an_unknown_batch_status_ends_in_one_resend_then_a_dead_letter() -> None:
    """Regression: a status the client does not know was polled forever. Now the batch is
    sent again once past its deadline, then dead-lettered."""
    gist = Misbehaving()
    gist.status = "completed?"
    h = Harness(gist, batch_max_contacts=2, batch_deadline=0.3)
    messages = [h.send(upsert(f"u{i}", f"u{i}@x.io")) for i in range(2)]
    await _run(h, 2)
    assert [m.failure.reason if m.failure else None for m in messages] == ["batch_timeout"] * 2
    assert gist.imports() == [["u0", "u1"], ["u0", "u1"]]


@pytest.mark.parametrize("status", ["FAILED", "failed", "Error", "CANCELLED"])
async def test_a_batch_gist_says_failed_is_sent_again_at_once_then_dead_lettered(
    status: str,
) -> None:
    """Regression: an explicit failure waited for GIST_BATCH_DEADLINE (an hour) like an
    unknown status. Now it is sent again at once, and the second failure dead-letters."""
    gist = Misbehaving()
    gist.status = status
    h = Harness(gist, batch_max_contacts=2, batch_deadline=3600)
    messages = [h.send(upsert(f"u{i}", f"u{i}@x.io")) for i in range(2)]
    await _run(h, 2, within=5)
    assert [m.failure.reason if m.failure else None for m in messages] == ["batch_failed"] * 2
    assert gist.imports() == [["u0", "u1"], ["u0", "u1"]]


async def test_a_batch_that_failed_after_one_of_unknown_fate_ends_as_unknown() -> None:
    """Regression (model test seed 48): the first import did not complete within the
    deadline (Gist may still import it: it did, late), the one sent again was reported
    FAILED, and the contacts were dead-lettered ``batch_failed``, which says Gist did not
    import them. Whether it did is unknown: ``batch_timeout``, saying both."""
    gist = Misbehaving()
    gist.stuck.add("b0")
    gist.failing.add("b1")
    h = Harness(gist, batch_max_contacts=2, batch_deadline=0.3)
    messages = [h.send(upsert(f"u{i}", f"u{i}@x.io")) for i in range(2)]
    await _run(h, 2, within=5)
    assert gist.imports() == [["u0", "u1"], ["u0", "u1"]]
    assert [m.failure.reason if m.failure else None for m in messages] == ["batch_timeout"] * 2
    detail = messages[0].failure.detail if messages[0].failure else ""
    assert "did not complete within 0.3 s" in detail, detail
    assert "FAILED" in detail, detail


async def test_a_stuck_batch_does_not_stop_the_polls_of_later_batches() -> None:
    """Regression: only the oldest batches were polled, so a few that never completed
    stopped every later batch."""
    gist = Misbehaving()
    gist.stuck = {"b0", "b1"}
    h = Harness(
        gist, batch_max_contacts=1, poll_window=2, poll_stale_after=0.1, batch_deadline=60
    )
    h.delivery.start()
    try:
        stuck = [h.send(upsert(f"s{i}", f"s{i}@x.io")) for i in range(2)]
        await h.until(lambda: len(gist.batches) == 2)
        later = [h.send(upsert(f"u{i}", f"u{i}@x.io")) for i in range(4)]
        await h.until(lambda: all(m.state == ENDED for m in later))
    finally:
        await h.delivery.close()
    assert all(m.failure is None for m in later)
    assert all(m.state != ENDED for m in stuck)  # still waiting for Gist, not lost


async def test_a_failing_batch_poll_never_sends_the_batch_again_at_once() -> None:
    """Regression: any 4xx on a poll re-sent the batch, without a cap (11 POSTs in 2 s)."""
    gist = Misbehaving()
    gist.poll_http = 400
    h = Harness(gist, batch_max_contacts=1, batch_deadline=0.5)
    message = h.send(upsert("u1", "u1@x.io"))
    await _run(h, 1)
    assert len(gist.imports()) == 2  # the first, and the one re-send past the deadline
    assert message.failure is not None
    assert message.failure.reason == "batch_timeout"


async def test_a_batch_gist_no_longer_knows_is_sent_again_once() -> None:
    gist = Misbehaving()
    gist.poll_http = 404
    h = Harness(gist, batch_max_contacts=1)
    message = h.send(upsert("u1", "u1@x.io"))
    await _run(h, 1)
    assert len(gist.imports()) == 2
    assert message.failure is not None
    assert message.failure.reason == "batch_timeout"


async def test_a_batch_accepted_without_an_id_is_not_halved_into_rejections() -> None:
    """Regression: a 200 without batch_id halved the batch down to single contacts and
    dead-lettered them all as rejected, although Gist may have queued them."""
    gist = Misbehaving()
    gist.no_batch_id = True
    h = Harness(gist, batch_max_contacts=4)
    messages = [h.send(upsert(f"u{i}", f"u{i}@x.io")) for i in range(4)]
    await _run(h, 4)
    assert {len(batch) for batch in gist.imports()} == {4}  # never split
    assert len(gist.imports()) == 3
    assert {m.failure.reason for m in messages if m.failure} == {"gist_unexpected_answer"}


async def test_a_contact_json_cannot_carry_fails_alone_and_its_contact_goes_on() -> None:
    """Regression: an integer beyond 64 bits made orjson raise in the client, the task
    died, the batch was never sent and the contact's later work waited forever."""
    gist = Misbehaving()
    h = Harness(gist, batch_max_contacts=3)
    bad = h.send(upsert("u1", "u1@x.io", big=2**70))
    good = h.send(upsert("u2", "u2@x.io"))
    after = h.send(EventTrack({"event_name": "Later", "user_id": "u1"}))
    await _run(h, 3)
    assert bad.failure is not None
    assert bad.failure.reason == "internal_error"
    assert good.failure is None
    assert after.failure is None  # the chain on u1 went on
    assert gist.imports() == [["u2"]]


async def test_an_unexpected_exception_at_the_edge_dead_letters_with_internal_error() -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/events":
            raise ValueError("a bug somewhere below")
        return FakeGist()(request)

    h = Harness(broken)
    message = h.send(EventTrack({"event_name": "X", "user_id": "u1"}))
    await _run(h, 1)
    assert message.failure is not None
    assert message.failure.reason == "internal_error"
    assert h.delivery.broken is None  # the message ended; nothing is broken
    await h.until(lambda: len(h.sink.written) == 1)


async def test_revoked_work_not_on_the_wire_sends_nothing_more() -> None:
    """Rebalance means stop: a revoked partition's requests that wait for their turn are
    dropped and its contacts leave the batcher; another partition's work goes on."""
    gist = FakeGist()
    release = asyncio.Event()

    async def slow_events(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/events":
            await release.wait()
        return gist(request)

    h = Harness(slow_events, batch_max_contacts=10, requests=1)
    kept = h.ledger.assign(TopicPartition("t", 1))
    h.delivery.start()
    try:
        busy = h.send(EventTrack({"event_name": "Busy", "user_id": "k"}), partition=kept)
        await asyncio.sleep(0.01)  # on the wire, holding the only request slot
        h.send(EventTrack({"event_name": "Queued", "user_id": "a"}))  # waits for the slot
        h.send(upsert("a2", "a2@x.io"))  # waits in the batcher
        stays = h.send(upsert("b1", "b1@x.io"), partition=kept)
        assert await h.delivery.revoke([h.partition]) == 2
        h.ledger.revoke(h.partition.tp)
        release.set()
        await h.until(lambda: stays.state == ENDED and busy.state == ENDED)
        await asyncio.sleep(0.1)
    finally:
        await h.delivery.close()
    batches = [body["contacts"] for path, body in gist.log if path == "POST /contacts/batch"]
    assert batches == [[{"user_id": "b1", "email": "b1@x.io", "custom_properties": {}}]]
    assert [body["event_name"] for path, body in gist.log if path == "POST /events"] == ["Busy"]
    assert h.sink.written == []


async def test_a_request_on_the_wire_when_revoked_is_awaited_and_what_gist_did_recorded() -> None:
    """A revocation does not cut a request Gist is answering: its answer is awaited (a
    bounded time) and recorded, so the new owner does not send the event again; the
    message does not end here (the new owner reads it again)."""
    gist = FakeGist()
    on_wire = asyncio.Event()
    release = asyncio.Event()

    async def slow_events(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/events":
            on_wire.set()
            await release.wait()
        return gist(request)

    recorded: list[tuple[str | None, int]] = []

    class Ids:
        def delivered(self, message: MessageWork, index: int, write: bool) -> None:
            recorded.append((message.message_id, index))

        async def flush(self) -> None:
            recorded.append(("flushed", -1))

    h = Harness(slow_events)
    h.delivery.ids = Ids()
    h.delivery.start()
    try:
        record = h.ledger.open_record(h.partition, 0, None, b"{}", [])
        message = h.ledger.open_message(record, None, "track", None, message_id="m1")
        h.ledger.seal(record)
        h.delivery.submit(message, [EventTrack({"event_name": "X", "user_id": "u"})])
        await on_wire.wait()
        asyncio.get_running_loop().call_later(0.05, release.set)
        assert await h.delivery.revoke([h.partition]) == 1
    finally:
        await h.delivery.close()
    assert recorded == [("m1", 0), ("flushed", -1)]  # recorded, then flushed for the next owner
    assert message.state != ENDED
    assert [p for p, _ in gist.log].count("POST /events") == 1


async def test_a_request_on_the_wire_longer_than_the_revoke_wait_is_cut() -> None:
    gist = FakeGist()
    on_wire = asyncio.Event()

    async def never(request: httpx.Request) -> httpx.Response:
        on_wire.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    h = Harness(never, revoke_wait=0.05)
    h.delivery.start()
    try:
        message = h.send(EventTrack({"event_name": "X", "user_id": "u"}))
        await on_wire.wait()
        async with asyncio.timeout(2):
            assert await h.delivery.revoke([h.partition]) == 1
    finally:
        await h.delivery.close()
    assert message.state != ENDED
    assert gist.log == []


# --- tag changes go many contacts per request ---------------------------------------


class TagGist(FakeGist):
    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/tags":
            body = orjson.loads(request.content)
            self.log.append(("POST /tags", body))
            if any(str(c.get("email", "")).startswith("bad") for c in body["contacts"]):
                return httpx.Response(400, json={"errors": [{"message": "invalid email"}]})
            return httpx.Response(200, json={"tag": {"id": 1, "name": body["name"]}})
        return super().__call__(request)


async def test_tag_changes_of_many_contacts_go_in_one_request() -> None:
    gist = TagGist()
    h = Harness(gist)
    for i in range(7):
        h.send(TagChange("vip", email=f"c{i}@x.io"))
    h.send(TagChange("vip", email="u0@x.io", untag=True))
    await _run(h, 8)
    tags = [body for path, body in gist.log if path == "POST /tags"]
    assert sorted(len(body["contacts"]) for body in tags) == [1, 7]
    (untag,) = [body for body in tags if len(body["contacts"]) == 1]
    assert untag["contacts"] == [{"email": "u0@x.io", "untag": True}]
    assert all(m.failure is None for m in h.settled)


async def test_a_tag_request_gist_refuses_is_halved_until_the_bad_contact_stands_alone() -> None:
    gist = TagGist()
    h = Harness(gist)
    messages = [
        h.send(TagChange("vip", email="bad@x.io" if i == 3 else f"c{i}@x.io")) for i in range(6)
    ]
    await _run(h, 6)
    assert [m.failure.reason if m.failure else None for m in messages] == [
        None, None, None, "gist_rejected", None, None,
    ]  # fmt: skip


async def test_a_tag_change_keeps_its_place_among_the_contacts_operations() -> None:
    gist = TagGist()
    h = Harness(gist)
    h.send(TagChange("vip", user_id="u1"))
    h.send(EventTrack({"event_name": "After", "user_id": "u1"}))
    await _run(h, 2)
    paths = [path for path, _ in gist.log]
    assert paths.index("POST /tags") < paths.index("POST /events")


async def test_nothing_more_of_a_message_goes_once_one_of_its_operations_failed() -> None:
    """Regression (model test seed 41): an identify's upsert failed and its subscription
    change went through all the same: the message was dead-lettered, yet Gist held half
    of it (and a replay of the dead letter would send that half twice). The operations
    after the failure end with it, unsent; another message's go."""
    gist = TagGist()
    h = Harness(gist)
    failed = h.send(
        ContactUpsert({"user_id": "u1", "email": "bad@x.io"}),
        TagChange("vip", user_id="u1"),
        EventTrack({"event_name": "After", "user_id": "u1"}),
    )
    fine = h.send(TagChange("vip", user_id="u2"))
    await _run(h, 2)
    assert [(m, f.reason) for m, f in h.sink.written] == [(failed, "gist_rejected")]
    assert fine.failure is None
    tagged = [c for path, body in gist.log if path == "POST /tags" for c in body["contacts"]]
    assert tagged == [{"user_id": "u2"}]
    assert "POST /events" not in [path for path, _ in gist.log]


async def test_each_request_carries_its_operations_priority() -> None:
    from destination.gist import Priority, RateLimiter

    asked: list[Priority] = []

    class Recording(RateLimiter):
        async def acquire(self, priority: Priority = Priority.NORMAL) -> Any:
            asked.append(priority)
            return await super().acquire(priority)

    h = Harness(TagGist())
    h.delivery.client.limiter = Recording()
    h.delivery.start()
    try:
        h.send(EventTrack({"event_name": "Heartbeat", "user_id": "u9"}, priority=Priority.LOW))
        h.send(upsert("u1", "u1@x.io"))  # contact imports default to high
        h.send(TagChange("vip", user_id="u2", priority=Priority.HIGH))
        await h.until_settled(3)
    finally:
        await h.delivery.close()
    assert asked.count(Priority.LOW) == 1  # the event
    assert asked.count(Priority.HIGH) == 2  # the import and the tag change
    assert set(asked) - {Priority.LOW, Priority.HIGH} == {Priority.CRITICAL}  # status polls


# --- state that stays true through revocations and failed imports ---------------------


async def test_an_update_after_a_batch_cut_by_a_revocation_is_sent() -> None:
    """Regression (repro f1): a batch import cut because another of its partitions was
    revoked put its contacts back with their encoded bodies; the next update of such a
    contact merged into it was never sent, yet its message ended delivered."""
    gist = FakeGist()
    first_in_flight = asyncio.Event()
    imports = 0

    async def first_import_hangs(request: httpx.Request) -> httpx.Response:
        nonlocal imports
        if request.url.path == "/contacts/batch":
            imports += 1
            if imports == 1:
                first_in_flight.set()
                await asyncio.Event().wait()
        return gist(request)

    h = Harness(first_import_hangs, revoke_wait=0.05)
    other = h.ledger.assign(TopicPartition("t", 1))
    h.delivery.start()
    try:
        m1 = h.send(upsert("alice", "alice@x.io", plan="free"))
        h.send(upsert("bob", "bob@x.io", plan="x"), partition=other)
        await first_in_flight.wait()  # alice and bob in one import, on the wire
        await h.delivery.revoke([other])  # bob's partition goes; the import is cut
        h.ledger.revoke(other.tp)
        m2 = h.send(upsert("alice", "alice@x.io", plan="pro", seats=5))
        await h.until(lambda: m1.state == ENDED and m2.state == ENDED)
    finally:
        await h.delivery.close()
    sent = [
        c for path, body in gist.log if path == "POST /contacts/batch" for c in body["contacts"]
    ]
    assert sent[-1] == {
        "user_id": "alice",
        "email": "alice@x.io",
        "custom_properties": {"plan": "pro", "seats": 5},
    }
    assert m1.failure is None
    assert m2.failure is None
    assert all(c["user_id"] == "alice" for c in sent[1:])  # nothing more of bob's


async def test_tag_changes_of_a_partition_not_revoked_still_go_after_a_revocation() -> None:
    """Regression (repro f4): abandoning a revoked partition's work rebuilt every waiting
    tag group, orphaning the group's timer: another partition's tag change never went
    (and held its offset) until 49 more changes of that tag arrived."""
    gist = TagGist()
    release = asyncio.Event()

    async def slow_events(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/events":
            await release.wait()
        return gist(request)

    h = Harness(slow_events, revoke_wait=0.05)
    other = h.ledger.assign(TopicPartition("t", 1))
    h.delivery.start()
    try:
        h.send(EventTrack({"event_name": "Slow", "user_id": "bob"}), partition=other)
        h.send(TagChange("vip", user_id="carol"), partition=other)  # same tag, revoked
        tag = h.send(TagChange("vip", user_id="alice"))  # waits to fill a POST /tags
        later = h.send(ContactUpsert({"user_id": "alice", "custom_properties": {"a": 1}}))
        await asyncio.sleep(0.01)
        await h.delivery.revoke([other])
        h.ledger.revoke(other.tp)
        await h.until(lambda: tag.state == ENDED and later.state == ENDED, within=3)
    finally:
        release.set()
        await h.delivery.close()
    tags = [body for path, body in gist.log if path == "POST /tags"]
    assert tags == [{"name": "vip", "contacts": [{"user_id": "alice"}]}]
    assert h.partition.offsets.committable() == later.record.offset + 1


async def test_contacts_sent_again_are_in_flight_again_not_parked() -> None:
    """Regression: ``Outcomes.unaccepted`` was never called, so contacts of an accepted
    batch sent again (past its deadline) stayed counted as parked."""
    gist = Misbehaving()
    gist.status = "IN_PROGRESS"
    h = Harness(gist, batch_max_contacts=2, batch_deadline=0.2)
    h.delivery.start()
    try:
        messages = [h.send(upsert(f"u{i}", f"u{i}@x.io")) for i in range(2)]
        await h.until(lambda: h.ledger.parked == 2)
        await h.until(lambda: len(gist.imports()) == 2)  # sent again past the deadline
        await asyncio.sleep(0)
        assert h.ledger.parked + h.ledger.messages == 2
        await h.until(lambda: all(m.state == ENDED for m in messages))
    finally:
        await h.delivery.close()
    assert h.ledger.parked == 0
    assert h.ledger.messages == 0


async def test_batches_answering_unknown_statuses_do_not_hold_up_later_batches() -> None:
    """Regression: four batches stuck on a status the client does not know took the poll
    window for an hour: a batch made after them was polled 0 times in 3 minutes while
    its contacts held their partition's offset."""
    gist = Misbehaving()

    def unknown_for_the_first_four(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.startswith("/contacts/batch/") and path.rsplit("/", 1)[1] in {
            "b0", "b1", "b2", "b3",
        }:  # fmt: skip
            gist.log.append((f"GET {path}", None))
            return httpx.Response(200, json={"status": "PAUSED"})
        return gist(request)

    h = Harness(unknown_for_the_first_four, batch_max_contacts=1, poll_window=4)
    h.delivery.start()
    try:
        stuck = [h.send(upsert(f"s{i}", f"s{i}@x.io")) for i in range(4)]
        await h.until(lambda: len(gist.batches) == 4)
        await h.until(lambda: sum(1 for p, _ in gist.log if p.startswith("GET ")) >= 4)
        later = h.send(upsert("late", "late@x.io"))
        await h.until(lambda: later.state == ENDED, within=3)
    finally:
        await h.delivery.close()
    assert later.failure is None
    assert all(m.state != ENDED for m in stuck)


async def test_a_contacts_body_counts_in_the_bytes_in_flight_until_its_import_ends() -> None:
    """Regression (repro f7): parked messages kept their encoded bodies although their
    records' bytes were released (9.4 MB for 300 parked, counted as 0 against
    MAX_INFLIGHT_BYTES)."""
    gist = Misbehaving()
    gist.stuck = {"b0"}
    h = Harness(gist, batch_max_contacts=10, batch_deadline=60)
    h.delivery.start()
    try:
        messages = [h.send(upsert(f"u{i}", f"u{i}@x.io", blob="y" * 3000)) for i in range(5)]
        await h.until(lambda: h.ledger.parked == 5)
        assert h.ledger.bytes >= 5 * 3000  # the bodies, though every record is released
        gist.stuck = set()
        await h.until(lambda: all(m.state == ENDED for m in messages))
    finally:
        await h.delivery.close()
    assert h.ledger.bytes == 0


async def test_an_operation_skipped_as_gist_holds_it_is_recorded_as_done() -> None:
    """A subscription change or cart line skipped because Gist holds it is done, as a
    contact skipped as unchanged is: a producer's copy read later must not send it again
    over newer values (model test seed 16 at 80 steps: a copy re-sent a subscription)."""
    recorded: list[tuple[str | None, int, bool]] = []

    class Ids:
        def delivered(self, message: MessageWork, index: int, write: bool) -> None:
            recorded.append((message.message_id, index, write))

        async def flush(self) -> None:
            pass

    h = Harness(FakeGist())
    h.delivery.ids = Ids()
    try:
        record = h.ledger.open_record(h.partition, 0, None, b"{}", [])
        message = h.ledger.open_message(record, None, "identify", None, message_id="m1")
        h.ledger.seal(record)
        h.delivery.submit(message, [TagChange("vip", user_id="u")])
        (step,) = list(h.delivery._open)
        h.delivery.settle(step, Skip(reasons.UNCHANGED))
    finally:
        await h.delivery.close()
    assert recorded == [("m1", 0, True)]
    assert message.state == ENDED
