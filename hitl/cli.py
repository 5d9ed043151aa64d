"""The ``hitl`` command: ``serve``, ``tasks list|show``, ``export``, ``users``, ``tokens``,
``webhooks``, ``worker`` (:mod:`hitl.cli_worker`); and the client's ``submit``, ``watch``,
``approve``... (:mod:`hitl.cli_client`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TextIO

from . import cli_accounts, cli_client, cli_webhooks, cli_worker, logs, metrics
from .accounts import Accounts, Role
from .config import SETTINGS, Config, default_db_path, default_of, env_var, is_postgres, is_shared
from .errors import ConfigError, HitlError, Invalid, StartupError
from .limits import MAX_INTEGER
from .models import Status, iso
from .store import Store, lock_exclusively, open_store

SERVE_SETTINGS = [s for s in SETTINGS if s.name != "db"]


PRECEDENCE = "flags win over environment variables, which win over defaults."


def shown_default(name: str) -> str:
    default = default_db_path() if name == "db" else default_of(name)
    return "off" if default is None else str(default)


def settings_epilog() -> str:
    """The settings of ``hitl serve`` as a table, for ``hitl --help``."""
    lines = ["settings of 'hitl serve' (flag, environment variable, default):"]
    for setting in SETTINGS:
        flag = "--" + setting.name.replace("_", "-")
        lines.append(f"  {flag:<20} {env_var(setting.name):<22} {shown_default(setting.name):<12}"
                     f" {setting.help}")
    lines.append(PRECEDENCE)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hitl", description="hitl: human-in-the-loop review service.",
        epilog=settings_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Each option once, with its variable and default; the epilog only adds the precedence.
    serve = commands.add_parser("serve", help="run the service (hypercorn)", epilog=PRECEDENCE)
    add_db_option(serve)
    for setting in SERVE_SETTINGS:
        serve.add_argument("--" + setting.name.replace("_", "-"), dest=setting.name,
                           metavar=setting.kind.split()[0].upper(),
                           help=f"{setting.help} [{env_var(setting.name)}, "
                                f"default {shown_default(setting.name)}]")
    # Set by `hitl serve --workers N` for its children: serve this inherited listening socket.
    serve.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    tasks = commands.add_parser("tasks", help="read tasks from the database")
    task_commands = tasks.add_subparsers(dest="tasks_command", metavar="ACTION", required=True)
    listing = task_commands.add_parser("list", help="list tasks, newest first")
    listing.add_argument("--status", choices=[s.value for s in Status], help="only this status")
    listing.add_argument("--limit", type=count, default=50, help="how many (default 50)")
    add_db_option(listing)
    show = task_commands.add_parser("show", help="one task with its reviews, as JSON")
    show.add_argument("task_id", help="its id, or a unique prefix of 8 characters or more")
    add_db_option(show)
    export = commands.add_parser("export", help="every task with its reviews, as JSON Lines")
    export.add_argument("--output", "-o", help="file to write (default: standard output)")
    add_db_option(export)
    cli_accounts.add_commands(commands, add_db_option)
    cli_webhooks.add_commands(commands, add_db_option)
    cli_worker.add_command(commands)
    cli_client.add_commands(commands)
    return parser


def count(text: str) -> int:
    """A positive number that SQLite can take (a bigger one is an error there, not here)."""
    value = int(text)
    if not 1 <= value <= MAX_INTEGER:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_INTEGER}, not {text}")
    return value


def add_db_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", help=f"SQLite database file (':memory:' keeps nothing) or a "
                                     f"postgresql:// URL [HITL_DB, default {default_db_path()}]")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if hasattr(args, "run"):  # a client of a service: no database, no server settings
            return int(args.run(args))
        config = load_config(args)
        if args.command == "serve" and config.workers > 1 and args.listen_fd is None:
            from . import supervisor

            return supervisor.run(config, raw_flags(args))
        if args.command == "serve":
            return run_server(config, listen_fd=args.listen_fd)
        action = getattr(args, f"{args.command}_command", None)
        return asyncio.run(with_store(config.db, COMMANDS[args.command, action], args))
    except (ConfigError, StartupError) as exc:
        print(f"hitl: error: {exc}", file=sys.stderr)
        return 2
    except HitlError as exc:
        print(f"hitl: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def raw_flags(args: argparse.Namespace) -> dict[str, str | None]:
    """The settings given as flags, as typed (None: not given)."""
    return {setting.name: getattr(args, setting.name, None) for setting in SETTINGS}


def load_config(args: argparse.Namespace) -> Config:
    config = Config.load(raw_flags(args), db=default_db_path())
    if config.db == default_db_path() and config.db != ":memory:":
        Path(config.db).parent.mkdir(parents=True, exist_ok=True)
    return config


def check_workers(config: Config) -> None:
    """``--workers N`` (N > 1) is one service only on a shared database and broker."""
    if config.workers > 1 and not is_shared(config):
        raise ConfigError(f"--workers {config.workers} needs a shared database and broker: "
                          "--db postgresql://... --broker redis://...")


def prepare_server(config: Config) -> None:
    """What start-up checks before serving, each failure one line: the metrics directory,
    the database (SQLite: its lock, held until this process ends, so a second server on
    the file stops here; PostgreSQL: reachable, migrated), and the first admin."""
    metrics.check_multiprocess_dir()
    if not is_postgres(config.db):  # many processes share a PostgreSQL database
        lock_exclusively(config.db)  # its descriptor stays open: held until the process ends
    asyncio.run(with_store(config.db, lambda store, _: first_start(store, config), None))


def run_server(config: Config, *, listen_fd: int | None = None) -> int:
    """Serve in this process; on ``listen_fd``, a socket already listening (a child of
    ``--workers``), else on ``--host``/``--port``."""
    from .app import create_app
    from .server import serve

    logs.configure(config.log_level, config.log_format)
    check_workers(config)
    prepare_server(config)
    app = create_app(config)
    logging.getLogger(__name__).info("hitl on http://%s:%s (database %s, pid %d)",
                                     config.host, config.port, safe_url(config.db),
                                     os.getpid())
    if listen_fd is None:
        asyncio.run(serve(app, config))
    else:  # the parent and the terminal may both pass on one Ctrl-C
        asyncio.run(serve(app, config, bind=[f"fd://{listen_fd}"], same_signal_within=1.0))
    abandoned = app.extensions["runner"].pool.busy
    if abandoned:  # a synchronous processor still blocking in its thread: do not wait for it
        logging.getLogger(__name__).warning("abandoning %d running processor(s)", abandoned)
        logging.shutdown()
        os._exit(0)
    return 0


def safe_url(text: str) -> str:
    """A database or broker address for a log line: a URL's password left out."""
    from urllib.parse import urlsplit

    url = urlsplit(text)
    if not url.scheme or url.password is None:
        return text
    netloc = url.netloc.rsplit("@", 1)[1]
    return url._replace(netloc=f"{url.username or ''}:***@{netloc}").geturl()


