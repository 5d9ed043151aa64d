"""``hitl submit|watch|approve|reject|cancel|wait|next``: the service driven over HTTP, with
:mod:`hitl.client` (``--url`` / ``HITL_URL``, ``--token`` / ``HITL_TOKEN``).

Exit status: 0 done (``wait``: the task completed), 1 refused by the server or, for
``wait``, the task failed or was cancelled (``next``: none waits), 2 a usage error (a URL
that is not one, an input that is not UTF-8 text), 3 the service unreachable or a ``wait``
that timed out. An error is one line, ``hitl: <the server's message>``, never a traceback.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from .client import Client, HitlError, Unavailable
from .config import default_of

DEFAULT_URL = f"http://{default_of('host')}:{default_of('port')}"  # where `hitl serve` listens
Command = Callable[[Client, argparse.Namespace], int]


class UsageError(Exception):
    """A bad argument found after parsing (standard input named twice, a URL that is not
    one, a file that is not text): exit status 2."""


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--url", help=f"the service [HITL_URL, default {DEFAULT_URL}]")
    server.add_argument("--token", help="an API token (hitl tokens create); HITL_TOKEN keeps "
                        "it out of the process list [HITL_TOKEN]")

    def command(name: str, run: Command, help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = commands.add_parser(
            name, parents=[server], help=help, description=help)
        parser.set_defaults(run=lambda args: run_command(run, args))
        return parser

    submit = command("submit", submit_command, "submit a task; prints its id")
    submit.add_argument("text", help="the task input, or - to read it from standard input")
    submit.add_argument("--title")
    submit.add_argument("--reviewer", action="append", dest="reviewers", metavar="NAME",
                        help="who may decide it: a user or group:NAME (repeatable)")
    submit.add_argument("--quorum", type=int, help="distinct approvals an attempt needs")
    submit.add_argument("--output", metavar="TEXT", help="a draft already made (- reads "
                        "standard input): the task starts waiting for review of it")
    submit.add_argument("--metadata", type=json_object, metavar="JSON",
                        help="a JSON object, stored with the task")
    submit.add_argument("--max-attempts", type=int, metavar="N")
    submit.add_argument("--review-timeout", type=float, metavar="SECONDS")
    submit.add_argument("--on-timeout", choices=["fail", "reject", "approve", "escalate"])
    submit.add_argument("--escalate-to", action="append", metavar="NAME")
    submit.add_argument("--allow-self-review", action="store_true", default=None)
    submit.add_argument("--idempotency-key", metavar="KEY",
                        help="a retry with the same key makes no second task")
    watch = command("watch", watch_command, "print a task's events as they happen, one a "
                    "line (id, status, the rest as JSON), until it finishes")
    watch.add_argument("task_id")
    watch.add_argument("--since", type=int, metavar="ID",
                       help="the events after this id (0: all; default: from its state now)")
    approve = command("approve", approve_command, "approve the output under review")
    approve.add_argument("task_id")
    approve.add_argument("-m", "--comment", help="a comment")
    approve.add_argument("--edit", metavar="FILE",
                         help="approve this file's text instead (- reads standard input)")
    reject = command("reject", reject_command, "reject the output under review; the "
                     "comment goes to the next attempt")
    reject.add_argument("task_id")
    reject.add_argument("-m", "--comment", required=True, help="what to change")
    for decide in (approve, reject):
        decide.add_argument("--attempt", type=int, help="only if this attempt is under review")
        decide.add_argument("--reviewer", help="the name recorded (with --auth none only)")
    cancel = command("cancel", cancel_command, "cancel an unfinished task")
    cancel.add_argument("task_id")
    wait = command("wait", wait_command, "wait until a task finishes; print its result (exit "
                   "0 completed, 1 failed or cancelled, 3 timed out or unreachable)")
    wait.add_argument("task_id")
    wait.add_argument("--timeout", type=float, metavar="SECONDS")
    command("next", next_command, "reserve the next task waiting for your review; print it "
            "as JSON (exit 1 when none waits)")


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def run_command(run: Command, args: argparse.Namespace) -> int:
    """Run one command with a client of the service the flags or the environment name."""
    url = args.url or os.environ.get("HITL_URL") or DEFAULT_URL
    token = args.token or os.environ.get("HITL_TOKEN") or None
    try:
        checked_url(url, "--url" if args.url else "HITL_URL")
        with Client(url, token) as client:
            return run(client, args)
    except UsageError as exc:
        return fail(str(exc), 2)
    except (Unavailable, TimeoutError) as exc:
        return fail(exc.message if isinstance(exc, HitlError) else str(exc), 3)
    except HitlError as exc:
        return fail(exc.message, 1)
    except BrokenPipeError:  # the reader went away (hitl watch ID | head -1): say nothing
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:  # a file that cannot be read
        return fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc), 1)
    except KeyboardInterrupt:  # a watch or a wait stopped with Ctrl-C
        return 130


def fail(message: str, status: int) -> int:
    print(f"hitl: {message}", file=sys.stderr)
    return status


def checked_url(url: str, given_by: str) -> None:
    """An http(s) URL with a host, or a usage error: an unreachable service it is not."""
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        valid = False
    if not valid:
        raise UsageError(f"{given_by} {url!r} is not an http:// or https:// URL")


def read_text(value: str, stdin_taken: bool = False) -> str:
    """A text given on the command line, or ``-``: standard input (which can be read once)."""
    if value != "-":
        return value
    if stdin_taken:
        raise UsageError("standard input (-) can be read only once")
    return read_stdin()


def read_file(path: str) -> str:
    """A file's text, or standard input's for ``-``."""
    if path == "-":
        return read_stdin()
    with open(path, encoding="utf-8") as file, utf8(path):
        return file.read()


def read_stdin() -> str:
    if isinstance(sys.stdin, io.TextIOWrapper):  # UTF-8 whatever the locale, as the API's
        sys.stdin.reconfigure(encoding="utf-8", errors="strict")
    with utf8("standard input"):
        return sys.stdin.read()


@contextmanager
def utf8(name: str) -> Iterator[None]:
    """Text that does not decode as UTF-8 is a usage error naming where it came from."""
    try:
        yield
    except UnicodeDecodeError:
        raise UsageError(f"{name}: not UTF-8 text") from None


def submit_command(client: Client, args: argparse.Namespace) -> int:
    data = read_text(args.text)
    options: dict[str, Any] = {name: getattr(args, name) for name in (
        "title", "reviewers", "quorum", "metadata", "max_attempts", "review_timeout",
        "on_timeout", "escalate_to", "allow_self_review", "idempotency_key")}
    if args.output is not None:
        options["output"] = read_text(args.output, stdin_taken=args.text == "-")
    print(client.submit(data, **{k: v for k, v in options.items() if v is not None}).task_id)
    return 0


def watch_command(client: Client, args: argparse.Namespace) -> int:
    client.get(args.task_id)  # an unknown task, or no service at all, fails at once
    for event in client.watch(args.task_id, last_event_id=args.since):
        rest = {k: v for k, v in event.data.items() if k not in ("task_id", "status")}
        print(event.id, event.status, json.dumps(rest, ensure_ascii=False), flush=True)
    return 0


def approve_command(client: Client, args: argparse.Namespace) -> int:
    edited = read_file(args.edit) if args.edit is not None else None
    client.approve(args.task_id, args.comment, edited, args.attempt, reviewer=args.reviewer)
    return 0


def reject_command(client: Client, args: argparse.Namespace) -> int:
    client.reject(args.task_id, args.comment, args.attempt, reviewer=args.reviewer)
    return 0


def cancel_command(client: Client, args: argparse.Namespace) -> int:
    client.cancel(args.task_id)
    return 0


def wait_command(client: Client, args: argparse.Namespace) -> int:
    task = client.wait(args.task_id, timeout=args.timeout)
    if task.completed:
        print(task.final_result or "")
        return 0
    if task.status == "failed":
        return fail(f"task {task.task_id} failed: {task.error or 'no reason given'}", 1)
    return fail(f"task {task.task_id} was {task.status}", 1)


def next_command(client: Client, args: argparse.Namespace) -> int:
    task = client.next_review()
    if task is None:
        return fail("no task waits for your review", 1)
    print(json.dumps(dict(task.raw), indent=2, ensure_ascii=False))
    return 0
