"""The JSON Schema of a rules file (config/mapping-rules.schema.json): generated from the
rules model, never stale, and agreeing with the loader on the files users write (with
the shorthands) and on mistakes it can see."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from destination.cli import main
from destination.commands.check_config import schema_text
from destination.mapping import RulesError, parse_rules
from destination.mapping._schema import rules_json_schema

REPO = Path(__file__).resolve().parents[2]
SCHEMA_FILE = REPO / "config" / "mapping-rules.schema.json"
SHIPPED = REPO / "config" / "mapping-rules.yaml"
EXAMPLES = sorted((REPO / "config" / "examples").glob("*.yaml"))
EDITOR_LINE = "# yaml-language-server: $schema=./mapping-rules.schema.json\n"

# The dialect the schema declares, and draft 7 for editors that know no newer one.
VALIDATORS = [jsonschema.Draft202012Validator, jsonschema.Draft7Validator]


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    return schema


def _schema_errors(text: str, validator: Any = jsonschema.Draft202012Validator) -> list[str]:
    document = yaml.safe_load(textwrap.dedent(text))  # as the loader reads YAML
    return [error.message for error in validator(_schema()).iter_errors(document)]


def _loader_accepts(text: str) -> bool:
    try:
        parse_rules(textwrap.dedent(text), "rules.yaml")
    except RulesError:
        return False
    return True


# Generated, committed, printed ---------------------------------------------------------


def test_the_committed_schema_is_what_the_command_prints(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["check-config", "--schema"]) == 0
    printed = capsys.readouterr().out
    assert printed == schema_text()
    assert SCHEMA_FILE.read_text(encoding="utf-8") == printed, (
        "config/mapping-rules.schema.json is stale: "
        "gist-destination check-config --schema > config/mapping-rules.schema.json"
    )
    assert json.loads(printed) == rules_json_schema()


def test_schema_takes_no_path(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--schema", str(SHIPPED)]) == 2
    assert "--schema takes no PATH" in capsys.readouterr().err


@pytest.mark.parametrize("validator", VALIDATORS, ids=lambda v: v.__name__)
def test_the_schema_is_a_valid_json_schema(validator: Any) -> None:
    validator.check_schema(_schema())


def test_the_schema_declares_its_dialect_and_describes_the_file() -> None:
    schema = _schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "gist-destination mapping rules"
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) >= {"identify", "track", "tags", "page", "group"}


def test_the_shipped_file_names_the_schema_for_editors() -> None:
    text = SHIPPED.read_text(encoding="utf-8")
    assert text.startswith(EDITOR_LINE)
    assert (SHIPPED.parent / "mapping-rules.schema.json").is_file()


# The files users have ------------------------------------------------------------------


@pytest.mark.parametrize("validator", VALIDATORS, ids=lambda v: v.__name__)
@pytest.mark.parametrize("path", [SHIPPED, *EXAMPLES], ids=lambda p: p.name)
def test_the_shipped_rules_and_examples_validate(path: Path, validator: Any) -> None:
    assert _schema_errors(path.read_text(encoding="utf-8"), validator) == []


# The loader and the schema agree -------------------------------------------------------

VALID = {
    "empty-file": "",
    "comments-only": "# nothing changed\n",
    "one-path-for-a-list": "identity: {user_id: userId, email: traits.email}\n",
    "one-pattern-for-a-list": "identify: {traits: {include: plan*, exclude: secret}}\n",
    "one-template-for-a-list": "page: {enabled: true, event: 'Viewed {name}'}\n",
    "sources": """\
        identify:
          fields:
            phone: traits.mobile
            name: [traits.name, [traits.first, traits.last]]
            tags: []
        """,
    "tag-rules": """\
        tags:
          traits:
            - tag: "plan-{traits.plan}"
            - untag: [trial, "trial-{traits.plan}"]
              when: {traits.trial: false, traits.plan: [team, null, 3]}
          events:
            - event: Subscription Cancelled
              untag: subscriber
            - event: [Order Completed, "re:purchase-.*"]
              tag: buyer
        """,
    "an-explicit-null-action": "tags: {traits: [{tag: null, untag: old}]}\n",
    "renames": """\
        identify: {traits: {rename: {Plan Type: plan_type, address.zip: zip}}}
        track: {events: {rename: {Order Completed: Purchase}}}
        group: {prefix: "", traits: {rename: {employees: company_size}}}
        """,
    "choices": "invalid_fields: drop\nvalues: {lists: join, nulls: drop, dates: keep}\n",
    "renames-replacing-the-defaults": """\
        identify: {traits: {rename: {replace: true, plan: tier}}}
        priorities: {events: {replace: false, Heartbeat: low}}
        """,
    "a-field-named-replace": "track: {properties: {rename: {Replace: replaced}}}\n",
}

INVALID = {
    "unknown-section": "identfy: {enabled: true}\n",
    "unknown-key": "track: {enabled: true, event: Purchase}\n",
    "a-bad-choice": "values: {lists: sometimes}\n",
    "another-version": "version: 2\n",
    "not-true-or-false": "alias: {enabled: maybe}\n",
    "a-number-for-a-path": "identity: {user_id: 5}\n",
    "an-empty-source": "identify: {fields: {name: [[]]}}\n",
    "a-section-that-is-a-list": "track: [enabled]\n",
    "not-a-mapping": "- identify\n",
    "tag-and-untag": "tags: {traits: [{tag: a, untag: b}]}\n",
    "neither-tag-nor-untag": "tags: {traits: [{when: {traits.vip: true}}]}\n",
    "an-event-rule-without-event": "tags: {events: [{tag: buyer}]}\n",
    "a-condition-on-an-object": "tags: {traits: [{tag: a, when: {traits.x: {y: 1}}}]}\n",
    "a-contact-field-as-custom-property": "identify: {traits: {rename: {mail: email}}}\n",
    "not-a-property-name": "track: {properties: {rename: {Plan: Plan Type}}}\n",
    "a-bad-prefix": "group: {prefix: Company-}\n",
    "an-empty-event-name": "track: {events: {rename: {Order Completed: ' '}}}\n",
    "an-empty-integration": "integration: ''\n",
    "replace-that-is-not-true-or-false": "track: {events: {rename: {replace: A}}}\n",
}


@pytest.mark.parametrize("text", VALID.values(), ids=VALID.keys())
def test_what_the_loader_takes_the_schema_takes(text: str) -> None:
    assert _loader_accepts(text)
    for validator in VALIDATORS:
        assert _schema_errors(text, validator) == []


@pytest.mark.parametrize("text", INVALID.values(), ids=INVALID.keys())
def test_mistakes_are_rejected_by_the_schema_as_by_the_loader(text: str) -> None:
    assert not _loader_accepts(text)
    for validator in VALIDATORS:
        assert _schema_errors(text, validator) != []


def test_the_schema_tells_an_editor_which_keys_exist() -> None:
    (message,) = _schema_errors("identify: {feilds: {}}\n")
    assert "feilds" in message
    track = _schema()["$defs"]["Track"]
    assert set(track["properties"]) == {"enabled", "events", "properties"}
    assert track["additionalProperties"] is False
