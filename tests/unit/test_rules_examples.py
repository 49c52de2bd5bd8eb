"""Every rules example an operator is shown (the README's ```yaml blocks, the files in
``config/examples/``) is run through ``gist-destination map`` on messages shaped as
Segment's and RudderStack's libraries send them: none of them may be rejected, and the
shipped defaults an example does not name (Segment's ``id`` and ``avatar`` traits) keep
working under it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from destination.cli import main

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
EXAMPLES = sorted((REPO / "config" / "examples").glob("*.yaml"))
_YAML_BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.MULTILINE | re.DOTALL)


def readme_examples() -> list[str]:
    return _YAML_BLOCK.findall(README.read_text(encoding="utf-8"))


TS = "2026-11-01T12:00:00.000Z"
MESSAGES: list[dict[str, Any]] = [
    # The identify: Segment's id and avatar traits beside an email.
    {"type": "identify", "userId": "u1",
     "traits": {"id": "abc", "avatar": "http://x/a.png", "email": "a@b.co"}},
    {"type": "identify", "messageId": "m-1", "userId": "u-42", "timestamp": TS,
     "traits": {"email": "Ada@Example.com", "firstName": "Ada", "lastName": "Lovelace",
                "phone": "+44 20 7946 0000", "createdAt": "2024-03-01T10:00:00Z",
                "plan": "pro", "address": {"city": "London", "country": "UK"},
                "unsubscribed": False, "tags": ["beta"], "vip": True},
     "context": {"ip": "203.0.113.7", "userAgent": "Mozilla/5.0"}},
    # rudder-sdk-python: traits only in context.traits.
    {"type": "identify", "userId": "u-7", "channel": "server",
     "integrations": {"All": True}, "timestamp": TS,
     "context": {"traits": {"email": "r@x.io", "name": "Rudder", "plan": "team", "id": "db-7"},
                 "library": {"name": "analytics-python", "version": "2.0.0"}}},
    {"type": "track", "messageId": "m-2", "userId": "u-42", "event": "Order Completed",
     "timestamp": TS, "context": {"traits": {"email": "ada@example.com"}},
     "properties": {"order_id": "o-9", "revenue": 42.5, "currency": "EUR",
                    "products": [{"product_id": "p1", "sku": "s-1", "price": 10,
                                  "quantity": 2},
                                 {"product_id": "p2", "price": 22.5}]}},
    {"type": "track", "userId": "u-42", "event": "Heartbeat"},
    {"type": "page", "userId": "u-42", "name": "Pricing",
     "properties": {"path": "/pricing", "url": "https://x.io/pricing", "title": "Pricing",
                    "referrer": "", "search": ""}},
    {"type": "screen", "userId": "u-42", "name": "Home"},
    {"type": "group", "userId": "u-42", "groupId": "g-1",
     "traits": {"name": "Acme", "plan": "team", "employees": 40,
                "address": {"city": "Paris"}}},
    {"type": "alias", "previousId": "anon-1", "userId": "u-42"},
    {"type": "delete", "userId": "u-42"},
    {"type": "identify", "userId": "u-42",
     "traits": {"email": "ada@example.com", "order_completed_last_30days": True},
     "context": {"personas": {"computation_class": "audience",
                              "computation_key": "order_completed_last_30days"}}},
]  # fmt: skip


def map_rows(rules: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> list[Any]:
    source = tmp_path / "messages.jsonl"
    source.write_bytes(b"\n".join(orjson.dumps(m) for m in MESSAGES))
    code = main(["map", str(source), "--rules", str(rules), "--format", "json", "--strict"])
    captured = capsys.readouterr()
    assert code == 0, captured.err  # --strict: no message rejected
    rows = [orjson.loads(line) for line in captured.out.splitlines()]
    assert len(rows) == len(MESSAGES)
    return rows


def test_the_readme_has_rules_examples() -> None:
    assert readme_examples()


@pytest.mark.parametrize("number", range(len(readme_examples())))
def test_each_readme_example_maps_every_message(
    number: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(readme_examples()[number], encoding="utf-8")
    rows = map_rows(rules, tmp_path, capsys)
    assert [r for r in rows if r["outcome"] == "rejected"] == []
    if "replace: true" not in readme_examples()[number]:  # the default renames are kept
        (upsert,) = rows[0]["operations"]
        custom = upsert["contact"]["custom_properties"]
        assert (custom["segment_id"], custom["avatar_url"]) == ("abc", "http://x/a.png")


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_each_example_file_maps_every_message(
    path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = map_rows(path, tmp_path, capsys)
    assert [r for r in rows if r["outcome"] == "rejected"] == []


def test_strict_fails_when_a_message_is_rejected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "messages.jsonl"
    source.write_bytes(b"\n".join(orjson.dumps(m) for m in MESSAGES[:3]))
    rules = tmp_path / "rules.yaml"
    rules.write_text("identify: {traits: {rename: {replace: true}}}\n")  # id is invalid
    assert main(["map", str(source), "--rules", str(rules)]) == 0  # results, not failures
    capsys.readouterr()
    for output in ("json", "table"):
        code = main(["map", str(source), "--rules", str(rules), "--strict", "--format", output])
        captured = capsys.readouterr()
        assert code == 1
        assert captured.err == "gist-destination map: 2 of 3 message(s) rejected (--strict)\n"
        assert "invalid_field" in captured.out  # every row is still printed
