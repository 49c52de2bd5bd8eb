"""E-commerce writes (``CommerceWrite``): a customer, its products, then the order or cart.

One write is one step of the request lane (so in per-contact order with the contact's
upserts and events), made of the requests it needs, each through the rate limiter:

1. the customer (``POST .../customers``), unless this worker knows the store has it; a
   create Gist refuses (422: it exists, e.g. after a restart) is sent as the update
   instead. Without an e-mail in the message, the Gist contact's is read first;
2. each product (and variant) the write names that this worker has not seen in the store
   (created, or updated when it exists): a known product costs no request;
3. the order (create; an existing one is updated) or its update, or the cart.

**What this worker remembers, and when it forgets** (``Catalogue``): the customers and
products it created or found in the store (bounded, least recently used out); an
answer that says one is gone (404) forgets the write's customer and products, and the
write is made once more from step 1. Each customer's cart (``Carts``) is known only
from what this worker itself wrote for the partition the write came from: after a start,
a rebalance (the partition's carts are forgotten), a cart write that failed or whose
answer never came, or a delete of the contact, the cart is unknown, and a line added or
removed (``cart_unknown``, skipped) waits for the next whole cart (Cart Viewed,
Checkout Started) or order, which sets it again: never guessed. A customer this worker
created has an empty cart.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, cast

from destination import reasons
from destination.gist import (
    CartPayload,
    CustomerPayload,
    EcommerceStore,
    GistClient,
    LineItem,
    OrderPayload,
    OrderUpdate,
    PermanentError,
    ProductPayload,
    VariantPayload,
)
from destination.mapping import line_total
from destination.observability import metrics
from destination.operations import CommerceItem, CommerceWrite
from destination.pipeline.inflight import Failure, PartitionWork, Skip
from destination.pipeline.lanes.base import DirectStep, charge

KNOWN_MAX = 100_000
"""Customers, and products, remembered as in the store (each)."""

Line = tuple[int, Any]  # quantity, unit price (None: not sent)


class Catalogue:
    """What this worker knows the store has: customers and products (variants)."""

    def __init__(self, max_known: int = KNOWN_MAX) -> None:
        self.max_known = max_known
        self._customers: OrderedDict[str, None] = OrderedDict()
        self._products: OrderedDict[tuple[str, str | None], None] = OrderedDict()

    def has_customer(self, customer_id: str) -> bool:
        if customer_id in self._customers:
            self._customers.move_to_end(customer_id)
            return True
        return False

    def add_customer(self, customer_id: str) -> None:
        _add(self._customers, customer_id, self.max_known)

    def forget_customer(self, customer_id: str) -> None:
        self._customers.pop(customer_id, None)

    def has_product(self, key: tuple[str, str | None]) -> bool:
        if key in self._products:
            self._products.move_to_end(key)
            return True
        return False

    def add_product(self, key: tuple[str, str | None]) -> None:
        _add(self._products, key, self.max_known)

    def forget_products(self, items: Iterable[CommerceItem]) -> None:
        for item in items:
            self._products.pop((item.product_id, None), None)
            self._products.pop(item.key, None)


def _add(known: OrderedDict[Any, None], key: Any, limit: int) -> None:
    known[key] = None
    known.move_to_end(key)
    while len(known) > limit:
        known.popitem(last=False)


class Carts:
    """Each customer's cart as this worker last wrote it, for the partition it wrote
    it for (see the module docstring)."""

    def __init__(self, max_known: int = KNOWN_MAX) -> None:
        self.max_known = max_known
        self._carts: OrderedDict[str, tuple[PartitionWork, dict[tuple[str, str | None], Line]]]
        self._carts = OrderedDict()

    def __len__(self) -> int:
        return len(self._carts)

    def get(
        self, customer_id: str, partition: PartitionWork
    ) -> dict[tuple[str, str | None], Line] | None:
        """The customer's cart, when known for this partition (None: unknown)."""
        found = self._carts.get(customer_id)
        if found is None or found[0] is not partition or partition.revoked:
            return None
        return found[1]

    def set(
        self, customer_id: str, partition: PartitionWork, lines: dict[tuple[str, str | None], Line]
    ) -> None:
        if partition.revoked:
            return
        self._carts[customer_id] = (partition, lines)
        self._carts.move_to_end(customer_id)
        while len(self._carts) > self.max_known:
            self._carts.popitem(last=False)

    def forget(self, customer_id: str) -> None:
        self._carts.pop(customer_id, None)

    def revoke(self, partitions: Iterable[PartitionWork]) -> None:
        gone = frozenset(partitions)
        for customer_id in [c for c, (p, _) in self._carts.items() if p in gone]:
            del self._carts[customer_id]


