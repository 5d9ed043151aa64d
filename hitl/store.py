"""All persistence: tasks, review decisions and published messages, in SQLite.

One writer connection takes every change, batched into one transaction per batch
(WAL, ``synchronous=NORMAL``); a second connection serves reads so that a page of
tasks never waits behind a write. ``:memory:`` uses one connection for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
from quart import Quart

from .broker import GLOBAL, HistoryPage
from .errors import StartupError
from .lifecycle import attach
from .models import TERMINAL, Message, Review, Status, Task, TaskEvent

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE tasks (
        task_id          TEXT PRIMARY KEY,
        task_input       TEXT NOT NULL,
        status           TEXT NOT NULL,
        attempt          INTEGER NOT NULL,
        processed_output TEXT,
        final_result     TEXT,
        error            TEXT,
        last_seq         INTEGER NOT NULL,
        created_at       REAL NOT NULL,
        updated_at       REAL NOT NULL
    );
    CREATE INDEX tasks_by_created ON tasks (created_at);
    CREATE INDEX tasks_by_status ON tasks (status, created_at);
    CREATE TABLE reviews (
        id         INTEGER PRIMARY KEY,
        task_id    TEXT NOT NULL REFERENCES tasks (task_id) ON DELETE CASCADE,
        attempt    INTEGER NOT NULL,
        decision   TEXT NOT NULL CHECK (decision IN ('approved', 'rejected')),
        comment    TEXT NOT NULL,
        reviewer   TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX reviews_by_task ON reviews (task_id, id);
    CREATE TABLE messages (
        gid     INTEGER PRIMARY KEY AUTOINCREMENT,
        task_id TEXT NOT NULL REFERENCES tasks (task_id) ON DELETE CASCADE,
        seq     INTEGER NOT NULL,
        status  TEXT NOT NULL,
        data    TEXT NOT NULL,
        UNIQUE (task_id, seq)
    );
    """,
)

_UPSERT_TASK = """
    INSERT INTO tasks (task_id, task_input, status, attempt, processed_output, final_result,
                       error, last_seq, created_at, updated_at)
    VALUES (:task_id, :task_input, :status, :attempt, :processed_output, :final_result,
            :error, :last_seq, :created_at, :updated_at)
    ON CONFLICT (task_id) DO UPDATE SET
        status = excluded.status, attempt = excluded.attempt,
        processed_output = excluded.processed_output, final_result = excluded.final_result,
        error = excluded.error, last_seq = excluded.last_seq, updated_at = excluded.updated_at
"""
_INSERT_REVIEW = """
    INSERT INTO reviews (task_id, attempt, decision, comment, reviewer, created_at)
    VALUES (:task_id, :attempt, :decision, :comment, :reviewer, :created_at)
"""
_INSERT_MESSAGE = """
    INSERT INTO messages (gid, task_id, seq, status, data)
    VALUES (:gid, :task_id, :seq, :status, :data)
"""
_GLOBAL_PAGE = """
    SELECT gid, task_id, seq, status, data FROM messages
     WHERE gid > :after ORDER BY gid LIMIT :limit
"""
_TASK_PAGE = """
    SELECT gid, task_id, seq, status, data FROM messages
     WHERE task_id = :task_id AND seq > :after ORDER BY seq LIMIT :limit
"""
_LATEST_GID = """
    SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0),
               coalesce((SELECT max(gid) FROM messages), 0))
"""
_TASK_COLUMNS = """task_id, task_input, status, attempt, processed_output, final_result,
                   error, last_seq, created_at, updated_at"""


@dataclass(frozen=True, slots=True)
class Write:
    """One state change: the task's row as it now is, plus what it adds."""

    task: dict[str, Any]
    event: TaskEvent | None = None
    review: Review | None = None


