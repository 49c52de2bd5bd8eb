"""Per-contact order: an operation waits for the earlier ones on the same contact.

Gist's batch import is asynchronous, so "sent" is not "applied". To end with the values
of the last message, and to land a track on a contact created by an identify whose batch
is still queued, operations on one contact (keyed by user_id and by lower-cased email)
are chained:

- a contact write (an upsert, or a delete / alias / tag change) waits for the previous
  write on each of its identities to finish (its batch completed);
- an event waits for the previous write, but not for other events;
- a delete / alias / tag change also waits for the events before it;
- a contact upsert that arrives while the previous write on all its identities is an
  upsert not yet sent is merged into it instead (later values winning).

``Step`` is one unit of delivery; ``IdentityGate`` holds the chains. Pure, no I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable


class StepKind(enum.Enum):
    CONTACT = "contact"  # an upsert, merged and sent in a batch import
    EVENT = "event"  # runs alongside other events on the same contact
    EXCLUSIVE = "exclusive"  # delete / alias / tag change: after everything before it


class Step:
    """One unit of delivery, ordered against other steps on the same identities."""

    __slots__ = ("dependents", "finished", "identities", "kind", "waiting")

    def __init__(self, kind: StepKind, identities: Iterable[str]) -> None:
        self.kind = kind
        self.identities = tuple(identities)
        self.waiting = 0
        self.dependents: list[Step] = []
        self.finished = False

    @property
    def ready(self) -> bool:
        return self.waiting == 0 and not self.finished


class _Chain:
    __slots__ = ("events", "last_write")

    def __init__(self) -> None:
        self.last_write: Step | None = None
        # Events in flight on the identity, an ordered set (O(1) removal); most chains
        # never see one, so it is made on the first.
        self.events: dict[Step, None] | None = None


class IdentityGate:
    def __init__(self) -> None:
        self._chains: dict[str, _Chain] = {}

    def __len__(self) -> int:
        """Identities with unfinished work."""
        return len(self._chains)

    def last_write(self, identities: Iterable[str]) -> Step | None:
        """The unfinished write every one of ``identities`` last had, if it is one and the
        same step for all of them (so a new upsert may merge into it); else None."""
        found: Step | None = None
        for identity in identities:
            chain = self._chains.get(identity)
            if chain is None or chain.last_write is None:
                return None
            if found is None:
                found = chain.last_write
            elif found is not chain.last_write:
                return None
        return found

    def admit(self, step: Step) -> bool:
        """Chain a new step behind the unfinished work on its identities; True when it
        may run at once."""
        before: dict[Step, None] = {}
        for identity in step.identities:
            chain = self._chains.get(identity)
            if chain is None:
                chain = self._chains[identity] = _Chain()
            if chain.last_write is not None:
                before[chain.last_write] = None
            if step.kind is StepKind.EVENT:
                if chain.events is None:
                    chain.events = {}
                chain.events[step] = None
                continue
            if step.kind is StepKind.EXCLUSIVE and chain.events:
                before.update(chain.events)
                chain.events.clear()
            chain.last_write = step
        for earlier in before:
            if earlier is not step and not earlier.finished:
                earlier.dependents.append(step)
                step.waiting += 1
        return step.waiting == 0

    def finish(self, step: Step) -> list[Step]:
        """``step`` is over (delivered or failed); returns the steps that may run now."""
        if step.finished:
            return []
        step.finished = True
        for identity in step.identities:
            chain = self._chains.get(identity)
            if chain is None:
                continue
            if chain.last_write is step:
                chain.last_write = None
            if chain.events:
                chain.events.pop(step, None)
            if chain.last_write is None and not chain.events:
                del self._chains[identity]
        released = []
        for dependent in step.dependents:
            dependent.waiting -= 1
            if dependent.waiting == 0 and not dependent.finished:
                released.append(dependent)
        step.dependents.clear()
        return released
