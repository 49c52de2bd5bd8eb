from __future__ import annotations

from destination.pipeline.inflight import Failure, Ledger, MessageWork, TopicPartition


def make() -> tuple[Ledger, list[MessageWork]]:
    settled: list[MessageWork] = []
    ledger = Ledger(on_settled=settled.append)
    return ledger, settled


def test_a_parked_message_leaves_the_in_flight_totals_and_releases_its_record() -> None:
    ledger, settled = make()
    partition = ledger.assign(TopicPartition("t", 0))
    record = ledger.open_record(partition, 0, b"k", b"x" * 100, [])
    message = ledger.open_message(record, None, "identify", None)
    ledger.close_record(record)
    message.expect(1)
    assert (ledger.messages, ledger.bytes, ledger.parked) == (1, 101, 0)
    message.operation_accepted()
    assert (ledger.messages, ledger.bytes, ledger.parked) == (0, 0, 1)
    assert partition.messages == 0
    assert record.value is None
    message.operation_done(accepted=True)
    assert settled == [message]
    ledger.finish(message)
    assert (ledger.messages, ledger.bytes, ledger.parked) == (0, 0, 0)
    assert partition.offsets.committable() == 1


def test_a_message_with_other_open_work_is_not_parked() -> None:
    ledger, _ = make()
    partition = ledger.assign(TopicPartition("t", 0))
    record = ledger.open_record(partition, 0, None, b"{}", [])
    message = ledger.open_message(record, None, "track", None)
    message.expect(2)  # a contact upsert and an event
    message.operation_accepted()
    assert not message.is_parked
    assert ledger.messages == 1
    message.operation_done()  # the event
    assert message.pending == 1
    message.operation_done(Failure("batch_contact_error", "bad"), accepted=True)
    assert message.failure is not None


def test_an_envelope_keeps_its_value_until_every_open_message_is_parked() -> None:
    ledger, settled = make()
    partition = ledger.assign(TopicPartition("t", 0))
    record = ledger.open_record(partition, 7, None, b'{"batch":[{},{}]}', [])
    first = ledger.open_message(record, 0, "identify", None, body={})
    second = ledger.open_message(record, 1, "track", None, body={})
    ledger.close_record(record)
    first.expect(1)
    second.expect(1)
    first.operation_accepted()
    assert record.value is not None
    assert first.body is None
    second.operation_done()
    ledger.finish(settled.pop())
    assert record.value is None  # now only the parked message is open
    assert ledger.bytes == 0
    first.operation_done(accepted=True)
    ledger.finish(settled.pop())
    assert partition.offsets.committable() == 8
    assert (ledger.messages, ledger.parked, ledger.bytes) == (0, 0, 0)
