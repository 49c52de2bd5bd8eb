"""``RetryPolicy``: capped exponential backoff with jitter, bounded by count and time."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from destination.gist import NO_RETRY, RetryPolicy


@settings(max_examples=200, deadline=None)
@given(
    attempt=st.integers(min_value=1, max_value=10_000),
    base=st.floats(min_value=0.001, max_value=10.0),
    cap=st.floats(min_value=0.001, max_value=3600.0),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_each_delay_is_drawn_from_the_upper_half_of_the_capped_ceiling(
    attempt: int, base: float, cap: float, seed: int
) -> None:
    policy = RetryPolicy(base=base, cap=cap)
    ceiling = min(cap, base * 2 ** min(attempt - 1, 30))
    delay = policy.delay(attempt, random.Random(seed))
    assert ceiling / 2 <= delay <= ceiling
    assert delay <= cap


def test_the_ceiling_doubles_per_attempt_until_the_cap() -> None:
    policy = RetryPolicy(base=0.5, cap=30.0)
    rng = random.Random(7)
    uppers = [max(policy.delay(n, rng) for _ in range(200)) for n in range(1, 10)]
    lowers = [min(policy.delay(n, rng) for _ in range(200)) for n in range(1, 10)]
    expected = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    for upper, lower, ceiling in zip(uppers, lowers, expected, strict=True):
        assert ceiling * 0.95 <= upper <= ceiling
        assert ceiling / 2 <= lower <= ceiling / 2 * 1.05


def test_delays_are_jittered_and_reproducible_with_a_seeded_rng() -> None:
    policy = RetryPolicy(base=1.0, cap=60.0)
    draws = [policy.delay(4) for _ in range(50)]
    assert len(set(draws)) > 40  # jitter spreads retries of many workers apart
    first = [policy.delay(n, random.Random(42)) for n in range(1, 6)]
    again = [policy.delay(n, random.Random(42)) for n in range(1, 6)]
    assert first == again


def test_a_huge_attempt_number_does_not_overflow() -> None:
    policy = RetryPolicy(base=0.5, cap=60.0)
    assert 30.0 <= policy.delay(10**9) <= 60.0


@pytest.mark.parametrize(
    ("policy", "attempt", "elapsed", "gives_up"),
    [
        (RetryPolicy(max_elapsed=60.0), 1, 0.0, False),
        (RetryPolicy(max_elapsed=60.0), 10_000, 59.9, False),  # 0 attempts: no count bound
        (RetryPolicy(max_elapsed=60.0), 2, 60.0, True),
        (RetryPolicy(max_elapsed=60.0, max_attempts=3), 2, 1.0, False),
        (RetryPolicy(max_elapsed=60.0, max_attempts=3), 3, 1.0, True),
        (RetryPolicy(max_elapsed=4 * 3600, max_attempts=0), 500, 3600.0, False),
        (NO_RETRY, 1, 0.0, True),
    ],
)
def test_gives_up_on_the_attempt_count_or_the_elapsed_time(
    policy: RetryPolicy, attempt: int, elapsed: float, gives_up: bool
) -> None:
    assert policy.gives_up(attempt, elapsed) is gives_up


def test_the_policy_is_an_immutable_value() -> None:
    policy = RetryPolicy(base=0.5, cap=60.0, max_elapsed=4 * 3600)
    with pytest.raises(AttributeError):
        policy.base = 1.0  # type: ignore[misc]
    assert policy == RetryPolicy(base=0.5, cap=60.0, max_elapsed=4 * 3600)
