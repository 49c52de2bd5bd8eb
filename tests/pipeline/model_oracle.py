"""What Gist must hold, for the model test: each message's *claims* on a contact, checked
against the sandbox when the message ends, and an oracle that replays the ended
messages in the order they ended.

A contact is seen as fields: ``("f", "user_id")``, ``("p", <custom property>)`` and
``("t", <tag, lower case>)``, each with its value as JSON text (so ``1``, ``1.0``,
``true`` and ``"1"`` are four values, as Gist stores them), ``None`` when absent.
Contacts are named by their e-mail (every contact of the sandbox has one).
"""

from __future__ import annotations

import math
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
    SubscriptionChange,
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
    if contact.unsubscribed_from_emails:
        out[("f", "unsubscribed_from_emails")] = "true"
    for subscription_type in store.subscription_types.values():
        if contact.id in subscription_type.contact_ids:
            out[("s", subscription_type.name.lower())] = "true"
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
            if "unsubscribed_from_emails" in contact:
                unsubscribed = contact["unsubscribed_from_emails"]
                fields[("f", "unsubscribed_from_emails")] = "true" if unsubscribed else None
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
        elif isinstance(op, SubscriptionChange):
            out.append(
                Claim(
                    op.user_id,
                    op.email,
                    {("s", op.subscription_type.strip().lower()): _flag(op.subscribed)},
                    if_exists=True,
                )
            )
    return out


def _flag(on: bool) -> str | None:
    return "true" if on else None


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


_NONE = "\0none"
"""An allowed value that is no value (a tag removed, a subscription cancelled)."""


class Oracle:
    """Gist as it must be: the sandbox's store, into which the ended messages are
    replayed in the order they ended (delivered, or skipped as ``unchanged``: the worker
    says Gist holds their values). A message dead-lettered after its import was sent
    with an unknown fate (``UNCERTAIN``) may or may not have landed: each of its values
    is allowed for its field until the field is next written for sure."""

    def __init__(self, imported: Sequence[tuple[float, dict[str, Any]]] = ()) -> None:
        """``imported``: (arrival time, contact) of each contact Gist imported, whoever
        sent it: one whose sender was revoked or crashed before its message ended there
        made the contact all the same."""
        self.store = Store()
        self.allowed: dict[tuple[str, Field], set[str]] = defaultdict(set)
        self.imported = imported
        self.deleted: dict[str, float] = {}  # e-mail -> when its last delete ended
        # Identities (user_id or e-mail) an uncertain upsert may have given a contact,
        # with the e-mail Gist would know it by: a tag or subscription change naming one
        # the replay does not know may have landed in Gist, or not.
        self.maybe: dict[str, str] = {}

    def _may_exist(
        self, user_id: str | None, email: str | None, at: float = math.inf
    ) -> str | None:
        """The e-mail of the contact an uncertain upsert, or an import that arrived before
        ``at`` (its message not ended when it landed), may have made under one of these
        identities (None: none did)."""
        for identity in (user_id, email.lower() if isinstance(email, str) else None):
            if identity is not None and identity in self.maybe:
                return self.maybe[identity]
        for arrived, contact in self.imported:
            known = contact.get("email")
            if arrived > at or not isinstance(known, str):
                continue
            if arrived <= self.deleted.get(known.lower(), -math.inf):
                continue  # imported, then deleted
            if (user_id is not None and contact.get("user_id") == user_id) or (
                isinstance(email, str) and known.lower() == email.lower()
            ):
                return known.lower()
        return None

    def delivered(self, operations: Sequence[Operation], at: float = math.inf) -> None:
        """Replay a message that ended delivered (at ``at``, ``time.monotonic()``)."""
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
                    # The contact the request names (by user_id when it has one).
                    found = store.find_contact(user_id=op.user_id, email=ref.get("email"))
                    store.tag_request({"name": op.tag, "contacts": [ref]})
                    field = ("t", op.tag.strip().lower())
                    if found is not None:
                        self.allowed.pop((found.email, field), None)
                    elif (maybe := self._may_exist(op.user_id, ref.get("email"), at)) is not None:
                        # Gist may know the contact by that identity (an import of
                        # unknown fate, or whose message ended later or elsewhere): the
                        # tag landed on it, or nothing happened.
                        self.allowed[(maybe, field)].update(
                            ("true" if not op.untag else _NONE, _NONE)
                        )
                elif isinstance(op, SubscriptionChange):
                    found = store.find_contact(user_id=op.user_id, email=op.email)
                    kind = next(
                        t
                        for t in store.subscription_types.values()
                        if t.name.lower() == op.subscription_type.strip().lower()
                    )
                    field = ("s", op.subscription_type.strip().lower())
                    if found is not None:
                        if op.subscribed:
                            kind.contact_ids[found.id] = None
                        else:
                            kind.contact_ids.pop(found.id, None)
                        self.allowed.pop((found.email, field), None)
                    elif (maybe := self._may_exist(op.user_id, op.email, at)) is not None:
                        self.allowed[(maybe, field)].update((_flag(op.subscribed) or _NONE, _NONE))
                elif isinstance(op, ContactDelete):
                    # Under every identity it carries, as the worker sends it: by user_id,
                    # then by e-mail (a lead made by the e-mail alone goes too).
                    for ref in ({"user_id": op.user_id}, {"email": op.email}):
                        if next(iter(ref.values())) is None:
                            continue
                        found = store.find_contact(**ref)
                        if found is not None:
                            store.delete_contact(found)
                            self.deleted[found.email.lower()] = at
                            for key in [k for k in self.allowed if k[0] == found.email]:
                                del self.allowed[key]
                    # Nor is any contact an uncertain upsert or an import made under them.
                    maybe = self._may_exist(op.user_id, op.email, at)
                    if maybe is not None:
                        self.deleted[maybe] = at
                        for identity in [i for i, e in self.maybe.items() if e == maybe]:
                            del self.maybe[identity]
            except ApiError:
                pass  # Gist refuses it the same way

    def uncertain(self, operations: Sequence[Operation]) -> None:
        """Operations that may or may not have landed (an import of unknown fate; a
        message skipped as a duplicate, whose operations a worker that died before it
        ended took to Gist, at a time the model cannot place): each of their values,
        none included, is allowed for its field."""
        for claim in claims_of(operations):
            if claim.absent:
                continue
            found = claim.find(self.store)
            email = found.email if found is not None else claim.email
            if email is None:
                continue
            if not claim.if_exists:  # an upsert: it may have made the contact, or given
                # it its user_id; Gist may know it by them from now on, or not
                if claim.user_id is not None and (found is None or found.user_id is None):
                    self.maybe[claim.user_id] = email
                if found is None:
                    self.maybe[email] = email
            for field, value in claim.fields.items():
                self.allowed[(email, field)].add(_NONE if value is None else value)

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
                if want == got or (_NONE if got is None else got) in self.allowed.get(
                    (email, field), ()
                ):
                    continue
                out.append(f"{email} {field[1]}: sandbox {got}, last delivered {want}")
        return out


