"""Contact upserts: merged per contact, batched, sent as asynchronous batch imports.

A ``ContactStep`` whose turn has come waits in the ``ContactBatcher`` until a batch is
full or its oldest waited ``batch_max_wait``. Taken into a batch, its body is fixed:
contact memory leaves out the fields Gist holds (a step with nothing left is skipped
``unchanged``), it is encoded once, and its bytes count in the ledger's bytes in flight
until it ends. At most ``max_concurrent_imports`` imports are out at once (a lane of
their own: one import carries hundreds of contacts and must not queue behind thousands
of events). The body of an import is made when its request gets its slot, from the
contacts still wanted then, so a revocation meanwhile takes its contacts out without
touching the others; an import already on the wire is left to finish. An accepted batch
goes to ``BatchPolls``; a batch Gist refuses whole (4xx) is halved until the contact at
fault stands alone, so one bad contact does not dead-letter a thousand good ones.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable

import structlog

from destination import reasons
from destination.gist import (
    CredentialsError,
    Dispatch,
    GistClient,
    GistError,
    PermanentError,
    Withdrawn,
)
from destination.observability import log_events, metrics
from destination.pipeline.contacts import ContactBatcher, ContactStep
from destination.pipeline.inflight import PartitionWork, Skip
from destination.pipeline.lanes.base import (
    ABANDONED,
    DeliverySettings,
    Lane,
    Settler,
    charge,
    failure_from,
    gates,
)
from destination.pipeline.lanes.polls import BatchPolls, PendingBatch
from destination.pipeline.memory import ContactMemory
from destination.pipeline.ordering import Step
from destination.pipeline.waiting import wait_event

log = structlog.get_logger(__name__)


class _Import:
    """One batch import on its way: its steps, those its last request carried (batch
    errors name contacts by their index in it), and the request's dispatch."""

    __slots__ = ("dispatch", "resent", "sent", "steps", "task")

    def __init__(self, steps: list[ContactStep], resent: bool) -> None:
        self.steps = steps
        self.resent = resent
        self.sent: list[ContactStep] = []
        self.dispatch = Dispatch(gates(s.partition for s in steps))
        self.task: asyncio.Task[None] | None = None

    def wanted(self) -> list[bytes]:
        self.sent = [s for s in self.steps if not s.finished and not s.partition_revoked()]
        return [s.encode() for s in self.sent]