class _Gone(Exception):
    """A 404 for what the write names: the catalogue was stale."""

    def __init__(self, error: PermanentError) -> None:
        super().__init__(str(error))
        self.error = error


class CommerceWriter:
    """Makes one ``CommerceWrite`` (see the module docstring)."""

    def __init__(
        self,
        client: GistClient,
        store: EcommerceStore,
        contact_written: Callable[[tuple[str, ...], PartitionWork], None] | None = None,
    ) -> None:
        """``contact_written(identities, partition)``: a customer write changed (or made)
        the Gist contact of its e-mail (contact memory forgets it)."""
        self.client = client
        self.store = store
        self.store_id = store.store_id
        self.catalogue = Catalogue()
        self.carts = Carts()
        self._contact_written = contact_written

    def forget(self, identities: Iterable[str]) -> None:
        """The contact is deleted: its customer and cart are no longer known."""
        for identity in identities:
            customer_id = identity[2:]
            self.catalogue.forget_customer(customer_id)
            self.carts.forget(customer_id)

    def revoke(self, partitions: Iterable[PartitionWork]) -> None:
        self.carts.revoke(partitions)

    async def write(self, step: DirectStep) -> Failure | Skip | None:
        op = step.operation
        assert isinstance(op, CommerceWrite)
        try:
            try:
                return await self._write(step, op)
            except _Gone:
                # The store lost what this worker remembered: forget it, and once more.
                self.catalogue.forget_customer(op.customer_id)
                self.catalogue.forget_products(op.items)
                try:
                    return await self._write(step, op)
                except _Gone as gone:
                    raise gone.error from None
        except BaseException:
            if op.action != "order_update":
                self.carts.forget(op.customer_id)  # not sure what Gist's cart holds now
            raise

    async def _write(self, step: DirectStep, op: CommerceWrite) -> Failure | Skip | None:
        lines: dict[tuple[str, str | None], Line] | None = None
        if op.action in ("cart_add", "cart_remove"):
            known = self.carts.get(op.customer_id, step.partition)
            if known is None and not self.catalogue.has_customer(op.customer_id):
                # A customer this worker creates has an empty cart: its first line counts.
                failed = await self._customer(step, op)
                if failed is not None:
                    return failed
                known = self.carts.get(op.customer_id, step.partition)
            if known is None:
                metrics.child(metrics.COMMERCE_WRITES, op.action, "cart_unknown").inc()
                return Skip(reasons.CART_UNKNOWN)
            lines = _changed(known, op)
            if lines == known:
                metrics.child(metrics.COMMERCE_WRITES, op.action, "unchanged").inc()
                return Skip(reasons.UNCHANGED)
        failed = await self._customer(step, op)
        if failed is not None:
            return failed
        for item in op.items:
            await self._product(step, item)
        if op.action == "order":
            await self._order(step, op)
            await self._set_cart(step, op, {})  # Gist leaves the cart: the order ends it
        elif op.action == "order_update":
            failed = await self._order_update(step, op)
            if failed is not None:
                return failed
        else:
            if lines is None:  # a whole cart
                lines = _changed({}, op)
            await self._set_cart(step, op, lines)
        metrics.child(metrics.COMMERCE_WRITES, op.action, "written").inc()
        return None

    # --- the requests -----------------------------------------------------------------
    def _options(self, step: DirectStep) -> dict[str, Any]:
        """A request for the step: counted, at its priority, gated by its partition."""
        op = step.operation
        assert isinstance(op, CommerceWrite)
        charge((step,))
        metrics.child(metrics.COMMERCE_REQUESTS, op.action).inc()
        return {"priority": op.priority, "dispatch": step.dispatch}

    async def _customer(self, step: DirectStep, op: CommerceWrite) -> Failure | None:
        customer_id = op.customer_id
        if self.catalogue.has_customer(customer_id):
            return None
        email = op.email
        if email is None:
            contact = await self.client.get_contact(user_id=op.user_id, **self._options(step))
            found = contact.get("email") if contact is not None else None
            if not isinstance(found, str) or not found:
                return Failure(
                    reason=reasons.NO_CUSTOMER_EMAIL,
                    detail="a Gist customer needs an e-mail: the message has none, and "
                    + (
                        "Gist has no contact of the user"
                        if contact is None
                        else "neither has the user's Gist contact"
                    ),
                )
            email = found
        payload = cast(
            CustomerPayload, {"customer_id": customer_id, "email_address": email, **op.customer}
        )
        created = True
        try:
            await self.client.create_customer(self.store_id, payload, **self._options(step))
        except PermanentError as error:
            if error.status != 422:
                raise
            update = {k: v for k, v in payload.items() if k != "customer_id"}
            found_customer = await self.client.update_customer(
                self.store_id, customer_id, cast(Any, update), **self._options(step)
            )
            if found_customer is None:
                raise
            created = False
        if self._contact_written is not None:
            self._contact_written(step.identities, step.partition)
        self.catalogue.add_customer(customer_id)
        if created:
            self.carts.set(customer_id, step.partition, {})  # a new customer's cart: empty
        return None

    async def _product(self, step: DirectStep, item: CommerceItem) -> None:
        client, store = self.client, self.store_id
        if not self.catalogue.has_product((item.product_id, None)):
            product: dict[str, Any] = {"product_id": item.product_id, "title": item.title}
            _details(product, item, with_price=item.variant_id is None)
            try:
                await client.create_product(
                    store, cast(ProductPayload, product), **self._options(step)
                )
            except PermanentError as error:
                if error.status != 422:
                    raise
                update = {k: v for k, v in product.items() if k != "product_id"}
                if (
                    await client.update_product(
                        store, item.product_id, cast(Any, update), **self._options(step)
                    )
                    is None
                ):
                    raise
            self.catalogue.add_product((item.product_id, None))
        if item.variant_id is None or self.catalogue.has_product(item.key):
            return
        variant: dict[str, Any] = {
            "product_variant_id": item.variant_id,
            "title": item.variant_title or item.title,
        }
        _details(variant, item, with_price=True)
        try:
            await client.create_variant(
                store, item.product_id, cast(VariantPayload, variant), **self._options(step)
            )
        except PermanentError as error:
            if error.status == 404:
                raise _Gone(error) from error  # the product is not in the store
            if error.status != 422:
                raise
            update = {k: v for k, v in variant.items() if k != "product_variant_id"}
            if (
                await client.update_variant(
                    store,
                    item.product_id,
                    item.variant_id,
                    cast(Any, update),
                    **self._options(step),
                )
                is None
            ):
                raise
        self.catalogue.add_product(item.key)

    def _currency(self, op: CommerceWrite) -> str:
        return op.currency or self.store.currency_code or "USD"

    async def _order(self, step: DirectStep, op: CommerceWrite) -> None:
        assert op.order_id is not None
        order = cast(
            OrderPayload,
            {
                "order_id": op.order_id,
                "customer_id": op.customer_id,
                "currency_code": self._currency(op),
                "line_items": _line_items(op.items),
                **op.fields,
            },
        )
        try:
            await self.client.create_order(self.store_id, order, **self._options(step))
        except PermanentError as error:
            if error.status == 404:
                raise _Gone(error) from error
            if error.status != 422:
                raise
            # Created before (a replay, a redelivery): the same values as an update.
            update = {k: v for k, v in order.items() if k not in ("order_id", "customer_id")}
            if (
                await self.client.update_order(
                    self.store_id, op.order_id, cast(OrderUpdate, update), **self._options(step)
                )
                is None
            ):
                raise

    async def _order_update(self, step: DirectStep, op: CommerceWrite) -> Failure | None:
        assert op.order_id is not None
        update: dict[str, Any] = dict(op.fields)
        if op.currency is not None:
            update["currency_code"] = op.currency
        if op.items:
            update["line_items"] = _line_items(op.items)
        try:
            found = await self.client.update_order(
                self.store_id, op.order_id, cast(OrderUpdate, update), **self._options(step)
            )
        except PermanentError as error:
            if error.status == 404:
                raise _Gone(error) from error  # a product the lines name
            raise
        if found is None:
            return Failure(
                reason=reasons.GIST_REJECTED,
                detail="the store has no such order (404): its Order Completed was not "
                "delivered (see the dead-letter topic) or went to another store",
                status=404,
            )
        return None

    async def _set_cart(
        self, step: DirectStep, op: CommerceWrite, lines: dict[tuple[str, str | None], Line]
    ) -> None:
        customer_id = op.customer_id
        known = self.carts.get(customer_id, step.partition)
        self.carts.forget(customer_id)  # until Gist says
        if not lines:
            if known != {}:
                await self.client.delete_cart(self.store_id, customer_id, **self._options(step))
            self.carts.set(customer_id, step.partition, {})
            return
        currency = self._currency(op)
        items = [
            CommerceItem(
                product_id=key[0], title=key[0], variant_id=key[1], price=price, quantity=quantity
            )
            for key, (quantity, price) in lines.items()
        ]
        cart: dict[str, Any] = {
            "currency_code": currency,
            "order_total": op.fields.get("order_total", line_total(items, currency))
            if op.action == "cart"
            else line_total(items, currency),
            "line_items": _line_items(items),
        }
        if op.fields.get("updated_at") is not None:
            cart["updated_at"] = op.fields["updated_at"]
        try:
            await self.client.upsert_cart(
                self.store_id, customer_id, cast(CartPayload, cart), **self._options(step)
            )
        except PermanentError as error:
            if error.status == 404:
                raise _Gone(error) from error
            raise
        self.carts.set(customer_id, step.partition, lines)


