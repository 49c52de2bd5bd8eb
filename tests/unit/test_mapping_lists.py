"""Lists of objects reach Gist in a shape it keeps (columns, by default), and nothing is
left out of a sent message without a word: each field dropped is told to the mapper's
``on_dropped`` (by default ``fields_dropped_total``) and shown by ``map``."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from destination.cli import main
from destination.mapping import FIELD_DROPS, Mapper, Rules, parse_rules
from destination.operations import ContactUpsert, EventTrack, Mapped, Rejected

ORDER = {
    "type": "track",
    "userId": "u-1",
    "event": "Order Completed",
    "properties": {
        "order_id": "o-9",
        "products": [
            {"product_id": "p1", "sku": "s-1", "price": 10, "quantity": 2},
            {"product_id": "p2", "price": 22.5, "brand": {"name": "Acme"}, "tags": ["a"]},
        ],
    },
}


class Drops:
    """An ``on_dropped`` that keeps what it is told."""

    def __init__(self) -> None:
        self.told: list[tuple[str, str, str]] = []

    def __call__(self, message_type: str, field: str, reason: str) -> None:
        self.told.append((message_type, field, reason))


def mapper(rules: str = "", drops: Drops | None = None) -> Mapper:
    parsed = parse_rules(textwrap.dedent(rules)) if rules else Rules()
    return Mapper(parsed, on_dropped=drops or Drops())


def properties(message: dict[str, Any], rules: str = "", drops: Drops | None = None) -> Any:
    result = mapper(rules, drops).map(message)
    assert isinstance(result, Mapped), result
    (op,) = result.operations
    if isinstance(op, EventTrack):
        return op.event.get("properties", {})
    assert isinstance(op, ContactUpsert)
    return op.contact.get("custom_properties", {})


# The shape -------------------------------------------------------------------------


def test_the_issues_products_are_kept_not_emptied() -> None:
    message = {"type": "track", "userId": "u-1", "event": "E",
               "properties": {"products": [{"product_id": "p1", "price": 10}]}}  # fmt: skip
    assert properties(message) == {"products_product_id": ["p1"], "products_price": [10]}


def test_each_field_of_the_objects_is_a_column_in_list_order() -> None:
    drops = Drops()
    assert properties(ORDER, drops=drops) == {
        "order_id": "o-9",
        "products_product_id": ["p1", "p2"],
        "products_sku": ["s-1", None],  # null where an object lacks the field
        "products_price": [10, 22.5],
        "products_quantity": [2, None],
        "products_brand_name": [None, "Acme"],  # nested objects flattened
        "products_tags": [None, '["a"]'],  # a list inside an object: JSON text
    }
    assert drops.told == []


def test_a_lists_other_items_stay_under_its_name() -> None:
    traits = {"mixed": [1, {"a": "x"}, [2, 3], None, {"b": True}, "2024-03-01T10:00:00Z"]}
    sent = properties({"type": "identify", "userId": "u-1", "traits": traits})
    assert sent == {
        "mixed": [1, "[2,3]", None, 1709287200],
        "mixed_a": ["x", None],
        "mixed_b": [None, True],
    }


def test_columns_follow_the_value_rules() -> None:
    traits = {"items": [{"at": "2024-03-01T10:00:00Z", "n": None}, {"at": "x", "n": 1}]}
    message = {"type": "identify", "userId": "u-1", "traits": traits}
    assert properties(message, "values: {lists: join}") == {
        "items_at": "1709287200,x",
        "items_n": ",1",
    }
    # nulls: drop leaves a null column item in place (the items keep their objects' order)
    assert properties(message, "values: {nulls: drop, dates: keep}") == {
        "items_at": ["2024-03-01T10:00:00Z", "x"],
        "items_n": [None, 1],
    }


def test_patterns_and_renames_see_a_columns_field_as_list_dot_field() -> None:
    rules = """
        track:
          properties:
            exclude: [products.sku, products.brand]
            rename: {products.price: prices}
        """
    assert properties(ORDER, rules) == {
        "order_id": "o-9",
        "products_product_id": ["p1", "p2"],
        "prices": [10, 22.5],
        "products_quantity": [2, None],
        "products_tags": [None, '["a"]'],
    }
    only = "track: {properties: {include: [products.product_id]}}"
    assert properties(ORDER, only) == {"products_product_id": ["p1", "p2"]}


def test_json_keeps_each_object_as_text() -> None:
    message = {"type": "track", "userId": "u-1", "event": "E",
               "properties": {"products": [{"product_id": "p1"}, 3]}}  # fmt: skip
    assert properties(message, "values: {list_objects: json}") == {
        "products": ['{"product_id":"p1"}', 3]
    }


def test_a_column_named_like_a_contact_field_is_an_invalid_field() -> None:
    message = {"type": "identify", "userId": "u-1", "traits": {"custom": [{"properties": 1}]}}
    result = mapper().map(message)
    assert isinstance(result, Rejected)
    assert result.reason == "invalid_field"
    assert "traits.custom.properties" in result.detail
    assert "'custom_properties'" in result.detail


def test_a_column_that_collides_with_a_field_of_another_value_is_an_invalid_field() -> None:
    message = {"type": "track", "userId": "u-1", "event": "E",
               "properties": {"products_price": 5, "products": [{"price": 10}]}}  # fmt: skip
    result = mapper().map(message)
    assert isinstance(result, Rejected)
    assert "both become property 'products_price'" in result.detail
    same = {"type": "track", "userId": "u-1", "event": "E",
            "properties": {"products_price": [10], "products": [{"price": 10}]}}  # fmt: skip
    assert properties(same) == {"products_price": [10]}


# Nothing dropped without a word ------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "message", "sent", "told"),
    [
        (
            "values: {list_objects: drop}",
            ORDER,
            {"order_id": "o-9", "products": []},
            [("track", "properties.products", "list_objects")],
        ),
        (
            "values: {lists: drop}",
            {"type": "identify", "userId": "u-1",
             "traits": {"langs": ["en"], "orders": [{"id": 1}], "plan": "pro"}},
            {"plan": "pro"},
            [("identify", "traits.langs", "lists"), ("identify", "traits.orders", "lists")],
        ),
        (
            "",
            {"type": "identify", "userId": "u-1",
             "traits": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": {"j": 1}}}}}}}}},
                        "k": 1}},
            {"k": 1},
            [("identify", "traits.a.b.c.d.e.f.g.h.i", "too_deep")],
        ),
        (
            "",
            {"type": "track", "userId": "u-1", "event": "E",
             "properties": {"$$": 1, "%": {"x": 1}, "ok": 2}},
            {"ok": 2},
            [("track", "properties.$$", "no_name"), ("track", "properties.%", "no_name")],
        ),
        (
            "invalid_fields: drop",
            {"type": "identify", "userId": "u-1", "timestamp": "yesterday",
             "traits": {"big": 2**64, "plan": "pro", "phone": True}},
            {"plan": "pro"},
            [("identify", "traits.phone", "invalid_field"),
             ("identify", "traits.big", "invalid_field"),
             ("identify", "timestamp", "invalid_field")],
        ),
        (
            "invalid_fields: drop",
            {"type": "track", "userId": "u-1", "event": "E",
             "properties": {"Plan Type": "a", "plan_type": "b", "ok": 1}},
            {"ok": 1},
            [("track", "properties property plan_type", "invalid_field")],
        ),
    ],
    ids=["list_objects-drop", "lists-drop", "too-deep", "no-name", "invalid", "collision"],
)  # fmt: skip
def test_each_field_left_out_is_told(
    rules: str, message: dict[str, Any], sent: dict[str, Any], told: list[Any]
) -> None:
    drops = Drops()
    assert properties(message, rules, drops) == sent
    assert drops.told == told
    assert {reason for _, _, reason in told} <= set(FIELD_DROPS)


def test_a_message_not_sent_tells_nothing() -> None:
    drops = Drops()
    lists_off = mapper("values: {lists: drop}\ntrack: {events: {exclude: E}}", drops)
    message = {"type": "track", "userId": "u-1", "event": "E", "properties": {"l": [1]}}
    assert not isinstance(lists_off.map(message), Mapped)  # skipped
    rejected = {"type": "identify", "traits": {"l": [1]}}  # no identity
    assert isinstance(lists_off.map(rejected), Rejected)
    assert drops.told == []
    # and what one message dropped is not told again with the next
    assert isinstance(lists_off.map({**message, "event": "F"}), Mapped)
    assert isinstance(lists_off.map({**message, "event": "F", "properties": {}}), Mapped)
    assert drops.told == [("track", "properties.l", "lists")]


def test_the_default_report_counts_fields_dropped_total() -> None:
    labels = {"type": "track", "reason": "list_objects"}
    before = REGISTRY.get_sample_value("gist_destination_fields_dropped_total", labels) or 0.0
    counting = Mapper(parse_rules("values: {list_objects: drop}"))
    assert isinstance(counting.map(ORDER), Mapped)
    after = REGISTRY.get_sample_value("gist_destination_fields_dropped_total", labels)
    assert after == before + 1


def test_map_shows_the_fields_left_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "m.jsonl"
    source.write_bytes(orjson.dumps(ORDER))
    rules = tmp_path / "rules.yaml"
    rules.write_text("values: {list_objects: drop}\n")
    assert main(["map", str(source), "--rules", str(rules), "--format", "json"]) == 0
    (row,) = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["outcome"] == "sent"
    assert row["dropped"] == [
        {"field": "properties.products", "reason": "list_objects",
         "detail": FIELD_DROPS["list_objects"]},
    ]  # fmt: skip
    assert main(["map", str(source), "--rules", str(rules), "--format", "table"]) == 0
    table = capsys.readouterr().out
    assert "dropped properties.products (list_objects)" in table
    assert "1 field(s) dropped, 1 sent" in table
    # The shipped rules drop nothing of it.
    assert main(["map", str(source), "--format", "json"]) == 0
    assert "dropped" not in orjson.loads(capsys.readouterr().out)
