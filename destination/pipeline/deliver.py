"""Delivering operations to Gist, in per-contact order, inside the workspace's budget.

Contact upserts merge and batch (``contacts``), go out as batch imports, and finish only
when their batch has COMPLETED (polling below); tag changes go many contacts to a
``POST /tags``; events, deletes and aliases one request each. ``IdentityGate`` decides
when each may go. Every request passes the client's rate limiter, so polls and retries
share the budget with the rest.

Every step ends, and ends its messages' operations through ``Outcomes``:

- Gist refuses it for good (``PermanentError``), a transient failure outlasts the retry
  time, or Gist keeps answering something unusable: the operation fails (dead letter);
- a completed batch reports the contact as failed; a completed batch whose errors cannot
  all be matched to contacts, or that imported fewer than it was sent, is sent again in
  halves until every contact's fate is known (upserts are idempotent);
- a batch not COMPLETED within ``batch_deadline`` (a status this client does not know
  counts as not completed), or one Gist no longer knows, is sent again once, then its
  contacts fail with ``batch_timeout``;
- an unexpected exception anywhere in here fails the operations concerned with
  ``internal_error``; a loop that dies anyway is reported (``broken``), never silent.

A ``CredentialsError`` is handed to ``on_fatal`` and the step is left open: nothing is
dead-lettered for a revoked key. ``abandon`` drops a revoked partition's work: nothing
more is sent for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from destination import reasons
from destination.gist import (
    BatchStatus,
    ContactRef,
    CredentialsError,
    GistClient,
    GistError,
    PermanentError,
    RetryableError,
    UnexpectedAnswerError,
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
from destination.pipeline.fingerprints import Fingerprints
from destination.pipeline.inflight import Failure, MessageWork, PartitionWork, Skip
from destination.pipeline.ordering import IdentityGate, Step, StepKind
from destination.pipeline.outcome import Outcomes, internal_failure
from destination.pipeline.waiting import wait_event

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
    poll_stale_after: float = 300.0
    """A batch pending this long leaves the poll window (so a stuck batch cannot stop
    the polls of later ones) and is polled, in turn with other such batches, every
    ``poll_max_interval``."""
    batch_deadline: float = 3600.0
    """A batch not COMPLETED this long after it was sent is sent again once; the second
    time, its contacts are dead-lettered (``batch_timeout``)."""
    tag_batch: int = 50
    """Contacts tagged (or untagged) in one ``POST /tags``: the reference's "up to ~50"."""
    tag_batch_wait: float = 0.2
    """Longest wait (s) to fill a tag request; a tag change holds its contact's later
    work meanwhile, so this is short."""


class DirectStep(Step):
    __slots__ = ("message", "operation", "partition", "task")

    def __init__(self, operation: Operation, message: MessageWork) -> None:
        kind = StepKind.EVENT if isinstance(operation, EventTrack) else StepKind.EXCLUSIVE
        super().__init__(kind, operation.identities)
        self.operation = operation
        self.message = message
        self.partition: PartitionWork | None = message.record.partition
        self.task: asyncio.Task[None] | None = None


class PendingBatch:
    """A batch import Gist accepted and has not completed yet."""

    __slots__ = (
        "batch_id",
        "deadline",
        "interval",
        "next_poll",
        "polling",
        "resent",
        "status",
        "steps",
        "submitted",
    )

    def __init__(
        self,
        batch_id: str,
        steps: list[ContactStep],
        now: float,
        interval: float,
        deadline: float,
        resent: bool,
        status: str = "QUEUED",
    ) -> None:
        self.batch_id = batch_id
        self.steps = steps  # in the order sent (batch errors name contacts by index)
        self.submitted = now
        self.deadline = now + deadline
        self.interval = interval
        self.next_poll = now + interval
        self.polling = False
        self.resent = resent  # sent again once already: the next expiry dead-letters
        self.status = status  # what Gist last said of it (the import's answer, a poll)

    def live(self) -> list[ContactStep]:
        return [step for step in self.steps if not step.finished]


