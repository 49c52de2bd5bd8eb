"""Contact memory: leaving out of an upsert what Gist already holds, never what it does
not, and still ending with the values of the last message for every contact. Each way a
record can go stale has a test here (the reproductions of ``../shared/repro/f2`` and
``f8`` among them)."""

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
from destination.pipeline.inflight import (
    ENDED,
    Failure,
    Ledger,
    MessageWork,
    PartitionWork,
    TopicPartition,
)
from destination.pipeline.memory import MAX_FIELDS, ContactMemory
from destination.pipeline.outcome import Outcomes

P0 = PartitionWork(TopicPartition("t", 0))


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def identities(payload: dict[str, Any]) -> tuple[str, ...]:
    out = []
    if payload.get("user_id") is not None:
        out.append("u:" + payload["user_id"])
    if payload.get("email") is not None:
        out.append("e:" + payload["email"].lower())
    return tuple(out)


def strip(
    memory: ContactMemory, payload: dict[str, Any], partition: PartitionWork = P0
) -> Any:
    stripped, _, _ = memory.strip(payload, identities(payload), partition)  # type: ignore[arg-type]
    return stripped


def confirm(memory: ContactMemory, payload: dict[str, Any], partition: PartitionWork = P0) -> None:
    _, note, _ = memory.strip(payload, identities(payload), partition)  # type: ignore[arg-type]
    memory.confirm(note)


def remembered(payload: dict[str, Any], **kwargs: Any) -> ContactMemory:
    memory = ContactMemory(3600.0, 100, **kwargs)
    confirm(memory, payload)
    return memory


def test_fields_gist_holds_are_left_out() -> None:
    memory = remembered(
        {
            "user_id": "u1",
            "email": "a@x.io",
            "name": "Ada",
            "custom_properties": {"plan": "free", "seats": 3},
        }
    )
    stripped = strip(
        memory,
        {
            "user_id": "u1",
            "email": "A@x.io",
            "name": "Ada",
            "custom_properties": {"plan": "pro", "seats": 3},
        },
    )
    assert stripped == {"user_id": "u1", "custom_properties": {"plan": "pro"}}


def test_an_upsert_of_nothing_new_is_not_sent() -> None:
    memory = remembered({"user_id": "u1", "custom_properties": {"vip": True}, "tags": ["beta"]})
    assert strip(memory, {"user_id": "u1", "custom_properties": {"vip": True}}) is None
    assert strip(memory, {"user_id": "u1", "tags": ["BETA"]}) is None
    assert strip(memory, {"user_id": "u1", "tags": ["beta", "new"]}) == {
        "user_id": "u1",
        "tags": ["new"],
    }


def test_an_upsert_of_a_known_contacts_identity_alone_is_not_sent() -> None:
    """Consent's subscriptions add an identity-only upsert (Gist subscribes only a
    contact it has): for a contact Gist confirmed, it sends nothing."""
    memory = remembered({"user_id": "u1", "custom_properties": {"vip": True}})
    assert strip(memory, {"user_id": "u1"}) is None
    assert strip(ContactMemory(3600, 100), {"user_id": "u1"}) == {"user_id": "u1"}


def test_a_contact_never_confirmed_is_sent_whole() -> None:
    memory = ContactMemory(3600.0, 100)
    payload = {"user_id": "u1", "custom_properties": {"plan": "pro"}}
    assert strip(memory, payload) == payload


def test_a_value_of_another_json_type_is_another_value() -> None:
    """Regression (repro f8): 1, 1.0 and true hashed alike, so a property changed from 1
    to true (or 0 to false, 1.0 to 1) was left out and Gist kept the old value."""
    for old, new in ((1, True), (0, False), (1.0, 1), (True, 1), ("1", 1), (None, False)):
        memory = remembered({"user_id": "u1", "custom_properties": {"paying": old}})
        assert strip(memory, {"user_id": "u1", "custom_properties": {"paying": new}}) == {
            "user_id": "u1",
            "custom_properties": {"paying": new},
        }, (old, new)
    memory = remembered({"user_id": "u1", "custom_properties": {"n": [1, {"a": 1.0}]}})
    assert strip(memory, {"user_id": "u1", "custom_properties": {"n": [1, {"a": 1}]}}) is not None
    assert strip(memory, {"user_id": "u1", "custom_properties": {"n": [1, {"a": 1.0}]}}) is None