class Store:
    """The database of one hitl service (or of the CLI reading it)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()  # one transaction at a time on the writer

    def init_app(self, app: Quart) -> None:
        attach(app, "store", self, self.open, self.close)

    async def open(self) -> None:
        """Connect, check the file is usable and bring its schema up to date."""
        try:
            self._writer = await self._connect()
            await self._migrate(self._writer)  # StartupError if the schema is too new
            in_memory = self.path == ":memory:" or self.path.startswith("file::memory:")
            self._reader = self._writer if in_memory else await self._connect()
        except StartupError:
            await self.close()
            raise
        except (sqlite3.Error, OSError) as exc:
            await self.close()
            raise StartupError(f"cannot use database {self.path!r}: {exc}") from None

    async def _connect(self) -> aiosqlite.Connection:
        is_uri = self.path.startswith("file:")
        if not is_uri and self.path != ":memory:" and not Path(self.path).parent.is_dir():
            raise StartupError(f"cannot use database {self.path!r}: its directory does not exist")
        pending = aiosqlite.connect(self.path, isolation_level=None, uri=is_uri)
        try:
            conn = await pending
        except sqlite3.Error:
            # aiosqlite stops its thread without awaiting it: let that finish before the
            # loop closes, or its late callback prints a traceback at exit.
            await asyncio.sleep(0.05)
            raise
        conn.row_factory = sqlite3.Row
        try:
            for pragma in ("journal_mode = WAL", "synchronous = NORMAL", "foreign_keys = ON",
                           "busy_timeout = 5000"):
                await conn.execute(f"PRAGMA {pragma}")
        except BaseException:
            await conn.close()  # else its thread keeps the process alive
            raise
        return conn

    async def _migrate(self, conn: aiosqlite.Connection) -> None:
        await conn.execute("BEGIN IMMEDIATE")
        try:
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER)")
            row = await (await conn.execute("SELECT max(version) FROM schema_version")).fetchone()
            version = (row[0] if row else None) or 0
            if version > len(MIGRATIONS):
                raise StartupError(
                    f"database {self.path!r} has schema version {version}, newer than this "
                    f"hitl knows ({len(MIGRATIONS)}): upgrade hitl"
                )
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in filter(str.strip, script.split(";")):
                    await conn.execute(statement)
                await conn.execute("INSERT INTO schema_version VALUES (?)", (number,))
            await conn.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")  # a real write
            await conn.execute("COMMIT")
        except BaseException:
            await conn.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        """Close both connections; safe to call twice."""
        for conn in {id(c): c for c in (self._reader, self._writer) if c is not None}.values():
            await conn.close()
        self._writer = self._reader = None

    @property
    def writer(self) -> aiosqlite.Connection:
        if self._writer is None:
            raise RuntimeError("store is not open")
        return self._writer

    @property
    def reader(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise RuntimeError("store is not open")
        return self._reader

    async def write(self, batch: Sequence[Write]) -> None:
        """Apply a batch of changes in one transaction: all of them or none."""
        tasks = list({w.task["task_id"]: w.task for w in batch}.values())  # newest row wins
        reviews = [{"task_id": w.task["task_id"], **_review_row(w.review)}
                   for w in batch if w.review is not None]
        messages = [_message_row(w.event) for w in batch if w.event is not None]
        async with self._transaction() as conn:
            await conn.executemany(_UPSERT_TASK, tasks)
            if reviews:
                await conn.executemany(_INSERT_REVIEW, reviews)
            if messages:
                await conn.executemany(_INSERT_MESSAGE, messages)

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._write_lock:
            conn = self.writer
            await conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                await conn.execute("ROLLBACK")
                raise
            await conn.execute("COMMIT")

    async def get_task(self, task_id: str) -> Task | None:
        rows = await self.reader.execute_fetchall(
            f"SELECT {_TASK_COLUMNS} FROM tasks WHERE task_id = :task_id", {"task_id": task_id}
        )
        if not rows:
            return None
        task = _task(next(iter(rows)))
        task.reviews = await self.reviews(task_id)
        return task

    async def task_state(self, task_id: str) -> tuple[Status, int] | None:
        """A task's status and last message number, without loading the rest."""
        rows = await self.reader.execute_fetchall(
            "SELECT status, last_seq FROM tasks WHERE task_id = :task_id", {"task_id": task_id}
        )
        return next(((Status(row[0]), int(row[1])) for row in rows), None)

    async def reviews(self, task_id: str) -> list[Review]:
        rows = await self.reader.execute_fetchall(
            """SELECT decision, attempt, comment, reviewer, created_at
                 FROM reviews WHERE task_id = :task_id ORDER BY id""",
            {"task_id": task_id},
        )
        return [Review(**dict(row)) for row in rows]

    async def list_tasks(
        self, status: Status | None = None, limit: int = 50, offset: int = 0
    ) -> tuple[list[Task], int]:
        """One page of tasks, newest first, and how many match in all."""
        where = "WHERE status = :status" if status else ""
        params = {"status": status, "limit": limit, "offset": offset}
        rows = await self.reader.execute_fetchall(
            f"""SELECT {_TASK_COLUMNS} FROM tasks {where}
                 ORDER BY created_at DESC, rowid DESC LIMIT :limit OFFSET :offset""",
            params,
        )
        total = await self.reader.execute_fetchall(f"SELECT count(*) FROM tasks {where}", params)
        return [_task(row) for row in rows], next(iter(total))[0]

    async def status_counts(self) -> dict[str, int]:
        rows = await self.reader.execute_fetchall(
            "SELECT status, count(*) FROM tasks GROUP BY status"
        )
        return {row[0]: row[1] for row in rows}

    async def unfinished_tasks(self) -> list[Task]:
        """Tasks to resume at start-up, oldest first, with their reviews."""
        rows = await self.reader.execute_fetchall(
            f"""SELECT {_TASK_COLUMNS} FROM tasks WHERE status NOT IN
                 ({", ".join(repr(s.value) for s in TERMINAL)}) ORDER BY created_at"""
        )
        tasks = [_task(row) for row in rows]
        for task in tasks:
            task.reviews = await self.reviews(task.task_id)
        return tasks

    async def iter_tasks(self, batch: int = 500) -> AsyncIterator[Task]:
        """Every task with its reviews, oldest first (the audit trail)."""
        offset = 0
        while True:
            rows = list(await self.reader.execute_fetchall(
                f"""SELECT {_TASK_COLUMNS} FROM tasks ORDER BY created_at, rowid
                     LIMIT :limit OFFSET :offset""",
                {"limit": batch, "offset": offset},
            ))
            for row in rows:
                task = _task(row)
                task.reviews = await self.reviews(task.task_id)
                yield task
            if len(rows) < batch:
                return
            offset += batch

    async def task_messages(self, task_id: str, after: int) -> list[Message]:
        rows = await self.reader.execute_fetchall(
            """SELECT gid, task_id, seq, status, data FROM messages
                WHERE task_id = :task_id AND seq > :after ORDER BY seq""",
            {"task_id": task_id, "after": after},
        )
        return [_event(row).for_task() for row in rows]

    async def load_history(self, topic: str, after: int, limit: int = 500,
                           max_bytes: int = 256 * 1024) -> HistoryPage:
        """The broker's replay: one page of a topic's messages after ``after``, and the
        topic's latest id (so that a page that stops short, or none, can be told apart
        from messages that were deleted)."""
        if topic == GLOBAL:
            rows = await self._page(_GLOBAL_PAGE, {"after": after, "limit": limit}, max_bytes)
            return HistoryPage([_event(row).for_global() for row in rows],
                               await self.latest_gid())
        params = {"task_id": topic, "after": after, "limit": limit}
        rows = await self._page(_TASK_PAGE, params, max_bytes)
        return HistoryPage([_event(row).for_task() for row in rows],
                           await self.latest_seq(topic))

    async def _page(self, query: str, params: dict[str, Any], max_bytes: int
                    ) -> list[sqlite3.Row]:
        """The query's rows up to about ``max_bytes`` of data (one row at least), fetched a
        few at a time: a page of large messages never loads much more than it keeps."""
        rows: list[sqlite3.Row] = []
        size, step = 0, 4
        async with self.reader.execute(query, params) as cursor:
            while size < max_bytes:
                fetched = list(await cursor.fetchmany(step))
                for row in fetched:
                    rows.append(row)
                    size += len(row["data"])
                    if size >= max_bytes:
                        break
                if len(fetched) < step:
                    break
                step = min(step * 2, 64)
        return rows

    async def latest_gid(self) -> int:
        """The highest global message number given so far (from the reader)."""
        rows = await self.reader.execute_fetchall(_LATEST_GID)
        return int(next(iter(rows))[0])

    async def latest_seq(self, task_id: str) -> int:
        """A task's latest message number; 0 for a task not (or no longer) stored."""
        state = await self.task_state(task_id)
        return state[1] if state is not None else 0

    async def last_gid(self) -> int:
        """The highest message number ever given, deleted or not (never reused)."""
        rows = await self.writer.execute_fetchall(
            "SELECT seq FROM sqlite_sequence WHERE name = 'messages'"
        )
        return next(iter(rows))[0] if rows else 0

    async def purge_finished(self, older_than_days: float) -> int:
        """Delete finished tasks last updated before the cut-off; how many went."""
        cutoff = time.time() - older_than_days * 86400
        async with self._transaction() as conn:
            cursor = await conn.execute(
                f"""DELETE FROM tasks WHERE updated_at < :cutoff AND status IN
                     ({", ".join(repr(s.value) for s in TERMINAL)})""",
                {"cutoff": cutoff},
            )
            return cursor.rowcount


def _task(row: sqlite3.Row) -> Task:
    data = dict(row)
    data["status"] = Status(data["status"])
    return Task(**data)


def _event(row: sqlite3.Row) -> TaskEvent:
    return TaskEvent(row["task_id"], row["seq"], row["gid"], row["status"], row["data"])


def _review_row(review: Review) -> dict[str, Any]:
    return {"attempt": review.attempt, "decision": review.decision, "comment": review.comment,
            "reviewer": review.reviewer, "created_at": review.created_at}


def _message_row(event: TaskEvent) -> dict[str, Any]:
    return {"gid": event.gid, "task_id": event.task_id, "seq": event.seq,
            "status": event.status, "data": event.data}
