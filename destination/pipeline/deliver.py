"""Delivering operations to Gist, in per-contact order, inside the workspace's budget.

Contact upserts merge and batch (``contacts``), go out as batch imports, and finish only
when their batch has COMPLETED (``BatchPoller``); events, deletes, aliases and tag
changes go one request each. ``IdentityGate`` decides when each may go. Every request
passes the client's rate limiter, so polls and retries share the budget with the rest.

A step that ends in ``PermanentError`` (or in a per-contact error of a completed batch,
or after retrying for ``retry.max_elapsed``) fails its messages, which the pipeline
dead-letters. A ``CredentialsError`` is handed to ``on_fatal`` and the step is left
open: nothing is dead-lettered for a revoked key.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from destination.gist import (
    BatchStatus,
    ContactRef,
    CredentialsError,
    GistClient,
    GistError,
    PermanentError,
    RetryableError,
)
from destination.observability import log_events, metrics
from destination.operations import (
    ContactAlias,
    ContactDelete,
    ContactUpsert,
    EventTrack,
    Operation,
    TagChange,
)
from destination.pipeline.contacts import ContactBatcher, ContactStep
from destination.pipeline.inflight import Failure, MessageWork
from destination.pipeline.ordering import IdentityGate, Step, StepKind

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    batch_max_contacts: int = 500
    batch_max_wait: float = 1.0
    max_concurrent_requests: int = 32
    """Events, deletes, aliases and tag changes sent at once."""
    max_concurrent_imports: int = 4
    """Batch imports sent at once: a lane of their own, because one import carries
    hundreds of contacts and must not queue behind thousands of waiting events (measured:
    under the real limit a backlog of mixed traffic sent nothing but events)."""
    poll_interval: float = 1.0
    poll_max_interval: float = 30.0
    poll_window: int = 4
    """Only the oldest ``poll_window`` pending batches are polled: Gist imports batches
    in turn, and polling every pending batch would spend the budget on polls."""


class DirectStep(Step):
    __slots__ = ("message", "operation")

    def __init__(self, operation: Operation, message: MessageWork) -> None:
        kind = StepKind.EVENT if isinstance(operation, EventTrack) else StepKind.EXCLUSIVE
        super().__init__(kind, operation.identities)
        self.operation = operation
        self.message = message


class PendingBatch:
    __slots__ = ("batch_id", "interval", "next_poll", "polling", "steps", "submitted")

    def __init__(self, batch_id: str, steps: list[ContactStep], now: float, interval: float):
        self.batch_id = batch_id
        self.steps = steps
        self.submitted = now
        self.interval = interval
        self.next_poll = now + interval
        self.polling = False


class Delivery:
    def __init__(
        self,
        client: GistClient,
        settings: DeliverySettings,
        on_fatal: Callable[[CredentialsError], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.settings = settings
        self._on_fatal = on_fatal
        self._clock = clock
        self.gate = IdentityGate()
        self.batcher = ContactBatcher(settings.batch_max_contacts, settings.batch_max_wait)
        self._requests = asyncio.Semaphore(settings.max_concurrent_requests)
        self._imports = asyncio.Semaphore(settings.max_concurrent_imports)
        self._pending: list[PendingBatch] = []
        self._batcher_wake = asyncio.Event()
        self._poller_wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._flush_all = False
        self._polls_halted = False

    # --- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        self._loops = [
            asyncio.create_task(self._flush_loop(), name="contact-batcher"),
            asyncio.create_task(self._poll_loop(), name="batch-poller"),
        ]

    def flush_now(self, enabled: bool = True) -> None:
        """Send waiting contacts without waiting for a full batch (shutdown, rebalance)."""
        self._flush_all = enabled
        self._batcher_wake.set()

    async def close(self) -> None:
        for task in [*self._loops, *self._tasks]:
            task.cancel()
        for task in [*self._loops, *self._tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._loops.clear()
        self._tasks.clear()

    @property
    def batches_pending(self) -> int:
        return len(self._pending)

    # --- intake -----------------------------------------------------------------------
    def submit(self, message: MessageWork, operations: tuple[Operation, ...]) -> None:
        """Take the message's operations; each ends in ``message.operation_done``."""
        message.expect(len(operations))
        for operation in operations:
            if isinstance(operation, ContactUpsert):
                self._submit_contact(message, operation)
            else:
                self._admit(DirectStep(operation, message))

    def _submit_contact(self, message: MessageWork, upsert: ContactUpsert) -> None:
        identities = upsert.identities
        previous = self.gate.last_write(identities)
        if isinstance(previous, ContactStep) and not previous.sent:
            previous.merge(upsert.contact)
            previous.tickets.append(message)
            metrics.CONTACT_UPDATES_MERGED.inc()
            return
        step = ContactStep(upsert.contact, identities)
        step.tickets.append(message)
        self._admit(step)

    def _admit(self, step: Step) -> None:
        if self.gate.admit(step):
            self._start(step)

    def _start(self, step: Step) -> None:
        if isinstance(step, ContactStep):
            self.batcher.add(step, self._clock())
            if len(self.batcher) == 1 or len(self.batcher) >= self.batcher.max_contacts:
                self._batcher_wake.set()
        elif isinstance(step, DirectStep):
            self._spawn(self._run_direct(step))

    def _finish(self, step: Step, failure: Failure | None) -> None:
        if isinstance(step, ContactStep):
            for message in step.tickets:
                message.operation_done(failure, accepted=step.accepted)
        elif isinstance(step, DirectStep):
            step.message.operation_done(failure)
        for released in self.gate.finish(step):
            self._start(released)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A bug, not Gist: its messages stay unfinished (never committed), so say so
            # loudly rather than let the partition stall in silence.
            log.error(log_events.DELIVERY_TASK_FAILED, exc_info=task.exception())

    # --- one request per operation ----------------------------------------------------
    async def _run_direct(self, step: DirectStep) -> None:
        async with self._requests:
            try:
                await self._execute(step.operation)
            except CredentialsError as error:
                self._on_fatal(error)
                return
            except GistError as error:
                self._finish(step, failure_from(error))
                return
        self._finish(step, None)

    async def _execute(self, operation: Operation) -> None:
        client = self.client
        if isinstance(operation, EventTrack):
            await client.track_event(operation.event)
        elif isinstance(operation, ContactDelete):
            # Already gone (404) is what a delete wants: not an error.
            if operation.user_id is not None:
                await client.delete_contact(user_id=operation.user_id)
            else:
                await client.delete_contact(email=operation.email)
        elif isinstance(operation, TagChange):
            ref: ContactRef = (
                {"user_id": operation.user_id}
                if operation.user_id is not None
                else {"email": operation.email or ""}
            )
            if operation.untag:
                ref["untag"] = True
            await client.tag_contacts(operation.tag, [ref])
        elif isinstance(operation, ContactAlias):
            contact = await client.get_contact(user_id=operation.previous_id)
            if contact is None or contact.get("id") is None:
                log.info(log_events.ALIAS_NOTHING_TO_MOVE)
                return
            await client.upsert_contact({"id": str(contact["id"]), "user_id": operation.user_id})
        else:  # pragma: no cover - ContactUpsert goes through the batcher
            raise TypeError(f"not a direct operation: {type(operation).__name__}")

    # --- contacts: batch imports ------------------------------------------------------
    async def _flush_loop(self) -> None:
        while True:
            due = self.batcher.due_at()
            now = self._clock()
            if due is None or (due > now and not self._flush_all):
                timeout = None if due is None else due - now
                self._batcher_wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._batcher_wake.wait(), timeout)
                continue
            steps = self.batcher.take()
            metrics.CONTACTS_PER_BATCH.observe(len(steps))
            self._spawn(self._send_batch(steps))

    async def _send_batch(self, steps: list[ContactStep]) -> None:
        async with self._imports:
            try:
                accepted = await self.client.import_contacts([s.payload for s in steps])
            except CredentialsError as error:
                self._on_fatal(error)
                return
            except PermanentError as error:
                self._rejected_batch(steps, error)
                return
            except GistError as error:
                for step in steps:
                    self._finish(step, failure_from(error))
                return
        for step in steps:
            if not step.accepted:  # a lost batch sent again is accepted once
                step.accepted = True
                for message in step.tickets:
                    message.operation_accepted()
        now = self._clock()
        self._pending.append(
            PendingBatch(accepted.batch_id, steps, now, self.settings.poll_interval)
        )
        metrics.BATCHES_PENDING.set(len(self._pending))
        self._poller_wake.set()

    def _rejected_batch(self, steps: list[ContactStep], error: PermanentError) -> None:
        """Gist refused the whole batch: halve it until the contact at fault stands alone,
        so one bad contact does not dead-letter a thousand good ones."""
        if len(steps) == 1:
            self._finish(steps[0], failure_from(error))
            return
        middle = len(steps) // 2
        log.warning(log_events.BATCH_REJECTED_SPLIT, contacts=len(steps), status=error.status)
        self._spawn(self._send_batch(steps[:middle]))
        self._spawn(self._send_batch(steps[middle:]))

    async def _poll_loop(self) -> None:
        """Poll the oldest ``poll_window`` pending batches, each when it is due; their
        polls run side by side (one at a time would let imports outrun the polls)."""
        while not self._polls_halted:
            window = [b for b in self._pending[: self.settings.poll_window] if not b.polling]
            if not window:
                self._poller_wake.clear()
                await self._poller_wake.wait()
                continue
            batch = min(window, key=lambda b: b.next_poll)
            now = self._clock()
            if batch.next_poll > now:
                self._poller_wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._poller_wake.wait(), batch.next_poll - now)
                continue
            batch.polling = True
            self._spawn(self._poll(batch))

    async def _poll(self, batch: PendingBatch) -> None:
        try:
            status = await self.client.batch_status(batch.batch_id)
        except CredentialsError as error:
            self._polls_halted = True  # nothing will succeed until an operator acts
            self._on_fatal(error)
            return
        except PermanentError:
            # Gist no longer knows the batch: its outcome is unknown, so send its
            # contacts again (an upsert is idempotent).
            log.warning(log_events.BATCH_LOST, batch_id=batch.batch_id)
            self._forget(batch)
            self._spawn(self._send_batch(batch.steps))
            return
        except RetryableError:
            status = None
        finally:
            batch.polling = False
            self._poller_wake.set()
        now = self._clock()
        if status is not None and status.completed:
            self._forget(batch)
            self._completed(batch, status, now)
        else:
            batch.interval = min(self.settings.poll_max_interval, batch.interval * 2)
            batch.next_poll = now + batch.interval

    def _forget(self, batch: PendingBatch) -> None:
        self._pending.remove(batch)
        metrics.BATCHES_PENDING.set(len(self._pending))

    def _completed(self, batch: PendingBatch, status: BatchStatus, now: float) -> None:
        failed = match_batch_errors(batch.steps, status)
        if failed:
            metrics.BATCH_CONTACT_ERRORS.inc(len(failed))
        log.info(
            log_events.BATCH_COMPLETED,
            batch_id=batch.batch_id,
            contacts=len(batch.steps),
            failed=len(failed),
            seconds=round(now - batch.submitted, 3),
        )
        for index, step in enumerate(batch.steps):
            reason = failed.get(index)
            self._finish(
                step,
                None if reason is None else Failure("batch_contact_error", reason, status=200),
            )


