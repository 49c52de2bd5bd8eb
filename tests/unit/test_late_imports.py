"""A delete outlasts the imports of its contact that were given up on (``BatchPolls.outlast``).

Gist faked at the HTTP edge with a small store: an import it holds back is imported, and
reported COMPLETED, only when the test lets it (``land``), whatever the worker decided.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import structlog

from destination.observability import metrics
from destination.operations import ContactDelete
from destination.pipeline.inflight import ENDED, MessageWork
from tests.unit.test_deliver import Harness, upsert


class LateGist:
    """Batch imports held back (``IN_PROGRESS``) until ``land`` imports them; deletes
    remove the contact by user id or e-mail; a batch in ``failing`` answers FAILED and
    one in ``forgotten`` 404."""

    def __init__(self) -> None:
        self.contacts: dict[str, dict[str, Any]] = {}  # by user_id
        self.batches: dict[str, list[dict[str, Any]]] = {}
        self.landed: set[str] = set()
        self.failing: set[str] = set()
        self.forgotten: set[str] = set()
        self.log: list[str] = []

    def land(self, *batch_ids: str) -> None:
        for batch_id in batch_ids:
            for contact in self.batches[batch_id]:
                self.contacts[contact["user_id"]] = dict(contact)
            self.landed.add(batch_id)

    def deletes(self) -> int:
        return sum(1 for line in self.log if line.startswith("DELETE"))

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.log.append(f"{request.method} {path}")
        if request.method == "POST" and path == "/contacts/batch":
            batch_id = f"b{len(self.batches)}"
            self.batches[batch_id] = orjson.loads(request.content)["contacts"]
            return httpx.Response(
                200, json={"status": "QUEUED", "queued_contacts": 1, "batch_id": batch_id}
            )
        if path.startswith("/contacts/batch/"):
            batch_id = path.rsplit("/", 1)[1]
            if batch_id in self.forgotten:
                return httpx.Response(404, json={"errors": [{"code": "not_found"}]})
            if batch_id in self.failing:
                return httpx.Response(200, json={"status": "FAILED"})
            if batch_id not in self.landed:
                return httpx.Response(200, json={"status": "IN_PROGRESS"})
            imported = len(self.batches[batch_id])
            return httpx.Response(
                200, json={"status": "COMPLETED", "imported_contacts": imported, "errors": []}
            )
        if request.method == "DELETE" and path == "/contacts":
            user_id = request.url.params.get("user_id")
            email = request.url.params.get("email")
            gone = [
                key
                for key, c in self.contacts.items()
                if (user_id is not None and c.get("user_id") == user_id)
                or (email is not None and c.get("email") == email)
            ]
            for key in gone:
                del self.contacts[key]
            if not gone:
                return httpx.Response(404, json={"errors": [{"code": "not_found"}]})
            return httpx.Response(200, json={})
        return httpx.Response(404, json={})


def harness(gist: LateGist, **settings: Any) -> Harness:
    options: dict[str, Any] = {"batch_max_contacts": 1, "batch_deadline": 0.15, **settings}
    return Harness(gist, **options)


async def give_up_on_an_import_of_u1(h: Harness) -> MessageWork:
    """u1's identify: imported as b0, past the deadline sent again as b1, past it again
    dead-lettered (``batch_timeout``), both imports still held back by Gist."""
    identify = h.send(upsert("u1", "u1@x.io", plan="pro"))
    await h.until(lambda: identify.state == ENDED)
    assert identify.failure is not None
    assert identify.failure.reason == "batch_timeout"
    return identify


def delete_u1() -> ContactDelete:
    return ContactDelete(user_id="u1", email="u1@x.io")


@contextlib.asynccontextmanager
async def a_delete_waiting(
    gist: LateGist, **settings: Any
) -> AsyncIterator[tuple[Harness, MessageWork]]:
    """u1's import given up on, then u1's delete sent (by user id and e-mail): the
    harness and the delete's message, delivery running until the block ends."""
    h = harness(gist, **settings)
    h.delivery.start()
    try:
        await give_up_on_an_import_of_u1(h)
        delete = h.send(delete_u1())
        await h.until(lambda: gist.deletes() == 2)
        yield h, delete
    finally:
        await h.delivery.close()