Cart = frozenset[tuple[tuple[str, str | None], int]]
"""A cart as its lines: ((product_id, variant_id), quantity)."""
ORDER_FIELDS = ("order_total", "refund_amount", "financial_status")


def _lines(items: Iterable[Any], base: Cart, remove: bool = False) -> Cart:
    """``base`` with ``items`` added (``remove``: taken out; quantity 0 the whole line)."""
    lines = dict(base)
    for item in items:
        key = (str(item.product_id), item.variant_id)
        quantity = lines.get(key, 0)
        if remove:
            left = 0 if item.quantity == 0 else quantity - item.quantity
            if left > 0:
                lines[key] = left
            else:
                lines.pop(key, None)
        else:
            lines[key] = quantity + item.quantity
    return frozenset(lines.items())


def sandbox_cart(store: Store, customer_id: str) -> Cart | None:
    """The customer's cart in the sandbox's first e-commerce store (empty when it has
    none; None when the customer is not in the store)."""
    shop = next(iter(store.ecommerce.stores.values()), None)
    customer = shop.customers.get(customer_id) if shop is not None else None
    if customer is None:
        return None
    if customer.cart is None:
        return frozenset()
    lines: dict[tuple[str, str | None], int] = defaultdict(int)
    for line in customer.cart.fields.get("line_items") or []:  # type: ignore[union-attr]
        assert isinstance(line, dict)
        variant = line.get("product_variant_id")
        lines[(str(line["product_id"]), None if variant is None else str(variant))] += int(
            line["quantity"]  # type: ignore[arg-type]
        )
    return frozenset(lines.items())


