from __future__ import annotations

from destination.pipeline.ordering import IdentityGate, Step, StepKind


def step(kind: StepKind, *identities: str) -> Step:
    return Step(kind, identities)


def test_event_waits_for_the_contact_write_before_it() -> None:
    gate = IdentityGate()
    write = step(StepKind.CONTACT, "u:1", "e:a@x.io")
    event = step(StepKind.EVENT, "u:1")
    assert gate.admit(write)
    assert not gate.admit(event)
    assert gate.finish(write) == [event]
    assert gate.finish(event) == []
    assert len(gate) == 0


def test_events_on_one_contact_run_together() -> None:
    gate = IdentityGate()
    first, second = step(StepKind.EVENT, "u:1"), step(StepKind.EVENT, "u:1")
    assert gate.admit(first)
    assert gate.admit(second)


def test_a_write_after_events_does_not_wait_for_them_but_a_delete_does() -> None:
    gate = IdentityGate()
    event = step(StepKind.EVENT, "u:1")
    gate.admit(event)
    assert gate.admit(step(StepKind.CONTACT, "u:1"))
    gate2 = IdentityGate()
    event2 = step(StepKind.EVENT, "u:1")
    delete = step(StepKind.EXCLUSIVE, "u:1")
    gate2.admit(event2)
    assert not gate2.admit(delete)
    assert gate2.finish(event2) == [delete]


def test_a_step_on_two_identities_waits_for_both_chains_once() -> None:
    gate = IdentityGate()
    by_user = step(StepKind.CONTACT, "u:1")
    by_email = step(StepKind.CONTACT, "e:a@x.io")
    both = step(StepKind.CONTACT, "u:1", "e:a@x.io")
    gate.admit(by_user)
    gate.admit(by_email)
    assert not gate.admit(both)
    assert both.waiting == 2
    assert gate.finish(by_user) == []
    assert gate.finish(by_email) == [both]


def test_same_previous_write_on_two_identities_counts_once() -> None:
    gate = IdentityGate()
    first = step(StepKind.CONTACT, "u:1", "e:a@x.io")
    gate.admit(first)
    second = step(StepKind.CONTACT, "u:1", "e:a@x.io")
    gate.admit(second)
    assert second.waiting == 1
    assert gate.finish(first) == [second]


def test_last_write_is_shared_only_when_every_identity_agrees() -> None:
    gate = IdentityGate()
    write = step(StepKind.CONTACT, "u:1", "e:a@x.io")
    gate.admit(write)
    assert gate.last_write(["u:1"]) is write
    assert gate.last_write(["u:1", "e:a@x.io"]) is write
    assert gate.last_write(["u:1", "e:b@x.io"]) is None
    gate.finish(write)
    assert gate.last_write(["u:1"]) is None


def test_chains_stay_ordered_across_many_writes() -> None:
    gate = IdentityGate()
    writes = [step(StepKind.CONTACT, "u:1") for _ in range(5)]
    ready = [gate.admit(w) for w in writes]
    assert ready == [True, False, False, False, False]
    for i, write in enumerate(writes[:-1]):
        assert gate.finish(write) == [writes[i + 1]]
