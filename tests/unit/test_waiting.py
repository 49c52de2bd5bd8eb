"""Cancellation-safe waits (``pipeline.waiting``): a waiter's own cancellation is never
swallowed, and a task that ignores its cancellation cannot hold the waiter."""

from __future__ import annotations

import asyncio
import gc

import pytest

from destination.pipeline.waiting import cancel_and_wait, wait_event


async def test_a_cancelled_task_is_waited_for_and_its_end_reported() -> None:
    ended = asyncio.Event()

    async def work() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            ended.set()

    task = asyncio.create_task(work())
    await asyncio.sleep(0)
    assert await cancel_and_wait(task, within=1.0) is True
    assert task.cancelled()
    assert ended.is_set()


async def test_a_task_that_ignores_its_cancellation_holds_the_waiter_only_within() -> None:
    release = asyncio.Event()

    async def deaf() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                continue  # swallowed: the task goes on

    task = asyncio.create_task(deaf())
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await cancel_and_wait(task, within=0.2) is False
    assert loop.time() - started < 5.0
    assert not task.done()
    release.set()
    task.cancel()
    await asyncio.wait({task}, timeout=1.0)
    assert task.done()


async def test_the_waiters_own_cancellation_is_raised_not_swallowed() -> None:
    """The shape it replaces, ``task.cancel(); with suppress(CancelledError): await
    task``, swallows a cancellation of the waiter that arrives while it waits."""
    slow_to_end = asyncio.Event()

    async def work() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await slow_to_end.wait()  # ends a while after its cancellation
            raise

    went_on = []

    async def waiter() -> None:
        task = asyncio.create_task(work())
        await asyncio.sleep(0)
        await cancel_and_wait(task, within=None)
        went_on.append(True)  # must not run: this waiter was cancelled meanwhile

    outer = asyncio.create_task(waiter())
    await asyncio.sleep(0.05)
    outer.cancel()
    slow_to_end.set()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert went_on == []


async def test_a_tasks_error_is_retrieved() -> None:
    """A task cancelled on the way out has no one else to read its error: unread, asyncio
    would log "Task exception was never retrieved" when it is collected."""
    unread: list[object] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: unread.append(context))

    async def broken() -> None:
        raise ValueError("boom")

    task = asyncio.create_task(broken())
    await asyncio.sleep(0)
    assert task.done()
    assert await cancel_and_wait(task, within=1.0) is True
    del task
    gc.collect()
    assert unread == []


async def test_wait_event_says_whether_the_event_was_set() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    assert await wait_event(event, 0) is False
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_event(event, 5.0) is True