class Delivery:
    def __init__(
        self,
        client: GistClient,
        settings: DeliverySettings,
        outcomes: Outcomes,
        on_fatal: Callable[[CredentialsError], None],
        clock: Callable[[], float] = time.monotonic,
        fingerprints: Fingerprints | None = None,
    ) -> None:
        """``fingerprints``: what Gist holds of each contact; its fields are left out of
        upserts (None: every upsert is sent whole)."""
        self.client = client
        self.settings = settings
        self.outcomes = outcomes
        self.fingerprints = fingerprints
        self._on_fatal = on_fatal
        self._clock = clock
        self.gate = IdentityGate()
        self.batcher = ContactBatcher(settings.batch_max_contacts, settings.batch_max_wait)
        self._requests = asyncio.Semaphore(settings.max_concurrent_requests)
        self._imports = asyncio.Semaphore(settings.max_concurrent_imports)
        self._open: dict[Step, None] = {}  # admitted and not finished, for ``abandon``
        self._pending: list[PendingBatch] = []
        self._sending: dict[asyncio.Task[None], list[ContactStep]] = {}
        # Tag changes waiting to fill a POST /tags, by (tag, untag); and those in flight.
        self._tag_groups: dict[tuple[str, bool], list[DirectStep]] = {}
        self._tagging: dict[asyncio.Task[None], list[DirectStep]] = {}
        self._batcher_wake = asyncio.Event()
        self._poller_wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._flush_all = False
        self._polls_halted = False
        self._closing = False
        self.broken: str | None = None
        """Set when a part of delivery stopped on a bug: the worker reports unhealthy."""

    # --- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        self._loops = [
            asyncio.create_task(self._flush_loop(), name="contact-batcher"),
            asyncio.create_task(self._poll_loop(), name="batch-poller"),
        ]
        for loop in self._loops:
            loop.add_done_callback(self._loop_done)

    def flush_now(self, enabled: bool = True) -> None:
        """Send waiting contacts without waiting for a full batch (shutdown, rebalance)."""
        self._flush_all = enabled
        self._batcher_wake.set()

    async def close(self) -> None:
        self._closing = True
        tasks = [*self._loops, *self._tasks]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        self._loops.clear()
        self._tasks.clear()

    @property
    def batches_pending(self) -> int:
        return len(self._pending)

    @property
    def batches_working(self) -> int:
        """Pending batches Gist is importing side by side: all of them when the last
        answer for each says ``IN_PROGRESS``, else 0. A Gist that takes our batches as
        they come and works on them side by side could use more; one that queues them,
        not. Every pending batch must say so, not two of them: answers are stale (polls
        are few at the real limit), and a Gist importing in turn has been seen with one
        batch last polled IN_PROGRESS before it completed and the next polled
        IN_PROGRESS after, the rest not polled since their import was accepted
        (``QUEUED``)."""
        statuses = [batch.status for batch in self._pending]
        if any(status != "IN_PROGRESS" for status in statuses):
            return 0
        return len(statuses)

    def oldest_pending_batch_age(self) -> float:
        if not self._pending:
            return 0.0
        return max(0.0, self._clock() - min(b.submitted for b in self._pending))

    # --- intake -----------------------------------------------------------------------
    def submit(self, message: MessageWork, operations: Sequence[Operation]) -> None:
        """Take the message's operations; each ends in ``outcomes.operation_done``."""
        self.outcomes.expect(message, len(operations))
        for operation in operations:
            try:
                if isinstance(operation, ContactUpsert):
                    self._submit_contact(message, operation)
                else:
                    self._admit(DirectStep(operation, message))
            except Exception as exc:  # a bug: this operation fails, the others go on
                self._report_internal(exc, "submit", message)
                self.outcomes.operation_done(message, internal_failure(exc, "submit"))

    def _submit_contact(self, message: MessageWork, upsert: ContactUpsert) -> None:
        identities = upsert.identities
        partition = message.record.partition
        previous = self.gate.last_write(identities)
        if (
            isinstance(previous, ContactStep)
            and not previous.sent
            and previous.partition is partition
        ):
            previous.merge(upsert.contact)
            previous.priority = max(previous.priority, upsert.priority)
            previous.tickets.append(message)
            metrics.CONTACT_UPDATES_MERGED.inc()
            return
        step = ContactStep(upsert.contact, identities, partition, upsert.priority)
        step.tickets.append(message)
        self._admit(step)

    def _admit(self, step: Step) -> None:
        self._open[step] = None
        if self.gate.admit(step):
            self._start(step)

    def _start(self, step: Step) -> None:
        if isinstance(step, ContactStep):
            # Every earlier write to the contact has completed (the gate saw to it): what
            # Gist holds is known here, so an update of nothing new takes no batch slot.
            if (
                self.fingerprints is not None
                and self.fingerprints.shared is None
                and not self._leave_out_what_gist_holds(step)
            ):
                metrics.REQUESTS_SAVED.labels("unchanged").inc(
                    2 / self.settings.batch_max_contacts
                )
                return
            self.batcher.add(step, self._clock())
            if len(self.batcher) == 1 or len(self.batcher) >= self.batcher.max_contacts:
                self._batcher_wake.set()
        elif isinstance(step, DirectStep) and isinstance(step.operation, TagChange):
            self._queue_tag(step)
        elif isinstance(step, DirectStep):
            step.task = self._spawn(functools.partial(self._run_direct, step), [step], "request")

    def _finish(self, step: Step, failure: Failure | Skip | None) -> None:
        """The step is over: end its operations, and start the steps it held back."""
        if step.finished:
            return
        self._open.pop(step, None)
        released = self.gate.finish(step)
        if isinstance(step, ContactStep):
            for message in step.tickets:
                self.outcomes.operation_done(message, failure, accepted=step.accepted)
        elif isinstance(step, DirectStep):
            self.outcomes.operation_done(step.message, failure)
        for later in released:
            try:
                self._start(later)
            except Exception as exc:
                self._internal([later], exc, "start")

    # --- errors that are bugs ---------------------------------------------------------
    def _report_internal(self, error: BaseException, where: str, message: Any = None) -> None:
        metrics.INTERNAL_ERRORS.labels(where).inc()
        extra = message.where() if isinstance(message, MessageWork) else {}
        log.error(
            log_events.INTERNAL_ERROR,
            where=where,
            error=type(error).__name__,
            exc_info=error,
            **extra,
        )

    def _internal(self, steps: Iterable[Step], error: BaseException, where: str) -> None:
        """An unexpected exception: the steps' operations fail with ``internal_error``."""
        self._report_internal(error, where)
        failure = internal_failure(error, where)
        for step in steps:
            if not step.finished:
                self._finish(step, failure)

    def _spawn(
        self, work: Callable[[], Awaitable[None]], steps: Sequence[Step], where: str
    ) -> asyncio.Task[None]:
        """Run ``work()`` in a task; an unexpected exception fails ``steps``. (The
        coroutine is made inside the task: one cancelled before it ran leaves none
        un-awaited behind.)"""
        task = asyncio.create_task(self._guarded(work, steps, where))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    async def _guarded(
        self, work: Callable[[], Awaitable[None]], steps: Sequence[Step], where: str
    ) -> None:
        try:
            await work()
        except Exception as exc:
            self._internal(steps, exc, where)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Even failing its steps failed: a bug in the bookkeeping itself.
            self._broke("delivery-task", task.exception())

    def _loop_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._broke(task.get_name(), task.exception())

    def _broke(self, component: str, error: BaseException | None) -> None:
        metrics.TASKS_FAILED.labels(component).inc()
        log.error(log_events.TASK_FAILED, component=component, exc_info=error)
        if self.broken is None:
            self.broken = f"{component} stopped: {type(error).__name__}"

    # --- revoked partitions -----------------------------------------------------------
    def abandon(self, partitions: Iterable[PartitionWork]) -> int:
        """Drop the work of revoked partitions: nothing more is sent for it (its requests
        in flight are cancelled, its contacts leave the batcher, their batches are no
        longer polled for them); their messages do not end here. Returns the steps
        dropped."""
        gone = set(partitions)
        doomed = [s for s in self._open if getattr(s, "partition", None) in gone]
        if not doomed:
            return 0
        for step in doomed:
            self._open.pop(step, None)
            if isinstance(step, ContactStep):
                self.batcher.remove(step)
            elif isinstance(step, DirectStep) and step.task is not None:
                step.task.cancel()
        doomed_set = set(doomed)
        in_flight: list[tuple[asyncio.Task[None], Sequence[Step]]] = [
            *self._sending.items(),
            *self._tagging.items(),
        ]
        for task, steps in in_flight:
            if any(s in doomed_set for s in steps):
                task.cancel()  # the others of the batch go back to wait again
        for key, group in list(self._tag_groups.items()):
            self._tag_groups[key] = [s for s in group if s not in doomed_set]
        released: list[Step] = []
        for step in doomed:  # finished without an outcome: the new owner reads it again
            released.extend(self.gate.finish(step))
        self._pending = [b for b in self._pending if b.live()]
        metrics.BATCHES_PENDING.set(len(self._pending))
        for later in released:
            if not later.finished:
                try:
                    self._start(later)
                except Exception as exc:
                    self._internal([later], exc, "start")
        return len(doomed)

    # --- tag changes: many contacts per POST /tags --------------------------------------
    def _queue_tag(self, step: DirectStep) -> None:
        operation = step.operation
        assert isinstance(operation, TagChange)
        key = (operation.tag, operation.untag)
        group = self._tag_groups.setdefault(key, [])
        group.append(step)
        if len(group) >= self.settings.tag_batch:
            self._send_tags(key)
        elif len(group) == 1:
            asyncio.get_running_loop().call_later(
                self.settings.tag_batch_wait, self._send_tags, key, group
            )

    def _send_tags(self, key: tuple[str, bool], group: list[DirectStep] | None = None) -> None:
        """Send the waiting group for ``key`` (when ``group`` is given: only if it is
        still the one waiting, i.e. the timer of an earlier, already sent group does not
        cut a later one short)."""
        waiting = self._tag_groups.get(key)
        if waiting is None or (group is not None and waiting is not group):
            return
        del self._tag_groups[key]
        steps = [s for s in waiting if not s.finished]
        if steps:
            self._dispatch_tags(key, steps)

    def _dispatch_tags(self, key: tuple[str, bool], steps: list[DirectStep]) -> None:
        if len(steps) > 1:
            metrics.REQUESTS_SAVED.labels("tag_batch").inc(len(steps) - 1)
        task = self._spawn(functools.partial(self._run_tags, key, steps), steps, "request")
        self._tagging[task] = steps
        task.add_done_callback(lambda t: self._tagging.pop(t, None))

    async def _run_tags(self, key: tuple[str, bool], steps: list[DirectStep]) -> None:
        tag, untag = key
        if self.fingerprints is not None:
            for step in steps:
                self.fingerprints.forget(step.identities)
        try:
            async with self._requests:
                refs: list[ContactRef] = []
                for step in steps:
                    operation = step.operation
                    assert isinstance(operation, TagChange)
                    ref: ContactRef = (
                        {"user_id": operation.user_id}
                        if operation.user_id is not None
                        else {"email": operation.email or ""}
                    )
                    if untag:
                        ref["untag"] = True
                    refs.append(ref)
                _charge(steps)
                priority = max(step.operation.priority for step in steps)
                await self.client.tag_contacts(tag, refs, priority=priority)
        except asyncio.CancelledError:
            if self._closing:
                raise
            # Revoked partitions' changes were in the request: the others wait again.
            for step in steps:
                if not step.finished:
                    self._queue_tag(step)
            return
        except CredentialsError as error:
            self._on_fatal(error)
            return
        except PermanentError as error:
            if len(steps) > 1:  # one contact at fault: find it, as for batch imports
                middle = len(steps) // 2
                self._dispatch_tags(key, steps[:middle])
                self._dispatch_tags(key, steps[middle:])
                return
            self._finish(steps[0], failure_from(error))
            return
        except GistError as error:
            failure = failure_from(error)
            for step in steps:
                self._finish(step, failure)
            return
        for step in steps:
            self._finish(step, None)

    # --- one request per operation ----------------------------------------------------
    async def _run_direct(self, step: DirectStep) -> None:
        if self.fingerprints is not None and not isinstance(step.operation, EventTrack):
            # A delete, alias or tag change: what Gist holds of the contact changes.
            self.fingerprints.forget(step.identities)
        async with self._requests:
            try:
                _charge((step,))
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
        priority = operation.priority
        if isinstance(operation, EventTrack):
            await client.track_event(operation.event, priority=priority)
        elif isinstance(operation, ContactDelete):
            # Already gone (404) is what a delete wants: not an error.
            if operation.user_id is not None:
                await client.delete_contact(user_id=operation.user_id, priority=priority)
            else:
                await client.delete_contact(email=operation.email, priority=priority)
        elif isinstance(operation, ContactAlias):
            contact = await client.get_contact(user_id=operation.previous_id, priority=priority)
            if contact is None or contact.get("id") is None:
                log.info(log_events.ALIAS_NOTHING_TO_MOVE)
                return
            await client.upsert_contact(
                {"id": str(contact["id"]), "user_id": operation.user_id}, priority=priority
            )
        else:  # pragma: no cover - upserts and tag changes are batched
            raise TypeError(f"not a direct operation: {type(operation).__name__}")

    # --- contacts: batch imports ------------------------------------------------------
    async def _flush_loop(self) -> None:
        while True:
            due = self.batcher.due_at()
            now = self._clock()
            if due is None or (due > now and not self._flush_all):
                timeout = None if due is None else due - now
                self._batcher_wake.clear()
                await wait_event(self._batcher_wake, timeout)
                continue
            steps = self.batcher.take()
            try:
                if self.fingerprints is not None and self.fingerprints.shared is not None:
                    await self.fingerprints.load(
                        key for s in steps if (key := _memory_key(s)) is not None
                    )
                self._dispatch(steps, resent=False)
            except Exception as exc:
                self._internal(steps, exc, "batcher")

    def _dispatch(self, steps: list[ContactStep], *, resent: bool) -> None:
        """Encode each contact (one that cannot be encoded fails alone) and send them."""
        ready: list[ContactStep] = []
        unchanged = 0
        for step in steps:
            if step.finished:
                continue
            try:
                if (
                    step.encoded is None
                    and self.fingerprints is not None
                    and step.stripped != step.merged  # not stripped since its last merge
                    and not self._leave_out_what_gist_holds(step)
                ):
                    unchanged += 1
                    continue
                step.encode()
            except Exception as exc:
                self._internal([step], exc, "encode")
                continue
            ready.append(step)
        if unchanged:
            # A batch import and its poll per batch of contacts: their share of both.
            saved = 2 * unchanged / self.settings.batch_max_contacts
            metrics.REQUESTS_SAVED.labels("unchanged").inc(saved)
        if ready:
            metrics.CONTACTS_PER_BATCH.observe(len(ready))
            task = self._spawn(functools.partial(self._send_batch, ready, resent), ready, "import")
            self._sending[task] = ready
            task.add_done_callback(lambda t: self._sending.pop(t, None))

    def _leave_out_what_gist_holds(self, step: ContactStep) -> bool:
        """Drop from the step's upsert the fields Gist holds; False (and the step ends,
        skipped as unchanged) when nothing is left."""
        assert self.fingerprints is not None
        step.memory_key = _memory_key(step)
        step.stripped = step.merged
        stripped, sent, left_out = self.fingerprints.strip(step.payload)
        if left_out:
            metrics.UNCHANGED_FIELDS.inc(left_out)
        if stripped is None:
            self._finish(step, Skip(reasons.UNCHANGED))
            return False
        step.payload = stripped
        step.sent_fields = sent
        return True

    async def _send_batch(self, steps: list[ContactStep], resent: bool) -> None:
        try:
            async with self._imports:
                live = [s for s in steps if not s.finished]
                if not live:
                    return
                steps = live
                _charge(steps)
                accepted = await self.client.import_encoded(
                    [s.encode() for s in steps], priority=max(s.priority for s in steps)
                )
        except asyncio.CancelledError:
            if self._closing:
                raise
            # Revoked partitions' contacts were in the batch: the others wait again.
            now = self._clock()
            for step in steps:
                if not step.finished:
                    step.sent = False
                    self.batcher.add(step, now)
            self._batcher_wake.set()
            return
        except CredentialsError as error:
            self._on_fatal(error)
            return
        except PermanentError as error:
            self._rejected_batch(steps, error, resent)
            return
        except GistError as error:
            failure = failure_from(error)
            for step in steps:
                self._finish(step, failure)
            return
        live = [s for s in steps if not s.finished]
        for step in live:
            if not step.accepted:  # a batch sent again is accepted once
                step.accepted = True
                for message in step.tickets:
                    self.outcomes.accepted(message)
        if not live:
            return
        self._pending.append(
            PendingBatch(
                accepted.batch_id,
                steps,
                self._clock(),
                self.settings.poll_interval,
                self.settings.batch_deadline,
                resent,
                accepted.status,
            )
        )
        metrics.BATCHES_PENDING.set(len(self._pending))
        self._poller_wake.set()

    def _rejected_batch(
        self, steps: list[ContactStep], error: PermanentError, resent: bool
    ) -> None:
        """Gist refused the whole batch: halve it until the contact at fault stands alone,
        so one bad contact does not dead-letter a thousand good ones."""
        live = [s for s in steps if not s.finished]
        if len(live) <= 1:
            for step in live:
                self._finish(step, failure_from(error))
            return
        log.warning(log_events.BATCH_REJECTED_SPLIT, contacts=len(live), status=error.status)
        self._send_halves(live, resent)

    def _send_halves(self, steps: list[ContactStep], resent: bool) -> None:
        middle = len(steps) // 2
        for half in (steps[:middle], steps[middle:]):
            task = self._spawn(functools.partial(self._send_batch, half, resent), half, "import")
            self._sending[task] = half
            task.add_done_callback(lambda t: self._sending.pop(t, None))

    # --- contacts: polling until COMPLETED --------------------------------------------
    async def _poll_loop(self) -> None:
        """Poll the oldest ``poll_window`` pending batches (and, one at a time, those
        pending longer than ``poll_stale_after``), each when it is due; their polls run
        side by side (one at a time would let imports outrun the polls)."""
        while not self._polls_halted:
            try:
                batch, wait = self._next_poll()
            except Exception as exc:  # a bug: fail no one, but do not spin on it
                self._report_internal(exc, "poller")
                batch, wait = None, 1.0
            if batch is None:
                self._poller_wake.clear()
                await wait_event(self._poller_wake, wait)
                continue
            batch.polling = True
            self._spawn(functools.partial(self._poll, batch), batch.live(), "poll")

    def _next_poll(self) -> tuple[PendingBatch | None, float | None]:
        """The batch to poll now, or how long until one may be due (None: until woken,
        which every new batch and every poll that ends does)."""
        now = self._clock()
        stale_after = self.settings.poll_stale_after
        fresh: list[PendingBatch] = []
        stale: list[PendingBatch] = []
        later: list[PendingBatch] = []  # beyond the window, not stale yet
        for batch in self._pending:
            if now - batch.submitted >= stale_after:
                stale.append(batch)
            elif len(fresh) < self.settings.poll_window:
                fresh.append(batch)
            else:
                later.append(batch)
        candidates = [b for b in fresh if not b.polling]
        if not any(b.polling for b in stale):  # stale ones: one poll at a time
            candidates.extend(b for b in stale if not b.polling)
        # A batch past its deadline is due at once, wherever it stands.
        candidates.extend(b for b in later if b.deadline <= now and not b.polling)
        wake_at = [b.submitted + stale_after for b in later]
        wake_at.extend(b.deadline for b in later if not b.polling)
        if candidates:
            batch = min(candidates, key=lambda b: min(b.next_poll, b.deadline))
            due = min(batch.next_poll, batch.deadline)
            if due <= now:
                return batch, None
            wake_at.append(due)
        return None, (max(0.001, min(wake_at) - now) if wake_at else None)

    async def _poll(self, batch: PendingBatch) -> None:
        status: BatchStatus | None = None
        lost = False
        try:
            if self._clock() >= batch.deadline:
                self._expire(batch, "deadline")
                return
            _charge(batch.live())
            status = await self.client.batch_status(batch.batch_id)
        except CredentialsError as error:
            self._polls_halted = True  # nothing will succeed until an operator acts
            self._on_fatal(error)
            return
        except PermanentError as error:
            # 404: Gist no longer knows the batch. Any other 4xx is taken as "not
            # completed yet" (never a reason to send the batch again at once).
            lost = error.status == 404
        except GistError:
            pass  # a failed poll: poll again later
        finally:
            batch.polling = False
            self._poller_wake.set()
        if batch not in self._pending:
            return  # abandoned meanwhile
        if status is not None:
            batch.status = status.status
        if lost:
            self._expire(batch, "lost")
        elif status is not None and status.completed:
            self._forget(batch)
            self._completed(batch, status)
        else:
            now = self._clock()
            batch.interval = min(self.settings.poll_max_interval, batch.interval * 2)
            batch.next_poll = now + batch.interval
            if now >= batch.deadline:
                self._expire(batch, "deadline")

    def _forget(self, batch: PendingBatch) -> None:
        with contextlib.suppress(ValueError):
            self._pending.remove(batch)
        metrics.BATCHES_PENDING.set(len(self._pending))

    def _expire(self, batch: PendingBatch, why: str) -> None:
        """Not completed in time, or lost: send it again once, else dead-letter it."""
        self._forget(batch)
        live = batch.live()
        action = "dead_lettered" if batch.resent else "resent"
        metrics.BATCHES_PAST_DEADLINE.labels(action).inc()
        log.warning(
            log_events.BATCH_LOST if why == "lost" else log_events.BATCH_PAST_DEADLINE,
            batch_id=batch.batch_id,
            contacts=len(live),
            action=action,
            seconds=round(self._clock() - batch.submitted, 1),
        )
        if not live:
            return
        if not batch.resent:
            self._dispatch(live, resent=True)
            return
        detail = (
            "Gist no longer knew the batch import, twice"
            if why == "lost"
            else f"the batch import did not complete within {self.settings.batch_deadline:g} s"
            ", twice"
        )
        failure = Failure(reasons.BATCH_TIMEOUT, detail)
        for step in live:
            self._finish(step, failure)

    def _completed(self, batch: PendingBatch, status: BatchStatus) -> None:
        failed, unmatched = match_batch_errors(batch.steps, status)
        now = self._clock()
        if failed:
            metrics.BATCH_CONTACT_ERRORS.inc(len(failed))
        log.info(
            log_events.BATCH_COMPLETED,
            batch_id=batch.batch_id,
            contacts=len(batch.steps),
            failed=len(failed),
            unmatched=len(unmatched),
            seconds=round(now - batch.submitted, 3),
        )
        rest: list[ContactStep] = []
        for index, step in enumerate(batch.steps):
            reason = failed.get(index)
            if reason is not None:
                self._finish(step, Failure(reasons.BATCH_CONTACT_ERROR, reason, status=200))
            elif not step.finished:
                rest.append(step)
        expected = len(batch.steps) - len(failed)
        short = status.imported_contacts is not None and status.imported_contacts < expected
        if not unmatched and not short:
            for step in rest:
                self._confirmed(step)
                self._finish(step, None)
            return
        # Some of ``rest`` failed, and Gist did not say which: find out.
        metrics.BATCHES_UNVERIFIED.inc()
        log.warning(
            log_events.BATCH_UNVERIFIED,
            batch_id=batch.batch_id,
            contacts=len(rest),
            unmatched_errors=len(unmatched),
            imported=status.imported_contacts,
            expected=expected,
        )
        if len(rest) == 1:
            detail = (
                unmatched[0]
                if unmatched
                else "Gist imported fewer contacts than it was sent and named none as failed"
            )
            self._finish(rest[0], Failure(reasons.BATCH_CONTACT_ERROR, detail, status=200))
        elif rest:
            self._send_halves(rest, batch.resent)


    def _confirmed(self, step: ContactStep) -> None:
        """Gist imported the contact: it holds what was sent (before the next write to
        the contact is released by ``_finish``)."""
        if self.fingerprints is not None and step.sent_fields is not None:
            self.fingerprints.confirm(step.memory_key, step.sent_fields)
        step.sent_fields = None