def _changed(
    known: dict[tuple[str, str | None], Line], op: CommerceWrite
) -> dict[tuple[str, str | None], Line]:
    """The cart after ``op``: its lines added (or, ``cart_remove``, taken out: quantity 0
    is the whole line) to ``known``."""
    lines = dict(known)
    for item in op.items:
        quantity, price = lines.get(item.key, (0, None))
        if op.action == "cart_remove":
            left = 0 if item.quantity == 0 else quantity - item.quantity
            if left > 0:
                lines[item.key] = (left, price)
            else:
                lines.pop(item.key, None)
        else:
            lines[item.key] = (
                quantity + item.quantity,
                item.price if item.price is not None else price,
            )
    return lines


def _line_items(items: Iterable[CommerceItem]) -> list[LineItem]:
    out: list[LineItem] = []
    for item in items:
        line: dict[str, Any] = {"product_id": item.product_id, "quantity": item.quantity}
        if item.variant_id is not None:
            line["product_variant_id"] = item.variant_id
        if item.price is not None:
            line["price"] = item.price
        out.append(cast(LineItem, line))
    return out


def _details(record: dict[str, Any], item: CommerceItem, *, with_price: bool) -> None:
    for name, value in (
        ("sku", item.sku),
        ("product_url", item.url),
        ("image_url", item.image_url),
        ("vendor", item.vendor),
    ):
        if value is not None:
            record[name] = value
    if with_price and item.price is not None:
        record["price"] = item.price
