"""PostgreSQL connections (asyncpg) that speak to hitl's SQL as aiosqlite's do.

hitl's statements are written once, in the SQL both engines share, with ``:name``
parameters. :func:`translate` turns one into PostgreSQL's (``$1`` parameters and the few
functions named differently), once per statement text; :class:`Connection` and
:class:`PoolReader` offer the calls the modules make of an aiosqlite connection
(``execute``, ``execute_fetchall``, ``executemany``, a cursor's ``rowcount`` and
``fetchone``). A statement that must differ beyond that is written per engine, beside
its SQLite twin, where the module owns it (``store.dialect`` says which).
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import asyncpg

from .errors import StorageUnavailable

Params = Mapping[str, Any] | Sequence[Any] | None

# SQLite's clock expression (hitl.store.NOW) and PostgreSQL's: seconds since the epoch.
SQLITE_NOW = "((julianday('now') - 2440587.5) * 86400.0)"
PG_NOW = "(extract(epoch from clock_timestamp())::float8)"

_LITERAL_OR_PARAM = re.compile(r"'(?:[^']|'')*'|::|:([A-Za-z_]\w*)|\?")
_REWRITES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\bIS\s+NOT\s+(?=:\w)", re.I), "IS DISTINCT FROM "),
    (re.compile(r"\bIS\s+(?=:\w)", re.I), "IS NOT DISTINCT FROM "),
    (re.compile(r"(?<![\w:]):(\w+)\s+IS\s+NULL\b", re.I), r"CAST(:\1 AS text) IS NULL"),
    (re.compile(r"\bjson_each\(([^()]*)\)", re.I), r"json_array_elements_text(CAST(\1 AS json))"),
    (re.compile(r"\bjson_group_array\(", re.I), "json_agg("),
    (re.compile(r"\bjson_object\(", re.I), "json_build_object("),
    (re.compile(r"\s+LIKE\s+", re.I), " ILIKE "),  # SQLite's LIKE ignores ASCII case
)


@functools.lru_cache(maxsize=1024)
def translate(sql: str) -> tuple[str, tuple[str, ...]]:
    """PostgreSQL's text of a statement, and the parameter names in ``$n`` order (``?``
    parameters are numbered as they come, named ``"0"``, ``"1"``...)."""
    sql = sql.replace(SQLITE_NOW, PG_NOW)
    if re.match(r"\s*INSERT\s+OR\s+IGNORE\s+", sql, re.I):
        sql = re.sub(r"OR\s+IGNORE\s+", "", sql, count=1, flags=re.I).rstrip().rstrip(";")
        sql += " ON CONFLICT DO NOTHING"
    for pattern, replacement in _REWRITES:
        sql = pattern.sub(replacement, sql)
    names: list[str] = []
    positional = 0

    def number(match: re.Match[str]) -> str:
        nonlocal positional
        text = match.group(0)
        if text.startswith("'") or text == "::":
            return text
        name = match.group(1)
        if name is None:  # a ? parameter
            name = str(positional)
            positional += 1
        elif name in names:
            return f"${names.index(name) + 1}"
        names.append(name)
        return f"${len(names)}"

    return _LITERAL_OR_PARAM.sub(number, sql), tuple(names)


def arguments(names: tuple[str, ...], params: Params) -> list[Any]:
    if params is None:
        return []
    if isinstance(params, Mapping):
        return [params[name] for name in names]
    return list(params)


def _returns_rows(sql: str) -> bool:
    head = sql.lstrip().split(None, 1)[0].upper() if sql.strip() else ""
    return head in ("SELECT", "WITH", "VALUES") or " RETURNING " in f" {sql.upper()} "


def _count(status: str) -> int:
    """The rows a command touched, from its status ("UPDATE 3", "INSERT 0 1")."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else -1


class Cursor:
    """A statement's outcome: its rows, and how many rows it touched (``rowcount``).

    Awaitable, and an async context manager, as aiosqlite's ``execute`` is."""

    def __init__(self, conn: Connection | None, sql: str, params: Params) -> None:
        self._conn, self._sql, self._params = conn, sql, params
        self.rows: list[asyncpg.Record] = []
        self.rowcount = -1
        self._next = 0

    async def _run(self) -> Cursor:
        text, names = translate(self._sql)
        args = arguments(names, self._params)
        assert self._conn is not None
        raw = self._conn.raw
        if _returns_rows(text):
            self.rows = await raw.fetch(text, *args)
            self.rowcount = len(self.rows)
        else:
            self.rowcount = _count(await raw.execute(text, *args))
        return self

    def __await__(self) -> Any:
        return self._run().__await__()

    async def __aenter__(self) -> Cursor:
        return await self._run()

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def fetchone(self) -> asyncpg.Record | None:
        row = self.rows[self._next] if self._next < len(self.rows) else None
        self._next += 1
        return row

    async def fetchmany(self, size: int) -> list[asyncpg.Record]:
        rows = self.rows[self._next:self._next + size]
        self._next += len(rows)
        return rows

    async def fetchall(self) -> list[asyncpg.Record]:
        rows = self.rows[self._next:]
        self._next = len(self.rows)
        return rows


class Connection:
    """One asyncpg connection (inside a transaction, usually), spoken to as aiosqlite's."""

    def __init__(self, raw: asyncpg.Connection) -> None:
        self.raw = raw

    def execute(self, sql: str, params: Params = None) -> Cursor:
        return Cursor(self, sql, params)

    async def execute_fetchall(self, sql: str, params: Params = None) -> list[asyncpg.Record]:
        text, names = translate(sql)
        return list(await self.raw.fetch(text, *arguments(names, params)))

    async def executemany(self, sql: str, seq: Iterable[Params]) -> None:
        text, names = translate(sql)
        rows = [arguments(names, params) for params in seq]
        if rows:
            await self.raw.executemany(text, rows)


class PoolReader:
    """Reads outside any transaction, each on a connection of the pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    def execute(self, sql: str, params: Params = None) -> _PooledCursor:
        return _PooledCursor(self.pool, sql, params)

    async def execute_fetchall(self, sql: str, params: Params = None) -> list[asyncpg.Record]:
        text, names = translate(sql)
        with unavailable():
            async with self.pool.acquire() as raw:
                return list(await raw.fetch(text, *arguments(names, params)))


class _PooledCursor(Cursor):
    """A cursor whose statement runs on a connection taken from the pool for it alone."""

    def __init__(self, pool: asyncpg.Pool, sql: str, params: Params) -> None:
        super().__init__(None, sql, params)
        self._pool = pool

    async def _run(self) -> Cursor:
        with unavailable():
            async with self._pool.acquire() as raw:
                self._conn = Connection(raw)
                try:
                    return await super()._run()
                finally:
                    self._conn = None


@contextlib.contextmanager
def unavailable() -> Iterator[None]:
    """A read the database cannot answer (down, restarting, cut off) is a 503, as a write."""
    try:
        yield
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise StorageUnavailable(f"{type(exc).__name__}: {exc}") from exc


def is_postgres_url(target: str) -> bool:
    return target.startswith(("postgresql://", "postgres://"))
