"""The one place where a message ends: delivered, dead-lettered or skipped.

Every path a message can take, from a record that is not JSON to a contact that a
completed batch reports as failed to an unexpected exception in the worker, ends in one
call here, and a message ends exactly once: a second end is a bug, logged as an error
and counted, never counted twice. Ending is what lets the ledger finish a record, and a
finished record is what lets its offset be committed, so "commit only what ended"
follows from the shape of the code.

A dead letter ends its message only once Kafka has acknowledged it; until then the
message holds its record (and so the offset) back. A message of a revoked partition is
not ended here at all: the new owner reads it again.

Delivery reports operations (``expect`` / ``accepted`` / ``operation_done``); when a
message's last operation is over it is delivered, or dead-lettered with the first
failure one of its operations met.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Protocol

import structlog

from destination import reasons
from destination.observability import log_events, metrics
from destination.pipeline.inflight import (
    DEAD_LETTERING,
    ENDED,
    OPEN,
    Failure,
    Ledger,
    MessageWork,
    PartitionWork,
    Skip,
)
from destination.pipeline.waiting import cancel_and_wait

log = structlog.get_logger(__name__)

DEAD_LETTER_BUG_RETRY = 5.0
"""Seconds before a dead letter whose writer failed by a bug is tried again: its
message must end, and the partition is held (and the error logged) until it does."""
_CLOSE_BOUND = 5.0
"""Seconds a stop waits for the dead-letter writes it cancelled."""


class DeadLetterSink(Protocol):
    async def write(self, message: MessageWork, failure: Failure) -> None:
        """Write the dead letter; return only once Kafka acknowledged it."""


class Outcomes:
    def __init__(
        self,
        ledger: Ledger,
        dead_letters: DeadLetterSink,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.ledger = ledger
        self.dead_letters = dead_letters
        self._wall_clock = wall_clock
        self._writing: dict[MessageWork, asyncio.Task[None]] = {}
        self.delivered_count = 0
        self.ended_count = 0  # delivered, skipped or dead-lettered
        self.observers: list[Callable[[MessageWork, str, str | None], None]] = []
        """Called with (message, "delivered" | "skipped" | "dead_lettered", reason) as
        each message ends (tests watch the invariants through this)."""

    # --- a message's operations -------------------------------------------------------
    def expect(self, message: MessageWork, operations: int) -> None:
        message.pending += operations

    def accepted(self, message: MessageWork) -> None:
        """One operation is now a contact in a batch Gist accepted (not yet imported)."""
        message.parked += 1
        if message.parked == message.pending:
            self.ledger.park(message)

    def unaccepted(self, message: MessageWork) -> None:
        """A contact of the message is sent again: it is in flight once more."""
        message.parked -= 1
        if message.is_parked:
            self.ledger.unpark(message)

    def operation_done(
        self,
        message: MessageWork,
        result: Failure | Skip | None = None,
        *,
        accepted: bool = False,
    ) -> None:
        """One operation of the message is over: delivered (``None``), failed, or not sent
        because Gist already holds it (``Skip``); ``accepted``: it was a contact whose
        batch Gist had accepted. The first failure decides the message's fate; a message
        none of whose operations was sent is skipped."""
        if isinstance(result, Failure):
            if message.failure is None:
                message.failure = result
        elif isinstance(result, Skip):
            message.skipped = result.reason
        else:
            message.sent = True
        message.pending -= 1
        if accepted:
            message.parked -= 1
        if message.pending == 0:
            if message.failure is not None:
                self.dead_letter(message, message.failure)
            elif message.sent or message.skipped is None:
                self.delivered(message)
            else:
                self.skipped(message, message.skipped)

    # --- the ends ---------------------------------------------------------------------
    def delivered(self, message: MessageWork) -> None:
        if not self._may_end(message, "delivered"):
            return
        self.delivered_count += 1
        metrics.child(metrics.MESSAGES_DELIVERED, message.message_type).inc()
        if message.timestamp is not None:
            metrics.DELIVERY_DELAY.observe(max(0.0, self._wall_clock() - message.timestamp))
        self._end(message, "delivered", None)

    def skipped(self, message: MessageWork, reason: str) -> None:
        if not self._may_end(message, "skipped"):
            return
        metrics.child(metrics.MESSAGES_SKIPPED, message.message_type, reason).inc()
        self._end(message, "skipped", reason)

    def dead_letter(self, message: MessageWork, failure: Failure) -> None:
        """Write the message to the dead-letter topic; it ends once Kafka has it."""
        if not self._may_end(message, "dead-lettered"):
            return
        message.failure = failure
        message.state = DEAD_LETTERING
        task = asyncio.create_task(self._write(message, failure), name="dead-letter")
        self._writing[message] = task
        task.add_done_callback(lambda _: self._writing.pop(message, None))

    def internal_error(self, message: MessageWork, error: BaseException, where: str) -> None:
        """An unexpected exception while handling the message: dead-letter it with
        ``internal_error`` rather than let it hang (and say so loudly)."""
        metrics.INTERNAL_ERRORS.labels(where).inc()
        log.error(
            log_events.INTERNAL_ERROR,
            where=where,
            error=type(error).__name__,
            exc_info=error,
            **message.where(),
        )
        self.dead_letter(message, internal_failure(error, where))

    def abandon(self, partitions: Iterable[PartitionWork]) -> None:
        """The partitions are revoked: stop writing their dead letters (the new owner
        reads those records again)."""
        gone = set(map(id, partitions))
        for message, task in list(self._writing.items()):
            if id(message.record.partition) in gone:
                task.cancel()

    @property
    def dead_letters_writing(self) -> int:
        return len(self._writing)

    async def close(self) -> None:
        # Bounded: a write that does not end on its cancellation must not hold the stop.
        await cancel_and_wait(*self._writing.values(), within=_CLOSE_BOUND)

    # --- the one way in and out -------------------------------------------------------
    def _may_end(self, message: MessageWork, how: str) -> bool:
        if message.state != OPEN:
            # A bug: a message ends once. Never count it twice; make it visible.
            metrics.INTERNAL_ERRORS.labels("outcome").inc()
            log.error(
                log_events.ENDED_TWICE,
                outcome=how,
                state=message.state,
                type=message.message_type,
                **message.where(),
            )
            return False
        return not message.record.partition.revoked

    def _end(self, message: MessageWork, how: str, reason: str | None) -> None:
        message.state = ENDED
        self.ended_count += 1
        self.ledger.ended(message)
        for observe in self.observers:
            observe(message, how, reason)

    async def _write(self, message: MessageWork, failure: Failure) -> None:
        while True:
            try:
                await self.dead_letters.write(message, failure)
                break
            except Exception as exc:  # the writer retries what Kafka throws; this is a bug
                metrics.INTERNAL_ERRORS.labels("dead_letter").inc()
                log.error(
                    log_events.INTERNAL_ERROR,
                    where="dead_letter",
                    error=type(exc).__name__,
                    exc_info=exc,
                    **message.where(),
                )
                await asyncio.sleep(DEAD_LETTER_BUG_RETRY)
        if message.record.partition.revoked:
            return
        metrics.child(metrics.MESSAGES_DEAD_LETTERED, message.message_type, failure.reason).inc()
        log.warning(
            log_events.DEAD_LETTERED,
            reason=failure.reason,
            status=failure.status,
            type=message.message_type,
            **message.where(),
        )
        self._end(message, "dead_lettered", failure.reason)


def internal_failure(error: BaseException, where: str) -> Failure:
    return Failure(
        reasons.INTERNAL_ERROR,
        f"{type(error).__name__} in {where}: {str(error)[:200]}",
    )
