"""Reading a rules file: YAML in, ``Rules`` out, or every problem at once with its line.

The YAML is composed into nodes first, so each key path (``("identify", "fields",
"phone")``) has a line; pydantic's error locations are then translated to those lines.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pydantic
import yaml
from pydantic import BaseModel

from destination.mapping._schema import Rules, rule_map_notes

DEFAULT_RULES_NAME = "default_rules.yaml"


@dataclass(frozen=True, slots=True)
class RulesProblem:
    """One thing wrong with a rules file."""

    file: str
    line: int | None
    """1-based; ``None`` when the problem has no place (e.g. an empty key path)."""
    path: str
    """The key path, ``identify.fields.phone`` or ``tags.events[1].event``; ``""`` for
    the whole file."""
    message: str
    """What was expected."""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.path or '(file)'}: {self.message}"


class RulesError(Exception):
    """The rules file is invalid: fix it; the destination does not start with it.

    ``errors`` lists every problem found, in file order; ``str()`` shows them all."""

    def __init__(self, errors: list[RulesProblem]) -> None:
        super().__init__(errors)
        self.errors = errors

    def __str__(self) -> str:
        count = len(self.errors)
        head = f"{count} error{'s' if count != 1 else ''} in mapping rules"
        return "\n".join([head + ":", *(f"  {e}" for e in self.errors)])


def default_rules_path() -> Path:
    """Where the shipped default rules file is (inside the installed package)."""
    return Path(str(resources.files("destination.mapping").joinpath(DEFAULT_RULES_NAME)))


def load_rules(path: str | Path | None = None, warnings: list[RulesProblem] | None = None) -> Rules:
    """Load and validate a rules file; ``None`` loads the shipped default. ``warnings``,
    when given, receives what a valid file does that its author may not expect
    (``parse_rules``).

    Raises ``OSError`` when the file cannot be read, ``RulesError`` when it is invalid."""
    file = default_rules_path() if path is None else Path(path)
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise RulesError([RulesProblem(str(file), line, "", "expected UTF-8 text")]) from None
    return parse_rules(text, str(file), warnings)


KeyPath = tuple[str | int, ...]


def parse_rules(
    text: str, file: str = "<rules>", warnings: list[RulesProblem] | None = None
) -> Rules:
    """Validate rules given as YAML text; ``file`` names it in errors. ``warnings``, when
    given, receives (in file order) what the file does to a default rule map: an entry
    taking the place of a default one, default entries dropped by ``{}`` or ``replace:
    true``, an entry giving the name a default entry gives."""
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise RulesError([_yaml_problem(exc, text, file)]) from None

    errors: list[RulesProblem] = []
    lines: dict[KeyPath, int] = {}
    if node is not None:
        _index(node, (), lines, errors, file)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        line = node.start_mark.line + 1 if node is not None else 1
        errors.append(
            RulesProblem(file, line, "", "expected a mapping of sections (identify:, track:, ...)")
        )
        raise RulesError(errors)
    try:
        rules = Rules.model_validate(data)
    except pydantic.ValidationError as exc:
        errors.extend(_problems(exc, lines, file))
    if errors:
        errors.sort(key=lambda e: e.line or 0)
        raise RulesError(errors)
    if warnings is not None:
        found = [
            RulesProblem(file, _line(path, lines), _dotted(path), note)
            for path, note in rule_map_notes(data, Rules)
        ]
        warnings.extend(sorted(found, key=lambda w: w.line or 0))
    return rules


def _yaml_problem(exc: yaml.YAMLError, text: str, file: str) -> RulesProblem:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is not None:
        line: int | None = mark.line + 1
    elif isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow
        line = text.count("\n", 0, exc.position) + 1
    else:
        line = None
    problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or str(exc)
    return RulesProblem(file, line, "", f"not valid YAML: {problem}")


def _index(
    node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int], errors: list[RulesProblem], file: str
) -> None:
    """Record the line of every key path; report duplicate keys (YAML keeps the last)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            line = key_node.start_mark.line + 1
            if key in seen:
                errors.append(
                    RulesProblem(
                        file,
                        line,
                        _dotted((*path, key)),
                        f"duplicate key (first at line {seen[key]})",
                    )
                )
            seen[key] = line
            lines[(*path, key)] = line
            _index(value_node, (*path, key), lines, errors, file)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            _index(item, (*path, i), lines, errors, file)


def _dotted(path: KeyPath) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def _problems(
    exc: pydantic.ValidationError, lines: dict[KeyPath, int], file: str
) -> Iterator[RulesProblem]:
    for error in exc.errors(include_url=False):
        loc = _file_loc(error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        message = message.replace("Input should be", "expected", 1)
        if error["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            message = "unknown key" + (
                f"; expected one of: {', '.join(allowed)}" if allowed else ""
            )
        elif error["type"] in ("bool_parsing", "bool_type"):
            message = "expected true or false"
        elif error["type"] == "missing":
            message = "required key is missing"
        elif error["type"] == "dict_type":
            message = "expected a mapping (key: value)"
        elif error["type"] in ("tuple_type", "list_type"):
            message = "expected a list"
        elif error["type"] == "model_type":
            message = "expected a mapping of keys: " + ", ".join(_allowed_keys(loc))
        yield RulesProblem(file, _line(loc, lines), _dotted(loc), message)


def _file_loc(loc: tuple[str | int, ...]) -> KeyPath:
    """pydantic's location as a key path of the file (a dict-key error ends in
    ``[key]``, which names no place of its own)."""
    return tuple(p for p in loc if p != "[key]")


def _line(loc: KeyPath, lines: dict[KeyPath, int]) -> int | None:
    """The line of the longest prefix of ``loc`` that the file has."""
    for end in range(len(loc), 0, -1):
        line = lines.get(loc[:end])
        if line is not None:
            return line
    return 1 if lines else None


def _allowed_keys(loc: KeyPath) -> list[str]:
    """The keys the section at ``loc`` accepts (for "unknown key" errors)."""
    model: Any = Rules
    for part in loc:
        model = _model_of(model, part)
        if model is None:
            return []
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _model_of(model: Any, part: str | int) -> Any:
    """The type one step down from ``model`` along ``part`` (a field, an index, a key)."""
    model = _unwrap(model)
    if isinstance(model, type) and issubclass(model, BaseModel):
        field = model.model_fields.get(str(part))
        return _unwrap(field.annotation) if field is not None else None
    origin = typing.get_origin(model)
    if origin in (tuple, list) and isinstance(part, int):
        return _unwrap(typing.get_args(model)[0])
    if origin is dict:
        return _unwrap(typing.get_args(model)[1])
    return None


def _unwrap(tp: Any) -> Any:
    """``Annotated[X, ...]`` -> X; ``X | None`` -> X."""
    while True:
        if typing.get_origin(tp) is typing.Annotated:
            tp = typing.get_args(tp)[0]
            continue
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
            tp = args[0]
            continue
        return tp
