"""One request per operation: events, deletes and aliases.

At most ``max_concurrent`` of them are out at once (the request lane's semaphore; batch
imports have their own, so they never queue behind thousands of events). A delete of a
contact Gist does not have is done (404 is what a delete wants); an alias looks the old
user up and moves its contact to the new user_id (nothing to move is done too).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable

import structlog

from destination.gist import CredentialsError, GistClient, GistError, Withdrawn
from destination.observability import log_events
from destination.operations import ContactAlias, ContactDelete, EventTrack, Operation
from destination.pipeline.inflight import PartitionWork
from destination.pipeline.lanes.base import (
    ABANDONED,
    DirectStep,
    Lane,
    Settler,
    charge,
    failure_from,
)
from destination.pipeline.ordering import Step

log = structlog.get_logger(__name__)


class RequestLane(Lane):
    def __init__(
        self,
        client: GistClient,
        settler: Settler,
        max_concurrent: int,
        before_delete: Callable[[tuple[str, ...]], Awaitable[None]] | None = None,
    ) -> None:
        """``before_delete(identities)``: done before a delete's request goes (its
        suppression is recorded: ``pipeline/suppress``)."""
        super().__init__(client, settler)
        self._slots = asyncio.Semaphore(max_concurrent)
        self._open: dict[DirectStep, None] = {}
        self._before_delete = before_delete

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
                charge((step,))
                await self._execute(step)
        except Withdrawn:
            self.settler.settle(step, ABANDONED)
            return
        except CredentialsError as error:
            self.settler.fatal(error)
            return
        except GistError as error:
            self.settler.settle(step, failure_from(error))
            return
        self.settler.settle(step, None)

    async def _execute(self, step: DirectStep) -> None:
        client = self.client
        operation: Operation = step.operation
        priority = operation.priority
        dispatch = step.dispatch
        if isinstance(operation, EventTrack):
            await client.track_event(operation.event, priority=priority, dispatch=dispatch)
        elif isinstance(operation, ContactDelete):
            if self._before_delete is not None:
                await self._before_delete(step.identities)
            # Already gone (404) is what a delete wants: not an error.
            if operation.user_id is not None:
                await client.delete_contact(
                    user_id=operation.user_id, priority=priority, dispatch=dispatch
                )
            else:
                await client.delete_contact(
                    email=operation.email, priority=priority, dispatch=dispatch
                )
        elif isinstance(operation, ContactAlias):
            contact = await client.get_contact(
                user_id=operation.previous_id, priority=priority, dispatch=dispatch
            )
            if contact is None or contact.get("id") is None:
                log.info(log_events.ALIAS_NOTHING_TO_MOVE)
                return
            await client.upsert_contact(
                {"id": str(contact["id"]), "user_id": operation.user_id},
                priority=priority,
                dispatch=dispatch,
            )
        else:  # pragma: no cover - upserts and tag changes have lanes of their own
            raise TypeError(f"not a direct operation: {type(operation).__name__}")
