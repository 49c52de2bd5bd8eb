"""The ``gist-destination`` command: one sub-command per thing an operator does.

Exit codes, the same for every command (the README's table):

    0    done (``run``: stopped by SIGTERM / SIGINT after its drain)
    1    failed while running: Kafka unreachable or failing (one line, no traceback);
         with a traceback, a bug
    2    bad input, named: an argument, a setting, the rules file, a topic that is not
         there (never created), a replay reason not in the catalogue
    3    ``run``: Gist rejected the API key
    141  the reader of the output went away (``map | head``), as for a Unix tool stopped
         by SIGPIPE; nothing is printed about it
"""

from __future__ import annotations

import argparse
import importlib
import os
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
    "suppressions": (
        "list the people a delete suppressed, or lift a suppression",
        "destination.commands.suppressions",
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


EXIT_BROKEN_PIPE = 141

_PRINTS_RESULTS = frozenset({"check-config", "map", "replay", "plan", "produce"})
"""The commands whose standard output is their result, piped to ``head``, ``jq``, ...
(the worker, the sandbox and the demo log to standard error and run until stopped)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser, runners = build_parser()
    args = parser.parse_args(argv)
    if args.command not in _PRINTS_RESULTS:
        return runners[args.command](args)
    try:
        code = runners[args.command](args)
        sys.stdout.flush()  # what is still buffered meets a closed pipe here, not at exit
        return code
    except BrokenPipeError:
        # The reader went away (``map | head``): stop quietly, as a Unix tool does on
        # SIGPIPE. Standard output goes to /dev/null, so that Python's own flush at exit
        # does not meet the closed pipe again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
