"""The ledger and the outcome step: a record ends when it is sealed and every message in
it ended; a message ends once; revoked work leaves the totals."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from destination import reasons
from destination.pipeline.inflight import (
    MESSAGE_OVERHEAD,
    Failure,
    Ledger,
    MessageWork,
    TopicPartition,
)
from destination.pipeline.outcome import Outcomes


class Sink:
    """The dead-letter topic's edge: records what would be written, acknowledged at once."""

    def __init__(self) -> None:
        self.written: list[tuple[MessageWork, Failure]] = []

    async def write(self, message: MessageWork, failure: Failure) -> None:
        self.written.append((message, failure))


def make() -> tuple[Ledger, Outcomes, Sink]:
    ledger = Ledger()
    sink = Sink()
    return ledger, Outcomes(ledger, sink), sink


def test_a_parked_message_leaves_the_in_flight_totals_and_releases_its_record() -> None:
    ledger, outcomes, _ = make()
    partition = ledger.assign(TopicPartition("t", 0))
    record = ledger.open_record(partition, 0, b"k", b"x" * 100, [])
    message = ledger.open_message(record, None, "identify", None)
    ledger.seal(record)
    outcomes.expect(message, 1)
    assert (ledger.messages, ledger.bytes, ledger.parked) == (1, 101 + MESSAGE_OVERHEAD, 0)
    outcomes.accepted(message)
    # Its record released; what is left held is its bookkeeping.
    assert (ledger.messages, ledger.bytes, ledger.parked) == (0, MESSAGE_OVERHEAD, 1)
    assert partition.messages == 0
    assert record.value is None
    outcomes.operation_done(message, accepted=True)
    assert (ledger.messages, ledger.bytes, ledger.parked) == (0, 0, 0)
    assert partition.offsets.committable() == 1


def test_a_message_whose_batch_is_sent_again_counts_in_flight_again_as_returned() -> None:
    """A parked contact whose import is sent again (``unaccepted``) is in flight once
    more, counted as returned (the in-flight bound may be exceeded by those: they were
    let in below it); parked again or ended, it is no longer; a revocation clears it."""
    ledger, outcomes, _ = make()
    partition = ledger.assign(TopicPartition("t", 0))
    record = ledger.open_record(partition, 0, None, b"{}", [])
    message = ledger.open_message(record, None, "identify", None)
    ledger.seal(record)
    outcomes.expect(message, 1)
    outcomes.accepted(message)
    assert (ledger.messages, ledger.parked, ledger.returned) == (0, 1, 0)
    outcomes.unaccepted(message)
    assert (ledger.messages, ledger.parked, ledger.returned) == (1, 0, 1)
    assert (partition.messages, partition.returned) == (1, 1)
    outcomes.accepted(message)  # the second import was accepted
    assert (ledger.messages, ledger.parked, ledger.returned) == (0, 1, 0)
    outcomes.unaccepted(message)
    outcomes.operation_done(message)
    assert (ledger.messages, ledger.parked, ledger.returned) == (0, 0, 0)
    assert partition.returned == 0
    other = ledger.open_record(partition, 1, None, b"{}", [])
    again = ledger.open_message(other, None, "identify", None)
    ledger.seal(other)
    outcomes.expect(again, 1)
    outcomes.accepted(again)
    outcomes.unaccepted(again)
    assert ledger.returned == 1
    ledger.revoke(partition.tp)
    assert (ledger.messages, ledger.parked, ledger.returned) == (0, 0, 0)


async def test_a_message_with_other_open_work_is_not_parked() -> None:
    ledger, outcomes, _ = make()
    partition = ledger.assign(TopicPartition("t", 0))
    record = ledger.open_record(partition, 0, None, b"{}", [])
    message = ledger.open_message(record, None, "track", None)
    ledger.seal(record)
    outcomes.expect(message, 2)  # a contact upsert and an event
    outcomes.accepted(message)
    assert not message.is_parked
    assert ledger.messages == 1
    outcomes.operation_done(message)  # the event
    assert message.pending == 1
    outcomes.operation_done(message, Failure("batch_contact_error", "bad"), accepted=True)
    assert message.failure is not None


async def test_an_envelope_keeps_its_value_until_every_open_message_is_parked() -> None:
    ledger, outcomes, _ = make()
    partition = ledger.assign(TopicPartition("t", 0))
    record = ledger.open_record(partition, 7, None, b'{"batch":[{},{}]}', [])
    first = ledger.open_message(record, 0, "identify", None, body={})
    second = ledger.open_message(record, 1, "track", None, body={})
    ledger.seal(record)
    outcomes.expect(first, 1)
    outcomes.expect(second, 1)
    outcomes.accepted(first)
    assert record.value is not None
    assert first.body is None
    outcomes.operation_done(second)
    assert record.value is None  # now only the parked message is open
    assert ledger.bytes == MESSAGE_OVERHEAD
    outcomes.operation_done(first, accepted=True)
    assert partition.offsets.committable() == 8
    assert (ledger.messages, ledger.parked, ledger.bytes) == (0, 0, 0)


