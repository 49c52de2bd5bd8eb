"""One request per operation: events, deletes, aliases, subscription changes; and
e-commerce writes (``CommerceWriter``: the few requests one needs, in turn).

At most ``max_concurrent`` of them are out at once (the request lane's semaphore; batch
imports have their own, so they never queue behind thousands of events). A delete goes
by user id and by e-mail, each it carries, and a contact Gist does not have is done (404
is what a delete wants); an alias looks the old user up and moves its contact to the new
user_id (nothing to move is done too).

A delete of a contact an import of which was given up on (Gist may import it yet) ends
only once that import's fate is known, or ``GIST_LATE_IMPORT_WATCH`` has passed; if it
lands meanwhile, the delete is sent again (``BatchPolls.outlast``). Until then the
contact's later work waits behind the delete, and its partition's commit too.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, cast

import structlog

from destination import reasons
from destination.gist import CredentialsError, Dispatch, GistClient, GistError, Withdrawn
from destination.observability import log_events
from destination.operations import (
    CommerceWrite,
    ContactAlias,
    ContactDelete,
    EventTrack,
    Operation,
    SubscriptionChange,
)
from destination.pipeline.inflight import Failure, PartitionWork, Skip
from destination.pipeline.lanes.base import (
    ABANDONED,
    DirectStep,
    Lane,
    Settler,
    charge,
    failure_from,
)
from destination.pipeline.lanes.commerce import CommerceWriter
from destination.pipeline.lanes.polls import BatchPolls
from destination.pipeline.memory import ContactMemory
from destination.pipeline.ordering import Step

log = structlog.get_logger(__name__)


class RequestLane(Lane):
    def __init__(
        self,
        client: GistClient,
        settler: Settler,
        max_concurrent: int,
        before_delete: Callable[[tuple[str, ...]], Awaitable[None]] | None = None,
        memory: ContactMemory | None = None,
    ) -> None:
        """``before_delete(identities)``: done before a delete's request goes (its
        suppression is recorded: ``pipeline/suppress``). ``memory``: a subscription
        Gist holds (as contact memory last confirmed it) is not set again."""
        super().__init__(client, settler)
        self._slots = asyncio.Semaphore(max_concurrent)
        self._open: dict[DirectStep, None] = {}
        self._before_delete = before_delete
        self._memory = memory
        self.subscription_types: dict[str, int] = {}
        """Subscription type ids by lower-cased name (``workspace.prepare``)."""
        self.commerce: CommerceWriter | None = None
        """Set when the rules name an e-commerce store."""
        self.late_imports: BatchPolls | None = None
        """Imports given up on that a delete outlasts (``BatchPolls.outlast``)."""

    def start(self, step: Step) -> None:
        assert isinstance(step, DirectStep)
        self._open[step] = None
        step.task = self.spawn(functools.partial(self._run, step), [step], "request")
        step.task.add_done_callback(lambda _: self._open.pop(step, None))

    def revoke(self, gone: set[PartitionWork]) -> list[asyncio.Task[None]]:
        on_wire: list[asyncio.Task[None]] = []
        for step in [s for s in self._open if s.partition in gone]:
            step.dispatch.withdraw()
            if step.dispatch.on_wire and step.task is not None:
                on_wire.append(step.task)  # its answer says what Gist did
                continue
            if step.task is not None:
                step.task.cancel()
            self._open.pop(step, None)
            self.settler.settle(step, ABANDONED)
        return on_wire

    def on_wire(self, partitions: set[PartitionWork]) -> list[asyncio.Task[None]]:
        return [
            s.task
            for s in self._open
            if s.partition in partitions and s.dispatch.on_wire and s.task is not None
        ]

    async def _run(self, step: DirectStep) -> None:
        try:
            async with self._slots:
                if isinstance(step.operation, CommerceWrite):
                    result = await self._commerce(step)  # counts each of its requests
                else:
                    charge((step,))
                    result = await self._execute(step)
            operation = step.operation
            if (
                result is None
                and isinstance(operation, ContactDelete)
                and self.late_imports is not None
            ):
                # Out of the slot: the wait is long, and the slot is for requests.
                await self.late_imports.outlast(
                    step.identities,
                    functools.partial(self._delete_again, step, operation),
                    step.message.where(),
                )
        except Withdrawn:
            self.settler.settle(step, ABANDONED)
            return
        except CredentialsError as error:
            self.settler.fatal(error)
            return
        except GistError as error:
            self.settler.settle(step, failure_from(error))
            return
        self.settler.settle(step, result)

    async def _commerce(self, step: DirectStep) -> Failure | Skip | None:
        if self.commerce is None:
            return Failure(
                reason=reasons.INTERNAL_ERROR,
                detail="an e-commerce write, and no store: the rules name none",
            )
        return await self.commerce.write(step)

    async def _execute(self, step: DirectStep) -> Failure | Skip | None:
        client = self.client
        operation: Operation = step.operation
        priority = operation.priority
        dispatch = step.dispatch
        if isinstance(operation, EventTrack):
            await client.track_event(operation.event, priority=priority, dispatch=dispatch)
        elif isinstance(operation, ContactDelete):
            if self._before_delete is not None:
                await self._before_delete(step.identities)
            # Under every identity it carries: Gist keeps a lead made by an e-mail
            # alone (an event before any identify) apart from the user's contact, and
            # a delete by user id alone would leave it. Already gone (404) is what a
            # delete wants: not an error. Retried whole, each part is idempotent.
            await self._delete(operation, dispatch)
        elif isinstance(operation, ContactAlias):
            contact = await client.get_contact(
                user_id=operation.previous_id, priority=priority, dispatch=dispatch
            )
            if contact is None or contact.get("id") is None:
                log.info(log_events.ALIAS_NOTHING_TO_MOVE)
                return None
            await client.upsert_contact(
                {"id": str(contact["id"]), "user_id": operation.user_id},
                priority=priority,
                dispatch=dispatch,
            )
        elif isinstance(operation, SubscriptionChange):
            return await self._subscription(step, operation)
        else:  # pragma: no cover - upserts and tag changes have lanes of their own
            raise TypeError(f"not a direct operation: {type(operation).__name__}")
        return None

    async def _delete(self, operation: ContactDelete, dispatch: Dispatch) -> None:
        client, priority = self.client, operation.priority
        if operation.user_id is not None:
            await client.delete_contact(
                user_id=operation.user_id, priority=priority, dispatch=dispatch
            )
        if operation.email is not None:
            await client.delete_contact(email=operation.email, priority=priority, dispatch=dispatch)

    async def _delete_again(self, step: DirectStep, operation: ContactDelete) -> None:
        """An import of the contact given up on landed after its delete: delete again."""
        async with self._slots:
            charge((step,))
            await self._delete(operation, step.dispatch)

    async def _subscription(
        self, step: DirectStep, operation: SubscriptionChange
    ) -> Failure | Skip | None:
        """``POST /subscription_types/{id}``, unless contact memory says Gist holds it (a
        subscription is remembered as a field of the contact no rule can name)."""
        type_id = self.subscription_types.get(operation.subscription_type.strip().lower())
        if type_id is None:
            return Failure(
                reason=reasons.GIST_REJECTED,
                detail="the workspace has no subscription type of that name "
                "(consent.subscription_types)",
            )
        memory, note = self._memory, None
        if memory is not None:
            field = {"custom_properties": {f"$subscription:{type_id}": operation.subscribed}}
            left, note, _ = memory.strip(cast(Any, field), step.identities, step.partition)
            if left is None:
                return Skip(reasons.UNCHANGED)
        contact = await self.client.set_subscription(
            type_id,
            subscribed=operation.subscribed,
            user_id=operation.user_id,
            email=operation.email,
            priority=operation.priority,
            dispatch=step.dispatch,
        )
        if contact is None:
            return Failure(
                reason=reasons.GIST_REJECTED,
                detail="Gist has no contact of the user to subscribe (404)",
                status=404,
            )
        if memory is not None and note is not None and not step.partition.suspended:
            memory.confirm(note)
        return None
