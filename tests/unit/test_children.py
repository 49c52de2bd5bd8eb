"""A child started with ``die_with_parent`` ends when its parent is killed outright."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

PARENT = """
import subprocess, sys, time
from destination.devtools.children import die_with_parent
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                         preexec_fn=die_with_parent if sys.argv[1] == "yes" else None)
print(child.pid, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _child_after_parent_killed(ask: str) -> int:
    with subprocess.Popen(
        [sys.executable, "-c", PARENT, ask], stdout=subprocess.PIPE, text=True
    ) as parent:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
    return child


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_a_child_dies_with_its_parent() -> None:
    child = _child_after_parent_killed("yes")
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_without_it_the_child_lives_on() -> None:
    """The control: the same parent without the request leaves an orphan."""
    child = _child_after_parent_killed("no")
    try:
        time.sleep(0.5)
        assert _alive(child)
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
