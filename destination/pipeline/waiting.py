"""Waiting, cancellation-safe: for an ``asyncio.Event`` with a time-out, and for tasks
being cancelled.

``asyncio.wait_for`` on Python 3.11 can swallow a cancellation that arrives as the
awaited event fires (fixed in 3.12): a loop built on it then never stops, and a
shutdown that awaits it hangs. ``asyncio.timeout`` does not have that flaw.

``task.cancel(); with suppress(CancelledError): await task`` has two: a cancellation of
the *waiting* task arrives as the same ``CancelledError`` and is swallowed with the
task's (the waiter carries on past its own stop), and a task that does not end on its
cancellation holds the waiter for ever. ``cancel_and_wait`` has neither.
"""

from __future__ import annotations

import asyncio
from typing import Any


async def wait_event(event: asyncio.Event, within: float | None) -> bool:
    """Wait until ``event`` is set or ``within`` seconds pass (None: no limit); True
    when it was set."""
    if within is not None and within <= 0:
        await asyncio.sleep(0)  # still a turn of the loop: a caller in a loop must yield
        return event.is_set()
    try:
        async with asyncio.timeout(within):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def cancel_and_wait(*tasks: asyncio.Future[Any], within: float | None) -> bool:
    """Cancel ``tasks`` and wait until they end or ``within`` seconds pass (None: no
    limit); True when every one ended. A cancellation of the caller is raised, not
    swallowed. Their errors are retrieved here (a task cancelled on the way out has no
    one else to read them): a caller that wants one reads ``task.exception()``."""
    for task in tasks:
        task.cancel()
    pending = {task for task in tasks if not task.done()}
    if pending:
        _, pending = await asyncio.wait(pending, timeout=within)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()
    return not pending
