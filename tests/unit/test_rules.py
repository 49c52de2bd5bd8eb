"""Loading rules files: the shipped default, operators' short files, and precise errors
(file, line, key path, what was expected) for everything wrong at once."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from destination.cli import main
from destination.gist import Priority
from destination.mapping import (
    Mapper,
    Rules,
    RulesError,
    RulesProblem,
    default_rules_path,
    load_rules,
    parse_rules,
)
from destination.operations import EventTrack, Mapped

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "config" / "mapping-rules.yaml"
EXAMPLES = sorted((REPO / "config" / "examples").glob("*.yaml"))


def problems(text: str) -> list[RulesProblem]:
    with pytest.raises(RulesError) as caught:
        parse_rules(textwrap.dedent(text).lstrip("\n"), "rules.yaml")
    return caught.value.errors


# The shipped file --------------------------------------------------------------------


def test_the_shipped_file_spells_out_the_built_in_defaults() -> None:
    assert load_rules(None) == Rules()
    assert load_rules(SHIPPED) == Rules()


def test_the_packaged_default_is_a_relative_link_to_the_shipped_file() -> None:
    packaged = REPO / "destination" / "mapping" / "default_rules.yaml"
    assert packaged.is_symlink()
    assert os.readlink(packaged) == "../../config/mapping-rules.yaml"
    assert default_rules_path().resolve() == SHIPPED.resolve()


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_the_examples_are_valid_and_differ_from_the_default(path: Path) -> None:
    assert load_rules(path) != Rules()


def test_there_are_examples() -> None:
    assert {p.name for p in EXAMPLES} >= {
        "page-and-screen.yaml",
        "group-traits.yaml",
        "filters-renames-tags.yaml",
    }


def test_the_page_example_sends_only_the_listed_properties() -> None:
    mapper = Mapper(load_rules(REPO / "config" / "examples" / "page-and-screen.yaml"))
    result = mapper.map(
        {
            "type": "page",
            "userId": "u-1",
            "name": "Pricing",
            "properties": {"path": "/p", "search": "?email=a@x.io"},
        }
    )
    assert result == Mapped(
        "page",
        (
            EventTrack(
                {
                    "event_name": "Viewed Pricing Page",
                    "user_id": "u-1",
                    "properties": {"path": "/p"},
                },
                priority=Priority.LOW,
            ),
        ),
    )


def test_an_empty_file_is_the_default() -> None:
    assert parse_rules("") == Rules()
    assert parse_rules("# only comments\n") == Rules()


def test_a_short_file_changes_only_what_it_names() -> None:
    rules = parse_rules("page: {enabled: true}\nvalues: {nulls: drop}\n")
    assert rules.page.enabled
    assert rules.page.event == Rules().page.event
    assert rules.values.nulls == "drop"
    assert rules.values.lists == "keep"
    assert rules.identify == Rules().identify


def test_a_short_priorities_section_changes_only_what_it_names() -> None:
    rules = parse_rules('priorities: {types: {page: normal}, events: {"Order *": high}}\n')
    assert rules.priorities.types.page == "normal"
    assert rules.priorities.types.identify == "high"
    assert rules.priorities.events == {"Order *": "high"}
    assert rules.priorities.audiences == "high"
    assert rules.page == Rules().page


# Rule maps add to their defaults ---------------------------------------------------------


def test_a_rename_adds_to_the_default_renames() -> None:
    rules = parse_rules("identify: {traits: {rename: {plan: subscription_plan}}}")
    assert rules.identify.traits.rename == {
        "plan": "subscription_plan",
        "id": "segment_id",
        "avatar": "avatar_url",
    }


def test_a_files_entry_takes_the_place_of_the_default_one_whatever_its_case() -> None:
    rules = parse_rules("identify: {traits: {rename: {ID: db_id}}}")
    assert rules.identify.traits.rename == {"ID": "db_id", "avatar": "avatar_url"}


def test_replace_true_keeps_only_the_files_entries() -> None:
    rules = parse_rules("identify: {traits: {rename: {replace: true, plan: tier}}}")
    assert rules.identify.traits.rename == {"plan": "tier"}
    kept = parse_rules("identify: {traits: {rename: {replace: false, plan: tier}}}")
    assert kept.identify.traits.rename == {"plan": "tier", **Rules().identify.traits.rename}


def test_an_empty_map_clears_the_defaults_as_it_always_did() -> None:
    assert parse_rules("identify: {traits: {rename: {}}}").identify.traits.rename == {}


def test_every_rule_map_takes_replace() -> None:
    rules = parse_rules(
        """
        track:
          events: {rename: {replace: true, A: B}}
          properties: {rename: {replace: false, a: b}}
        priorities: {events: {replace: true, Heartbeat: low}}
        """
    )
    assert rules.track.events.rename == {"A": "B"}
    assert rules.track.properties.rename == {"a": "b"}
    assert rules.priorities.events == {"Heartbeat": "low"}


def test_replace_must_be_true_or_false() -> None:
    (problem,) = problems(
        """
        identify:
          traits:
            rename: {replace: tier}
        """
    )
    assert (problem.line, problem.path) == (3, "identify.traits.rename")
    assert problem.message.startswith("replace: expected true or false")
    assert "'Replace'" in problem.message  # how to rename a field named replace


def warnings_of(text: str) -> list[tuple[int | None, str, str]]:
    found: list[RulesProblem] = []
    parse_rules(textwrap.dedent(text).lstrip("\n"), "rules.yaml", found)
    return [(w.line, w.path, w.message) for w in found]


def test_no_warnings_for_the_shipped_file_or_a_file_that_only_adds() -> None:
    found: list[RulesProblem] = []
    load_rules(SHIPPED, found)
    assert found == []
    assert warnings_of("identify: {traits: {rename: {plan: tier, id: segment_id}}}") == []


def test_warnings_name_what_shadows_or_drops_a_default() -> None:
    assert warnings_of(
        """
        identify:
          traits:
            rename:
              Id: db_id
              plan: avatar_url
        group: {traits: {rename: {}}}
        """
    ) == [
        (4, "identify.traits.rename.Id", "takes the place of the default entry id: segment_id"),
        (
            5,
            "identify.traits.rename.plan",
            "gives 'avatar_url' as the default entry avatar: avatar_url does: a message with "
            "both plan and avatar (different values) has an invalid field",
        ),
    ]
    ((line, path, message),) = warnings_of("identify: {traits: {rename: {replace: true}}}")
    assert (line, path) == (1, "identify.traits.rename")
    assert message == (
        "replace: true drops the default entries id: segment_id, avatar: avatar_url "
        "(fields named id, avatar are then invalid fields unless excluded)"
    )
    ((_, _, cleared),) = warnings_of("identify: {traits: {rename: {}}}")
    assert cleared.startswith("{} drops the default entries id: segment_id")


def test_check_config_prints_warnings_and_stays_valid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("identify:\n  traits:\n    rename: {id: db_id}\n")
    assert main(["check-config", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{path}: valid: ")
    assert captured.err == (
        f"{path}:3: identify.traits.rename.id: warning: takes the place of the default "
        "entry id: segment_id\n"
    )


def test_one_item_where_a_list_is_expected() -> None:
    rules = parse_rules("identify: {fields: {phone: traits.mobile}, traits: {exclude: secret}}")
    assert rules.identify.fields.phone == (("traits.mobile",),)
    assert rules.identify.traits.exclude == ("secret",)


def test_summary() -> None:
    assert Rules().summary() == (
        "identify, track, alias, delete on; page, screen, group off; "
        "0 event rename(s), 0 tag rule(s)"
    )


# Errors ------------------------------------------------------------------------------

ERROR_CASES: list[tuple[str, str, list[tuple[int, str, str]]]] = [
    # (id, file, [(line, key path, part of the message)])
    (
        "unknown keys, with what is allowed",
        """
        identify:
          enabeld: true
          fields:
            phon: traits.phone
        trak: {}
        """,
        [
            (2, "identify.enabeld", "unknown key; expected one of: enabled, fields, traits"),
            (4, "identify.fields.phon", "unknown key; expected one of: name, phone,"),
            (5, "trak", "unknown key; expected one of: version, integration,"),
        ],
    ),
    (
        "wrong types",
        """
        identify:
          enabled: sometimes
        values:
          lists: flatten
        track: [1, 2]
        tags:
          traits: {tag: x}
        """,
        [
            (2, "identify.enabled", "expected true or false"),
            (4, "values.lists", "expected 'keep', 'join' or 'drop'"),
            (5, "track", "expected a mapping of keys: enabled, events, properties"),
            (7, "tags.traits", "expected a list"),
        ],
    ),
    (
        "bad patterns",
        """
        track:
          events:
            exclude:
              - "Debug*"
              - "re:(unclosed"
              - ""
        """,
        [
            (5, "track.events.exclude[1]", "bad regular expression '(unclosed'"),
            (6, "track.events.exclude[2]", "expected a non-empty pattern"),
        ],
    ),
    (
        "bad paths and sources",
        """
        identity:
          email: [trait.email, "context..email"]
        identify:
          fields:
            name: [traits.name, [traits.first, 7], []]
        """,
        [
            (2, "identity.email[0]", "a path starts with a message field"),
            (2, "identity.email[1]", "expected a path like traits.email"),
            (5, "identify.fields.name[1]", "expected a path, or a list of paths"),
            (5, "identify.fields.name[2]", "expected a path, or a list of paths"),
        ],
    ),
    (
        "bad templates",
        """
        page:
          event:
            - "Viewed {name Page"
            - "Viewed {}"
            - "Viewed {name!r}"
        """,
        [
            (3, "page.event[0]", "bad template 'Viewed {name Page'"),
            (4, "page.event[1]", "{} needs a path"),
            (5, "page.event[2]", "without ! or : parts"),
        ],
    ),
    (
        "bad names",
        """
        identify:
          traits:
            rename: {plan: Subscription Plan}
        track:
          events:
            rename: {Order Completed: " "}
        group: {prefix: Company}
        integration: ""
        """,
        [
            (3, "identify.traits.rename.plan", "expected a Gist property name"),
            (6, "track.events.rename.Order Completed", "expected a non-empty name"),
            (7, "group.prefix", "expected lower-case letters, digits and _"),
            (8, "integration", "expected a non-empty name"),
        ],
    ),
    (
        "a rename onto a Gist contact field",
        """
        identify:
          traits:
            rename: {mail: email, plan: tier}
        group:
          traits: {rename: {tags: id}}
        track:
          properties: {rename: {mail: email}}
        """,
        [
            (3, "identify.traits.rename.mail", "'email' is a Gist contact field"),
            (5, "group.traits.rename.tags", "'id' is a Gist contact field"),
        ],
    ),
    (
        "tag rules",
        """
        tags:
          traits:
            - {tag: a, untag: b}
            - when: {traits.plan: pro}
            - {tag: a, when: {traits.plan: {nested: 1}}}
          events:
            - {tag: customer}
        """,
        [
            (3, "tags.traits[0]", "give exactly one of tag or untag"),
            (4, "tags.traits[1]", "give exactly one of tag or untag"),
            (5, "tags.traits[2].when.traits.plan", "expected a value (string, number"),
            (7, "tags.events[0].event", "required key is missing"),
        ],
    ),
    (
        "version and a duplicate key",
        """
        version: 2
        page: {enabled: true}
        page: {enabled: false}
        """,
        [
            (1, "version", "expected 1"),
            (3, "page", "duplicate key (first at line 2)"),
        ],
    ),
    (
        "priorities",
        """
        priorities:
          types:
            identify: critical
            page: urgent
            trak: low
          events:
            "re:(": high
            Heartbeat: Low
            "": low
          audiences: [high]
        """,
        [
            (3, "priorities.types.identify", "expected 'high', 'normal' or 'low' (critical"),
            (4, "priorities.types.page", "expected 'high', 'normal' or 'low'"),
            (5, "priorities.types.trak", "unknown key; expected one of: identify, track,"),
            (7, "priorities.events.re:(", "bad regular expression '('"),
            (8, "priorities.events.Heartbeat", "expected 'high', 'normal' or 'low'"),
            (9, "priorities.events.", "expected a non-empty pattern"),  # the key ""
            (10, "priorities.audiences", "expected 'high', 'normal' or 'low'"),
        ],
    ),
    ("not a mapping", "- identify\n- track\n", [(1, "", "expected a mapping of sections")]),
    ("not YAML", "identify: {enabled: true\ntrack: {}\n", [(2, "", "not valid YAML")]),
    (
        "a character YAML does not allow",
        "page: {enabled: true}\n\x1f\n",
        [(2, "", "not valid YAML: special characters are not allowed")],
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
def test_every_error_is_reported_with_its_line(
    text: str, expected: list[tuple[int, str, str]]
) -> None:
    found = problems(text)
    assert len(found) == len(expected), "\n".join(map(str, found))
    for problem, (line, path, message) in zip(found, expected, strict=True):
        assert problem.file == "rules.yaml"
        assert (problem.line, problem.path) == (line, path), problem
        assert message in problem.message, problem


def test_the_error_lists_every_problem() -> None:
    with pytest.raises(RulesError) as caught:
        parse_rules("values: {lists: x, nulls: y}\npage: {enabled: maybe}\n", "my.yaml")
    assert str(caught.value).splitlines() == [
        "3 errors in mapping rules:",
        "  my.yaml:1: values.lists: expected 'keep', 'join' or 'drop'",
        "  my.yaml:1: values.nulls: expected 'keep' or 'drop'",
        "  my.yaml:2: page.enabled: expected true or false",
    ]


def test_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_bytes(b"page:\n  enabled: true # caf\xe9\n")
    with pytest.raises(RulesError) as caught:
        load_rules(path)
    assert [(e.file, e.line) for e in caught.value.errors] == [(str(path), 2)]


def test_a_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_rules(tmp_path / "missing.yaml")


# gist-destination check-config ---------------------------------------------------------


def test_check_config_on_the_shipped_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert "valid: identify, track, alias, delete on" in out


def test_check_config_on_a_valid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("page: {enabled: true}\n")
    assert main(["check-config", str(path)]) == 0
    assert capsys.readouterr().out == (
        f"{path}: valid: identify, track, page, alias, delete on; screen, group off; "
        "0 event rename(s), 0 tag rule(s)\n"
    )


def test_check_config_on_a_broken_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("identify:\n  enabeld: true\ntrack:\n  events: {exclude: 're:('}\n")
    assert main(["check-config", str(path)]) == 2  # as run exits for it
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "2 errors in mapping rules:"
    assert err[1].startswith(f"  {path}:2: identify.enabeld: unknown key")
    assert err[2].startswith(f"  {path}:4: track.events.exclude[0]: bad regular expression")


def test_check_config_on_an_unreadable_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["check-config", str(tmp_path)]) == 2


# Whatever the file holds, loading answers with rules or with RulesError ----------------

_SECTION_KEYS = sorted(
    set(Rules.model_fields)
    | {"enabled", "fields", "traits", "events", "include", "exclude", "rename", "tag", "event"}
    | {"types", "audiences", "high", "low", "replace"}
)
_yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(_SECTION_KEYS) | st.text(max_size=6), children, max_size=3
        )
    ),
    max_leaves=15,
)


def _problems_or_none(text: str) -> list[RulesProblem] | None:
    try:
        parse_rules(text, "fuzz.yaml")
    except RulesError as error:
        return error.errors
    return None


@settings(max_examples=200)
@given(data=st.dictionaries(st.sampled_from(_SECTION_KEYS), _yaml_values, max_size=4))
def test_any_yaml_document_loads_or_raises_rules_error(data: dict[str, object]) -> None:
    text = yaml.safe_dump(data)
    found = _problems_or_none(text)
    assert found is None or found
    for problem in found or []:
        assert problem.file == "fuzz.yaml"
        assert problem.line is None or 1 <= problem.line <= text.count("\n") + 1
        assert problem.message


@settings(max_examples=200)
@given(text=st.text(max_size=80))
def test_any_text_loads_or_raises_rules_error(text: str) -> None:
    found = _problems_or_none(text)
    assert found is None or found
