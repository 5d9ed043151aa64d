"""``hitl users ...`` and ``hitl tokens ...``: accounts and API tokens, on the database."""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Awaitable, Callable

from .accounts import Accounts, Role
from .errors import Invalid
from .models import iso
from .store import Store

Command = Callable[[Store, argparse.Namespace | None], Awaitable[int]]


def add_commands(commands: argparse._SubParsersAction,  # type: ignore[type-arg]
                 add_db_option: Callable[[argparse.ArgumentParser], None]) -> None:
    users = commands.add_parser("users", help="manage accounts")
    actions = users.add_subparsers(dest="users_command", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="add a user")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=[role.value for role in Role])
    add.add_argument("--group", action="append", default=[], help="a group (repeatable)")
    add.add_argument("--display-name", help="the name shown to people (default: NAME)")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from standard input (asked twice on a terminal)")
    listing = actions.add_parser("list", help="list users")
    disable = actions.add_parser("disable", help="disable a user: sessions and tokens stop")
    disable.add_argument("name")
    passwd = actions.add_parser("passwd", help="set a user's password")
    passwd.add_argument("name")
    passwd.add_argument("--password-stdin", action="store_true",
                        help="read the password from standard input (asked twice on a terminal)")
    link = actions.add_parser("link", help="print a one-time sign-in link token (15 min)")
    link.add_argument("name")
    for parser in (add, listing, disable, passwd, link):
        add_db_option(parser)

    tokens = commands.add_parser("tokens", help="manage API tokens")
    actions = tokens.add_subparsers(dest="tokens_command", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="create a token; it is printed once")
    create.add_argument("--user", required=True)
    create.add_argument("--label", default="")
    create.add_argument("--expires", type=float, metavar="DAYS", help="valid for DAYS days")
    listing = actions.add_parser("list", help="list tokens (never the tokens themselves)")
    revoke = actions.add_parser("revoke", help="revoke a token")
    revoke.add_argument("id")
    for parser in (create, listing, revoke):
        add_db_option(parser)


def read_password(args: argparse.Namespace) -> str | None:
    if not args.password_stdin:
        return None
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Password again: "):
            raise Invalid("the passwords differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


async def users_add(store: Store, args: argparse.Namespace | None) -> int:
    assert args is not None
    user = await Accounts(store).add_user(args.name, Role(args.role), password=read_password(args),
                                          groups=tuple(args.group),
                                          display_name=args.display_name)
    print(f"added {user.role.value} {user.name!r}"
          + ("" if user.has_password else " (no password: sign in with `hitl users link`)"))
    return 0


async def users_list(store: Store, args: argparse.Namespace | None) -> int:
    for user in await Accounts(store).users():
        state = "disabled" if user.disabled_at else "enabled"
        groups = ",".join(user.groups) or "-"
        print(f"{user.name:<20} {user.role.value:<10} {state:<9} groups {groups:<20} "
              f"{user.display_name}")
    return 0


async def users_disable(store: Store, args: argparse.Namespace | None) -> int:
    assert args is not None
    await Accounts(store).disable(args.name)
    print(f"disabled {args.name!r}: their sessions ended and their tokens stopped")
    return 0


async def users_passwd(store: Store, args: argparse.Namespace | None) -> int:
    assert args is not None
    password = read_password(args)
    if password is None:
        raise Invalid("give the password with --password-stdin")
    await Accounts(store).set_password(args.name, password)
    print(f"password set for {args.name!r}")
    return 0


async def users_link(store: Store, args: argparse.Namespace | None) -> int:
    assert args is not None
    secret = await Accounts(store).create_link(args.name)
    print("sign in once within 15 minutes at http://HOST:PORT/login/once/<token>; token:")
    print(secret)
    return 0


async def tokens_create(store: Store, args: argparse.Namespace | None) -> int:
    assert args is not None
    info, secret = await Accounts(store).create_token(args.user, args.label, args.expires)
    expires = iso(info.expires_at) if info.expires_at else "never"
    print(f"token {info.id} for {info.user_name!r} (label {info.label!r}, expires {expires}); "
          "it is shown once:")
    print(secret)
    return 0


async def tokens_list(store: Store, args: argparse.Namespace | None) -> int:
    for info in await Accounts(store).tokens():
        state = "revoked" if info.revoked_at else (
            f"expires {iso(info.expires_at)}" if info.expires_at else "no expiry")
        print(f"{info.id}  {info.user_name:<20} {state:<34} {info.label}")
    return 0


async def tokens_revoke(store: Store, args: argparse.Namespace | None) -> int:
    assert args is not None
    await Accounts(store).revoke_token(args.id)
    print(f"revoked token {args.id}")
    return 0


COMMANDS: dict[tuple[str, str | None], Command] = {
    ("users", "add"): users_add, ("users", "list"): users_list,
    ("users", "disable"): users_disable, ("users", "passwd"): users_passwd,
    ("users", "link"): users_link,
    ("tokens", "create"): tokens_create, ("tokens", "list"): tokens_list,
    ("tokens", "revoke"): tokens_revoke,
}
