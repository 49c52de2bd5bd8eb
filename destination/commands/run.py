"""``gist-destination run``: settings and rules checked, then the worker until stopped."""

from __future__ import annotations

import argparse
import asyncio
import gc
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
    tune_garbage_collector()
    return asyncio.run(serve(settings, Mapper(rules), api_key))


def tune_garbage_collector() -> None:
    """Keep the cyclic collector from rescanning the work in flight.

    Each message's objects live for a second or more (until Gist completes its batch), so
    with the default thresholds they all reach the oldest generation, and every 25%
    growth of it sets off a full collection that walks every live object: 27% of the
    worker's CPU in the drain benchmark. A larger young generation lets them die young
    (a full collection becomes rare; memory stays bounded by the in-flight limits), and
    the start-up objects (modules, rules) are frozen out of every scan. Cycles that reach
    the oldest generation are freed by the full collection the worker's housekeeping
    runs every ``Worker.full_collection_every`` seconds.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)