def test_an_envelope_whose_first_message_is_skipped_is_not_finished_before_the_rest() -> None:
    """Regression: the first message of an envelope ended (skipped) before the others
    were opened finished the record, so its offset was committed with a track and an
    identify still undelivered."""
    ledger, outcomes, _ = make()
    partition = ledger.assign(TopicPartition("t", 0))
    record = ledger.open_record(partition, 0, None, b'{"batch":[{},{},{}]}', [])
    page = ledger.open_message(record, 0, "page", None, body={})
    outcomes.skipped(page, reasons.TYPE_OFF)
    assert partition.offsets.committable() == 0  # not sealed: more messages to come
    track = ledger.open_message(record, 1, "track", None, body={})
    identify = ledger.open_message(record, 2, "identify", None, body={})
    ledger.seal(record)
    outcomes.expect(track, 1)
    outcomes.expect(identify, 1)
    outcomes.operation_done(track)
    assert partition.offsets.committable() == 0
    outcomes.operation_done(identify)
    assert partition.offsets.committable() == 1
    assert (ledger.messages, ledger.bytes, partition.open) == (0, 0, 0)


def test_a_message_that_ends_twice_is_counted_once_and_reported() -> None:
    ledger, outcomes, _ = make()
    partition = ledger.assign(TopicPartition("t", 0))
    first = ledger.open_record(partition, 0, None, b"{}", [])
    message = ledger.open_message(first, None, "track", None)
    ledger.seal(first)
    second = ledger.open_record(partition, 1, None, b"{}", [])
    other = ledger.open_message(second, None, "track", None)
    ledger.seal(second)
    outcomes.delivered(message)
    with capture_logs() as logs:
        outcomes.skipped(message, reasons.TYPE_OFF)
    assert [entry["event"] for entry in logs] == ["message.ended_twice"]
    # The second end did not release anything it should not have.
    assert (ledger.messages, partition.open) == (1, 1)
    assert partition.offsets.committable() == 1
    outcomes.delivered(other)
    assert partition.offsets.committable() == 2


async def test_a_dead_letter_ends_its_message_only_once_written() -> None:
    ledger, outcomes, sink = make()
    partition = ledger.assign(TopicPartition("t", 0))
    record = ledger.open_record(partition, 0, None, b"nope", [])
    message = ledger.open_message(record, None, "unknown", None)
    ledger.seal(record)
    outcomes.dead_letter(message, Failure(reasons.INVALID_JSON, "not JSON"))
    assert partition.offsets.committable() == 0  # written yet? not until the sink says so
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert [f.reason for _, f in sink.written] == [reasons.INVALID_JSON]
    assert partition.offsets.committable() == 1


async def test_a_revoked_partition_leaves_the_totals_and_its_late_ends_are_ignored() -> None:
    ledger, outcomes, sink = make()
    partition = ledger.assign(TopicPartition("t", 0))
    other = ledger.assign(TopicPartition("t", 1))
    record = ledger.open_record(partition, 0, None, b"x" * 10, [])
    parked = ledger.open_message(record, 0, "identify", None)
    busy = ledger.open_message(record, 1, "track", None)
    ledger.seal(record)
    outcomes.expect(parked, 1)
    outcomes.expect(busy, 1)
    outcomes.accepted(parked)
    kept = ledger.open_record(other, 0, None, b"y" * 5, [])
    ledger.open_message(kept, None, "track", None)
    ledger.seal(kept)
    ledger.revoke(partition.tp)
    held = 5 + MESSAGE_OVERHEAD
    assert (ledger.messages, ledger.parked, ledger.bytes, ledger.uncommitted) == (1, 0, held, 1)
    outcomes.operation_done(busy, Failure(reasons.GIST_REJECTED, "late"))
    outcomes.operation_done(parked, accepted=True)
    await asyncio.sleep(0)
    assert sink.written == []  # nothing written for a partition we no longer own
    assert (ledger.messages, ledger.parked, ledger.bytes) == (1, 0, held)


def test_a_sealed_record_cannot_take_more_messages() -> None:
    ledger, _, _ = make()
    partition = ledger.assign(TopicPartition("t", 0))
    record = ledger.open_record(partition, 0, None, b"{}", [])
    ledger.seal(record)
    with pytest.raises(RuntimeError):
        ledger.open_message(record, None, "track", None)


def test_the_oldest_unfinished_record_says_how_long_a_partition_is_held() -> None:
    now = [100.0]
    ledger = Ledger(clock=lambda: now[0])
    outcomes = Outcomes(ledger, Sink())
    partition = ledger.assign(TopicPartition("t", 0))
    first = ledger.open_record(partition, 0, None, b"{}", [])
    held = ledger.open_message(first, None, "track", None)
    ledger.seal(first)
    now[0] = 130.0
    second = ledger.open_record(partition, 1, None, b"{}", [])
    quick = ledger.open_message(second, None, "track", None)
    ledger.seal(second)
    now[0] = 160.0
    outcomes.delivered(quick)
    assert partition.oldest_unfinished_age(now[0]) == 60.0
    outcomes.delivered(held)
    assert partition.oldest_unfinished_age(now[0]) == 0.0
