"""``gist-destination sandbox``: serve the Gist sandbox until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from destination.devtools.sandbox._config import BATCH_ERROR_FORMATS, DEFAULT_API_KEY, SandboxConfig


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
    faults = parser.add_argument_group(
        "answers the Gist reference does not describe (off by default; settable live "
        "through POST /_sandbox/faults)"
    )
    faults.add_argument(
        "--batch-status",
        metavar="STATUS",
        default=defaults.batch_status,
        help='batch-status polls answer {"status": STATUS} (e.g. FAILED, completed); '
        "batches pause, none completes while it is set",
    )
    faults.add_argument(
        "--batch-stuck",
        action="store_true",
        help="batches never complete (the head one stays IN_PROGRESS, the rest QUEUED)",
    )
    faults.add_argument(
        "--batch-errors",
        choices=BATCH_ERROR_FORMATS,
        default=defaults.batch_errors,
        help="shape of a completed batch's errors: objects (index/email/user_id/message), "
        "strings, anonymous (message and an opaque contact_ref), omitted (always [])",
    )
    faults.add_argument(
        "--batch-id-missing",
        action="store_true",
        help="batch imports answer QUEUED without a batch_id (the batch is still applied)",
    )
    faults.add_argument(
        "--batch-poll-status",
        type=int,
        metavar="HTTP_STATUS",
        default=defaults.batch_poll_status,
        help="batch-status polls answer this HTTP error status (400..599)",
    )
    faults.add_argument(
        "--non-json-rate",
        type=float,
        metavar="FRACTION",
        default=defaults.non_json_rate,
        help="fraction of successful API answers (not /token/info) replaced by a 200 HTML "
        "body, after the request was applied",
    )
    parser.add_argument(
        "--subscription-type",
        dest="subscription_types",
        action="append",
        metavar="NAME",
        help="a subscription type of the workspace (repeatable; default "
        f"{', '.join(defaults.subscription_types)})",
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
        batch_status=args.batch_status,
        batch_stuck=args.batch_stuck,
        batch_errors=args.batch_errors,
        batch_id_missing=args.batch_id_missing,
        batch_poll_status=args.batch_poll_status,
        non_json_rate=args.non_json_rate,
        subscription_types=(
            tuple(args.subscription_types)
            if args.subscription_types
            else SandboxConfig().subscription_types
        ),
        seed=args.seed,
    )


async def serve(config: SandboxConfig, host: str, port: int) -> None:
    from destination.devtools.sandbox._app import running_sandbox

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
