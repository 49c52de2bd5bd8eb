"""When a partition pauses: its own bounds, with a resume mark below them."""

from __future__ import annotations

from destination.pipeline.consume import FlowLimits
from destination.pipeline.inflight import PartitionWork, TopicPartition


def limits() -> FlowLimits:
    return FlowLimits(
        messages=1000,
        bytes_=1 << 20,
        per_partition=10,
        awaiting_import=1000,
        uncommitted_per_partition=50,
        resume_at=0.8,
    )


def test_a_partition_with_too_many_messages_in_flight_is_full() -> None:
    work = PartitionWork(TopicPartition("events", 0))
    work.messages = 9
    assert not limits().partition_full(work, resuming=False)
    work.messages = 10
    assert limits().partition_full(work, resuming=False)
    work.messages = 8  # paused: resumes only below 80% of the bound
    assert limits().partition_full(work, resuming=True)
    work.messages = 7
    assert not limits().partition_full(work, resuming=True)


def test_finished_records_held_behind_one_unfinished_record_pause_the_partition() -> None:
    """One message retried for hours: the records after it finish, but their offsets
    cannot be committed; the tracker must not grow with them."""
    work = PartitionWork(TopicPartition("events", 0))
    for offset in range(50):
        work.offsets.add(offset)
    for offset in range(1, 50):
        work.offsets.finish(offset)
    work.messages = 1  # far below the in-flight bound
    assert limits().partition_full(work, resuming=False)
    work.offsets.finish(0)  # the stuck one is delivered: everything is committable
    assert not limits().partition_full(work, resuming=True)


def test_a_paused_partition_resumes_below_the_mark_of_the_uncommitted_bound() -> None:
    work = PartitionWork(TopicPartition("events", 0))
    for offset in range(45):
        work.offsets.add(offset)
    assert not limits().partition_full(work, resuming=False)  # 45 < 50
    assert limits().partition_full(work, resuming=True)  # 45 >= 40


def test_a_message_is_opened_only_below_every_bound() -> None:
    """Checked per message opened: one huge envelope cannot exceed the limits."""
    from destination.pipeline.inflight import Ledger

    ledger = Ledger()
    work = ledger.assign(TopicPartition("events", 0))
    bounds = FlowLimits(
        messages=3, bytes_=1000, per_partition=3, awaiting_import=10, uncommitted_total=5
    )
    record = ledger.open_record(work, 0, None, b"x" * 10, [])
    opened = 0
    while bounds.room(ledger, work):
        ledger.open_message(record, opened, "track", None)
        opened += 1
    assert opened == 3
    assert ledger.messages == 3


def test_records_held_across_partitions_are_bounded_in_total() -> None:
    from destination.pipeline.inflight import Ledger

    ledger = Ledger()
    bounds = FlowLimits(
        messages=1000, bytes_=1 << 20, per_partition=1000, awaiting_import=10, uncommitted_total=4
    )
    a = ledger.assign(TopicPartition("events", 0))
    b = ledger.assign(TopicPartition("events", 1))
    for offset in range(2):
        ledger.open_record(a, offset, None, b"{}", [])
        ledger.open_record(b, offset, None, b"{}", [])
    assert ledger.uncommitted == 4
    assert not bounds.room(ledger, a)
    assert bounds.full(ledger, resuming=False)


def test_messages_held_for_gist_count_in_the_bytes_bound_parked_or_not() -> None:
    """Regression: with the parked messages alone bounded, what was read before they
    reached the bound was sent and parked on top (44,000 parked, bound 30,000). What is
    held is bounded in bytes, each message's bookkeeping counted, parked or not."""
    from destination.pipeline.inflight import MESSAGE_OVERHEAD, Ledger

    ledger = Ledger()
    work = ledger.assign(TopicPartition("events", 0))
    record_bytes = 200
    bounds = FlowLimits(
        messages=100,
        bytes_=5 * (record_bytes + MESSAGE_OVERHEAD),
        per_partition=100,
        awaiting_import=100,
    )
    opened = []
    while bounds.fits(ledger, record_bytes):
        record = ledger.open_record(work, len(opened), None, b"x" * record_bytes, [])
        opened.append(ledger.open_message(record, None, "identify", None))
        ledger.seal(record)
    assert len(opened) == 5
    for message in opened[:3]:
        ledger.park(message)  # sent: waiting on Gist's import; its record is released
    assert (ledger.parked, ledger.messages) == (3, 2)
    assert ledger.bytes == 2 * record_bytes + 5 * MESSAGE_OVERHEAD
    assert not bounds.fits(ledger, record_bytes)  # parking frees the record, not the rest
    ledger.ended(opened[0])  # its import completed
    assert bounds.fits(ledger, record_bytes)
