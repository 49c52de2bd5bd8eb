"""``gist-destination check-config [PATH]``: validate a mapping-rules file.

Exit 0 with a one-line summary when the file is valid, 1 with every error (file, line,
key path, what was expected) when it is not, 2 when the file cannot be read.
"""

from __future__ import annotations

import argparse
import sys

from destination.mapping._loading import RulesError, default_rules_path, load_rules


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path",
        nargs="?",
        default=None,
        metavar="PATH",
        help="the mapping-rules YAML file (default: the shipped config/mapping-rules.yaml)",
    )


def run(args: argparse.Namespace) -> int:
    path = args.path if args.path is not None else str(default_rules_path())
    try:
        rules = load_rules(path)
    except OSError as exc:
        print(f"{path}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except RulesError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{path}: valid: {rules.summary()}")
    return 0
