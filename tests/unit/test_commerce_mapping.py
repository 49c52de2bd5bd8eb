"""Segment's E-commerce Spec (v2) events mapped to Gist e-commerce writes; what ``plan``
counts for them; the cart and catalogue bookkeeping of the writer."""

from __future__ import annotations

from typing import Any

import pytest

from destination.commands.plan import commerce_cost
from destination.mapping import Mapper, line_total, parse_rules
from destination.operations import (
    CommerceItem,
    CommerceWrite,
    EventTrack,
    Mapped,
    Rejected,
)
from destination.pipeline.lanes.commerce import Carts, Catalogue, _changed

STORE = "ecommerce:\n  store: {name: Acme, domain: shop.acme.com, currency: USD}\n"
TS = "2026-12-01T10:00:00.000Z"


def mapper(extra: str = "") -> Mapper:
    return Mapper(parse_rules(STORE + extra), on_dropped=lambda *_: None)


def track(event: str, **properties: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "userId": "u1",
        "event": event,
        "timestamp": TS,
        "messageId": "m1",
        "context": {"traits": {"email": "a@b.co", "firstName": "Ada"}},
        "properties": properties,
    }


def write_of(result: Any) -> CommerceWrite:
    assert isinstance(result, Mapped), result
    found = [op for op in result.operations if isinstance(op, CommerceWrite)]
    assert len(found) == 1
    return found[0]


SHOE = {"product_id": 501, "sku": "SH-42", "name": "Shoe", "variant": "42", "price": "59.99"}


def test_order_completed_is_an_order_with_lines_totals_and_the_message_time() -> None:
    write = write_of(mapper().map(track(
        "Order Completed", order_id=9001, total=127.97, revenue=119.98, shipping=5,
        tax=2.99, discount=0, currency="usd", products=[{**SHOE, "quantity": 2}],
    )))  # fmt: skip
    assert write.action == "order"
    assert write.order_id == "9001"  # ids as strings
    assert write.currency == "USD"
    assert write.customer_id == "u1"
    assert write.customer == {"first_name": "Ada"}
    assert write.fields == {
        "order_total": 127.97,
        "tax_total": 2.99,
        "shipping_total": 5,
        "discount_total": 0,
        "financial_status": "paid",
        "processed_at": "2026-12-01T10:00:00Z",
    }
    (item,) = write.items
    assert item == CommerceItem(
        product_id="501", title="Shoe", variant_id="SH-42", variant_title="42",
        price=59.99, quantity=2, sku="SH-42",
    )  # fmt: skip
    assert write.timestamp is not None


def test_an_order_without_a_total_is_the_sum_of_its_lines_in_the_currencys_unit() -> None:
    lines = [{"product_id": "p", "price": 19.99, "quantity": 3}]
    write = write_of(mapper().map(track("Order Completed", order_id="o", products=lines)))
    assert write.fields["order_total"] == 59.97  # not 59.970000000000006
    yen = [CommerceItem("p", "p", price=333, quantity=3)]
    assert line_total(yen, "JPY") == 999


@pytest.mark.parametrize(
    ("event", "properties", "expected"),
    [
        ("Order Refunded", {"order_id": "o", "total": 30},
         {"refund_amount": 30, "financial_status": "refunded"}),
        ("Order Refunded", {"order_id": "o", "total": 10, "products": [{"product_id": "p"}]},
         {"refund_amount": 10, "financial_status": "partially_refunded"}),
        ("Order Cancelled", {"order_id": "o", "total": 99.5},
         {"refund_amount": 99.5, "financial_status": "cancelled",
          "cancelled_at": "2026-12-01T10:00:00Z"}),
        ("Order Updated", {"order_id": "o", "total": 12, "tax": 1},
         {"order_total": 12, "tax_total": 1}),
    ],
)  # fmt: skip
def test_order_updates_carry_status_refund_and_cancellation(
    event: str, properties: dict[str, Any], expected: dict[str, Any]
) -> None:
    write = write_of(mapper().map(track(event, **properties)))
    assert write.action == "order_update"
    assert {k: v for k, v in write.fields.items() if k != "updated_at"} == expected
    assert write.items == ()


def test_cart_events_are_lines_or_whole_carts_at_the_carts_priority() -> None:
    added = write_of(mapper().map(track("Product Added", cart_id="c", quantity=3, **SHOE)))
    assert added.action == "cart_add"
    assert added.items[0].quantity == 3
    removed = write_of(mapper().map(track("Product Removed", product_id="p")))
    assert removed.action == "cart_remove"
    assert removed.items[0].quantity == 0  # no quantity: the whole line
    viewed = write_of(mapper().map(track("Cart Viewed", products=[SHOE, {"product_id": 2}])))
    assert viewed.action == "cart"
    assert [i.product_id for i in viewed.items] == ["501", "2"]
    assert viewed.priority.label == "low"
    order = write_of(mapper().map(track("Order Completed", order_id="o")))
    assert order.priority.label == "normal"


