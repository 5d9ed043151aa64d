"""Who is who: accounts, API tokens, browser sessions and one-time sign-in links.

Every rule here lives in the store (a token's expiry and revocation, a session's end, a
link's single use, the sign-in throttle), so a second process on the same database
enforces it alike. Secrets are stored only as hashes: passwords with argon2, tokens,
session ids and links (random, 256 bits) with SHA-256, which is enough for a random
secret and fast on every request.

Its SQL sits here rather than in :mod:`hitl.store` to keep each module to one thing;
it runs on the store's own connections and transactions.
"""

from __future__ import annotations

import functools
import hashlib
import json
import secrets
import time
import unicodedata
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from .errors import Conflict, Invalid, NotFound
from .store import Store

TOKEN_PREFIX = "hitl_"
SESSION_DAYS = 30
LINK_MINUTES = 15
THROTTLE = (5, 60.0)  # failed sign-ins allowed per account and per address, per seconds
MAX_NAME = 64

Method = Literal["password", "link", "token", "proxy", "none", "system", "metrics"]
# Names of the service's own identities (a review timing out is decided by ``timeout``):
# no account, proxy user or typed reviewer name may take one.
SYSTEM_NAMES = frozenset({"timeout"})

_hasher = PasswordHasher()


class Role(StrEnum):
    ADMIN = "admin"
    REVIEWER = "reviewer"
    SUBMITTER = "submitter"
    VIEWER = "viewer"
    WORKER = "worker"


