"""Leaving out of an upsert what Gist already holds, and still ending with the values of
the last message for every contact."""

from __future__ import annotations

import asyncio
import random
import tracemalloc
from typing import Any

import httpx
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from destination.gist import ContactPayload, GistClient, RateLimit, RateLimiter, RetryPolicy
from destination.operations import ContactDelete, ContactUpsert
from destination.pipeline.deliver import Delivery, DeliverySettings
from destination.pipeline.fingerprints import Fingerprints
from destination.pipeline.inflight import ENDED, Failure, Ledger, MessageWork, TopicPartition
from destination.pipeline.outcome import Outcomes


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def remembered(payload: dict[str, Any], **kwargs: Any) -> Fingerprints:
    prints = Fingerprints(3600.0, 100, **kwargs)
    _, sent, _ = prints.strip(payload)  # type: ignore[arg-type]
    prints.confirm("u:u1", sent)
    return prints


def test_fields_gist_holds_are_left_out() -> None:
    prints = remembered(
        {
            "user_id": "u1",
            "email": "a@x.io",
            "name": "Ada",
            "custom_properties": {"plan": "free", "seats": 3},
        }
    )
    stripped, _, left_out = prints.strip(
        {
            "user_id": "u1",
            "email": "A@x.io",
            "name": "Ada",
            "custom_properties": {"plan": "pro", "seats": 3},
        }
    )
    assert stripped == {"user_id": "u1", "custom_properties": {"plan": "pro"}}
    assert left_out == 3  # email (case is Gist's), name, seats


def test_an_upsert_of_nothing_new_is_not_sent() -> None:
    prints = remembered({"user_id": "u1", "custom_properties": {"vip": True}, "tags": ["beta"]})
    stripped, _, _ = prints.strip({"user_id": "u1", "custom_properties": {"vip": True}})
    assert stripped is None
    stripped, _, _ = prints.strip({"user_id": "u1", "tags": ["BETA"]})
    assert stripped is None
    stripped, _, _ = prints.strip({"user_id": "u1", "tags": ["beta", "new"]})
    assert stripped == {"user_id": "u1", "tags": ["new"]}


def test_a_contact_never_confirmed_is_sent_whole() -> None:
    prints = Fingerprints(3600.0, 100)
    payload = {"user_id": "u1", "custom_properties": {"plan": "pro"}}
    stripped, _, left_out = prints.strip(payload)  # type: ignore[arg-type]
    assert stripped == payload
    assert left_out == 0


def test_values_are_trusted_for_the_ttl_only() -> None:
    clock = Clock()
    prints = remembered({"user_id": "u1", "name": "Ada"}, clock=clock)
    clock.now = 3599.0
    assert prints.strip({"user_id": "u1", "name": "Ada"})[0] is None
    clock.now = 3601.0  # a person may have edited it in Gist: send it again
    assert prints.strip({"user_id": "u1", "name": "Ada"})[0] == {"user_id": "u1", "name": "Ada"}


def test_the_least_recently_used_contacts_are_forgotten_past_the_capacity() -> None:
    prints = Fingerprints(3600.0, 2)
    for user in ("a", "b", "c"):
        _, sent, _ = prints.strip({"user_id": user, "name": "N"})
        prints.confirm(f"u:{user}", sent)
    assert len(prints) == 2
    assert prints.strip({"user_id": "a", "name": "N"})[0] is not None  # forgotten
    assert prints.strip({"user_id": "c", "name": "N"})[0] is None


def test_forget_sends_everything_again() -> None:
    prints = remembered({"user_id": "u1", "name": "Ada"})
    prints.forget(["u:u1"])
    assert prints.strip({"user_id": "u1", "name": "Ada"})[0] is not None


def test_bytes_per_contact_are_measured() -> None:
    """The figure the README states: about 250 bytes a contact with nine fields."""
    prints = Fingerprints(3600.0, 100_000)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for n in range(20_000):
        payload = {
            "user_id": f"user-{n}",
            "name": "N",
            "custom_properties": {f"p{i}": i for i in range(8)},
        }
        _, sent, _ = prints.strip(payload)  # type: ignore[arg-type]
        prints.confirm(f"u:user-{n}", sent)
    per_contact = (tracemalloc.get_traced_memory()[0] - before) / 20_000
    tracemalloc.stop()
    assert per_contact < 300, per_contact  # 9 fields: 144 bytes of hashes, the key, a slot