class ContactImports(Lane):
    def __init__(
        self,
        client: GistClient,
        settler: Settler,
        *,
        settings: DeliverySettings,
        memory: ContactMemory | None,
        hold: Callable[[ContactStep, int], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``hold(step, n)`` counts the step's body in the ledger's bytes in flight (``n``
        may be negative)."""
        super().__init__(client, settler)
        self.memory = memory
        self._hold = hold
        self._clock = clock
        self.batch_max_contacts = settings.batch_max_contacts
        self.batcher = ContactBatcher(settings.batch_max_contacts, settings.batch_max_wait)
        self._imports = asyncio.Semaphore(settings.max_concurrent_imports)
        self._sending: set[_Import] = set()
        self._wake = asyncio.Event()
        self._flush_all = False
        self._loop: asyncio.Task[None] | None = None
        self.polls = BatchPolls(
            client,
            settler,
            self._resend,
            interval=settings.poll_interval,
            max_interval=settings.poll_max_interval,
            window=settings.poll_window,
            stale_after=settings.poll_stale_after,
            deadline=settings.batch_deadline,
            late_watch=settings.late_import_watch,
            clock=clock,
        )

    # --- lifecycle --------------------------------------------------------------------
    def run(self) -> list[asyncio.Task[None]]:
        """The batcher's and the poller's loops (the caller watches them)."""
        self._loop = asyncio.create_task(self._flush_loop(), name="contact-batcher")
        polls = asyncio.create_task(self.polls.run(), name="batch-poller")
        return [self._loop, polls]

    def flush_now(self, enabled: bool = True) -> None:
        """Send waiting contacts without waiting for a full batch (shutdown, rebalance)."""
        self._flush_all = enabled
        self._wake.set()

    async def close(self) -> None:
        await self.polls.close()
        await super().close()

    # --- intake -----------------------------------------------------------------------
    def start(self, step: Step) -> None:
        assert isinstance(step, ContactStep)
        memory = self.memory
        # Every earlier write to the contact has ended (the gate saw to it): what Gist
        # holds is known here, unless it must be fetched from Redis (at dispatch).
        if memory is not None and memory.shared is None and not self._strip(step):
            metrics.REQUESTS_SAVED.labels("unchanged").inc(2 / self.batch_max_contacts)
            return
        self.batcher.add(step, self._clock())
        if len(self.batcher) == 1 or len(self.batcher) >= self.batcher.max_contacts:
            self._wake.set()

    def _strip(self, step: ContactStep) -> bool:
        """Leave out of the step's upsert the fields Gist holds; False (and the step ends,
        skipped as unchanged) when nothing is left."""
        assert self.memory is not None
        step.stripped = True
        stripped, note, left_out = self.memory.strip(
            step.payload, step.identities, step.partition
        )
        if left_out:
            metrics.UNCHANGED_FIELDS.inc(left_out)
        step.note = note
        if stripped is None:
            self.settler.settle(step, Skip(reasons.UNCHANGED))
            return False
        step.payload = stripped
        return True

    # --- batches ----------------------------------------------------------------------
    async def _flush_loop(self) -> None:
        while True:
            due = self.batcher.due_at()
            now = self._clock()
            if due is None or (due > now and not self._flush_all):
                timeout = None if due is None else due - now
                self._wake.clear()
                await wait_event(self._wake, timeout)
                continue
            steps = self.batcher.take()
            try:
                if self.memory is not None and self.memory.shared is not None:
                    await self.memory.load(
                        (s.identities, s.partition) for s in steps if not s.stripped
                    )
                self._dispatch(steps, resent=False)
            except Exception as exc:
                self.settler.internal(steps, exc, "batcher")

    def _dispatch(self, steps: list[ContactStep], *, resent: bool) -> None:
        """Fix each contact's body (one that cannot be encoded fails alone) and send."""
        ready: list[ContactStep] = []
        unchanged = 0
        for step in steps:
            if step.partition_revoked():
                self.settler.settle(step, ABANDONED)
            if step.finished:
                continue
            try:
                if step.encoded is None:
                    if self.memory is not None and not step.stripped and not self._strip(step):
                        unchanged += 1
                        continue
                    step.held = len(step.encode())
                    self._hold(step, step.held)
            except Exception as exc:
                self.settler.internal([step], exc, "encode")
                continue
            ready.append(step)
        if unchanged:
            # A batch import and its poll per batch of contacts: their share of both.
            metrics.REQUESTS_SAVED.labels("unchanged").inc(
                2 * unchanged / self.batch_max_contacts
            )
        if ready:
            metrics.CONTACTS_PER_BATCH.observe(len(ready))
            self._send(ready, resent)

    def _send(self, steps: list[ContactStep], resent: bool) -> None:
        batch = _Import(steps, resent)
        self._sending.add(batch)
        batch.task = self.spawn(functools.partial(self._run, batch), steps, "import")
        batch.task.add_done_callback(lambda _: self._sending.discard(batch))

    def _resend(self, steps: list[ContactStep], resent: bool) -> None:
        """Contacts of an accepted batch go out again: in flight once more."""
        for step in steps:
            if step.accepted:
                step.accepted = False
                self.settler.parked(step, False)
        self._send(steps, resent)

    async def _run(self, batch: _Import) -> None:
        try:
            async with self._imports:
                if not any(not s.finished for s in batch.steps):
                    return
                charge(batch.steps)
                accepted = await self.client.import_encoded(
                    batch.wanted,
                    priority=max(s.priority for s in batch.steps),
                    dispatch=batch.dispatch,
                )
        except Withdrawn:
            for step in batch.steps:
                self.settler.settle(step, ABANDONED)
            return
        except asyncio.CancelledError:
            if self.closing:
                raise
            # Cut on the wire by a revocation that waited long enough: Gist may have it
            # or not. The other partitions' contacts go again, their bodies unchanged.
            kept = [s for s in batch.steps if not s.finished and not s.partition_revoked()]
            for step in kept:
                step.may_land = True
            if kept:
                self._send(kept, batch.resent)
            return
        except CredentialsError as error:
            self.settler.fatal(error)
            return
        except PermanentError as error:
            self._rejected(batch, error)
            return
        except GistError as error:
            failure = failure_from(error)
            for step in batch.sent or batch.steps:
                self.settler.settle(step, failure if not step.partition_revoked() else ABANDONED)
            return
        if batch.dispatch.unanswered:  # an earlier attempt may have been queued too
            for step in batch.steps:
                step.may_land = True
        sent: list[ContactStep] = []
        for step in batch.sent:
            if step.partition_revoked():  # revoked while the import was on the wire
                self.settler.settle(step, ABANDONED)
            elif not step.finished:
                sent.append(step)
                if not step.accepted:
                    step.accepted = True
                    self.settler.parked(step, True)
        if sent:
            self.polls.add(
                PendingBatch(
                    accepted.batch_id,
                    batch.sent,
                    self._clock(),
                    self.polls.interval,
                    self.polls.deadline,
                    batch.resent,
                    accepted.status,
                )
            )

    def _rejected(self, batch: _Import, error: PermanentError) -> None:
        """Gist refused the whole batch: halve it until the contact at fault stands alone."""
        live = [s for s in batch.sent or batch.steps if not s.finished]
        kept = [s for s in live if not s.partition_revoked()]
        for step in live:
            if step.partition_revoked():
                self.settler.settle(step, ABANDONED)
        if len(kept) <= 1:
            for step in kept:
                self.settler.settle(step, failure_from(error))
            return
        log.warning(log_events.BATCH_REJECTED_SPLIT, contacts=len(kept), status=error.status)
        middle = len(kept) // 2
        self._send(kept[:middle], batch.resent)
        self._send(kept[middle:], batch.resent)

    # --- revocation -------------------------------------------------------------------
    def on_wire(self, partitions: set[PartitionWork]) -> list[asyncio.Task[None]]:
        return [
            b.task
            for b in self._sending
            if b.dispatch.on_wire
            and b.task is not None
            and any(s.partition in partitions for s in b.steps)
        ]

    def revoke(self, gone: set[PartitionWork]) -> list[asyncio.Task[None]]:
        for step in [s for s in self.batcher.waiting() if s.partition in gone]:
            self.batcher.remove(step)
            self.settler.settle(step, ABANDONED)
        on_wire: list[asyncio.Task[None]] = []
        for batch in list(self._sending):
            if not any(s.partition in gone for s in batch.steps):
                continue
            if batch.dispatch.on_wire and batch.task is not None:
                on_wire.append(batch.task)  # the answer (accepted or not) settles them
                continue
            # Not on the wire: its body is made when it goes, without the revoked ones.
            for step in batch.steps:
                if step.partition in gone:
                    self.settler.settle(step, ABANDONED)
            if all(s.finished for s in batch.steps) and batch.task is not None:
                batch.task.cancel()
                self._sending.discard(batch)
        on_wire.extend(self.polls.revoke(gone))
        return on_wire
