"""The bounds on held work follow what the budget sends and how fast messages end."""

from __future__ import annotations

from destination.pipeline.read_ahead import Counts, ReadAhead


def read_ahead(seconds: float = 10.0) -> ReadAhead:
    return ReadAhead(seconds, 20_000, 120_000, min_in_flight=1_000, min_held=4_000)


def test_before_anything_is_measured_the_floors_hold() -> None:
    ra = read_ahead()
    assert ra.update(Counts(0.0, 0, 0, 0), 10.0) == (1_000, 4_000)
    assert ra.update(Counts(5.0, 0, 0, 0), 10.0) == (1_000, 4_000)  # no request yet


def test_events_hold_seconds_of_the_budget() -> None:
    small = ReadAhead(30.0, 20_000, 100_000, min_in_flight=50, min_held=50)
    small.update(Counts(0.0, 0, 0, 0), 10.0)
    # 10 requests a second, one event each: 300 events are 30 s of budget
    assert small.update(Counts(10.0, 100, 100, 100), 10.0) == (300, 300)
    ra = read_ahead()
    ra.update(Counts(0.0, 0, 0, 0), 10.0)
    assert ra.update(Counts(10.0, 100, 100, 100), 10.0) == (1_000, 4_000)  # the floors win


def test_contacts_reach_the_ceiling_and_what_is_held_follows_how_fast_they_end() -> None:
    ra = read_ahead()
    ra.update(Counts(0.0, 0, 0, 0), 10.0)
    # 250 contacts a request: in flight, the ceiling; Gist confirms 1,000 a second, so
    # 10,000 held is 10 s of it, however much more the budget could send meanwhile.
    assert ra.update(Counts(10.0, 100, 25_000, 10_000), 10.0) == (20_000, 10_000)


def test_only_the_last_half_minute_counts() -> None:
    ra = read_ahead()
    ra.update(Counts(0.0, 0, 0, 0), 10.0)
    ra.update(Counts(10.0, 100, 25_000, 50_000), 10.0)  # a fast start...
    ra.update(Counts(40.0, 400, 100_000, 50_000), 10.0)
    # ...then Gist stopped completing: the bound falls back to the floor.
    assert ra.update(Counts(70.0, 700, 175_000, 50_000), 10.0)[1] == 4_000


def test_a_gist_importing_side_by_side_is_given_more() -> None:
    """A minute per batch, in parallel: Gist completes what it was given a minute ago,
    so the rate it completes says nothing about what it could do with more."""
    ra = read_ahead()
    ra.update(Counts(0.0, 0, 0, 0), 10.0)
    held = [ra.update(Counts(float(t), 10 * t, 2_000 * t, 0), 10.0, working=4)[1]
            for t in range(1, 14)]  # fmt: skip
    assert held[:3] == [6_000, 9_000, 13_500]
    assert held[-1] == 120_000  # the ceiling stays the ceiling


def test_a_gist_importing_in_turn_gets_what_it_completes() -> None:
    """One batch IN_PROGRESS, the rest QUEUED: holding more only holds memory."""
    ra = read_ahead()
    ra.update(Counts(0.0, 0, 0, 0), 10.0)
    for t in range(1, 12):
        bounds = ra.update(Counts(float(t), 10 * t, 2_000 * t, 500 * t), 10.0, working=1)
    assert bounds[1] == 5_000  # 500 a second, 10 s of it