def match_batch_errors(steps: list[ContactStep], status: BatchStatus) -> dict[int, str]:
    """Which submitted contacts a completed batch reports as failed: by ``index`` when
    Gist gives it, else by e-mail or user_id."""
    failed: dict[int, str] = {}
    by_email: dict[str, int] = {}
    by_user: dict[str, int] = {}
    if any(e.index is None for e in status.errors):
        for i, step in enumerate(steps):
            email = step.payload.get("email")
            if isinstance(email, str):
                by_email.setdefault(email.strip().lower(), i)
            user_id = step.payload.get("user_id")
            if user_id is not None:
                by_user.setdefault(str(user_id), i)
    for error in status.errors:
        index = error.index
        if index is None or not 0 <= index < len(steps):
            index = None
            if error.user_id is not None:
                index = by_user.get(error.user_id)
            if index is None and error.email is not None:
                index = by_email.get(error.email.strip().lower())
        if index is not None:
            failed[index] = error.message
        else:
            log.warning(log_events.BATCH_ERROR_UNMATCHED, message=error.message[:200])
    return failed


def failure_from(error: GistError) -> Failure:
    reason = "retries_exhausted" if isinstance(error, RetryableError) else "gist_rejected"
    return Failure(
        reason=reason,
        detail=str(error),
        status=error.status,
        body_excerpt=error.body_excerpt,
        attempts=error.attempts,
    )
