"""messageId de-duplication: ids recorded only once delivered, copies in flight end as
their original ends, bounded memory."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tracemalloc
from collections.abc import Sequence
from typing import Any

from destination import reasons
from destination.operations import ContactUpsert, EventTrack
from destination.pipeline.dedup import Dedup, DeliveredIds, id_hash
from destination.pipeline.inflight import (
    ENDED,
    Failure,
    Ledger,
    MessageWork,
    Skip,
    TopicPartition,
)
from destination.pipeline.outcome import Outcomes


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_an_id_is_remembered_for_the_window_and_then_forgotten() -> None:
    clock = Clock()
    ids = DeliveredIds(window=100.0, capacity=1000, slices=10, clock=clock)
    ids.add("m-1")
    clock.now = 50.0
    ids.add("m-2")
    assert "m-1" in ids
    assert "m-2" in ids
    assert "m-3" not in ids
    clock.now = 109.0  # m-1's slice [0, 10) ends 100 s before 110
    assert "m-1" in ids
    clock.now = 111.0
    assert "m-1" not in ids
    assert "m-2" in ids


def test_its_length_counts_the_ids_held_through_seals_and_forgetting() -> None:
    clock = Clock()
    ids = DeliveredIds(window=100.0, capacity=1000, slices=10, clock=clock)
    for n in range(5):
        ids.add(f"a{n}")
    assert len(ids) == 5
    clock.now = 20.0  # the first slice is sealed at the next add
    for n in range(3):
        ids.add(f"b{n}")
    assert len(ids) == 8
    clock.now = 60.0
    ids.add("c0")
    assert len(ids) == 9
    clock.now = 125.0  # the a-slice [0, 10) is forgotten; the b-slice [20, 30) is not
    assert "a0" not in ids
    assert len(ids) == 4
    clock.now = 500.0
    assert "c0" not in ids
    assert len(ids) == 0


def test_past_its_capacity_the_oldest_slice_is_forgotten_first() -> None:
    clock = Clock()
    ids = DeliveredIds(window=1000.0, capacity=150, slices=10, clock=clock)
    for slice_ in range(3):
        clock.now = slice_ * 100.0
        for n in range(60):
            ids.add(f"s{slice_}-{n}")
    assert len(ids) <= 150
    assert "s0-0" not in ids
    assert "s2-59" in ids
    assert "s1-0" in ids


def test_the_filter_before_the_sealed_slices_never_hides_an_id() -> None:
    """A new id is told apart by a Bloom filter before the sealed slices are searched
    (their bisections were 14% of the worker's CPU on a 1,000,000 drain): every id of a
    sealed slice stays found, across seals, expiries and evictions, and new ones are
    not."""
    clock = Clock()
    ids = DeliveredIds(window=1000.0, capacity=30_000, slices=10, clock=clock)
    for slice_ in range(15):  # the first slices expire, later ones hit the capacity
        clock.now = slice_ * 100.0
        for n in range(2500):
            ids.add(f"s{slice_}-{n}")
    clock.now = 1500.0
    kept = [s for s in range(15) if f"s{s}-0" in ids]
    assert kept == list(range(kept[0], 15))
    assert len(kept) >= 5
    assert all(f"s{s}-{n}" in ids for s in kept for n in range(2500))
    assert sum(f"new-{n}" in ids for n in range(10_000)) == 0
    # A forgotten slice is counted out of the filter, not left in it (nor rebuilt).
    clock.now = 10_000.0
    ids.add("late")  # every slice kept so far is past the window now
    clock.now = 10_100.0
    assert "late" in ids
    assert sum(ids._bloom) <= 4  # only "late"'s counters are left


def test_an_id_costs_about_eight_bytes_once_its_slice_is_sealed() -> None:
    clock = Clock()
    ids = DeliveredIds(window=86_400.0, capacity=10_000_000, slices=24, clock=clock)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for n in range(200_000):
        ids.add(f"message-{n}")
    clock.now = 3_600.0
    ids.add("next-slice")  # seals the first slice
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    per_id = (after - before) / 200_000
    assert per_id < 12, per_id


class Pipeline:
    """Dedup between intake and delivery, with the real Outcomes and Ledger."""

    def __init__(self, shared: Any = None, offset: int = 0) -> None:
        self.ledger = Ledger()
        self.written: list[tuple[MessageWork, Failure]] = []
        self.outcomes = Outcomes(self.ledger, self)
        self.partition = self.ledger.assign(TopicPartition("t", 0))
        self.submitted: list[MessageWork] = []
        self.indices: list[list[int]] = []
        self.dedup = Dedup(
            DeliveredIds(3600.0, 1000),
            self._submit,
            self.outcomes.skipped,
            self.outcomes.dead_letter,
            shared,
        )
        self.outcomes.observers.append(self.dedup.ended)
        self.ends: dict[int, tuple[str, str | None]] = {}
        self.outcomes.observers.append(
            lambda message, how, reason: self.ends.__setitem__(id(message), (how, reason))
        )
        self.offset = offset

    def _submit(self, message: MessageWork, ops: Sequence[Any], indices: Sequence[int]) -> None:
        self.submitted.append(message)
        self.indices.append(list(indices))

    async def write(self, message: MessageWork, failure: Failure) -> None:
        self.written.append((message, failure))

    def offer(
        self,
        message_id: str | None,
        partition: Any = None,
        operations: int = 1,
        writes: bool = False,
    ) -> MessageWork:
        """A message of ``operations`` events (``writes``: contact upserts)."""
        record = self.ledger.open_record(partition or self.partition, self.offset, None, b"{}", [])
        self.offset += 1
        kind = "identify" if writes else "track"
        message = self.ledger.open_message(record, None, kind, None, None, message_id)
        self.ledger.seal(record)
        ops: list[Any] = [
            ContactUpsert({"user_id": "u", "custom_properties": {"n": i}}, message_id)
            if writes
            else EventTrack({"event_name": f"X{i}", "user_id": "u"}, message_id)
            for i in range(operations)
        ]
        self.dedup.offer(message, ops)
        return message

    def deliver(
        self, message: MessageWork, indices: Sequence[int] = (0,), writes: bool = False
    ) -> None:
        """What delivery does as each operation is confirmed: record it, end it."""
        self.outcomes.expect(message, len(indices))
        for index in indices:
            self.dedup.delivered(message, index, write=writes)
            self.outcomes.operation_done(message)


def test_an_id_is_recorded_only_once_delivered() -> None:
    p = Pipeline()
    first = p.offer("m-1")
    assert p.submitted == [first]
    assert "m-1" not in p.dedup.local  # sent, not yet delivered
    p.deliver(first)
    assert "m-1" in p.dedup.local
    again = p.offer("m-1")
    assert p.ends[id(again)] == ("skipped", "duplicate")
    assert p.submitted == [first]


def test_a_copy_in_flight_ends_as_its_original_ends() -> None:
    p = Pipeline()
    first = p.offer("m-1")
    copy = p.offer("m-1")  # a producer's retry right behind it
    assert p.submitted == [first]  # not sent twice
    assert copy.state != ENDED  # held: its offset waits
    p.deliver(first)
    assert p.ends[id(copy)] == ("skipped", "duplicate")
    assert p.partition.offsets.committable() == 2


def test_a_copy_of_a_message_skipped_as_unchanged_ends_as_a_duplicate() -> None:
    """A skip as "unchanged" says Gist holds the message's values; a copy read after a later
    update of the contact does not hold them (model test, seed 4): it is a duplicate.
    Other reasons for a skip hold for the copy too."""
    p = Pipeline()
    first = p.offer("m-1", writes=True)
    copy = p.offer("m-1", writes=True)
    p.outcomes.expect(first, 1)
    p.outcomes.operation_done(first, Skip(reasons.UNCHANGED))
    assert p.ends[id(first)] == ("skipped", reasons.UNCHANGED)
    assert p.ends[id(copy)] == ("skipped", reasons.DUPLICATE)
    other = p.offer("m-2", writes=True)
    its_copy = p.offer("m-2", writes=True)
    p.outcomes.expect(other, 1)
    p.outcomes.operation_done(other, Skip(reasons.SUPPRESSED))
    assert p.ends[id(its_copy)] == ("skipped", reasons.SUPPRESSED)


async def test_a_copy_of_a_dead_lettered_message_is_dead_lettered_alike() -> None:
    p = Pipeline()
    first = p.offer("m-1")
    copy = p.offer("m-1")
    p.outcomes.expect(first, 1)
    p.outcomes.operation_done(first, Failure(reasons.GIST_REJECTED, "404"))
    for _ in range(3):
        await asyncio.sleep(0)
    assert [(m, f.reason) for m, f in p.written] == [
        (first, reasons.GIST_REJECTED),
        (copy, reasons.GIST_REJECTED),
    ]
    assert "m-1" not in p.dedup.local


def test_without_redis_a_write_counts_as_delivered_only_while_its_partition_stays() -> None:
    """Regression (model test seed 42, no Redis): a partition went to another worker,
    which read it again from the group's commit and sent its older identifies again;
    back here, the newer identify was skipped as delivered, and Gist kept the older
    values. A write's id now holds for the ownership that recorded it; an event's for
    the whole window (sending an event twice makes two)."""
    p = Pipeline()
    tp = TopicPartition("t", 0)
    write, event = p.offer("w-1", writes=True), p.offer("e-1")
    p.deliver(write, writes=True)
    p.deliver(event)
    # Read again while the partition stays: both were delivered.
    assert p.ends[id(p.offer("w-1", writes=True))] == ("skipped", "duplicate")
    assert p.ends[id(p.offer("e-1"))] == ("skipped", "duplicate")
    # The partition goes, and comes back: a new ownership.
    p.dedup.abandon([p.partition])
    p.ledger.revoke(tp)
    p.partition = p.ledger.assign(tp)
    p.offset = 0
    rewrite, reevent = p.offer("w-1", writes=True), p.offer("e-1")
    assert p.submitted == [write, event, rewrite]  # the write goes again, the event not
    assert p.ends[id(reevent)] == ("skipped", "duplicate")
    p.deliver(rewrite, writes=True)
    assert p.ends[id(p.offer("w-1", writes=True))] == ("skipped", "duplicate")


def test_messages_without_an_id_are_always_sent() -> None:
    p = Pipeline()
    a, b = p.offer(None), p.offer(None)
    assert p.submitted == [a, b]


def test_a_copy_from_another_partition_is_sent_when_the_original_is_revoked() -> None:
    p = Pipeline()
    other = p.ledger.assign(TopicPartition("t", 1))
    first = p.offer("m-1")
    copy = p.offer("m-1", partition=other)
    assert p.submitted == [first]
    p.dedup.abandon([p.partition])
    assert p.submitted == [first, copy]
    p.deliver(copy)
    assert "m-1" in p.dedup.local


async def test_a_message_that_partly_succeeded_sends_only_what_did_not() -> None:
    """A track whose event went and whose tag change failed is dead-lettered whole; sent
    again (a replay, a redelivery), only the tag change goes."""
    p = Pipeline()
    first = p.offer("m-2", operations=2)
    assert p.indices == [[0, 1]]
    p.outcomes.expect(first, 2)
    p.dedup.delivered(first, 0, write=False)
    p.outcomes.operation_done(first)
    p.outcomes.operation_done(first, Failure(reasons.GIST_REJECTED, "400"))
    for _ in range(3):
        await asyncio.sleep(0)
    again = p.offer("m-2", operations=2)
    assert p.submitted == [first, again]
    assert p.indices[-1] == [1]
    p.deliver(again, indices=(1,))
    assert p.ends[id(again)] == ("delivered", None)
    third = p.offer("m-2", operations=2)
    assert p.ends[id(third)] == ("skipped", "duplicate")


def test_shared_ids_hash_the_same_in_every_process() -> None:
    """Regression (repro f3): ids were hashed with Python's salted hash(), so an id one
    process put in Redis never matched in another: replays and producer retries across
    replicas or restarts were sent twice."""
    code = "from destination.pipeline.dedup import id_hash; print(id_hash('ajs-msg-0001'))"
    seen = set()
    for seed in ("1", "2", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        seen.add(out.stdout.strip())
    assert seen == {str(id_hash("ajs-msg-0001"))}


async def test_a_delivered_id_goes_to_redis_in_the_same_turn_not_later() -> None:
    """Regression (issue 18's failover, 1 event sent twice with Redis in 3 runs): ids were
    gathered for 50 ms before the write, so a process killed within 50 ms of Gist's
    confirmation left the next owner nothing to skip. Ids added in one turn go in one
    write, started at once."""
    from destination.pipeline.dedup import SharedIds

    written: list[tuple[str, ...]] = []

    class Pipe:
        def sadd(self, key: str, *members: str) -> None:
            written.append(members)

        def expire(self, key: str, seconds: int) -> None:
            pass

        async def execute(self) -> None:
            pass

    class Redis:
        def pipeline(self, transaction: bool = True) -> Pipe:
            return Pipe()

    ids = SharedIds(Redis(), "p", window=3600.0, timeout=1.0)
    ids.add("a")
    ids.add("b")
    for _ in range(3):  # a few turns of the event loop, no time passing
        await asyncio.sleep(0)
    assert written == [(format(id_hash("a"), "x"), format(id_hash("b"), "x"))]


class SharedStore:
    """Redis's side of ``SharedIds`` (the edge), in memory: what every owner recorded."""

    def __init__(self) -> None:
        self.ids: set[str] = set()

    def add(self, key: str) -> None:
        self.ids.add(key)

    async def delivered(self, keys: Sequence[str]) -> set[str]:
        return {key for key in keys if key in self.ids}

    async def flush(self) -> bool:
        return True


async def _read(p: Pipeline, message_id: str) -> MessageWork:
    """A record of one upsert of contact ``u``, looked up in Redis first, as the intake
    does, then offered."""
    await p.dedup.look_up([(message_id, "t", 0, p.offset)])
    return p.offer(message_id, writes=True)


async def test_with_redis_a_redelivered_write_goes_again_after_an_earlier_one_did() -> None:
    """Redis lost the ids of an earlier write of the contact (a flush) but kept a later
    one's: the next owner sends the earlier write again, and so must send the later one,
    or Gist ends at the older value (model test seed 16, 80 steps)."""
    store = SharedStore()
    old = Pipeline(store)
    earlier, later = await _read(old, "w-1"), await _read(old, "w-2")
    old.deliver(earlier, writes=True)
    old.deliver(later, writes=True)
    store.ids = {k for k in store.ids if not k.startswith("w-1")}  # lost with a flush
    new = Pipeline(store)  # the next owner reads from the group's commit
    again_earlier, again_later = await _read(new, "w-1"), await _read(new, "w-2")
    assert new.submitted == [again_earlier, again_later]


async def test_with_redis_a_redelivered_record_whose_writes_all_went_is_skipped() -> None:
    store = SharedStore()
    old = Pipeline(store)
    earlier, later = await _read(old, "w-1"), await _read(old, "w-2")
    old.deliver(earlier, writes=True)
    old.deliver(later, writes=True)
    new = Pipeline(store)
    again = [await _read(new, "w-1"), await _read(new, "w-2")]
    assert new.submitted == []
    assert [new.ends[id(m)] for m in again] == [("skipped", "duplicate")] * 2


async def test_with_redis_a_producers_copy_of_a_delivered_write_skips_after_newer_ones() -> None:
    """A copy found at another record is an older message's: sending it after a newer
    write of the contact would put its older values back."""
    store = SharedStore()
    old = Pipeline(store)
    original = await _read(old, "w-1")
    old.deliver(original, writes=True)
    new = Pipeline(store, offset=10)  # the original was committed
    newer = await _read(new, "w-2")
    copy = await _read(new, "w-1")
    assert new.submitted == [newer]
    assert new.ends[id(copy)] == ("skipped", "duplicate")
