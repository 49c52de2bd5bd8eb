"""What every lane shares: the contract with ``Delivery`` and the bookkeeping of tasks.

A lane is given steps whose turn has come (``start``) and reports how each ended
through one callback, ``Settler.settle(step, result)``:

- ``None``: Gist confirmed it;
- a ``Failure``: it failed for good (the message is dead-lettered);
- a ``Skip``: nothing needed sending (Gist already holds it);
- ``ABANDONED``: its partition was revoked and the lane dropped it; nothing is known of
  what Gist did with it, and nothing more will be sent for it.

``revoke(partitions)`` is the lane's half of a revocation: steps of those partitions that
are not on the wire are dropped at once (settled ``ABANDONED``), and the tasks whose
requests are on the wire are returned, for ``Delivery`` to wait for their answers (a
bounded time) before the new owner may start: what Gist confirmed is then recorded, so
the new owner does not send it again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import structlog

from destination import reasons
from destination.gist import (
    CredentialsError,
    Dispatch,
    GistClient,
    GistError,
    RetryableError,
    UnexpectedAnswerError,
)
from destination.observability import log_events, metrics
from destination.operations import EventTrack, Operation
from destination.pipeline.inflight import Failure, MessageWork, PartitionWork, Skip
from destination.pipeline.ordering import Step, StepKind

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
    late_import_watch: float = 600.0
    """How long (s) after giving up on an import a delete of one of its contacts waits
    for its fate (``BatchPolls.outlast``): if Gist imports it meanwhile, the delete is
    sent again. 0: deletes do not wait."""
    tag_batch: int = 50
    """Contacts tagged (or untagged) in one ``POST /tags``: the reference's "up to ~50"."""
    tag_batch_wait: float = 0.2
    """Longest wait (s) to fill a tag request; a tag change holds its contact's later
    work meanwhile, so this is short."""
    revoke_wait: float = 5.0
    """Longest wait (s), on a revocation, for the answers of requests already on the
    wire, so that what Gist confirmed is recorded before the new owner starts."""


class _Abandoned:
    __slots__ = ()

    def __repr__(self) -> str:
        return "ABANDONED"


ABANDONED: Final = _Abandoned()
"""A step's partition was revoked and the step dropped: its outcome is unknown."""

Result = Failure | Skip | _Abandoned | None


def gates(partitions: Iterable[PartitionWork | None]) -> tuple[asyncio.Event, ...]:
    """What a request for steps of these partitions waits for (``Dispatch.gates``)."""
    return tuple({p.sending: None for p in partitions if p is not None})


class DirectStep(Step):
    """An operation sent on its own (an event, a delete, an alias) or in a tag group."""

    __slots__ = ("dispatch", "index", "message", "operation", "partition", "task")

    def __init__(self, operation: Operation, message: MessageWork, index: int) -> None:
        kind = StepKind.EVENT if isinstance(operation, EventTrack) else StepKind.EXCLUSIVE
        super().__init__(kind, operation.identities)
        self.operation = operation
        self.message = message
        self.index = index  # the operation's place in its message (de-duplication)
        self.partition: PartitionWork = message.record.partition
        self.task: asyncio.Task[None] | None = None
        self.dispatch = Dispatch((self.partition.sending,))


class Settler(Protocol):
    """What a lane reports to (``Delivery``)."""

    def settle(self, step: Step, result: Result) -> None:
        """The step is over (see the module docstring); a second call is ignored."""

    def parked(self, step: Step, accepted: bool) -> None:
        """A contact step is now in a batch Gist accepted (or, False, sent again)."""

    def fatal(self, error: CredentialsError) -> None:
        """Gist rejected the API key: nothing will succeed until an operator acts."""

    def internal(self, steps: Sequence[Step], error: BaseException, where: str) -> None:
        """An unexpected exception: the steps fail with ``internal_error``."""

    def report(self, error: BaseException, where: str) -> None:
        """An unexpected exception that fails no step (logged and counted)."""

    def broke(self, component: str, error: BaseException | None) -> None:
        """A part of delivery stopped on a bug: the worker reports unhealthy."""


class Lane:
    """Tasks of one lane: each runs guarded (an exception fails its steps), is tracked
    for ``close``, and a bug in the guarding itself is reported as broken."""

    def __init__(self, client: GistClient, settler: Settler) -> None:
        self.client = client
        self.settler = settler
        self._tasks: set[asyncio.Task[None]] = set()
        self.closing = False

    def start(self, step: Step) -> None:  # pragma: no cover - each lane has its own
        raise NotImplementedError

    def revoke(self, gone: set[PartitionWork]) -> list[asyncio.Task[None]]:
        """Drop the steps of the revoked partitions that are not on the wire (settled
        ``ABANDONED``); return the tasks whose requests are."""
        raise NotImplementedError  # pragma: no cover

    def on_wire(self, partitions: set[PartitionWork]) -> list[asyncio.Task[None]]:
        """The tasks whose requests for these partitions' steps are on the wire."""
        raise NotImplementedError  # pragma: no cover

    async def close(self) -> None:
        self.closing = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        self._tasks.clear()

    def spawn(
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
            self.settler.internal(steps, exc, where)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Even failing its steps failed: a bug in the bookkeeping itself.
            self.settler.broke("delivery-task", task.exception())


def shares(steps: Sequence[Step]) -> dict[str, float]:
    """One request's cost shared among the messages of ``steps``, by message type."""
    from destination.pipeline.contacts import ContactStep

    if not steps:
        return {}
    share = 1.0 / len(steps)
    by_type: dict[str, float] = {}
    for step in steps:
        if isinstance(step, ContactStep):
            tickets = step.tickets
            if len(tickets) == 1:
                kind = tickets[0][0].message_type
                by_type[kind] = by_type.get(kind, 0.0) + share
            elif tickets:
                each = share / len(tickets)
                for message, _ in tickets:
                    kind = message.message_type
                    by_type[kind] = by_type.get(kind, 0.0) + each
        elif isinstance(step, DirectStep):
            kind = step.message.message_type
            by_type[kind] = by_type.get(kind, 0.0) + share
    return by_type


def charge(steps: Sequence[Step] | dict[str, float]) -> None:
    """One request made for ``steps`` (or for the messages of ``shares(steps)``): its cost
    shared among their messages, by type (``requests_for_messages_total``: requests per
    delivered message, by type)."""
    by_type = steps if isinstance(steps, dict) else shares(steps)
    for kind, amount in by_type.items():
        metrics.child(metrics.REQUESTS_FOR_MESSAGES, kind).inc(amount)


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


def log_internal(error: BaseException, where: str, message: MessageWork | None = None) -> None:
    metrics.INTERNAL_ERRORS.labels(where).inc()
    extra = message.where() if message is not None else {}
    log.error(
        log_events.INTERNAL_ERROR, where=where, error=type(error).__name__, exc_info=error, **extra
    )
