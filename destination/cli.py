"""The ``gist-destination`` command: one sub-command per thing an operator does."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from destination import __version__

Runner = Callable[[argparse.Namespace], int]


def _sandbox(parser: argparse.ArgumentParser) -> Runner:
    from destination.sandbox import command

    command.add_arguments(parser)
    return command.run


def _check_config(parser: argparse.ArgumentParser) -> Runner:
    from destination.mapping import command

    command.add_arguments(parser)
    return command.run


def _map(parser: argparse.ArgumentParser) -> Runner:
    from destination.commands import map as command

    command.add_arguments(parser)
    return command.run


def _replay(parser: argparse.ArgumentParser) -> Runner:
    from destination.commands import replay as command

    command.add_arguments(parser)
    return command.run


def _plan(parser: argparse.ArgumentParser) -> Runner:
    from destination.commands import plan as command

    command.add_arguments(parser)
    return command.run


def _run(parser: argparse.ArgumentParser) -> Runner:
    from destination import run_command

    run_command.add_arguments(parser)
    return run_command.run


def _produce(parser: argparse.ArgumentParser) -> Runner:
    from destination import produce_command

    produce_command.add_arguments(parser)
    return produce_command.run


def _demo(parser: argparse.ArgumentParser) -> Runner:
    from destination import demo

    demo.add_arguments(parser)
    return demo.run


_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Runner]]] = {
    "run": ("consume Kafka and deliver to Gist (settings from the environment)", _run),
    "sandbox": ("serve a local stand-in for the Gist API", _sandbox),
    "produce": ("send a file of messages, or sample traffic, to a Kafka topic", _produce),
    "demo": ("run broker, sandbox, sample stream and worker end to end on this machine", _demo),
    "check-config": ("validate a mapping-rules file and report every error", _check_config),
    "map": ("show what messages become in Gist under the mapping rules (offline)", _map),
    "replay": ("copy dead letters back to an input topic, filtered by reason and time", _replay),
    "plan": ("the Gist requests a sample of messages costs, against the budget", _plan),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Runner]]:
    parser = argparse.ArgumentParser(prog="gist-destination", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    runners: dict[str, Runner] = {}
    for name, (help_text, install) in _COMMANDS.items():
        runners[name] = install(subparsers.add_parser(name, help=help_text, description=help_text))
    return parser, runners


def main(argv: Sequence[str] | None = None) -> int:
    parser, runners = build_parser()
    args = parser.parse_args(argv)
    return runners[args.command](args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