@dataclass(frozen=True, slots=True)
class User:
    name: str
    display_name: str
    role: Role
    groups: tuple[str, ...] = ()
    created_at: float = field(default_factory=time.time)
    disabled_at: float | None = None
    has_password: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "display_name": self.display_name, "role": self.role.value,
                "groups": list(self.groups), "created_at": self.created_at,
                "disabled": self.disabled_at is not None}


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is asking, and how they proved it: resolved once per request."""

    user: User
    method: Method
    token_label: str | None = None
    csrf: str | None = None  # the session's token for forms (browser sessions only)

    @property
    def name(self) -> str:
        return self.user.name


@dataclass(frozen=True, slots=True)
class TokenInfo:
    id: str
    user_name: str
    label: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "user": self.user_name, "label": self.label,
                "created_at": self.created_at, "expires_at": self.expires_at,
                "revoked": self.revoked_at is not None, "last_used_at": self.last_used_at}


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def checked_name(name: str, what: str = "user name") -> str:
    """A name shown to people: printable, no control or format characters (a right-to-left
    override renders 'alice' from other letters), at most MAX_NAME characters."""
    name = unicodedata.normalize("NFC", name.strip())
    if not name or len(name) > MAX_NAME:
        raise Invalid(f"{what} must be 1 to {MAX_NAME} characters")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in name):
        raise Invalid(f"{what} must not contain control or formatting characters")
    return name


def checked_login(name: str) -> str:
    """Sign-in names: lower-case letters, digits and ``._-`` (no look-alikes)."""
    name = checked_name(name)
    if not all(ch.isascii() and (ch.isalnum() or ch in "._-") for ch in name):
        raise Invalid("user name may use ASCII letters, digits, '.', '_' and '-' only")
    if name.lower() in SYSTEM_NAMES:
        raise Invalid(f"user name {name.lower()!r} is the service's own")
    return name.lower()


class Accounts:
    """Accounts, tokens, sessions and links, kept in the store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # --- users ----------------------------------------------------------------------

    async def add_user(self, name: str, role: Role, *, password: str | None = None,
                       groups: tuple[str, ...] = (), display_name: str | None = None) -> User:
        name = checked_login(name)
        display = checked_name(display_name or name, "display name")
        groups = tuple(checked_login(group) for group in groups)
        if password is not None:
            check_password(password)
        user = User(name, display, role, groups, has_password=password is not None)
        async with self.store.transaction() as conn:
            exists = await conn.execute_fetchall(
                "SELECT 1 FROM users WHERE name = :name", {"name": name})
            if exists:
                raise Conflict(f"user {name!r} already exists")
            await conn.execute(
                """INSERT INTO users (name, display_name, role, groups, password_hash,
                                      created_at)
                   VALUES (:name, :display, :role, :groups, :hash, :at)""",
                {"name": name, "display": display, "role": role.value,
                 "groups": json.dumps(list(groups)), "at": user.created_at,
                 "hash": _hasher.hash(password) if password is not None else None})
        return user

    async def user(self, name: str) -> User | None:
        rows = await self.store.reader.execute_fetchall(
            f"SELECT {_USER_COLUMNS} FROM users WHERE name = :name", {"name": name.lower()})
        return next((_user(row) for row in rows), None)

    async def users(self) -> list[User]:
        rows = await self.store.reader.execute_fetchall(
            f"SELECT {_USER_COLUMNS} FROM users ORDER BY name")
        return [_user(row) for row in rows]

    async def has_admin(self) -> bool:
        rows = await self.store.reader.execute_fetchall(
            "SELECT 1 FROM users WHERE role = 'admin' AND disabled_at IS NULL LIMIT 1")
        return bool(rows)

    async def disable(self, name: str) -> None:
        """Disable a user: their sessions end and their tokens stop working at once."""
        async with self.store.transaction() as conn:
            cursor = await conn.execute(
                "UPDATE users SET disabled_at = :at WHERE name = :name AND disabled_at IS NULL",
                {"name": name.lower(), "at": time.time()})
            if cursor.rowcount == 0:
                raise NotFound(f"no enabled user {name!r}")
            await conn.execute("UPDATE sessions SET ended_at = :at WHERE user_name = :name "
                               "AND ended_at IS NULL", {"name": name.lower(), "at": time.time()})

    async def set_password(self, name: str, password: str) -> None:
        check_password(password)
        async with self.store.transaction() as conn:
            cursor = await conn.execute(
                "UPDATE users SET password_hash = :hash WHERE name = :name",
                {"name": name.lower(), "hash": _hasher.hash(password)})
            if cursor.rowcount == 0:
                raise NotFound(f"no user {name!r}")

    async def verify_password(self, name: str, password: str) -> User | None:
        """The user, if the password is theirs and they are enabled (argon2, in a thread)."""
        import asyncio

        rows = await self.store.reader.execute_fetchall(
            f"SELECT {_USER_COLUMNS}, password_hash FROM users WHERE name = :name",
            {"name": name.strip().lower()})
        row = next(iter(rows), None)
        stored = row["password_hash"] if row is not None else None
        ok: bool
        try:  # the same work whether or not the user exists: timing tells nothing
            ok = await asyncio.to_thread(_hasher.verify, stored or dummy_hash(), password)
        except (VerificationError, InvalidHashError):
            ok = False
        if not ok or row is None or stored is None:
            return None
        user = _user(row)
        return user if user.disabled_at is None else None

    async def provision(self, name: str, role: Role, groups: tuple[str, ...],
                        display_name: str | None) -> User:
        """A user first seen through a trusted proxy: known, or added with ``role``."""
        known = await self.user(name)
        if known is not None:
            return known
        try:
            return await self.add_user(name, role, groups=groups, display_name=display_name)
        except Conflict:  # added meanwhile, by another request or process
            known = await self.user(name)
            assert known is not None
            return known

    # --- tokens ---------------------------------------------------------------------

    async def create_token(self, user_name: str, label: str = "",
                           expires_days: float | None = None) -> tuple[TokenInfo, str]:
        """A new API token for the user: its record, and the token itself (shown once)."""
        user = await self.user(user_name)
        if user is None:
            raise NotFound(f"no user {user_name!r}")
        label = checked_name(label, "label") if label else ""
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        info = TokenInfo(secrets.token_hex(6), user.name, label, now,
                         now + expires_days * 86400 if expires_days else None, None, None)
        async with self.store.transaction() as conn:
            await conn.execute(
                """INSERT INTO tokens (id, user_name, label, token_hash, created_at, expires_at)
                   VALUES (:id, :user, :label, :hash, :at, :expires)""",
                {"id": info.id, "user": info.user_name, "label": info.label,
                 "hash": digest(secret), "at": now, "expires": info.expires_at})
        return info, secret

    async def tokens(self) -> list[TokenInfo]:
        rows = await self.store.reader.execute_fetchall(
            """SELECT id, user_name, label, created_at, expires_at, revoked_at, last_used_at
                 FROM tokens ORDER BY created_at""")
        return [TokenInfo(**dict(row)) for row in rows]

    async def revoke_token(self, token_id: str) -> None:
        async with self.store.transaction() as conn:
            cursor = await conn.execute(
                "UPDATE tokens SET revoked_at = :at WHERE id = :id AND revoked_at IS NULL",
                {"id": token_id, "at": time.time()})
            if cursor.rowcount == 0:
                raise NotFound(f"no unrevoked token {token_id!r}")

    async def by_token(self, secret: str) -> Identity | None:
        """The identity a bearer token gives: None if unknown, revoked, expired or its
        user is disabled."""
        rows = await self.store.identity_reader.execute_fetchall(
            f"""SELECT {_USER_COLUMNS}, tokens.label AS token_label
                  FROM tokens JOIN users ON users.name = tokens.user_name
                 WHERE token_hash = :hash AND revoked_at IS NULL AND disabled_at IS NULL
                   AND (expires_at IS NULL OR expires_at > :now)""",
            {"hash": digest(secret), "now": time.time()})
        row = next(iter(rows), None)
        if row is None:
            return None
        return Identity(_user(row), "token", token_label=row["token_label"] or "")

    # --- browser sessions and one-time links ----------------------------------------

    async def start_session(self, user: User, method: Method) -> str:
        """A new browser session; its id goes in the signed cookie, its hash in the store."""
        session_id = secrets.token_urlsafe(32)
        now = time.time()
        async with self.store.transaction() as conn:
            await conn.execute(
                """INSERT INTO sessions (id_hash, user_name, method, csrf, created_at,
                                         expires_at)
                   VALUES (:hash, :user, :method, :csrf, :at, :expires)""",
                {"hash": digest(session_id), "user": user.name, "method": method,
                 "csrf": secrets.token_urlsafe(32), "at": now,
                 "expires": now + SESSION_DAYS * 86400})
        return session_id

    async def by_session(self, session_id: str) -> Identity | None:
        rows = await self.store.identity_reader.execute_fetchall(
            f"""SELECT {_USER_COLUMNS}, sessions.method AS method, sessions.csrf AS csrf
                  FROM sessions JOIN users ON users.name = sessions.user_name
                 WHERE id_hash = :hash AND ended_at IS NULL AND expires_at > :now
                   AND disabled_at IS NULL""",
            {"hash": digest(session_id), "now": time.time()})
        row = next(iter(rows), None)
        if row is None:
            return None
        return Identity(_user(row), row["method"], csrf=row["csrf"])

    async def end_session(self, session_id: str) -> None:
        async with self.store.transaction() as conn:
            await conn.execute("UPDATE sessions SET ended_at = :at WHERE id_hash = :hash",
                               {"hash": digest(session_id), "at": time.time()})

    async def create_link(self, user_name: str) -> str:
        """A sign-in link token for the user: one use, within LINK_MINUTES."""
        if await self.user(user_name) is None:
            raise NotFound(f"no user {user_name!r}")
        secret = secrets.token_urlsafe(32)
        async with self.store.transaction() as conn:
            await conn.execute(
                """INSERT INTO login_links (token_hash, user_name, expires_at)
                   VALUES (:hash, :user, :expires)""",
                {"hash": digest(secret), "user": user_name.lower(),
                 "expires": time.time() + LINK_MINUTES * 60})
        return secret

    async def use_link(self, secret: str) -> User | None:
        """Spend a sign-in link: the first use within its time wins; every other, None."""
        async with self.store.transaction() as conn:
            rows = await conn.execute_fetchall(
                """UPDATE login_links SET used_at = :now
                    WHERE token_hash = :hash AND used_at IS NULL AND expires_at > :now
                RETURNING user_name""",
                {"hash": digest(secret), "now": time.time()})
        row = next(iter(rows), None)
        if row is None:
            return None
        user = await self.user(row[0])
        return user if user is not None and user.disabled_at is None else None

    # --- the sign-in throttle -------------------------------------------------------

    async def throttled(self, keys: list[str]) -> float:
        """Seconds until another sign-in may be tried for any of ``keys`` (0: now)."""
        allowed, window = THROTTLE
        now = time.time()
        wait = 0.0
        for key in keys:
            rows = list(await self.store.reader.execute_fetchall(
                """SELECT at FROM login_failures WHERE key = :key AND at > :since
                    ORDER BY at DESC LIMIT :n""",
                {"key": key, "since": now - window, "n": allowed}))
            if len(rows) >= allowed:
                wait = max(wait, rows[-1][0] + window - now)
        return wait

    async def record_failure(self, keys: list[str]) -> None:
        now = time.time()
        async with self.store.transaction() as conn:
            await conn.executemany("INSERT INTO login_failures (key, at) VALUES (:key, :at)",
                                   [{"key": key, "at": now} for key in keys])
            await conn.execute("DELETE FROM login_failures WHERE at < :old",
                               {"old": now - THROTTLE[1]})

    # --- the signing key --------------------------------------------------------------

    async def secret_key(self) -> str:
        """The key session cookies are signed with: made once, then kept in the store."""
        async with self.store.transaction() as conn:
            await conn.execute("INSERT OR IGNORE INTO settings (key, value) "
                               "VALUES ('secret_key', :value)",
                               {"value": secrets.token_urlsafe(48)})
            rows = await conn.execute_fetchall(
                "SELECT value FROM settings WHERE key = 'secret_key'")
        return str(next(iter(rows))[0])


def check_password(password: str) -> None:
    if len(password) < 8:
        raise Invalid("password must be at least 8 characters")
    if len(password) > 1024:
        raise Invalid("password must be at most 1024 characters")


@functools.cache
def dummy_hash() -> str:
    """What a password is checked against for a name with none: made at first use, as
    hashing takes tens of milliseconds that every ``hitl`` command would pay at import."""
    return _hasher.hash("not a password of anyone's")


_USER_COLUMNS = ("users.name AS name, display_name, role, groups, users.created_at AS "
                 "created_at, disabled_at, password_hash IS NOT NULL AS has_password")


def _user(row: Any) -> User:
    return User(row["name"], row["display_name"], Role(row["role"]),
                tuple(json.loads(row["groups"])), row["created_at"], row["disabled_at"],
                bool(row["has_password"]))
