from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from destination.pipeline.offsets import OffsetTracker


def test_nothing_consumed_commits_nothing() -> None:
    assert OffsetTracker().committable() is None


def test_commit_stops_at_the_first_unfinished_offset() -> None:
    tracker = OffsetTracker()
    for offset in (10, 11, 12, 13):
        tracker.add(offset)
    tracker.finish(12)
    tracker.finish(11)
    assert tracker.committable() == 10
    tracker.finish(10)
    assert tracker.committable() == 13
    tracker.finish(13)
    assert tracker.committable() == 14
    assert len(tracker) == 0


def test_offsets_must_increase() -> None:
    tracker = OffsetTracker()
    assert not tracker.seen(5)
    tracker.add(5)
    assert tracker.seen(5)
    assert tracker.seen(4)
    assert not tracker.seen(6)
    with pytest.raises(ValueError, match="arrived after"):
        tracker.add(5)


@given(st.permutations(list(range(30))), st.integers(0, 30))
def test_committable_is_lowest_unfinished(order: list[int], finished: int) -> None:
    tracker = OffsetTracker()
    for offset in range(30):
        tracker.add(offset)
    done = set(order[:finished])
    for offset in order[:finished]:
        tracker.finish(offset)
    expected = min(set(range(30)) - done, default=30)
    assert tracker.committable() == expected
    assert len(tracker) == 30 - finished


def test_uncommitted_counts_finished_records_held_back_by_an_unfinished_one() -> None:
    tracker = OffsetTracker()
    for offset in range(10):
        tracker.add(offset)
    for offset in range(1, 10):
        tracker.finish(offset)
    assert (len(tracker), tracker.uncommitted) == (1, 10)
    tracker.finish(0)
    assert (len(tracker), tracker.uncommitted) == (0, 0)