def test_memory_lasts_the_ttl_from_its_first_record_however_often_confirmed() -> None:
    """Regression (repro f2 c): each confirmation renewed the TTL, so a value a person
    edited in Gist never came back while the contact kept changing. Now a record lives
    ``ttl`` from when it was first made; then everything is sent once again."""
    clock = Clock()
    memory = remembered({"user_id": "u1", "name": "Ada", "seen": 0}, clock=clock)
    for hour in range(1, 4):  # the contact changes every twenty minutes, for an hour
        clock.now += 1200
        assert strip(memory, {"user_id": "u1", "name": "Ada", "seen": hour}) == {
            "user_id": "u1",
            "seen": hour,
        }
        confirm(memory, {"user_id": "u1", "name": "Ada", "seen": hour})
    clock.now += 1  # 3601 s after the first record
    assert strip(memory, {"user_id": "u1", "name": "Ada", "seen": 3}) == {
        "user_id": "u1",
        "name": "Ada",
        "seen": 3,
    }


def test_the_least_recently_used_contacts_are_forgotten_past_the_capacity() -> None:
    memory = ContactMemory(3600.0, 2)
    for user in ("a", "b", "c"):
        confirm(memory, {"user_id": user, "name": "N"})
    assert len(memory) == 2
    assert strip(memory, {"user_id": "a", "name": "N"}) is not None  # forgotten
    assert strip(memory, {"user_id": "c", "name": "N"}) is None


def test_past_the_capacity_a_hundredth_is_forgotten_at_a_time() -> None:
    """Regression (CPU): one least recently used record was forgotten per new one, each
    eviction walking a dict's deleted front slots (62% of the worker's CPU draining
    1,000,000 identifies; benchmarks/bench_memory_eviction.py). Past the bound a
    hundredth goes at once, oldest first, and the next hundredth of contacts is taken
    without an eviction."""
    memory = ContactMemory(3600.0, 1000)
    for i in range(1000):
        confirm(memory, {"user_id": f"u{i}", "name": "N"})
    assert len(memory) == 1000
    confirm(memory, {"user_id": "u1000", "name": "N"})
    assert len(memory) == 990  # 11 oldest forgotten: the bound with a hundredth to spare
    assert strip(memory, {"user_id": "u10", "name": "N"}) is not None  # forgotten
    assert strip(memory, {"user_id": "u11", "name": "N"}) is None  # kept
    for i in range(1001, 1011):
        confirm(memory, {"user_id": f"u{i}", "name": "N"})
    assert len(memory) == 1000  # room for a hundredth: nothing evicted


def test_memory_is_bounded_in_bytes_and_fields_per_contact() -> None:
    """Regression (repro f7): 16 bytes a field and no cap on fields: 1,500 traits a
    contact made 4.9 GB at the default 200,000 contacts."""
    memory = ContactMemory(3600.0, 200_000, max_bytes=1_000_000)
    for c in range(200):
        traits = {f"t{k}": k for k in range(1500)}
        confirm(memory, {"user_id": f"u{c}", "custom_properties": traits})
    assert memory.held_bytes <= 1_000_000
    per_contact = memory.held_bytes / len(memory)
    assert per_contact < 16 * 2 * (MAX_FIELDS + 8), per_contact
    # The fields beyond the cap are simply sent again.
    traits = {f"t{k}": k for k in range(1500)}
    kept = strip(memory, {"user_id": "u199", "custom_properties": traits})
    assert kept is not None
    assert len(kept["custom_properties"]) == 1500 - MAX_FIELDS


def test_invalidate_sends_everything_again() -> None:
    memory = remembered({"user_id": "u1", "email": "a@x.io", "name": "Ada"})
    memory.invalidate(["e:a@x.io"], P0)  # any one of its keys forgets it
    assert strip(memory, {"user_id": "u1", "email": "a@x.io", "name": "Ada"}) is not None
    assert len(memory) == 0


def test_a_record_serves_only_writes_with_exactly_its_identities() -> None:
    """Regression (repro f2 e): memory was keyed by one identity, so a write under the
    user id left what the e-mail key remembered stale, and an e-mail-only update carrying
    the value the e-mail key last saw was skipped although the contact had changed."""
    email = "alice@example.com"
    memory = ContactMemory(3600.0, 100)
    confirm(memory, {"email": email, "custom_properties": {"plan": "free"}})
    confirm(memory, {"user_id": "alice", "email": email, "custom_properties": {"plan": "pro"}})
    assert strip(memory, {"email": email, "custom_properties": {"plan": "free"}}) is not None
    # And the other way: a user-id-only write leaves nothing the e-mail could trust.
    memory = ContactMemory(3600.0, 100)
    confirm(memory, {"user_id": "alice", "email": email, "custom_properties": {"plan": "pro"}})
    confirm(memory, {"user_id": "alice", "custom_properties": {"plan": "free"}})
    for later in (
        {"email": email, "custom_properties": {"plan": "pro"}},
        {"user_id": "alice", "email": email, "custom_properties": {"plan": "pro"}},
    ):
        assert strip(memory, later) is not None, later
    assert strip(memory, {"user_id": "alice", "custom_properties": {"plan": "free"}}) is None


