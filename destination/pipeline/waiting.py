"""Waiting for an ``asyncio.Event`` with a time-out, cancellation-safe.

``asyncio.wait_for`` on Python 3.11 can swallow a cancellation that arrives as the
awaited event fires (fixed in 3.12): a loop built on it then never stops, and a
shutdown that awaits it hangs. ``asyncio.timeout`` does not have that flaw.
"""

from __future__ import annotations

import asyncio


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
