"""``replay`` refuses what cannot mean what the operator typed, before it touches Kafka:
a reason not in the catalogue, a negative partition, times that are not times (``nan``
compares false with every time: it kept everything or nothing), an empty time range.
(Ported from the F9 reproduction.)"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

from destination import reasons
from destination.cli import main
from destination.commands.replay import add_arguments, parse_filter

LETTER = {"reason": "batch_timeout", "time": "1700000000", "source-partition": "0",
          "source-offset": "5"}  # fmt: skip


def parsed(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--from", "dlq", "--to", "in", *argv])


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--until", "nan"], "--until must be ISO 8601 or epoch seconds, got 'nan'"),
        (["--since", "NaN"], "--since must be ISO 8601 or epoch seconds, got 'NaN'"),
        (["--since", "inf"], "--since must be ISO 8601 or epoch seconds"),
        (["--since", "yesterday"], "--since must be ISO 8601 or epoch seconds"),
        (["--since", "1700000100", "--until", "1700000000"], "--since (1700000100) must be"),
        (["--reason", "batch_timout"], "'batch_timout' is not a dead-letter reason"),
        (["--reason", "invalid-json"], "(did you mean 'invalid_json'?)"),
        (["--reason", "duplicate"], "'duplicate' is not a dead-letter reason"),  # a skip
        (["--partition", "-1"], "--partition must be 0 or more, got -1"),
        (["--partition", "0", "--offsets=-1-5"], "--offsets must be A-B"),
        (["--offsets", "1-5"], "--offsets needs --partition"),
    ],
)
def test_nonsense_is_refused_naming_the_option(argv: list[str], error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        parse_filter(parsed(*argv))


def test_the_reason_error_lists_the_catalogue() -> None:
    with pytest.raises(ValueError, match="batch_timout") as raised:
        parse_filter(parsed("--reason", "batch_timout"))
    assert all(code in str(raised.value) for code in reasons.DEAD_LETTER)


def test_sensible_filters_still_select() -> None:
    wanted = parse_filter(parsed("--reason", "batch_timeout", "--since", "2023-11-14T22:00",
                                 "--until", "1700000001", "--partition", "0",
                                 "--offsets", "0-5"))  # fmt: skip
    assert wanted.keeps(LETTER)
    assert not parse_filter(parsed("--until", "1700000000")).keeps(LETTER)
    assert not parse_filter(parsed("--reason", "invalid_json")).keeps(LETTER)


def test_the_command_exits_2_before_reaching_kafka(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["replay", "--from", "dlq", "--to", "in", "--dry-run",
            "--bootstrap-servers", "127.0.0.1:1"]  # fmt: skip: nothing listens there
    assert main([*argv, "--reason", "invalid-json"]) == 2
    assert "'invalid-json' is not a dead-letter reason" in capsys.readouterr().err
    assert main([*argv, "--until", "nan"]) == 2
    assert main(["replay", "--from", "same", "--to", "same"]) == 2
    assert "--from and --to name the same topic" in capsys.readouterr().err


def test_an_unreachable_kafka_is_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "destination", "replay", "--from", "dlq", "--to", "in",
         "--bootstrap-servers", "127.0.0.1:1"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("gist-destination replay: cannot reach Kafka at 127.0.0.1:1")
