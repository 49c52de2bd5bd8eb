"""``gist-destination sandbox``: serve the Gist sandbox until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from destination.sandbox._config import DEFAULT_API_KEY, SandboxConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SandboxConfig()
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--port", type=int, default=8080, help="port to listen on (0 picks a free one)"
    )
    parser.add_argument(
        "--api-key",
        dest="api_keys",
        action="append",
        metavar="KEY",
        help=f"an API key to accept (repeatable; default {DEFAULT_API_KEY})",
    )
    parser.add_argument(
        "--workspace-id", default=defaults.workspace_id, help="the workspace the keys belong to"
    )
    parser.add_argument(
        "--rate-limit",
        type=int,
        default=defaults.rate_limit,
        help="requests allowed in any --rate-window seconds; 0 disables the limit",
    )
    parser.add_argument("--rate-window", type=float, default=defaults.rate_window)
    parser.add_argument(
        "--batch-delay",
        type=float,
        default=defaults.batch_delay,
        help="seconds a batch stays QUEUED, then again IN_PROGRESS, before COMPLETED",
    )
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    parser.add_argument(
        "--error-rate",
        type=float,
        default=defaults.error_rate,
        help="fraction of API requests answered with a random 500/502/503",
    )
    parser.add_argument(
        "--latency", type=float, default=defaults.latency, help="seconds added to each request"
    )
    parser.add_argument(
        "--no-retry-after",
        dest="retry_after",
        action="store_false",
        help="send 429s without a Retry-After header",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for the injected faults")


def config_from_args(args: argparse.Namespace) -> SandboxConfig:
    return SandboxConfig(
        api_keys=frozenset(args.api_keys or [DEFAULT_API_KEY]),
        workspace_id=args.workspace_id,
        rate_limit=args.rate_limit,
        rate_window=args.rate_window,
        batch_delay=args.batch_delay,
        max_batch_size=args.max_batch_size,
        error_rate=args.error_rate,
        latency=args.latency,
        retry_after=args.retry_after,
        seed=args.seed,
    )


async def serve(config: SandboxConfig, host: str, port: int) -> None:
    from destination.sandbox._app import running_sandbox

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with running_sandbox(config, host, port) as sandbox:
            limit = (
                f"{config.rate_limit} requests per {config.rate_window:g} s"
                if config.rate_limit
                else "no rate limit"
            )
            print(
                f"Gist sandbox listening on {sandbox.url} (workspace {config.workspace_id}, "
                f"{len(config.api_keys)} API key(s), {limit}); Ctrl-C to stop",
                flush=True,
            )
            await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"gist-destination sandbox: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config, args.host, args.port))
    except OSError as exc:  # e.g. the port is taken
        print(
            f"gist-destination sandbox: cannot listen on {args.host}:{args.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    return 0
