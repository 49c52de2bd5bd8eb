"""The bound on messages not yet sent follows what the budget sends."""

from __future__ import annotations

from destination.pipeline.read_ahead import Counts, ReadAhead


def read_ahead(seconds: float = 10.0) -> ReadAhead:
    return ReadAhead(seconds, 20_000, min_in_flight=1_000)


def test_before_anything_is_measured_the_floor_holds() -> None:
    ra = read_ahead()
    assert ra.update(Counts(0.0, 0, 0), 10.0) == 1_000
    assert ra.update(Counts(5.0, 0, 0), 10.0) == 1_000  # no request yet


def test_events_hold_seconds_of_the_budget() -> None:
    small = ReadAhead(30.0, 20_000, min_in_flight=50)
    small.update(Counts(0.0, 0, 0), 10.0)
    # 10 requests a second, one event each: 300 events are 30 s of budget
    assert small.update(Counts(10.0, 100, 100), 10.0) == 300
    ra = read_ahead()
    ra.update(Counts(0.0, 0, 0), 10.0)
    assert ra.update(Counts(10.0, 100, 100), 10.0) == 1_000  # the floor wins


def test_contacts_reach_the_ceiling() -> None:
    ra = read_ahead()
    ra.update(Counts(0.0, 0, 0), 10.0)
    # 250 contacts a request at 10 requests a second: 25,000 in 10 s, over the ceiling
    assert ra.update(Counts(10.0, 100, 25_000), 10.0) == 20_000


def test_only_the_last_half_minute_counts() -> None:
    ra = read_ahead()
    ra.update(Counts(0.0, 0, 0), 10.0)
    ra.update(Counts(10.0, 100, 25_000), 10.0)  # contacts...
    ra.update(Counts(40.0, 400, 25_300), 10.0)
    # ...then events only, one a request: 10 s of budget is 100 of them (the floor).
    assert ra.update(Counts(70.0, 700, 25_600), 10.0) == 1_000
