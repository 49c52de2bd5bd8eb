"""``gist-destination run``: settings and rules checked, then the worker until stopped."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from destination.mapping import Mapper, RulesError, load_rules
from destination.observability.logging import configure_logging
from destination.settings import SettingsError, load_settings
from destination.worker import EXIT_CONFIG, serve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--settings",
        type=Path,
        metavar="FILE",
        help="a dotenv file of settings (NAME=value lines); the environment wins",
    )


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.settings)
        api_key = settings.api_key()
    except SettingsError as error:
        print(f"gist-destination: {error}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log_format, settings.log_level, settings.log_emails)
    try:
        rules = load_rules(settings.mapping_config)
    except RulesError as error:
        print(f"gist-destination: MAPPING_CONFIG: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as error:
        print(
            f"gist-destination: MAPPING_CONFIG: cannot read {error.filename}: {error.strerror}",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    return asyncio.run(serve(settings, Mapper(rules), api_key))
