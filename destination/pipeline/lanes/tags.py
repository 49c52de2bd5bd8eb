"""Tag changes: many contacts per ``POST /tags``.

Changes of one tag (tag or untag) wait in a *group* until it holds ``tag_batch``
contacts or its oldest change waited ``tag_batch_wait``; each group has its own timer,
which lives exactly as long as the group waits. A group Gist refuses (4xx) is halved
until the change at fault stands alone, as batch imports are. Revoking a partition takes
its changes out of the waiting groups (a group left empty is dropped with its timer; the
others keep theirs) and out of groups not yet on the wire.
"""

from __future__ import annotations

import asyncio
import functools

from destination.gist import (
    ContactRef,
    CredentialsError,
    Dispatch,
    GistClient,
    GistError,
    PermanentError,
    Withdrawn,
)
from destination.observability import metrics
from destination.operations import TagChange
from destination.pipeline.inflight import PartitionWork
from destination.pipeline.lanes.base import (
    ABANDONED,
    DirectStep,
    Lane,
    Settler,
    charge,
    failure_from,
    gates,
)
from destination.pipeline.ordering import Step

TagKey = tuple[str, bool]  # (tag, untag)


class _Group:
    """Changes of one tag waiting to fill a request."""

    __slots__ = ("key", "steps", "timer")

    def __init__(self, key: TagKey) -> None:
        self.key = key
        self.steps: list[DirectStep] = []
        self.timer: asyncio.TimerHandle | None = None


class _Request:
    """A group taken to be sent: its steps, those its request carried, its dispatch."""

    __slots__ = ("dispatch", "key", "sent", "steps", "task")

    def __init__(self, key: TagKey, steps: list[DirectStep]) -> None:
        self.key = key
        self.steps = steps
        self.sent: list[DirectStep] = []
        self.task: asyncio.Task[None] | None = None
        self.dispatch = Dispatch(gates(s.partition for s in steps))

    def refs(self) -> list[ContactRef]:
        """The contacts still wanted when the request goes."""
        self.sent = [s for s in self.steps if not s.finished and not s.partition.revoked]
        refs: list[ContactRef] = []
        for step in self.sent:
            operation = step.operation
            assert isinstance(operation, TagChange)
            ref: ContactRef = (
                {"user_id": operation.user_id}
                if operation.user_id is not None
                else {"email": operation.email or ""}
            )
            if operation.untag:
                ref["untag"] = True
            refs.append(ref)
        return refs


class TagLane(Lane):
    def __init__(
        self,
        client: GistClient,
        settler: Settler,
        slots: asyncio.Semaphore,
        batch: int,
        wait: float,
    ) -> None:
        """``slots``: the request lane's semaphore (a tag request is a request)."""
        super().__init__(client, settler)
        self._slots = slots
        self.batch = batch
        self.wait = wait
        self._waiting: dict[TagKey, _Group] = {}
        self._sending: set[_Request] = set()

    def start(self, step: Step) -> None:
        assert isinstance(step, DirectStep)
        assert isinstance(step.operation, TagChange)
        key = (step.operation.tag, step.operation.untag)
        group = self._waiting.get(key)
        if group is None:
            group = self._waiting[key] = _Group(key)
            group.timer = asyncio.get_running_loop().call_later(self.wait, self._due, group)
        group.steps.append(step)
        if len(group.steps) >= self.batch:
            self._send_group(group)

    def _due(self, group: _Group) -> None:
        if self._waiting.get(group.key) is group:
            self._send_group(group)

    def _send_group(self, group: _Group) -> None:
        del self._waiting[group.key]
        if group.timer is not None:
            group.timer.cancel()
        steps = [s for s in group.steps if not s.finished]
        if steps:
            self._send(group.key, steps)

    def _send(self, key: TagKey, steps: list[DirectStep]) -> None:
        if len(steps) > 1:
            metrics.REQUESTS_SAVED.labels("tag_batch").inc(len(steps) - 1)
        request = _Request(key, steps)
        self._sending.add(request)
        request.task = self.spawn(functools.partial(self._run, request), steps, "request")
        request.task.add_done_callback(lambda _: self._sending.discard(request))

    def revoke(self, gone: set[PartitionWork]) -> list[asyncio.Task[None]]:
        for key, group in list(self._waiting.items()):
            kept = [s for s in group.steps if s.partition not in gone]
            for step in group.steps:
                if step.partition in gone:
                    self.settler.settle(step, ABANDONED)
            if kept:
                group.steps[:] = kept  # the same group: its timer stays in force
            else:
                del self._waiting[key]
                if group.timer is not None:
                    group.timer.cancel()
        on_wire: list[asyncio.Task[None]] = []
        for request in list(self._sending):
            if not any(s.partition in gone for s in request.steps):
                continue
            if request.dispatch.on_wire and request.task is not None:
                on_wire.append(request.task)  # its answer says what Gist did
                continue
            # Not on the wire: its body is made when it goes, without the revoked ones.
            for step in request.steps:
                if step.partition in gone:
                    self.settler.settle(step, ABANDONED)
        return on_wire

    def on_wire(self, partitions: set[PartitionWork]) -> list[asyncio.Task[None]]:
        return [
            r.task
            for r in self._sending
            if r.dispatch.on_wire
            and r.task is not None
            and any(s.partition in partitions for s in r.steps)
        ]

    async def _run(self, request: _Request) -> None:
        tag = request.key[0]
        steps = request.steps
        try:
            async with self._slots:
                charge(steps)
                priority = max(step.operation.priority for step in steps)
                await self.client.tag_contacts(
                    tag, request.refs, priority=priority, dispatch=request.dispatch
                )
        except Withdrawn:
            return  # every change of it was abandoned before it went
        except asyncio.CancelledError:
            if self.closing:
                raise
            # Cut on the wire by a revocation: the other partitions' changes go again.
            kept = [s for s in steps if not s.finished and not s.partition.revoked]
            if kept:
                self._send(request.key, kept)
            return
        except CredentialsError as error:
            self.settler.fatal(error)
            return
        except PermanentError as error:
            live = [s for s in request.sent if not s.finished and not s.partition.revoked]
            if len(live) > 1:  # one contact at fault: find it, as for batch imports
                middle = len(live) // 2
                self._send(request.key, live[:middle])
                self._send(request.key, live[middle:])
                return
            for step in request.sent:
                self.settler.settle(step, failure_from(error) if step in live else ABANDONED)
            return
        except GistError as error:
            failure = failure_from(error)
            for step in request.sent or steps:
                self.settler.settle(step, failure if not step.partition.revoked else ABANDONED)
            return
        for step in request.sent:
            self.settler.settle(step, None if not step.partition.revoked else ABANDONED)