def test_a_record_serves_only_the_partition_that_confirmed_it_and_a_revoke_drops_it() -> None:
    """Regression (repro f2 a): a partition revoked and assigned again kept its memory,
    though another replica may have written its contacts meanwhile."""
    p1 = PartitionWork(TopicPartition("t", 1))
    memory = ContactMemory(3600.0, 100)
    confirm(memory, {"user_id": "u1", "name": "Ada"})
    assert strip(memory, {"user_id": "u1", "name": "Ada"}, p1) is not None  # another partition
    memory.revoke([P0])
    again = PartitionWork(TopicPartition("t", 0))  # assigned again: a new PartitionWork
    assert strip(memory, {"user_id": "u1", "name": "Ada"}, again) is not None
    assert len(memory) == 0


def test_a_confirmation_of_a_revoked_partition_is_not_recorded() -> None:
    p = PartitionWork(TopicPartition("t", 3))
    memory = ContactMemory(3600.0, 100)
    _, note, _ = memory.strip({"user_id": "u1", "name": "Ada"}, ("u:u1",), p)  # type: ignore[arg-type]
    p.revoked = True
    memory.confirm(note)
    assert len(memory) == 0


def test_bytes_per_contact_are_measured() -> None:
    """The figure the README states: about 250 bytes a contact with nine fields."""
    memory = ContactMemory(3600.0, 100_000, max_bytes=1 << 40)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for n in range(20_000):
        confirm(
            memory,
            {
                "user_id": f"user-{n}",
                "name": "N",
                "custom_properties": {f"p{i}": i for i in range(8)},
            },
        )
    per_contact = (tracemalloc.get_traced_memory()[0] - before) / 20_000
    tracemalloc.stop()
    assert per_contact < 330, per_contact  # 9 fields: 144 bytes of hashes, a key, a slot


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
        memory=ContactMemory(3600.0, 1000) if memory else None,
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


async def test_a_write_that_timed_out_is_forgotten_so_the_next_one_is_sent() -> None:
    """Regression (repro f2 b): a batch dead-lettered batch_timeout that Gist imported
    after all left memory with the value before it, so a later message carrying that
    value was skipped as unchanged while Gist held the timed-out one."""
    store: dict[str, Any] = {}
    stuck = False
    batches: dict[str, int] = {}

    def gist(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/contacts/batch":  # Gist imports it sooner or later: here, at once
            contacts = orjson.loads(request.content)["contacts"]
            for contact in contacts:
                store.setdefault(contact["user_id"], {}).update(contact["custom_properties"])
            batch_id = f"b{len(batches)}"
            batches[batch_id] = len(contacts)
            return httpx.Response(200, json={"status": "QUEUED", "batch_id": batch_id})
        if stuck:
            return httpx.Response(200, json={"status": "IN_PROGRESS"})
        count = batches[path.rsplit("/", 1)[1]]
        return httpx.Response(
            200, json={"status": "COMPLETED", "imported_contacts": count, "errors": []}
        )

    ledger = Ledger()
    written: list[Failure] = []

    class Sink:
        async def write(self, message: MessageWork, failure: Failure) -> None:
            written.append(failure)

    outcomes = Outcomes(ledger, Sink())
    partition = ledger.assign(TopicPartition("t", 0))
    client = GistClient(
        "k", base_url="http://gist.test", transport=httpx.MockTransport(gist),
        retry=RetryPolicy(base=0.001, cap=0.002),
    )  # fmt: skip
    delivery = Delivery(
        client,
        DeliverySettings(batch_max_contacts=1, batch_max_wait=0.001, poll_interval=0.01,
                         poll_max_interval=0.02, batch_deadline=0.1),
        outcomes,
        on_fatal=lambda error: None,
        memory=ContactMemory(3600.0, 100),
    )  # fmt: skip
    offset = 0

    async def send(plan: str) -> MessageWork:
        nonlocal offset
        record = ledger.open_record(partition, offset, None, b"{}", [])
        offset += 1
        message = ledger.open_message(record, None, "identify", None)
        ledger.seal(record)
        update = ContactUpsert({"user_id": "alice", "custom_properties": {"plan": plan}})
        delivery.submit(message, (update,))
        async with asyncio.timeout(5):
            while message.state != ENDED:  # noqa: ASYNC110 - polling
                await asyncio.sleep(0.005)
        return message

    delivery.start()
    try:
        assert (await send("free")).failure is None
        stuck = True
        timed_out = await send("pro")
        assert timed_out.failure is not None
        assert timed_out.failure.reason == "batch_timeout"
        stuck = False
        later = await send("free")
    finally:
        await delivery.close()
    assert later.skipped is None  # sent, not taken as held
    assert store["alice"]["plan"] == "free"