async def first_start(store: Store, config: Config) -> None:
    """With accounts on and no admin yet: make one, and print a one-time sign-in link."""
    accounts = Accounts(store)
    if config.auth != "accounts" or await accounts.has_admin():
        return
    if await accounts.user("admin") is None:
        await accounts.add_user("admin", Role.ADMIN, display_name="Administrator")
    secret = await accounts.create_link("admin")
    host = f"[{config.host}]" if ":" in config.host else config.host
    print(f"\nhitl: no admin yet, so one was made. Sign in as admin within 15 minutes "
          f"(one use) at:\n\n    http://{host}:{config.port}/login/once/{secret}\n\n"
          "then add users: hitl users add NAME --role reviewer --password-stdin\n"
          "and API tokens: hitl tokens create --user NAME\n", flush=True)


async def with_store(path: str, command: Callable[[Store, argparse.Namespace | None],
                                                  Awaitable[object]],
                     args: argparse.Namespace | None) -> int:
    store = open_store(path)
    await store.open()
    try:
        result = await command(store, args)
    finally:
        await store.close()
    return result if isinstance(result, int) else 0


async def list_command(store: Store, args: argparse.Namespace | None) -> int:
    assert args is not None
    status = Status(args.status) if args.status else None
    tasks, total = await store.list_tasks(status, args.limit, 0)
    for task in tasks:
        texts = one_line(task.task_input)
        if task.processed_output is not None:
            texts += " → " + one_line(task.processed_output)
        print(f"{task.task_id}  {task.status.value:<19} attempt {task.attempt}  "
              f"{iso(task.created_at)}  {texts}")
    print(f"({len(tasks)} of {total} task(s))", file=sys.stderr)
    return 0


def one_line(text: str, width: int = 50) -> str:
    """A text's start on one line, for a listing: ``…`` says it goes on."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 1] + "…"


async def show_command(store: Store, args: argparse.Namespace | None) -> int:
    assert args is not None
    try:
        task = await store.get_task(await store.resolve_task_id(args.task_id))
    except Invalid as exc:  # an ambiguous prefix
        print(f"hitl: {exc}", file=sys.stderr)
        return 1
    if task is None:
        print(f"hitl: no task with id {args.task_id!r}", file=sys.stderr)
        return 1
    print(json.dumps(task.to_json(), indent=2, ensure_ascii=False))
    return 0


async def export_command(store: Store, args: argparse.Namespace | None) -> int:
    assert args is not None
    out: TextIO = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        async for task in store.iter_tasks():
            out.write(json.dumps(task.to_json(), ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


COMMANDS: dict[tuple[str, str | None], Callable[[Store, argparse.Namespace | None],
                                                 Awaitable[int]]] = {
    ("tasks", "list"): list_command, ("tasks", "show"): show_command,
    ("export", None): export_command, **cli_accounts.COMMANDS, **cli_webhooks.COMMANDS}