async def test_a_delete_is_sent_again_when_an_import_given_up_on_lands_after_it() -> None:
    """Regression (model test seed 52 at 80 steps): an identify's import did not complete
    in time and its message was dead-lettered; the person's delete went; Gist imported the
    identify afterwards and the deleted contact came back. Now the delete waits for the
    imports given up on, and goes again when one lands."""
    gist = LateGist()
    repeated = metrics.DELETES_REPEATED._value.get()
    async with a_delete_waiting(gist) as (h, delete):
        await asyncio.sleep(0.2)
        assert delete.state != ENDED  # the imports' fate is unknown yet
        gist.land("b0")  # late: after the delete
        assert "u1" in gist.contacts
        await h.until(lambda: gist.deletes() == 4)
        assert gist.contacts == {}  # deleted again
        await asyncio.sleep(0.1)
        assert delete.state != ENDED  # b1 may land yet
        gist.land("b1")
        await h.until(lambda: delete.state == ENDED)
    assert delete.failure is None
    assert gist.contacts == {}
    assert gist.deletes() == 6
    assert metrics.DELETES_REPEATED._value.get() == repeated + 2
    assert h.partition.offsets.committable() == 2


async def test_deletes_waiting_for_one_import_share_its_polls() -> None:
    """A purge of many people whose import was given up on: one poll per interval for
    the import, not one per delete (each would take a request from the budget)."""
    gist = LateGist()
    h = harness(gist, batch_max_contacts=20, poll_max_interval=0.05)
    h.delivery.start()
    try:
        identifies = [h.send(upsert(f"u{i}", f"u{i}@x.io")) for i in range(20)]
        await h.until(lambda: all(m.state == ENDED for m in identifies))
        deletes = [h.send(ContactDelete(user_id=f"u{i}")) for i in range(20)]
        await h.until(lambda: gist.deletes() == 20)
        before = sum(1 for line in gist.log if line.startswith("GET"))
        await asyncio.sleep(0.5)
        polls = sum(1 for line in gist.log if line.startswith("GET")) - before
        assert all(m.state != ENDED for m in deletes)
        gist.failing.update({"b0", "b1"})
        await h.until(lambda: all(m.state == ENDED for m in deletes))
    finally:
        await h.delivery.close()
    assert 0 < polls <= 2 * (0.5 / 0.05 + 2)  # two imports (b0, b1), each polled alone
    assert gist.deletes() == 20


@pytest.mark.parametrize("fate", ["failing", "forgotten"])
async def test_a_delete_ends_once_gist_says_the_import_given_up_on_will_not_land(
    fate: str,
) -> None:
    gist = LateGist()
    async with a_delete_waiting(gist) as (h, delete):
        await asyncio.sleep(0.1)
        assert delete.state != ENDED
        getattr(gist, fate).update({"b0", "b1"})
        await h.until(lambda: delete.state == ENDED)
    assert delete.failure is None
    assert gist.deletes() == 2  # nothing landed: once is enough


async def test_a_delete_waits_no_longer_than_the_watch_and_says_it_may_be_undone() -> None:
    gist = LateGist()
    h = harness(gist, late_import_watch=0.6)
    h.delivery.start()
    try:
        with structlog.testing.capture_logs() as logs:
            await give_up_on_an_import_of_u1(h)
            delete = h.send(delete_u1())
            await h.until(lambda: delete.state == ENDED)
    finally:
        await h.delivery.close()
    assert delete.failure is None
    assert gist.deletes() == 2
    undone = [e for e in logs if e["event"] == "gist.delete_may_be_undone"]
    assert {e["batch_id"] for e in undone} == {"b0", "b1"}
    assert all("u1" not in str(e) for e in logs)  # no identity in the logs


@pytest.mark.parametrize(
    ("watch", "user"),
    [(0.0, "u1"), (600.0, "u2")],
    ids=["without-a-watch", "another-contact"],
)
async def test_a_delete_that_has_nothing_to_outlast_ends_at_once(watch: float, user: str) -> None:
    """With ``GIST_LATE_IMPORT_WATCH=0``, or for a contact no import given up on carried,
    the delete ends once sent, and no import is polled for it."""
    gist = LateGist()
    h = harness(gist, late_import_watch=watch)
    h.delivery.start()
    try:
        await give_up_on_an_import_of_u1(h)
        polls = sum(1 for line in gist.log if line.startswith("GET"))
        delete = h.send(ContactDelete(user_id=user, email=f"{user}@x.io"))
        await h.until(lambda: delete.state == ENDED)
    finally:
        await h.delivery.close()
    assert delete.failure is None
    assert sum(1 for line in gist.log if line.startswith("GET")) == polls


async def test_a_revocation_while_a_delete_waits_leaves_it_to_the_next_owner() -> None:
    """The delete went, its message did not end: the next owner reads it again and sends
    it again (nothing is committed over it)."""
    async with a_delete_waiting(LateGist()) as (h, delete):
        await h.delivery.revoke([h.partition])
    assert delete.state != ENDED
    assert h.partition.offsets.committable() == 1  # the identify, not the delete