def test_the_plain_event_is_sent_too_unless_the_rules_say_not() -> None:
    both = mapper().map(track("Order Completed", order_id="o"))
    assert isinstance(both, Mapped)
    assert [type(op) for op in both.operations] == [EventTrack, CommerceWrite]
    only = mapper("  send_events: false\n").map(track("Order Completed", order_id="o"))
    assert isinstance(only, Mapped)
    assert [type(op) for op in only.operations] == [CommerceWrite]


def test_without_a_store_commerce_events_are_plain_events() -> None:
    result = Mapper(parse_rules(""), on_dropped=lambda *_: None).map(
        track("Order Completed", order_id="o")
    )
    assert isinstance(result, Mapped)
    assert [type(op) for op in result.operations] == [EventTrack]


@pytest.mark.parametrize(
    ("properties", "field"),
    [
        ({"products": [{"name": "no id"}]}, "properties.products[0].product_id"),
        ({"total": -5}, "properties.total"),
        ({"products": [{"product_id": "p", "quantity": 1.5}]},
         "properties.products[0].quantity"),
        ({"currency": "dollars"}, "properties.currency"),
        ({"products": "p-1"}, "properties.products"),
    ],
)  # fmt: skip
def test_what_gist_cannot_take_is_an_invalid_field_or_dropped(
    properties: dict[str, Any], field: str
) -> None:
    rejected = mapper().map(track("Order Completed", order_id="o", **properties))
    assert isinstance(rejected, Rejected)
    assert rejected.reason == "invalid_field"
    assert field in rejected.detail
    dropped: list[tuple[str, str, str]] = []
    lenient = Mapper(
        parse_rules(STORE + "invalid_fields: drop\n"),
        on_dropped=lambda *d: dropped.append(d),
    )
    write = write_of(lenient.map(track("Order Completed", order_id="o", **properties)))
    assert write.order_id == "o"
    assert any(f == field for _, f, _ in dropped), dropped


def test_an_order_event_without_an_order_id_is_rejected() -> None:
    rejected = mapper().map(track("Order Completed", total=5))
    assert isinstance(rejected, Rejected)
    assert "properties.order_id" in rejected.detail


def test_the_rules_name_one_store_and_a_real_currency() -> None:
    from destination.mapping import RulesError

    with pytest.raises(RulesError, match="not both"):
        parse_rules(STORE + "  store_id: '7'\n")
    with pytest.raises(RulesError, match="ISO 4217"):
        parse_rules("ecommerce:\n  store: {name: A, domain: a.co, currency: usd}\n")
    assert parse_rules("ecommerce:\n  store_id: 7\n").ecommerce.store_id == "7"


def test_plan_counts_an_order_and_the_records_it_needs_once() -> None:
    write = write_of(mapper().map(track("Order Completed", order_id="o", products=[SHOE])))
    known: set[Any] = set()
    # The order, the cart cleared, the customer, the product and its variant.
    assert commerce_cost(write, known) == 5
    assert commerce_cost(write, known) == 2


class _Partition:
    revoked = False


def test_a_cart_is_known_only_for_the_partition_that_wrote_it_until_it_is_revoked() -> None:
    carts = Carts()
    mine, other = _Partition(), _Partition()
    carts.set("u1", mine, {("p", None): (1, 5)})  # type: ignore[arg-type]
    assert carts.get("u1", mine) == {("p", None): (1, 5)}  # type: ignore[arg-type]
    assert carts.get("u1", other) is None  # type: ignore[arg-type]
    carts.revoke([mine])  # type: ignore[list-item]
    assert carts.get("u1", mine) is None  # type: ignore[arg-type]


def test_cart_lines_add_and_remove_by_product_and_variant() -> None:
    add = CommerceWrite("cart_add", "u1", items=(CommerceItem("p", "P", "v", price=2),))
    one = _changed({}, add)
    two = _changed(one, add)
    assert two == {("p", "v"): (2, 2)}
    # A removal without a quantity (mapped as 0) takes the whole line out.
    remove_all = CommerceWrite(
        "cart_remove", "u1", items=(CommerceItem("p", "P", "v", quantity=0),)
    )
    assert _changed(two, remove_all) == {}
    partial = CommerceWrite(
        "cart_remove", "u1", items=(CommerceItem("p", "P", "v", quantity=1),)
    )
    assert _changed(two, partial) == {("p", "v"): (1, 2)}


def test_the_catalogue_is_bounded_and_forgets_what_a_404_disproved() -> None:
    catalogue = Catalogue(max_known=2)
    for product in ("a", "b", "c"):
        catalogue.add_product((product, None))
    assert not catalogue.has_product(("a", None))  # the least recently used went
    assert catalogue.has_product(("c", None))
    catalogue.forget_products([CommerceItem("c", "C")])
    assert not catalogue.has_product(("c", None))
