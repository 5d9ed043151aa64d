"""``hitl webhooks add|list|remove``: webhook endpoints, on the database.

A running ``hitl serve`` finds endpoints added or removed here within ``--webhook-poll``
seconds.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable

from .models import iso
from .store import Store
from .webhooks import EVENTS, Webhooks

Command = Callable[[Store, argparse.Namespace | None], Awaitable[int]]


def add_commands(commands: argparse._SubParsersAction,  # type: ignore[type-arg]
                 add_db_option: Callable[[argparse.ArgumentParser], None]) -> None:
    webhooks = commands.add_parser("webhooks", help="manage webhook endpoints")
    actions = webhooks.add_subparsers(dest="webhooks_command", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="register an endpoint; prints its id (and secret)")
    add.add_argument("url")
    add.add_argument("--event", action="append", default=[], choices=EVENTS,
                     help="an event to send (repeatable; default: all)")
    add.add_argument("--secret", help="whsec_<base64> (default: a new one, printed)")
    listing = actions.add_parser("list", help="endpoints with their recent delivery attempts")
    remove = actions.add_parser("remove", help="stop sending to an endpoint")
    remove.add_argument("id")
    for parser in (add, listing, remove):
        add_db_option(parser)


async def webhooks_add(store: Store, args: argparse.Namespace | None) -> int:
    assert args is not None
    endpoint = await Webhooks(store).add(args.url, args.event, args.secret)
    events = ", ".join(endpoint.events) or "all events"
    print(f"added webhook {endpoint.id} for {endpoint.url} ({events})")
    if args.secret is None:
        print("its secret, for verifying signatures (shown once):")
        print(endpoint.secret)
    return 0


async def webhooks_list(store: Store, args: argparse.Namespace | None) -> int:
    webhooks = Webhooks(store)
    for endpoint in await webhooks.endpoints():
        events = ",".join(endpoint.events) or "all"
        print(f"{endpoint.id}  {endpoint.url}  events {events}  at message {endpoint.cursor}")
        if endpoint.retry_gid is not None and endpoint.next_retry is not None:
            print(f"    retrying message {endpoint.retry_gid} (tries {endpoint.retry_tries}), "
                  f"next at {iso(endpoint.next_retry)}")
        for attempt in await webhooks.attempts(endpoint.id):
            code = attempt.status_code if attempt.status_code is not None else "-"
            line = (f"    {iso(attempt.at)}  {attempt.type:<24} {attempt.message_id} "
                    f"try {attempt.try_number}  {code}  {attempt.outcome}")
            if attempt.error:
                line += f"  {attempt.error}"
            if attempt.next_retry is not None:
                line += f"  next retry {iso(attempt.next_retry)}"
            print(line)
    return 0


async def webhooks_remove(store: Store, args: argparse.Namespace | None) -> int:
    assert args is not None
    await Webhooks(store).remove(args.id)
    print(f"removed webhook {args.id}")
    return 0


COMMANDS: dict[tuple[str, str | None], Command] = {
    ("webhooks", "add"): webhooks_add, ("webhooks", "list"): webhooks_list,
    ("webhooks", "remove"): webhooks_remove,
}
