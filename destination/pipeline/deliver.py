"""Delivering operations to Gist, in per-contact order, inside the workspace's budget.

``Delivery`` is thin: it orders operations per contact (``IdentityGate``), hands each
step whose turn has come to its lane, and is the one place where a step's outcome is
recorded. The lanes (``lanes/``) do the sending:

- ``RequestLane``: one request per operation (events, deletes, aliases, subscription
  changes), and e-commerce writes (``CommerceWriter``: customer, products, order or cart);
- ``TagLane``: tag changes, many contacts per ``POST /tags``;
- ``ContactImports``: contact upserts, merged, batched into asynchronous imports and
  polled (``BatchPolls``) until Gist says how each contact fared.

Every request passes the client's rate limiter, so polls and retries share the budget.

**Where saved state learns what happened** (``settle``, the only place): a contact
write Gist confirmed is recorded in contact memory (``memory``); anything else that
befalls a contact write (a failure, a time-out, a batch Gist reports failed, an
abandonment) forgets the contact there, and a delete, alias or tag change forgets it
before its request goes; an operation Gist confirmed (or did not need, its values being
held) is recorded under its message's id (``dedup``), so a redelivery sends only what
was not done. Then the operation ends (``Outcomes``), and the steps it held back start.

**Revocation** (``revoke``): nothing more is sent for the partitions' work. Steps not on
the wire are dropped at once; requests on the wire get ``revoke_wait`` to answer, and
what they confirmed is recorded; contact memory forgets the partitions (another owner
may write their contacts), is handed over in Redis, and the recorded ids are flushed to
Redis before the new owner may start. Messages of a revoked partition never end here:
the new owner reads them again.

A ``CredentialsError`` goes to ``on_fatal`` and the step is left open: nothing is
dead-lettered for a revoked key. An unexpected exception fails the operations concerned
with ``internal_error``; a loop that dies anyway is reported (``broken``), never silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import structlog

from destination.gist import CredentialsError, GistClient
from destination.observability import log_events, metrics
from destination.operations import (
    CommerceWrite,
    ContactDelete,
    ContactUpsert,
    EventTrack,
    Operation,
    SubscriptionChange,
    TagChange,
)
from destination.pipeline.contacts import ContactStep
from destination.pipeline.inflight import Failure, MessageWork, PartitionWork, Skip
from destination.pipeline.lanes.base import (
    ABANDONED,
    DeliverySettings,
    DirectStep,
    Result,
    log_internal,
)
from destination.pipeline.lanes.commerce import CommerceWriter
from destination.pipeline.lanes.imports import ContactImports
from destination.pipeline.lanes.requests import RequestLane
from destination.pipeline.lanes.tags import TagLane
from destination.pipeline.memory import ContactMemory
from destination.pipeline.ordering import IdentityGate, Step
from destination.pipeline.outcome import Outcomes, internal_failure
from destination.pipeline.workspace import Workspace

__all__ = ["Delivery", "DeliverySettings", "DirectStep"]

log = structlog.get_logger(__name__)


class Delivery:
    def __init__(
        self,
        client: GistClient,
        settings: DeliverySettings,
        outcomes: Outcomes,
        on_fatal: Callable[[CredentialsError], None],
        clock: Callable[[], float] = time.monotonic,
        memory: ContactMemory | None = None,
    ) -> None:
        """``memory``: what Gist holds of each contact; its fields are left out of upserts
        (None: every upsert is sent whole). ``ids`` (set later, ``Dedup``) records each
        operation Gist confirmed."""
        self.client = client
        self.settings = settings
        self.outcomes = outcomes
        self.memory = memory
        self.ids: Any = None
        self.suppression_log: Any = None
        """``SuppressionLog``: a delete's identities are recorded before it goes."""
        self._on_fatal = on_fatal
        self.gate = IdentityGate()
        self._open: dict[Step, None] = {}  # admitted and not over
        self.requests = RequestLane(
            client,
            self,
            settings.max_concurrent_requests,
            before_delete=self._record_deletion,
            memory=memory,
        )
        self.tags = TagLane(
            client,
            self,
            self.requests._slots,
            settings.tag_batch,
            settings.tag_batch_wait,
        )
        self.imports = ContactImports(
            client, self, settings=settings, memory=memory, hold=self._hold, clock=clock
        )
        self.requests.late_imports = self.imports.polls
        self._lanes = (self.requests, self.tags, self.imports, self.imports.polls)
        self._loops: list[asyncio.Task[None]] = []
        self.broken: str | None = None
        """Set when a part of delivery stopped on a bug: the worker reports unhealthy."""

    # --- lifecycle --------------------------------------------------------------------
    def use(self, workspace: Workspace) -> None:
        """What the rules name in the workspace (found at start-up): subscription type
        ids, and the e-commerce store (writes go to it)."""
        self.requests.subscription_types = dict(workspace.subscription_types)
        if workspace.store is not None:
            memory = self.memory
            self.requests.commerce = CommerceWriter(
                self.client,
                workspace.store,
                contact_written=memory.invalidate if memory is not None else None,
            )

    def start(self) -> None:
        self._loops = self.imports.run()
        for loop in self._loops:
            loop.add_done_callback(self._loop_done)

    def flush_now(self, enabled: bool = True) -> None:
        """Send waiting contacts without waiting for a full batch (shutdown, rebalance)."""
        self.imports.flush_now(enabled)

    async def close(self) -> None:
        for loop in self._loops:
            loop.cancel()
        if self._loops:
            await asyncio.wait(self._loops, timeout=5.0)
        self._loops.clear()
        for lane in self._lanes:
            await lane.close()
        if self.memory is not None and self.memory.shared is not None:
            await self.memory.shared.close()

    @property
    def batches_pending(self) -> int:
        return self.imports.polls.pending

    def oldest_pending_batch_age(self) -> float:
        return self.imports.polls.oldest_age()

    # --- intake -----------------------------------------------------------------------
    def submit(
        self,
        message: MessageWork,
        operations: Sequence[Operation],
        indices: Sequence[int] | None = None,
    ) -> None:
        """Take the message's operations (``indices``: their places in the message, when
        some were done before); each ends in ``outcomes.operation_done``."""
        self.outcomes.expect(message, len(operations))
        places = range(len(operations)) if indices is None else indices
        for index, operation in zip(places, operations, strict=False):  # as many of each
            try:
                if isinstance(operation, ContactUpsert):
                    self._submit_contact(message, operation, index)
                else:
                    self._admit(DirectStep(operation, message, index))
            except Exception as exc:  # a bug: this operation fails, the others go on
                log_internal(exc, "submit", message)
                self.outcomes.operation_done(message, internal_failure(exc, "submit"))

    def _submit_contact(self, message: MessageWork, upsert: ContactUpsert, index: int) -> None:
        identities = upsert.identities
        partition = message.record.partition
        previous = self.gate.last_write(identities)
        if (
            isinstance(previous, ContactStep)
            and previous.mergeable
            and previous.partition is partition
        ):
            previous.merge(upsert.contact)
            previous.priority = max(previous.priority, upsert.priority)
            previous.tickets.append((message, index))
            metrics.CONTACT_UPDATES_MERGED.inc()
            return
        step = ContactStep(upsert.contact, identities, partition, upsert.priority)
        step.tickets.append((message, index))
        self._admit(step)

    def _admit(self, step: Step) -> None:
        self._open[step] = None
        if self.gate.admit(step):
            self._start(step)

    def _start(self, step: Step) -> None:
        """The step's turn has come: hand it to its lane."""
        partition = getattr(step, "partition", None)
        if partition is not None and partition.revoked:
            self.settle(step, ABANDONED)  # released by an answer that came after a revoke
            return
        if isinstance(step, ContactStep):
            self.imports.start(step)
            return
        assert isinstance(step, DirectStep)
        if step.message.failure is not None:
            # An earlier operation of its message failed: the message is dead-lettered
            # whole (its dead letter carries every operation, and a replay sends them
            # all), so nothing more of it goes to Gist, which keeps the contact as it was
            # before the message rather than half of it (model test seed 41: an import
            # FAILED, then its message's subscription change went through).
            self.settle(step, step.message.failure)
            return
        operation = step.operation
        if self.memory is not None and not isinstance(
            operation, EventTrack | SubscriptionChange | CommerceWrite
        ):
            # A delete, alias or tag change: what Gist holds of the contact changes. (A
            # subscription is remembered as it is confirmed; a customer write forgets the
            # contact itself.)
            self.memory.invalidate(step.identities, step.partition)
        commerce = self.requests.commerce
        if commerce is not None and isinstance(operation, ContactDelete):
            commerce.forget(step.identities)
        if isinstance(operation, TagChange):
            self.tags.start(step)
        else:
            self.requests.start(step)

    # --- the one place a step's outcome is recorded -----------------------------------
    def settle(self, step: Step, result: Result) -> None:
        """The step is over (see the module docstring): record it in the stores, end its
        operations, start the steps it held back."""
        if step.finished:
            return
        self._open.pop(step, None)
        released = self.gate.finish(step)
        ids = self.ids
        if isinstance(step, ContactStep):
            self._settle_contact(step, result)
            for message, index in step.tickets:
                if ids is not None and (result is None or isinstance(result, Skip)):
                    ids.delivered(message, index, write=True)
                if result is not ABANDONED:
                    ended = result if isinstance(result, Failure | Skip) else None
                    self.outcomes.operation_done(message, ended, accepted=step.accepted)
        elif isinstance(step, DirectStep):
            # Skipped as Gist holds it (a subscription, a cart line) is done too, as for
            # a contact: a producer's copy read later must not send it again (model
            # test seed 16 at 80 steps: a copy re-sent its subscription change).
            if ids is not None and (result is None or isinstance(result, Skip)):
                write = not isinstance(step.operation, EventTrack)
                ids.delivered(step.message, step.index, write=write)
            if result is not ABANDONED:
                ended = result if isinstance(result, Failure | Skip) else None
                self.outcomes.operation_done(step.message, ended)
        for later in released:
            try:
                self._start(later)
            except Exception as exc:
                self.internal([later], exc, "start")

    def _settle_contact(self, step: ContactStep, result: Result) -> None:
        if step.held:
            self._hold(step, -step.held)
            step.held = 0
        memory = self.memory
        if memory is None:
            return
        if result is None and step.partition is not None and step.partition.suspended:
            # Confirmed while a rebalance decides: another owner may start on the
            # contact meanwhile, and what was handed over to it must stay true.
            memory.invalidate(step.identities, step.partition)
        elif result is None:
            if step.note is not None:
                memory.confirm(step.note)
        elif not isinstance(result, Skip) and step.encoded is not None:
            # Sent, and not confirmed: Gist may hold it, or not. Not sure means send.
            memory.invalidate(step.identities, step.partition)
        step.note = None

    async def _record_deletion(self, identities: tuple[str, ...]) -> None:
        if self.suppression_log is not None:
            await self.suppression_log.record(identities)

    def parked(self, step: Step, accepted: bool) -> None:
        if not isinstance(step, ContactStep):
            return
        for message, _ in step.tickets:
            if accepted:
                self.outcomes.accepted(message)
            else:
                self.outcomes.unaccepted(message)

    def _hold(self, step: ContactStep, n: int) -> None:
        if step.partition is not None:
            self.outcomes.ledger.hold(step.partition, n)

    # --- errors -----------------------------------------------------------------------
    def fatal(self, error: CredentialsError) -> None:
        self.imports.polls.halt()
        self._on_fatal(error)

    def internal(self, steps: Sequence[Step], error: BaseException, where: str) -> None:
        log_internal(error, where)
        failure = internal_failure(error, where)
        for step in steps:
            if not step.finished:
                self.settle(step, failure)

    def report(self, error: BaseException, where: str) -> None:
        log_internal(error, where)

    def broke(self, component: str, error: BaseException | None) -> None:
        metrics.TASKS_FAILED.labels(component).inc()
        log.error(log_events.TASK_FAILED, component=component, exc_info=error)
        if self.broken is None:
            self.broken = f"{component} stopped: {type(error).__name__}"

    def _loop_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.broke(task.get_name(), task.exception())

    # --- partitions changing hands ----------------------------------------------------
    async def suspend(self, partitions: Iterable[PartitionWork]) -> None:
        """A rebalance began: nothing more is sent for these partitions until it says
        whether they stay (``resume``) or go (``revoke``); requests already on the wire
        get ``revoke_wait`` to answer, so that what Gist confirmed is recorded. Their
        work is kept: a partition that stays goes on where it was."""
        works = set(partitions)
        for work in works:
            work.sending.clear()
        on_wire: list[asyncio.Task[None]] = []
        for lane in self._lanes:
            on_wire.extend(lane.on_wire(works))
        if on_wire:
            await asyncio.wait(on_wire, timeout=self.settings.revoke_wait)
        if self.memory is not None:
            # Contacts sent and not confirmed may land in Gist while another owner has
            # the partition: contact memory cannot say what Gist holds of them.
            for step in list(self._open):
                if (
                    isinstance(step, ContactStep)
                    and step.partition in works
                    and step.encoded is not None
                ):
                    self.memory.invalidate(step.identities, step.partition)

    async def hand_over(self, partitions: Iterable[PartitionWork], leaving: bool) -> None:
        """Before a new owner may start (after the last commit, their ``committed``): what
        Gist confirmed is in Redis, and contact memory's records of the partitions are
        handed over (``leaving``: they are gone; else a rebalance decides)."""
        works = set(partitions)
        if leaving and self.requests.commerce is not None:
            self.requests.commerce.revoke(works)
        memory = self.memory
        if memory is not None:
            if leaving:
                memory.revoke(works)
            if memory.shared is not None:
                await memory.shared.handover({w.tp: w.committed for w in works}, leaving)
        if self.ids is not None:
            with contextlib.suppress(Exception):
                await self.ids.flush()

    async def resume(self, partitions: Iterable[PartitionWork]) -> None:
        """The partitions stayed with this worker: their requests go again."""
        works = set(partitions)
        memory = self.memory
        if memory is not None and memory.shared is not None:
            await memory.shared.resume(w.tp for w in works)
        for work in works:
            work.sending.set()

    async def revoke(self, partitions: Iterable[PartitionWork]) -> int:
        """Drop the work of revoked partitions (see the module docstring); returns the
        steps that were still open."""
        gone = set(partitions)
        for work in gone:
            work.revoked = True  # from now on nothing of theirs ends, nothing is sent
            work.sending.set()  # a request waiting for it finds it withdrawn
        dropped = sum(1 for s in self._open if getattr(s, "partition", None) in gone)
        on_wire: list[asyncio.Task[None]] = []
        for lane in self._lanes:
            on_wire.extend(lane.revoke(gone))
        for step in list(self._open):  # waiting for their turn: they never started
            if step.waiting and getattr(step, "partition", None) in gone:
                self.settle(step, ABANDONED)
        if on_wire:
            await asyncio.wait(on_wire, timeout=self.settings.revoke_wait)
            late = [task for task in on_wire if not task.done()]
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=1.0)
        for step in list(self._open):
            if getattr(step, "partition", None) in gone:
                self.settle(step, ABANDONED)
        await self.hand_over(gone, leaving=True)
        return dropped

    async def take_over(self, partitions: Iterable[PartitionWork]) -> None:
        """New partitions, at the group's committed offsets (their ``committed``)."""
        memory = self.memory
        if memory is not None and memory.shared is not None:
            await memory.shared.take_over({w.tp: w.committed for w in partitions})
