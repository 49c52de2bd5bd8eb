"""Exit codes are the same for every command (``destination/cli.py``, the README's
table): the same bad rules file is 2 for ``check-config``, ``run``, ``map`` and ``plan``;
output piped to a reader that stops early (``| head``) ends quietly with 141."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

BROKEN_RULES = "version: 1\ntrack:\n  enabled: maybe\n"


def command(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "destination", *args],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, **env},
    )  # fmt: skip


def test_a_bad_rules_file_is_exit_2_for_every_command(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(BROKEN_RULES)
    messages = tmp_path / "m.jsonl"
    messages.write_text('{"type": "track", "userId": "u", "event": "E"}\n')
    settings = {"GIST_API_KEY": "k", "KAFKA_TOPICS": "t", "MAPPING_CONFIG": str(rules),
                "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}  # fmt: skip: never reached
    runs = {
        "check-config": command("check-config", str(rules)),
        "run": command("run", **settings),
        "map": command("map", str(messages), "--rules", str(rules)),
        "plan": command("plan", str(messages), "--rules", str(rules)),
    }
    assert {name: done.returncode for name, done in runs.items()} == dict.fromkeys(runs, 2)
    for name, done in runs.items():
        assert "track.enabled" in done.stderr, name
        assert "Traceback" not in done.stderr, name


def pipe_closed_early(*args: str) -> tuple[int, str]:
    """Run with standard output a pipe whose reader has gone, as ``| head`` leaves it."""
    with subprocess.Popen(
        [sys.executable, "-m", "destination", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as process:  # fmt: skip
        assert process.stdout is not None
        assert process.stderr is not None
        process.stdout.close()
        stderr = process.stderr.read()
        return process.wait(60), stderr


@pytest.mark.parametrize(
    "args", [["map"], ["map", "--format", "table"], ["plan", "--json"], ["plan"]]
)
def test_a_reader_that_stops_early_ends_it_quietly(tmp_path: Path, args: list[str]) -> None:
    messages = tmp_path / "m.jsonl"
    messages.write_bytes(b"\n".join(
        orjson.dumps({"type": "track", "userId": f"u{i}", "event": f"E{i % 50}"})
        for i in range(3000)
    ))  # fmt: skip
    code, stderr = pipe_closed_early(args[0], str(messages), *args[1:])
    assert stderr == ""
    assert code == 141


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["plan", "-", "--sample", "0"], "--sample must be 1 or more, got 0"),
        (["plan", "-", "--rate", "nan"], "--rate must be a number above 0, got nan"),
        (["plan", "-", "--rate", "-5"], "--rate must be a number above 0, got -5.0"),
        (["produce", "--sample", "-3", "--topic", "t"], "--sample must be 1 or more, got -3"),
        (["produce", "-", "--topic", "t", "--create-topic", "--partitions", "0"],
         "--partitions must be 1 or more, got 0"),
    ],
)  # fmt: skip
def test_numbers_out_of_range_are_refused_before_kafka(args: list[str], error: str) -> None:
    done = command(*args, KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1")
    assert done.returncode == 2
    assert error in done.stderr
