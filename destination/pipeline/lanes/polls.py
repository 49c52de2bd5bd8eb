"""Batch imports Gist accepted, polled until they end.

Gist's batch import is asynchronous: a contact is in Gist only once its batch's status is
``COMPLETED``, and a per-contact error shows up only there. ``BatchPolls`` keeps every
pending batch and polls it when due (backing off to ``poll_max_interval``):

- ``COMPLETED``: each contact is confirmed, or fails with the error Gist names for it;
  errors that cannot all be matched to contacts, or fewer imported than sent, send the
  rest again in halves until every contact's fate is known (upserts are idempotent);
- an explicit failure (``FAILED``, ``ERROR``, ``CANCELLED``, any case): the batch is sent
  again once, then its contacts fail with ``batch_failed`` (``batch_timeout``, fate
  unknown, for those an earlier import of which may have landed: expired, completed
  without saying which contacts failed, or its answer lost: ``ContactStep.may_land``);
- not ``COMPLETED`` within ``batch_deadline`` (a status this client does not know counts
  as not completed), or a batch Gist no longer knows (404): sent again once, then its
  contacts fail with ``batch_timeout``.

An import given up on past its deadline may still be imported, later: a delete of one of
its contacts would then be undone (model test seed 52 at 80 steps: a person's identify
timed out, the delete went, Gist imported the identify after it and the contact came
back). Such imports are remembered for ``late_watch`` seconds (``GivenUp``); a delete of
one of their contacts waits for their fate (``outlast``), polling them, and is sent again
when one lands. An import whose id Gist never gave (its answer lost) or that Gist no
longer knows (404) cannot be watched.

Polls are few at the real limit, so only the oldest ``poll_window`` batches that Gist
says it queues or imports are polled at each turn; a batch pending longer than
``poll_stale_after`` or answering a status this client does not know leaves that window
and is polled, one such batch at a time, every ``poll_max_interval`` (so a stuck batch
never stops the polls of later ones).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import structlog

from destination import reasons
from destination.gist import BatchStatus, CredentialsError, GistClient, GistError, PermanentError
from destination.observability import log_events, metrics
from destination.pipeline.contacts import ContactStep
from destination.pipeline.inflight import Failure, PartitionWork
from destination.pipeline.lanes.base import ABANDONED, Lane, Settler, charge, shares
from destination.pipeline.waiting import wait_event

log = structlog.get_logger(__name__)

KNOWN_WORKING = frozenset({"QUEUED", "IN_PROGRESS"})
"""The statuses the reference gives a batch that has not completed yet."""

FAILED_STATUSES = frozenset({"FAILED", "FAILURE", "ERROR", "ERRORED", "CANCELED", "CANCELLED"})
"""Statuses that say the import failed (compared in upper case): not imported, or not
surely; the batch is sent again rather than waited for."""


class PendingBatch:
    """A batch import Gist accepted and has not completed yet."""

    __slots__ = (
        "batch_id",
        "deadline",
        "interval",
        "next_poll",
        "polling",
        "resent",
        "shares",
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
        self.shares = shares(steps)  # a poll's cost among its messages (``charge``)

    def live(self) -> list[ContactStep]:
        return [step for step in self.steps if not step.finished]


class GivenUp:
    """An import not COMPLETED within the deadline, given up on: Gist may import it yet.
    ``until``: when this worker stops expecting it to land; ``fate``, once a delete
    waits for it: resolves to ``landed``, ``failed``, ``forgotten`` (404) or
    ``unresolved`` (``until`` passed), one poller finding out for every delete."""

    __slots__ = ("batch_id", "fate", "identities", "until")

    def __init__(self, batch_id: str, identities: frozenset[str], until: float) -> None:
        self.batch_id = batch_id
        self.identities = identities
        self.until = until
        self.fate: asyncio.Future[str] | None = None


MAX_GIVEN_UP = 256
"""Imports given up on that are remembered at once (the oldest are forgotten first)."""

Resend = Callable[[list[ContactStep], bool], None]
"""Sends contacts of a batch again (their bodies as they were); True: a batch sent again
(its next expiry fails the contacts)."""


class BatchPolls(Lane):
    def __init__(
        self,
        client: GistClient,
        settler: Settler,
        resend: Resend,
        *,
        interval: float,
        max_interval: float,
        window: int,
        stale_after: float,
        deadline: float,
        late_watch: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(client, settler)
        self._resend = resend
        self.interval = interval
        self.max_interval = max_interval
        self.window = window
        self.stale_after = stale_after
        self.deadline = deadline
        self.late_watch = late_watch
        self._clock = clock
        self._pending: list[PendingBatch] = []
        self._given_up: dict[str, GivenUp] = {}  # by batch id, oldest first
        self._wake = asyncio.Event()
        self._halted = False

    # --- what the rest of the worker reads --------------------------------------------
    @property
    def pending(self) -> int:
        return len(self._pending)

    def oldest_age(self) -> float:
        if not self._pending:
            return 0.0
        return max(0.0, self._clock() - min(b.submitted for b in self._pending))

    # --- batches coming and going -----------------------------------------------------
    def add(self, batch: PendingBatch) -> None:
        self._pending.append(batch)
        metrics.BATCHES_PENDING.set(len(self._pending))
        self._wake.set()

    def revoke(self, gone: set[PartitionWork]) -> list[asyncio.Task[None]]:
        """The revoked partitions' contacts in pending batches are abandoned; a batch left
        with none of another partition is polled no more."""
        for batch in self._pending:
            for step in batch.steps:
                if step.partition in gone:
                    self.settler.settle(step, ABANDONED)
        self._pending = [b for b in self._pending if b.live()]
        metrics.BATCHES_PENDING.set(len(self._pending))
        return []  # a poll on the wire decides nothing for the revoked ones

    def on_wire(self, partitions: set[PartitionWork]) -> list[asyncio.Task[None]]:
        return []  # a poll asks; it sends nothing for the contacts

    def halt(self) -> None:
        """Poll no more (the API key was rejected)."""
        self._halted = True
        self._wake.set()

    # --- the loop ---------------------------------------------------------------------
    async def run(self) -> None:
        """Poll each batch when due; polls run side by side (one at a time would let
        imports outrun the polls)."""
        while not self._halted:
            try:
                batch, wait = self._next_poll()
            except Exception as exc:  # a bug: fail no one, but do not spin on it
                self.settler.report(exc, "poller")
                batch, wait = None, 1.0
            if batch is None:
                self._wake.clear()
                await wait_event(self._wake, wait)
                continue
            batch.polling = True
            self.spawn(functools.partial(self._poll, batch), batch.live(), "poll")

    def _next_poll(self) -> tuple[PendingBatch | None, float | None]:
        """The batch to poll now, or how long until one may be due (None: until woken,
        which every new batch and every poll that ends does)."""
        now = self._clock()
        fresh: list[PendingBatch] = []
        slow: list[PendingBatch] = []  # pending long, or answering statuses we do not know
        later: list[PendingBatch] = []  # beyond the window, not slow yet
        for batch in self._pending:
            if now - batch.submitted >= self.stale_after or batch.status not in KNOWN_WORKING:
                slow.append(batch)
            elif len(fresh) < self.window:
                fresh.append(batch)
            else:
                later.append(batch)
        candidates = [b for b in fresh if not b.polling]
        if not any(b.polling for b in slow):  # slow ones: one poll at a time
            candidates.extend(b for b in slow if not b.polling)
        # A batch past its deadline is due at once, wherever it stands.
        candidates.extend(b for b in later if b.deadline <= now and not b.polling)
        wake_at = [b.submitted + self.stale_after for b in later]
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
            charge(batch.shares)
            status = await self.client.batch_status(batch.batch_id)
        except CredentialsError as error:
            self.halt()  # nothing will succeed until an operator acts
            self.settler.fatal(error)
            return
        except PermanentError as error:
            # 404: Gist no longer knows the batch. Any other 4xx is taken as "not
            # completed yet" (never a reason to send the batch again at once).
            lost = error.status == 404
        except GistError:
            pass  # a failed poll: poll again later
        finally:
            batch.polling = False
            self._wake.set()
        if batch not in self._pending:
            return  # abandoned meanwhile
        if status is not None:
            batch.status = status.status
        if lost:
            self._expire(batch, "lost")
        elif status is not None and status.completed:
            self._forget(batch)
            self._completed(batch, status)
        elif status is not None and status.status.upper() in FAILED_STATUSES:
            self._expire(batch, "failed")
        else:
            now = self._clock()
            batch.interval = min(self.max_interval, batch.interval * 2)
            batch.next_poll = now + batch.interval
            if now >= batch.deadline:
                self._expire(batch, "deadline")

    def _forget(self, batch: PendingBatch) -> None:
        with contextlib.suppress(ValueError):
            self._pending.remove(batch)
        metrics.BATCHES_PENDING.set(len(self._pending))

    def _expire(self, batch: PendingBatch, why: str) -> None:
        """Not completed in time, lost, or failed: send it again once, else its contacts
        fail."""
        self._forget(batch)
        live = batch.live()
        action = "dead_lettered" if batch.resent else "resent"
        metrics.BATCHES_PAST_DEADLINE.labels(action).inc()
        event = {
            "lost": log_events.BATCH_LOST,
            "failed": log_events.BATCH_FAILED,
        }.get(why, log_events.BATCH_PAST_DEADLINE)
        log.warning(
            event,
            batch_id=batch.batch_id,
            status=batch.status,
            contacts=len(live),
            action=action,
            seconds=round(self._clock() - batch.submitted, 1),
        )
        if why == "deadline":
            self._remember(batch)
        if not live:
            return
        if why != "failed":  # Gist may import it yet, whatever becomes of the next
            for step in live:
                step.may_land = True
        if not batch.resent:
            self._resend(live, True)
            return
        if why == "failed":
            failed = Failure(
                reasons.BATCH_FAILED,
                f"Gist reported the batch import {batch.status}, twice",
            )
            # An earlier import that did not complete may still be imported: the
            # contact's fate is unknown, not failed.
            unknown = Failure(
                reasons.BATCH_TIMEOUT,
                "an earlier import of the contact may have landed (it did not complete "
                f"within {self.deadline:g} s, Gist no longer knew it, it completed without "
                "saying which contacts failed, or its answer was lost), and Gist reported "
                f"the one sent again {batch.status}",
            )
            for step in live:
                self.settler.settle(step, unknown if step.may_land else failed)
            return
        if why == "lost":
            failure = Failure(reasons.BATCH_TIMEOUT, "Gist no longer knew the batch import, twice")
        else:
            failure = Failure(
                reasons.BATCH_TIMEOUT,
                f"the batch import did not complete within {self.deadline:g} s, twice",
            )
        for step in live:
            self.settler.settle(step, failure)

    # --- imports given up on, and the deletes they could undo -------------------------
    def _remember(self, batch: PendingBatch) -> None:
        if self.late_watch <= 0:
            return
        identities = frozenset(i for step in batch.steps for i in step.identities)
        self._given_up.pop(batch.batch_id, None)
        self._given_up[batch.batch_id] = GivenUp(
            batch.batch_id, identities, self._clock() + self.late_watch
        )
        while len(self._given_up) > MAX_GIVEN_UP:
            del self._given_up[next(iter(self._given_up))]

    def given_up(self, identities: Iterable[str]) -> list[GivenUp]:
        """The imports given up on, still watched, that carried one of ``identities``."""
        now = self._clock()
        for batch_id in [b for b, g in self._given_up.items() if g.until <= now]:
            del self._given_up[batch_id]
        wanted = frozenset(identities)
        return [g for g in self._given_up.values() if not g.identities.isdisjoint(wanted)]

    async def outlast(
        self,
        identities: Iterable[str],
        repeat: Callable[[], Awaitable[object]],
        where: dict[str, Any] | None = None,
    ) -> None:
        """A delete of these contacts was sent: wait for the fate of the imports given up
        on that carried one of them (``GivenUp.fate``), and ``repeat()`` the delete each
        time one of them lands. ``GistError`` from ``repeat`` propagates (the delete
        failed). ``where``: the delete's message, for the log lines."""
        watched = self.given_up(identities)
        if not watched:
            return
        where = where or {}
        log.info(log_events.DELETE_OUTLASTS_IMPORTS, batches=len(watched), **where)
        fates = {self._fate(given_up): given_up for given_up in watched}
        while fates:
            done, _ = await asyncio.wait(fates, return_when=asyncio.FIRST_COMPLETED)
            landed = False
            for fate in done:
                given_up = fates.pop(fate)
                if fate.result() == "landed":
                    landed = True
                elif fate.result() == "unresolved":
                    log.warning(
                        log_events.DELETE_MAY_BE_UNDONE,
                        batch_id=given_up.batch_id,
                        watched_seconds=self.late_watch,
                        **where,
                    )
            if landed:
                log.warning(log_events.DELETE_REPEATED, **where)
                metrics.DELETES_REPEATED.inc()
                await repeat()

    def _fate(self, given_up: GivenUp) -> asyncio.Future[str]:
        if given_up.fate is None:
            given_up.fate = asyncio.get_running_loop().create_future()
            self.spawn(functools.partial(self._follow_guarded, given_up), [], "late-import")
        return given_up.fate

    async def _follow_guarded(self, given_up: GivenUp) -> None:
        """``_follow``; a bug in it ends the wait of the deletes as ``unresolved`` (they
        would wait for ever on a fate no one finds out), then is reported."""
        try:
            await self._follow(given_up)
        except Exception:
            if given_up.fate is not None and not given_up.fate.done():
                given_up.fate.set_result("unresolved")
            raise

    async def _follow(self, given_up: GivenUp) -> None:
        """Poll an import given up on every ``max_interval`` until its fate is known, or
        its ``until`` passed. A failed poll is polled again; a rejected key stops the
        polls and leaves the fate open (nothing succeeds until an operator acts)."""
        fate = given_up.fate
        assert fate is not None
        while True:
            found: str | None = None
            try:
                status = await self.client.batch_status(given_up.batch_id)
            except CredentialsError as error:
                self.halt()
                self.settler.fatal(error)
                return
            except PermanentError as error:
                found = "forgotten" if error.status == 404 else None  # else: not yet
            except GistError:
                pass
            else:
                if status.completed:
                    found = "landed"
                elif status.status.upper() in FAILED_STATUSES:
                    found = "failed"
            if found is None and self._clock() >= given_up.until:
                found = "unresolved"
            if found is not None:
                if self._given_up.get(given_up.batch_id) is given_up:
                    del self._given_up[given_up.batch_id]  # its fate is known
                metrics.LATE_IMPORTS.labels(found).inc()
                if not fate.done():
                    fate.set_result(found)
                return
            await asyncio.sleep(self.max_interval)

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
                self.settler.settle(
                    step, Failure(reasons.BATCH_CONTACT_ERROR, reason, status=200)
                )
            elif not step.finished:
                rest.append(step)
        expected = len(batch.steps) - len(failed)
        short = status.imported_contacts is not None and status.imported_contacts < expected
        if not unmatched and not short:
            for step in rest:
                self.settler.settle(step, None)
            return
        # Some of ``rest`` failed, and Gist did not say which: find out. Each may have
        # been imported (a later FAILED does not undo it).
        for step in rest:
            step.may_land = True
        metrics.BATCHES_UNVERIFIED.inc()
        log.warning(
            log_events.BATCH_UNVERIFIED,
            batch_id=batch.batch_id,
            contacts=len(rest),
            unmatched_errors=len(unmatched),
            imported=status.imported_contacts,
            expected=expected,
        )
        if len(batch.steps) == 1 and rest:
            # Alone in its batch: the error is its own.
            detail = (
                unmatched[0]
                if unmatched
                else "Gist imported fewer contacts than it was sent and named none as failed"
            )
            self.settler.settle(rest[0], Failure(reasons.BATCH_CONTACT_ERROR, detail, status=200))
        elif len(rest) == 1:
            # The last one left of several (the others ended meanwhile, a revocation): the
            # error may be another's (model test seed 303). On its own, it will tell.
            self._resend(rest, batch.resent)
        elif rest:
            middle = len(rest) // 2
            self._resend(rest[:middle], batch.resent)
            self._resend(rest[middle:], batch.resent)


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
            # Not its text: Gist's error may quote the contact's values.
            log.warning(log_events.BATCH_ERROR_UNMATCHED, message_chars=len(error.message))
    return failed, unmatched
