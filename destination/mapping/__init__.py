"""Mapping rules: one Segment-spec message in, the Gist operations it causes out.

    rules = load_rules(path)          # None: the shipped default (config/mapping-rules.yaml)
    mapper = Mapper(rules)            # compiles the rules once
    result = mapper.map(message)      # Mapped | Skipped | Rejected; never raises

Each field left out of a message that is sent (why: ``FIELD_DROPS``) is counted in
``fields_dropped_total``, or told to ``Mapper(rules, on_dropped=...)``.

``load_rules`` raises ``RulesError`` listing every problem of an invalid file (file,
line, key path, what was expected) and ``OSError`` when the file cannot be read.
"""

from destination.mapping._commerce import line_total, minor_unit
from destination.mapping._loading import (
    RulesError,
    RulesProblem,
    default_rules_path,
    load_rules,
    parse_rules,
)
from destination.mapping._mapper import Mapper
from destination.mapping._reasons import FIELD_DROPS, REJECT_REASONS, SKIP_REASONS
from destination.mapping._schema import Rules

__all__ = [
    "FIELD_DROPS",
    "REJECT_REASONS",
    "SKIP_REASONS",
    "Mapper",
    "Rules",
    "RulesError",
    "RulesProblem",
    "default_rules_path",
    "line_total",
    "load_rules",
    "minor_unit",
    "parse_rules",
]
