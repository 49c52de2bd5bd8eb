"""``plan``'s report says what an operator needs to judge it: the sample's time span, a
warning when the sample is a burst, the consumer group whose lag it drains, drain times
in minutes below an hour; and an unreachable Kafka is one line, no traceback."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

import pytest

from destination.commands.plan import Plan, TopicSample, duration, print_report, summarise

NOW = 1_800_000_000.0


def sample(lag: int = 1358, whole: bool = False, committed: bool = True) -> TopicSample:
    return TopicSample([], [], "gist-destination", lag, committed, whole)


def plan_of(records: int, requests: float) -> Plan:
    plan = Plan(records=records, messages=records)
    plan.lines["track: Viewed"].messages = records
    plan.lines["track: Viewed"].requests = requests
    return plan


def report(stamps: list[float], topic: TopicSample | None, rate: float | None = None) -> str:
    return _printed(summarise(plan_of(len(stamps), len(stamps)), rate, topic, 100, 10.0,
                              stamps=stamps, now=NOW))  # fmt: skip


def _printed(data: dict[str, object]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_report(data)
    return out.getvalue()


def test_a_burst_long_past_is_flagged_and_its_rate_not_trusted() -> None:
    burst = [NOW - 7200 + i / 1000 for i in range(200)]  # 0.2 s, two hours ago
    text = report(burst, sample())
    assert "WARNING: the sample is a burst (written in 0.199 s, then nothing for 2.0 h)" in text
    assert "the rate below is the burst's, not the topic's: give --rate R" in text
    assert "(measured)" in text


def test_a_topic_that_holds_only_a_fresh_burst_is_flagged() -> None:
    fresh = [NOW - 5 + i / 1000 for i in range(200)]
    assert "the topic holds only what was written in 0.199 s" in report(fresh, sample(whole=True))
    assert "burst" not in report(fresh, sample(whole=False))  # a fast topic's last 200


def test_steady_traffic_is_not_a_burst_and_the_span_is_given() -> None:
    steady = [NOW - 86_400 + i * 432 for i in range(200)]  # a day, one every 7 min
    text = report(steady, sample())
    assert "burst" not in text
    assert "(23.9 h); newest record" in text


def test_a_files_times_say_nothing_of_a_burst() -> None:
    old = [NOW - 30 * 86_400 + i for i in range(200)]
    assert "burst" not in report(old, None)


def test_the_group_is_named_and_drain_is_in_minutes_below_an_hour() -> None:
    text = report([NOW - 100, NOW - 1], sample(lag=1358))
    # 1358 events at 10 requests a second: 135.8 s.
    assert "consumer group 'gist-destination': lag 1,358 records, 2.3 min to drain" in text
    assert "never" not in text
    assert "(it has committed nothing" in report([NOW - 1, NOW], sample(committed=False))
    assert duration(59 * 60) == "59.0 min"
    assert duration(2 * 3600) == "2.0 h"


@pytest.mark.parametrize("argv", [["--json"], []])
def test_an_unreachable_kafka_is_one_line(argv: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "destination", "plan", "--topic", "segment",
         "--bootstrap-servers", "127.0.0.1:1", *argv],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "gist-destination plan: cannot reach Kafka at 127.0.0.1:1 (set KAFKA_BOOTSTRAP_SERVERS "
        "or --bootstrap-servers, and KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_* and KAFKA_SSL_* as "
        "for run)"
    ]