def _charge(steps: Sequence[Step]) -> None:
    """One request made for ``steps``: its cost shared among their messages, by type
    (``requests_for_messages_total``: requests per delivered message, by type)."""
    if not steps:
        return
    share = 1.0 / len(steps)
    by_type: dict[str, float] = {}
    for step in steps:
        if isinstance(step, ContactStep):
            tickets = step.tickets
            if tickets:
                each = share / len(tickets)
                for message in tickets:
                    kind = message.message_type
                    by_type[kind] = by_type.get(kind, 0.0) + each
        elif isinstance(step, DirectStep):
            kind = step.message.message_type
            by_type[kind] = by_type.get(kind, 0.0) + share
    for kind, amount in by_type.items():
        metrics.child(metrics.REQUESTS_FOR_MESSAGES, kind).inc(amount)


def _memory_key(step: ContactStep) -> str | None:
    """The contact a step's upsert is remembered under (``fingerprints.contact_key``)."""
    for identity in step.identities:
        if identity.startswith("u:"):
            return identity
    return step.identities[0] if step.identities else None


def match_batch_errors(
    steps: Sequence[ContactStep], status: BatchStatus
) -> tuple[dict[int, str], list[str]]:
    """Which submitted contacts a completed batch reports as failed (by ``index`` when
    Gist gives it, else by e-mail or user_id), and the messages of the errors that name
    no contact of the batch."""
    failed: dict[int, str] = {}
    unmatched: list[str] = []
    by_identity: dict[str, int] = {}
    if any(e.index is None or not 0 <= e.index < len(steps) for e in status.errors):
        for i, step in enumerate(steps):
            for identity in step.identities:
                by_identity.setdefault(identity, i)
    for error in status.errors:
        index = error.index
        if index is None or not 0 <= index < len(steps):
            index = None
            if error.user_id is not None:
                index = by_identity.get("u:" + error.user_id)
            if index is None and error.email is not None:
                index = by_identity.get("e:" + error.email.strip().lower())
        if index is not None:
            failed[index] = error.message
        else:
            unmatched.append(error.message)
            log.warning(log_events.BATCH_ERROR_UNMATCHED, message=error.message[:200])
    return failed, unmatched


def failure_from(error: GistError) -> Failure:
    if isinstance(error, UnexpectedAnswerError):
        reason = reasons.GIST_UNEXPECTED_ANSWER
    elif isinstance(error, RetryableError):
        reason = reasons.RETRIES_EXHAUSTED
    else:
        reason = reasons.GIST_REJECTED
    return Failure(
        reason=reason,
        detail=str(error),
        status=error.status,
        body_excerpt=error.body_excerpt,
        attempts=error.attempts,
    )