class CommerceOracle:
    """Each customer's cart and each order as Gist must hold them, from the commerce
    writes of the ended messages in the order they ended.

    A cart is a *set* of carts Gist may hold: one, as long as every change is known.
    A delta the worker skipped as ``cart_unknown`` (it does not know the cart, so it
    writes nothing) leaves the cart as it was, or, when an earlier attempt of the same
    message by a worker that crashed or lost the partition may have written it, with
    the delta applied; a write dead-lettered with an unknown fate likewise. A whole
    cart or an order sets it again. An order created again (an Order Completed seen
    again) leaves the one the store has as it is. A delta the worker delivered is applied to each
    cart of the set: the worker must have known the cart, never guessed it."""

    LIMIT = 64  # carts in a set; beyond, the customer is not checked (noted)

    def __init__(self) -> None:
        self.carts: dict[str, set[Cart] | None] = {}
        self.orders: dict[str, dict[str, str | None]] = {}
        self.allowed_orders: dict[tuple[str, str], set[str | None]] = defaultdict(set)
        self.maybe_orders: set[str] = set()

    def _carts(self, customer_id: str) -> set[Cart] | None:
        return self.carts.setdefault(customer_id, {frozenset()})

    def _after(self, op: Any, cart: Cart) -> Cart:
        if op.action == "cart":
            return _lines(op.items, frozenset())
        if op.action == "order":
            return frozenset()
        return _lines(op.items, cart, remove=op.action == "cart_remove")

    def ended(self, operations: Sequence[Operation], how: str, reason: str | None) -> None:
        """A message's end: ``delivered`` (written), or skipped / dead-lettered with
        ``reason`` (``maybe``: it may or may not have been written)."""
        for op in operations:
            if type(op).__name__ != "CommerceWrite":
                continue
            op_: Any = op
            written = how == "delivered"
            maybe = not written and (
                reason == "cart_unknown" or (how == "dead_lettered" and reason in UNCERTAIN)
            )
            if not (written or maybe):
                continue
            carts = self._carts(op_.customer_id)
            if op_.action != "order_update" and carts is not None:
                after = {self._after(op_, cart) for cart in carts}
                if op_.action in ("cart", "order"):
                    carts = after if written else carts | after
                else:
                    carts = after if written else carts | after
                self.carts[op_.customer_id] = carts if len(carts) <= self.LIMIT else None
            if op_.action in ("order", "order_update") and op_.order_id is not None:
                self._order(op_, written)

    def _order(self, op: Any, written: bool) -> None:
        order_id = str(op.order_id)
        values = {name: op.fields.get(name) for name in ORDER_FIELDS if name in op.fields}
        values = {k: (None if v is None else str(v)) for k, v in values.items()}
        if op.action == "order":
            values.setdefault("financial_status", "paid")
        if not written:
            self.maybe_orders.add(order_id)
            for name, value in values.items():
                self.allowed_orders[(order_id, name)].add(value)
            return
        if op.action == "order" and order_id in self.orders:
            return  # the store has it: an Order Completed seen again leaves it as it is
        if op.action == "order":
            self.orders[order_id] = {"refund_amount": None, **values}
            if order_id in self.maybe_orders:  # an unsure earlier create may be what holds
                return
        elif order_id in self.orders:
            self.orders[order_id].update(values)
        else:  # updated though its creation is unsure: the order may hold these values
            for name, value in values.items():
                self.allowed_orders[(order_id, name)].add(value)
            return
        for name in values:
            self.allowed_orders.pop((order_id, name), None)

    def differences(self, sandbox: Store, customers: Iterable[str]) -> list[str]:
        out = []
        for customer_id in sorted(customers):
            carts = self.carts.get(customer_id, {frozenset()})
            held = sandbox_cart(sandbox, customer_id)
            if carts is None:
                continue
            if held is None:
                held = frozenset()
            if held not in carts:
                shown = sorted(sorted(c) for c in carts)[:3]
                out.append(
                    f"cart of {customer_id}: sandbox {sorted(held)}, the delivered messages "
                    f"allow only {shown}"
                )
        shop = next(iter(sandbox.ecommerce.stores.values()), None)
        held_orders = shop.orders if shop is not None else {}
        for order_id in sorted(set(self.orders) | set(held_orders)):
            order = held_orders.get(order_id)
            want = self.orders.get(order_id)
            if order is None:
                if want is not None:
                    out.append(f"order {order_id}: delivered, not in the sandbox")
                continue
            if want is None:
                if order_id not in self.maybe_orders:
                    out.append(f"order {order_id}: in the sandbox, never delivered")
                continue
            got = {
                "order_total": str(order.fields.get("order_total")),
                "refund_amount": None
                if order.fields.get("refund_amount") is None
                else str(order.fields.get("refund_amount")),
                "financial_status": order.financial_status,
            }
            for name in ORDER_FIELDS:
                if name not in want:
                    continue
                if _same(got[name], want[name]) or any(
                    _same(got[name], v) for v in self.allowed_orders.get((order_id, name), ())
                ):
                    continue
                out.append(
                    f"order {order_id} {name}: sandbox {got[name]}, last delivered {want[name]}"
                )
        return out


def _same(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a is b
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b
