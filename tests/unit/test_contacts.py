from __future__ import annotations

import pytest

from destination.gist import ContactPayload
from destination.pipeline.contacts import ContactBatcher, ContactStep, merge_contact


def test_later_values_win_and_properties_merge_key_by_key() -> None:
    into: ContactPayload = {
        "user_id": "u1",
        "name": "Ada",
        "custom_properties": {"plan": "free", "a": 1},
        "tags": ["beta"],
    }
    merge_contact(
        into, {"name": "Ada L.", "custom_properties": {"plan": "pro"}, "tags": ["BETA", "vip"]}
    )
    assert into == {
        "user_id": "u1",
        "name": "Ada L.",
        "custom_properties": {"plan": "pro", "a": 1},
        "tags": ["beta", "vip"],
    }


def test_step_copies_the_payload_it_merges_into() -> None:
    original: ContactPayload = {"user_id": "u1", "custom_properties": {"a": 1}}
    step = ContactStep(original, ("u:1",))
    step.merge({"custom_properties": {"a": 2}})
    assert original["custom_properties"] == {"a": 1}
    assert step.payload["custom_properties"] == {"a": 2}
    assert step.merged == 1
    step.merge({"custom_properties": {"b": 3}, "tags": ["vip"]})  # into its own copy now
    assert original == {"user_id": "u1", "custom_properties": {"a": 1}}
    assert step.payload == {"user_id": "u1", "custom_properties": {"a": 2, "b": 3}, "tags": ["vip"]}


def test_batcher_is_due_when_full_or_when_the_oldest_waited_long_enough() -> None:
    batcher = ContactBatcher(max_contacts=3, max_wait=1.0)
    assert batcher.due_at() is None
    steps = [ContactStep({"user_id": str(i)}, (f"u:{i}",)) for i in range(4)]
    batcher.add(steps[0], now=10.0)
    batcher.add(steps[1], now=10.5)
    assert batcher.due_at() == 11.0
    batcher.add(steps[2], now=10.6)
    batcher.add(steps[3], now=10.7)
    assert batcher.due_at() == float("-inf")
    taken = batcher.take()
    assert taken == steps[:3]
    assert not any(s.mergeable for s in taken)
    assert batcher.due_at() == 11.7
    assert batcher.take() == [steps[3]]
    assert len(batcher) == 0


def test_a_step_taken_into_a_batch_takes_no_more_merges() -> None:
    """Regression (repro f1): an update merged into a contact whose body was already
    encoded was never sent, yet its message was delivered. Once taken, a step refuses
    merges for good (delivery chains a new step behind it instead)."""
    batcher = ContactBatcher(max_contacts=1, max_wait=1.0)
    step = ContactStep({"user_id": "u1", "custom_properties": {"plan": "free"}}, ("u:u1",))
    batcher.add(step, now=0.0)
    assert batcher.take() == [step]
    step.encode()
    with pytest.raises(RuntimeError):
        step.merge({"user_id": "u1", "custom_properties": {"plan": "pro"}})
