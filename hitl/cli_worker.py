"""``hitl worker``: run a processor on the jobs of a ``hitl serve --processor external``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
from typing import Any

from . import logs
from .cli_client import DEFAULT_URL
from .errors import ConfigError
from .limits import MAX_LEASE, MAX_WORKER
from .processors import load_processor
from .worker import Settings, Worker


def add_command(commands: Any) -> None:
    """``hitl worker`` and its options, on the ``hitl`` command's subparsers."""
    worker = commands.add_parser(
        "worker", help="run a processor on an external-processor service's jobs",
        description="Claim jobs from hitl serve --processor external over HTTP and run a "
                    "processor on them. SIGTERM or SIGINT: stop claiming, let running jobs "
                    "finish within --grace seconds, give the rest back, exit 0.")
    worker.add_argument("--url", default=os.environ.get("HITL_URL", DEFAULT_URL),
                        help=f"the service [HITL_URL, default {DEFAULT_URL}]")
    worker.add_argument("--token", default=os.environ.get("HITL_TOKEN"),
                        help="API token of a user with role worker [HITL_TOKEN]")
    worker.add_argument("--processor", required=True, metavar="MODULE:CALLABLE",
                        help="processor as 'package.module:callable' (sync or async)")
    worker.add_argument("--concurrency", type=positive(int), default=1,
                        help="jobs at a time (default 1)")
    worker.add_argument("--name", default=default_name(),
                        help="this worker's name, shown in the service's records "
                             "(default host-pid)")
    worker.add_argument("--lease", type=positive(float), metavar="SECONDS",
                        help=f"lease asked for each job, 1 to {MAX_LEASE} (default: the "
                        "service's)")
    worker.add_argument("--grace", type=positive(float), default=25.0, metavar="SECONDS",
                        help="on SIGTERM, how long running jobs may take to finish "
                             "(default 25)")
    worker.add_argument("--log-level", default="info",
                        help="logging level (debug, info, warning, error; default info)")
    worker.set_defaults(run=run)


def positive(kind: type[float] | type[int]) -> Any:
    def parse(text: str) -> float | int:
        value = kind(text)
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
        return value
    return parse


def default_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"[-MAX_WORKER:]


def run(args: argparse.Namespace) -> int:
    """Run the worker until a signal (0), or until the service refuses it (2)."""
    if args.log_level.upper() not in logging.getLevelNamesMapping():
        raise ConfigError(f"--log-level {args.log_level!r} is not a logging level")
    logs.configure(args.log_level, "text")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    if not 1 <= len(args.name) <= MAX_WORKER:
        raise ConfigError(f"--name must be 1 to {MAX_WORKER} characters, "
                          f"not {len(args.name)}")
    if args.lease is not None and not 1 <= args.lease <= MAX_LEASE:
        raise ConfigError(f"--lease must be between 1 and {MAX_LEASE} seconds, "
                          f"not {args.lease:g}")
    if not args.url.startswith(("http://", "https://")):
        raise ConfigError(f"--url {args.url!r} must start with http:// or https://")
    worker = Worker(load_processor(args.processor), Settings(
        url=args.url, token=args.token or None, name=args.name, concurrency=args.concurrency,
        lease=args.lease, grace=args.grace))
    status = asyncio.run(worker.run())
    if worker.runner.busy:  # a synchronous processor still blocking in its thread: leave it
        logging.getLogger("hitl.worker").warning("abandoning %d running processor(s)",
                                                 worker.runner.busy)
        logging.shutdown()
        os._exit(status)
    return status
