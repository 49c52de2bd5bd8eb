"""The ``gist-destination`` command: one sub-command per thing an operator does."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from destination import __version__

Runner = Callable[[argparse.Namespace], int]


# name: (what it does, its module). Each module has ``add_arguments(parser)`` and
# ``run(args) -> exit code``, and is imported only when the command line is built.
# Operator commands live in destination.commands; the local tools in destination.devtools.
_COMMANDS: dict[str, tuple[str, str]] = {
    "run": (
        "consume Kafka and deliver to Gist (settings from the environment)",
        "destination.commands.run",
    ),
    "check-config": (
        "validate a mapping-rules file and report every error",
        "destination.commands.check_config",
    ),
    "map": (
        "show what messages become in Gist under the mapping rules (offline)",
        "destination.commands.map",
    ),
    "replay": (
        "copy dead letters back to an input topic, filtered by reason and time",
        "destination.commands.replay",
    ),
    "plan": (
        "the Gist requests a sample of messages costs, against the budget",
        "destination.commands.plan",
    ),
    "sandbox": ("serve a local stand-in for the Gist API", "destination.devtools.sandbox.command"),
    "produce": (
        "send a file of messages, or sample traffic, to a Kafka topic",
        "destination.devtools.produce",
    ),
    "demo": (
        "run broker, sandbox, sample stream and worker end to end on this machine",
        "destination.devtools.demo",
    ),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Runner]]:
    parser = argparse.ArgumentParser(prog="gist-destination", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    runners: dict[str, Runner] = {}
    for name, (help_text, module) in _COMMANDS.items():
        command = importlib.import_module(module)
        command.add_arguments(subparsers.add_parser(name, help=help_text, description=help_text))
        runners[name] = command.run
    return parser, runners


def main(argv: Sequence[str] | None = None) -> int:
    parser, runners = build_parser()
    args = parser.parse_args(argv)
    return runners[args.command](args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
