"""Child processes that end with their parent.

The demo, the tests and the benchmarks start brokers, sandboxes and workers as
subprocesses and stop them in ``finally`` blocks; a parent killed outright (SIGKILL, a
CI time-out) runs no ``finally``, and its children would live on, holding ports and CPU
(found: a worker left running for hours by a test run that was killed). On Linux,
``die_with_parent`` as ``preexec_fn`` asks the kernel to SIGKILL the child when the
thread that started it exits (so start long-lived children from the main thread, never
from ``asyncio.to_thread``); elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # no prctl here: nothing to ask for
        return
