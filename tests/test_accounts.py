"""Accounts, tokens, sessions, sign-in links and the throttle, on the store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hitl.accounts import Accounts, Role, checked_name
from hitl.errors import Conflict, Invalid, NotFound
from hitl.store import Store

ON_POSTGRESQL = True  # and on SQLite (tests/conftest.py)


@pytest.fixture
async def accounts(tmp_path: Path) -> AsyncIterator[Accounts]:
    store = Store(str(tmp_path / "hitl.db"))
    await store.open()
    yield Accounts(store)
    await store.close()


async def test_a_password_is_checked_and_never_stored_in_clear(accounts: Accounts,
                                                               tmp_path: Path) -> None:
    await accounts.add_user("ann", Role.REVIEWER, password="correct horse")
    assert (await accounts.verify_password("ann", "correct horse")) is not None
    assert await accounts.verify_password("ann", "wrong horse") is None
    assert await accounts.verify_password("nobody", "correct horse") is None
    await accounts.store.close()
    assert b"correct horse" not in (tmp_path / "hitl.db").read_bytes()
    await accounts.store.open()


async def test_a_token_works_until_revoked_or_expired(accounts: Accounts) -> None:
    await accounts.add_user("bot", Role.SUBMITTER)
    info, secret = await accounts.create_token("bot", "ci")
    identity = await accounts.by_token(secret)
    assert identity is not None and identity.name == "bot" and identity.token_label == "ci"
    await accounts.revoke_token(info.id)
    assert await accounts.by_token(secret) is None
    _, short = await accounts.create_token("bot", expires_days=1e-9)
    await asyncio.sleep(0.01)
    assert await accounts.by_token(short) is None
    assert await accounts.by_token("hitl_unknown") is None


async def test_disabling_a_user_ends_sessions_and_tokens(accounts: Accounts) -> None:
    user = await accounts.add_user("ann", Role.REVIEWER, password="correct horse")
    _, secret = await accounts.create_token("ann")
    session = await accounts.start_session(user, "password")
    assert await accounts.by_session(session) is not None
    await accounts.disable("ann")
    assert await accounts.by_session(session) is None
    assert await accounts.by_token(secret) is None
    assert await accounts.verify_password("ann", "correct horse") is None
    with pytest.raises(NotFound):
        await accounts.disable("ann")


async def test_a_sign_in_link_works_once(accounts: Accounts) -> None:
    await accounts.add_user("admin", Role.ADMIN)
    secret = await accounts.create_link("admin")
    results = await asyncio.gather(*(accounts.use_link(secret) for _ in range(5)))
    assert sum(user is not None for user in results) == 1
    assert await accounts.use_link(secret) is None


async def test_failed_sign_ins_are_throttled(accounts: Accounts) -> None:
    keys = ["user:ann", "addr:127.0.0.1"]
    for _ in range(4):
        await accounts.record_failure(keys)
    assert await accounts.throttled(keys) == 0
    await accounts.record_failure(keys)
    wait = await accounts.throttled(keys)
    assert 50 < wait <= 60
    assert await accounts.throttled(["user:bob"]) == 0


@pytest.mark.parametrize("name", ["alice\u202e", "a\x00b", "", "x" * 65, "bo\u200bb"])
async def test_names_with_control_or_format_characters_are_refused(name: str) -> None:
    with pytest.raises(Invalid):
        checked_name(name)


async def test_user_names_are_plain_and_unique(accounts: Accounts) -> None:
    await accounts.add_user("Ann", Role.REVIEWER)
    with pytest.raises(Conflict):
        await accounts.add_user("ann", Role.VIEWER)
    for look_alike in ("\u0430nn", "ann (CEO)", "ann\u202e"):  # Cyrillic а, spaces, RLO
        with pytest.raises(Invalid):
            await accounts.add_user(look_alike, Role.VIEWER)
    assert [u.name for u in await accounts.users()] == ["ann"]


async def test_the_secret_key_is_made_once_and_kept(accounts: Accounts) -> None:
    first = await accounts.secret_key()
    assert first == await accounts.secret_key() and len(first) > 40
