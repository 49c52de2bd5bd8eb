"""``gist-destination check-config [PATH]``: validate a mapping-rules file.

Exit 0 with a one-line summary when the file is valid, 2 with every error (file, line,
key path, what was expected) when it is not or cannot be read: as ``run`` exits for the
same file. Warnings (a valid file that changes a default rule map: an entry taking the
place of a default one, default entries dropped) go to standard error and leave the
exit code 0.

``check-config --schema`` prints the JSON Schema of a rules file instead (for editors;
committed as ``config/mapping-rules.schema.json``).
"""

from __future__ import annotations

import argparse
import json
import sys

from destination.mapping._loading import RulesError, RulesProblem, default_rules_path, load_rules
from destination.mapping._schema import rules_json_schema


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path",
        nargs="?",
        default=None,
        metavar="PATH",
        help="the mapping-rules YAML file (default: the shipped config/mapping-rules.yaml)",
    )
    parser.add_argument(
        "--schema",
        action="store_true",
        help="print the JSON Schema of a mapping-rules file (for editors) and check nothing",
    )


def schema_text() -> str:
    """The JSON Schema as ``--schema`` prints it (and as the committed file holds it)."""
    return json.dumps(rules_json_schema(), indent=2, ensure_ascii=False) + "\n"


def run(args: argparse.Namespace) -> int:
    if args.schema:
        if args.path is not None:
            print("check-config: --schema takes no PATH", file=sys.stderr)
            return 2
        sys.stdout.write(schema_text())
        return 0
    path = args.path if args.path is not None else str(default_rules_path())
    warnings: list[RulesProblem] = []
    try:
        rules = load_rules(path, warnings)
    except OSError as exc:
        print(f"{path}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except RulesError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"{path}: valid: {rules.summary()}")
    for warning in warnings:
        where = f"{warning.file}:{warning.line}" if warning.line is not None else warning.file
        print(f"{where}: {warning.path}: warning: {warning.message}", file=sys.stderr)
    return 0
