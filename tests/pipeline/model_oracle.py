"""What Gist must hold, for the model test: each message's *claims* on a contact, checked
against the sandbox when the message ends, and an oracle that replays the ended
messages in the order they ended.

A contact is seen as fields: ``("f", "user_id")``, ``("p", <custom property>)`` and
``("t", <tag, lower case>)``, each with its value as JSON text (so ``1``, ``1.0``,
``true`` and ``"1"`` are four values, as Gist stores them), ``None`` when absent.
Contacts are named by their e-mail (every contact of the sandbox has one).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from destination.devtools.sandbox._store import ApiError, Contact, Store
from destination.operations import (
    ContactDelete,
    ContactUpsert,
    EventTrack,
    Operation,
    TagChange,
)

Field = tuple[str, str]
View = dict[Field, str]

UNCERTAIN = {"batch_timeout", "retries_exhausted", "gist_unexpected_answer"}
"""Dead-letter reasons after which Gist may or may not hold the message's values (the
import was sent and its fate is unknown: Gist may import it late)."""


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def view(store: Store, contact: Contact | None) -> View:
    if contact is None:
        return {}
    out: View = {}
    if contact.user_id is not None:
        out[("f", "user_id")] = _json(contact.user_id)
    for name, value in contact.custom_properties.items():
        out[("p", name)] = _json(value)
    for tag_id in contact.tag_ids:
        tag = store.tags.get(tag_id)
        if tag is not None:
            out[("t", tag.name.lower())] = "true"
    return out


@dataclass
class Claim:
    """What one operation of a message says Gist holds once it is delivered: the
    contact found by ``user_id`` (else ``email``) has ``fields`` (``None``: absent);
    ``absent``: there is no such contact (a delete); ``if_exists``: only if the
    contact exists (a tag change of a contact Gist does not know does nothing)."""

    user_id: str | None
    email: str | None
    fields: dict[Field, str | None]
    absent: bool = False
    if_exists: bool = False

    def find(self, store: Store) -> Contact | None:
        return store.find_contact(user_id=self.user_id, email=self.email)


def claims_of(operations: Sequence[Operation]) -> list[Claim]:
    out = []
    for op in operations:
        if isinstance(op, ContactUpsert):
            contact: dict[str, Any] = dict(op.contact)
            fields: dict[Field, str | None] = {}
            if contact.get("user_id") is not None:
                fields[("f", "user_id")] = _json(str(contact["user_id"]))
            for name, value in (contact.get("custom_properties") or {}).items():
                fields[("p", name)] = _json(value)
            for tag in contact.get("tags") or []:
                fields[("t", str(tag).strip().lower())] = "true"
            email = contact.get("email")
            out.append(
                Claim(
                    None if contact.get("user_id") is None else str(contact["user_id"]),
                    email.lower() if isinstance(email, str) else None,
                    fields,
                )
            )
        elif isinstance(op, TagChange):
            out.append(
                Claim(
                    op.user_id,
                    None if op.user_id is not None else op.email,
                    {("t", op.tag.strip().lower()): None if op.untag else "true"},
                    if_exists=True,
                )
            )
        elif isinstance(op, ContactDelete):
            out.append(Claim(op.user_id, None if op.user_id else op.email, {}, absent=True))
    return out


def identities_of(operations: Sequence[Operation]) -> set[str]:
    out: set[str] = set()
    for op in operations:
        out.update(op.identities)
    return out


@dataclass
class Seen:
    """A claim and what the sandbox held of its contact when the message ended."""

    position: tuple[int, int, int]
    claim: Claim
    email: str | None  # the contact found (else the claim's e-mail)
    exists: bool
    held: View


def seen(store: Store, position: tuple[int, int, int], claim: Claim) -> Seen:
    contact = claim.find(store)
    return Seen(
        position,
        claim,
        contact.email if contact is not None else claim.email,
        contact is not None,
        view(store, contact),
    )


def unheld(entry: Seen, burst: Iterable[Seen]) -> list[str]:
    """What of ``entry``'s claim the sandbox did not hold when it ended, unless a later
    message that ended with it (one step: an update merged into the same upsert) set
    the value held instead."""
    claim = entry.claim
    if claim.absent:
        return [] if not entry.exists else ["the contact still exists after its delete"]
    if not entry.exists:
        if claim.if_exists:
            return []
        return ["no such contact"]
    out = []
    for field, value in claim.fields.items():
        held = entry.held.get(field)
        if held == value:
            continue
        if any(
            other.position > entry.position
            and other.email == entry.email
            and field in other.claim.fields
            and other.claim.fields[field] == held
            for other in burst
        ):
            continue
        out.append(f"{field[1]}={value} but the sandbox holds {held}")
    return out


class Oracle:
    """Gist as it must be: the sandbox's store, into which the ended messages are
    replayed in the order they ended (delivered, or skipped as ``unchanged``: the worker
    says Gist holds their values). A message dead-lettered after its import was sent
    with an unknown fate (``UNCERTAIN``) may or may not have landed: each of its values
    is allowed for its field until the field is next written for sure."""

    def __init__(self) -> None:
        self.store = Store()
        self.allowed: dict[tuple[str, Field], set[str]] = defaultdict(set)

    def delivered(self, operations: Sequence[Operation]) -> None:
        store = self.store
        for op in operations:
            try:
                if isinstance(op, ContactUpsert):
                    contact = store.upsert_contact(dict(op.contact))
                    for claim in claims_of([op]):
                        for field in claim.fields:
                            self.allowed.pop((contact.email, field), None)
                elif isinstance(op, EventTrack):
                    store.track_event(dict(op.event))
                elif isinstance(op, TagChange):
                    ref: dict[str, Any] = (
                        {"user_id": op.user_id} if op.user_id is not None else {"email": op.email}
                    )
                    if op.untag:
                        ref["untag"] = True
                    found = store.find_contact(user_id=op.user_id, email=op.email)
                    store.tag_request({"name": op.tag, "contacts": [ref]})
                    if found is not None:
                        self.allowed.pop((found.email, ("t", op.tag.strip().lower())), None)
                elif isinstance(op, ContactDelete):  # by user_id when it has one, as sent
                    found = (
                        store.find_contact(user_id=op.user_id)
                        if op.user_id is not None
                        else store.find_contact(email=op.email)
                    )
                    if found is not None:
                        store.delete_contact(found)
                        for key in [k for k in self.allowed if k[0] == found.email]:
                            del self.allowed[key]
            except ApiError:
                pass  # Gist refuses it the same way

    def uncertain(self, operations: Sequence[Operation]) -> None:
        for claim in claims_of([op for op in operations if isinstance(op, ContactUpsert)]):
            found = claim.find(self.store)
            email = found.email if found is not None else claim.email
            if email is None:
                continue
            for field, value in claim.fields.items():
                if value is not None:
                    self.allowed[(email, field)].add(value)

    def differences(self, sandbox: Store) -> list[str]:
        """Every field in which the sandbox differs from the replay, beyond what an
        uncertain message allows."""
        mine = {c.email: view(self.store, c) for c in self.store.contacts.values()}
        theirs = {c.email: view(sandbox, c) for c in sandbox.contacts.values()}
        out = []
        for email in sorted(set(mine) | set(theirs)):
            expected, held = mine.get(email, {}), theirs.get(email, {})
            for field in sorted(set(expected) | set(held)):
                want, got = expected.get(field), held.get(field)
                if want == got or (got is not None and got in self.allowed.get((email, field), ())):
                    continue
                out.append(f"{email} {field[1]}: sandbox {got}, last delivered {want}")
        return out