# --- through the delivery engine ------------------------------------------------------
class Gist:
    """Batch imports completing in a random order (after a random number of polls);
    applies each contact's fields as Gist would, keeps what was sent."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.contacts: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, list[dict[str, Any]]] = {}
        self.polls_left: dict[str, int] = {}
        self.sent: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/contacts/batch":
            contacts = orjson.loads(request.content)["contacts"]
            self.sent.extend(contacts)
            batch_id = f"b{len(self.batches)}"
            self.batches[batch_id] = contacts
            self.polls_left[batch_id] = self.rng.randint(0, 3)
            return httpx.Response(200, json={"status": "QUEUED", "batch_id": batch_id})
        if path.startswith("/contacts/batch/"):
            batch_id = path.rsplit("/", 1)[1]
            if self.polls_left[batch_id] > 0:
                self.polls_left[batch_id] -= 1
                return httpx.Response(200, json={"status": "IN_PROGRESS"})
            contacts = self.batches[batch_id]
            if self.polls_left[batch_id] == 0:
                self.polls_left[batch_id] = -1
                for contact in contacts:
                    stored = self.contacts.setdefault(contact["user_id"], {})
                    for name, value in contact.items():
                        if name == "custom_properties":
                            stored.setdefault(name, {}).update(value)
                        else:
                            stored[name] = value
            return httpx.Response(
                200,
                json={"status": "COMPLETED", "imported_contacts": len(contacts), "errors": []},
            )
        if request.method == "DELETE":
            self.contacts.pop(request.url.params["user_id"], None)
            return httpx.Response(200, json={})
        return httpx.Response(404, json={})


class Sink:
    async def write(self, message: MessageWork, failure: Failure) -> None:
        raise AssertionError(f"dead letter: {failure}")


async def deliver(
    waves: list[list[Any]], seed: int, memory: bool
) -> tuple[Gist, list[MessageWork]]:
    """Send each wave of updates, waiting for it to end before the next."""
    gist = Gist(random.Random(seed))
    ledger = Ledger()
    outcomes = Outcomes(ledger, Sink())
    partition = ledger.assign(TopicPartition("t", 0))
    client = GistClient(
        "k", base_url="http://gist.test", transport=httpx.MockTransport(gist),
        retry=RetryPolicy(base=0.001, cap=0.002),
        limiter=RateLimiter(RateLimit(10_000, 1.0, 0.0, pace=False)),
    )  # fmt: skip
    delivery = Delivery(
        client,
        DeliverySettings(batch_max_contacts=3, batch_max_wait=0.005, poll_interval=0.001,
                         poll_max_interval=0.002),
        outcomes,
        on_fatal=lambda error: None,
        fingerprints=Fingerprints(3600.0, 1000) if memory else None,
    )  # fmt: skip
    messages: list[MessageWork] = []
    offset = 0
    delivery.start()
    try:
        for wave in waves:
            for update in wave:
                record = ledger.open_record(partition, offset, None, b"{}", [])
                offset += 1
                message = ledger.open_message(record, None, "identify", None)
                ledger.seal(record)
                delivery.submit(message, (update,))
                messages.append(message)
                if offset % 4 == 3:
                    await asyncio.sleep(0.001)
            async with asyncio.timeout(20):
                while any(m.state != ENDED for m in messages):  # noqa: ASYNC110 - polling
                    await asyncio.sleep(0.002)
    finally:
        await delivery.close()
    return gist, messages


def last_values(updates: list[Any]) -> dict[str, dict[str, Any]]:
    """What each contact holds after applying the updates in order (Gist's upsert)."""
    final: dict[str, dict[str, Any]] = {}
    for update in updates:
        if isinstance(update, ContactDelete):
            final.pop(str(update.user_id), None)
            continue
        contact: ContactPayload = update.contact
        stored = final.setdefault(str(contact["user_id"]), {})
        for name, value in contact.items():
            if name == "custom_properties":
                stored.setdefault(name, {}).update(value)  # type: ignore[union-attr]
            else:
                stored[name] = value
    return final


updates_strategy = st.lists(
    st.one_of(
        st.builds(
            lambda user, props: ContactUpsert({"user_id": user, "custom_properties": props}),
            st.sampled_from(["a", "b", "c"]),
            st.dictionaries(
                st.sampled_from(["plan", "seats", "vip"]), st.integers(0, 2), min_size=1
            ),
        ),
        st.builds(lambda user: ContactDelete(user_id=user), st.sampled_from(["a", "b", "c"])),
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=40, deadline=None)
@given(updates=updates_strategy, seed=st.integers(0, 1000))
def test_final_state_is_the_last_message_whatever_the_order_batches_complete(
    updates: list[Any], seed: int
) -> None:
    gist, messages = asyncio.run(deliver([updates], seed, memory=True))
    assert all(m.failure is None for m in messages)
    assert gist.contacts == last_values(updates)


def test_a_resync_of_unchanged_contacts_sends_nothing() -> None:
    def audience(user: str, member: bool) -> ContactUpsert:
        return ContactUpsert({"user_id": user, "custom_properties": {"vip": member}})

    first = [audience(f"u{i}", True) for i in range(9)]
    resync = [audience(f"u{i}", True) for i in range(9)] + [audience("u0", False)]
    gist, messages = asyncio.run(deliver([first, resync], 1, memory=True))
    assert len(gist.sent) == 10  # the first nine, and the one change
    assert gist.sent[-1] == {"user_id": "u0", "custom_properties": {"vip": False}}
    assert gist.contacts["u0"]["custom_properties"] == {"vip": False}
    assert sum(m.skipped == "unchanged" for m in messages) == 9
    without, _ = asyncio.run(deliver([first, resync], 1, memory=False))
    assert len(without.sent) == 19
