"""The store on PostgreSQL (asyncpg): one database shared by several hitl processes.

It answers the same questions as :class:`hitl.store.Store` with the same statements
(translated by :mod:`hitl.pg`), and adds what sharing needs:

- **Message numbers** are given inside each commit from one counter row, whose row lock
  orders the commits that take it: gids commit in order, with no gap a reader could skip
  (a sequence's values commit out of order). Every journal commit takes it, so commits
  are serialized as SQLite's single writer serializes them, and the rules checked in
  them (one decision per attempt, votes under the quorum) see every earlier commit.
- **Stale writers lose**: a task's row is written only over an older one (``last_seq``),
  and a task's message number is unique, so a process writing from an outdated copy of a
  task fails with a conflict instead of undoing another process's change.
- **Flow leases**: each unfinished task is owned by one process (``owner``,
  ``owner_until`` on the database's clock), renewed while it lives and taken over once
  it lapses (hitl.runner).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import replace
from typing import Any

import asyncpg

from .errors import DuplicateKey, StartupError, StorageUnavailable, Superseded, VoteRefused
from .models import TERMINAL, Task
from .pg import PG_NOW, Connection, PoolReader, translate
from .store import (
    _END_RESERVATION,
    _FORGET_EXPIRED_KEY,
    _INSERT_KEY,
    _INSERT_MESSAGE,
    _INSERT_REVIEW,
    _TASK_COLUMNS,
    IDEMPOTENCY_WINDOW,
    Store,
    Write,
    _message_row,
    _review_row,
    _task,
)

# hitl's own advisory lock: concurrent start-ups migrate one at a time.
MIGRATION_LOCK = 0x6869746C  # "hitl"
_TERMINAL = ", ".join(repr(status.value) for status in TERMINAL)

# The schema of SQLite's migrations 1-11, as one, plus what sharing adds (the counter,
# flow ownership). Later changes are appended as migrations of their own.
PG_MIGRATIONS: tuple[str, ...] = (
    f"""
    CREATE TABLE counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
    INSERT INTO counters VALUES ('gid', 0);
    CREATE TABLE tasks (
        task_id           TEXT PRIMARY KEY,
        task_input        TEXT NOT NULL,
        status            TEXT NOT NULL,
        attempt           INTEGER NOT NULL,
        processed_output  TEXT,
        final_result      TEXT,
        error             TEXT,
        last_seq          INTEGER NOT NULL,
        created_at        DOUBLE PRECISION NOT NULL,
        updated_at        DOUBLE PRECISION NOT NULL,
        submitted_by      TEXT,
        reviewers         TEXT NOT NULL DEFAULT '[]',
        allow_self_review INTEGER NOT NULL DEFAULT 0,
        title             TEXT NOT NULL DEFAULT '',
        metadata          TEXT,
        quorum            INTEGER NOT NULL DEFAULT 1,
        review_timeout    DOUBLE PRECISION,
        on_timeout        TEXT NOT NULL DEFAULT 'fail',
        escalate_to       TEXT NOT NULL DEFAULT '[]',
        max_attempts      INTEGER,
        review_deadline   DOUBLE PRECISION,
        escalated         INTEGER NOT NULL DEFAULT 0,
        owner             TEXT,
        owner_until       DOUBLE PRECISION
    );
    CREATE INDEX tasks_by_created ON tasks (created_at);
    CREATE INDEX tasks_by_status ON tasks (status, created_at);
    CREATE INDEX tasks_by_submitter ON tasks (submitted_by, created_at);
    CREATE INDEX tasks_by_waiting ON tasks (status, updated_at, task_id);
    CREATE INDEX tasks_unfinished ON tasks (owner_until) WHERE status NOT IN ({_TERMINAL});
    CREATE TABLE reviews (
        id             BIGSERIAL PRIMARY KEY,
        task_id        TEXT NOT NULL REFERENCES tasks (task_id) ON DELETE CASCADE,
        attempt        INTEGER NOT NULL,
        decision       TEXT NOT NULL CHECK (decision IN ('approved', 'rejected')),
        comment        TEXT NOT NULL,
        reviewer       TEXT NOT NULL,
        created_at     DOUBLE PRECISION NOT NULL,
        display_name   TEXT NOT NULL DEFAULT '',
        auth_method    TEXT NOT NULL DEFAULT 'none',
        token_label    TEXT,
        admin_override INTEGER NOT NULL DEFAULT 0,
        edited_output  TEXT
    );
    CREATE INDEX reviews_by_task ON reviews (task_id, id);
    CREATE UNIQUE INDEX reviews_one_vote ON reviews (task_id, attempt, reviewer);
    CREATE TABLE messages (
        gid     BIGINT PRIMARY KEY,
        task_id TEXT NOT NULL REFERENCES tasks (task_id) ON DELETE CASCADE,
        seq     INTEGER NOT NULL,
        status  TEXT NOT NULL,
        data    TEXT NOT NULL,
        UNIQUE (task_id, seq)
    );
    CREATE TABLE idempotency_keys (
        key          TEXT PRIMARY KEY,
        task_id      TEXT NOT NULL REFERENCES tasks (task_id) ON DELETE CASCADE,
        request_hash TEXT NOT NULL,
        created_at   DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX idempotency_keys_by_task ON idempotency_keys (task_id);
    CREATE TABLE attempts (
        task_id     TEXT NOT NULL REFERENCES tasks (task_id) ON DELETE CASCADE,
        attempt     INTEGER NOT NULL,
        output      TEXT,
        started_at  DOUBLE PRECISION,
        finished_at DOUBLE PRECISION,
        error       TEXT,
        tries       INTEGER NOT NULL DEFAULT 0,
        known       INTEGER NOT NULL DEFAULT 1,
        edited_by   TEXT,
        PRIMARY KEY (task_id, attempt)
    );
    CREATE TABLE users (
        name          TEXT PRIMARY KEY,
        display_name  TEXT NOT NULL,
        role          TEXT NOT NULL,
        groups        TEXT NOT NULL DEFAULT '[]',
        password_hash TEXT,
        created_at    DOUBLE PRECISION NOT NULL,
        disabled_at   DOUBLE PRECISION
    );
    CREATE TABLE tokens (
        id           TEXT PRIMARY KEY,
        user_name    TEXT NOT NULL REFERENCES users (name),
        label        TEXT NOT NULL DEFAULT '',
        token_hash   TEXT NOT NULL UNIQUE,
        created_at   DOUBLE PRECISION NOT NULL,
        expires_at   DOUBLE PRECISION,
        revoked_at   DOUBLE PRECISION,
        last_used_at DOUBLE PRECISION
    );
    CREATE TABLE sessions (
        id_hash    TEXT PRIMARY KEY,
        user_name  TEXT NOT NULL REFERENCES users (name),
        method     TEXT NOT NULL,
        csrf       TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        ended_at   DOUBLE PRECISION
    );
    CREATE INDEX sessions_by_user ON sessions (user_name);
    CREATE TABLE login_links (
        token_hash TEXT PRIMARY KEY,
        user_name  TEXT NOT NULL REFERENCES users (name),
        expires_at DOUBLE PRECISION NOT NULL,
        used_at    DOUBLE PRECISION
    );
    CREATE TABLE login_failures (
        key TEXT NOT NULL,
        at  DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX login_failures_by_key ON login_failures (key, at);
    CREATE TABLE settings (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE reservations (
        task_id      TEXT NOT NULL REFERENCES tasks (task_id) ON DELETE CASCADE,
        attempt      INTEGER NOT NULL,
        reviewer     TEXT NOT NULL,
        display_name TEXT NOT NULL DEFAULT '',
        created_at   DOUBLE PRECISION NOT NULL,
        expires_at   DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (task_id, attempt, reviewer)
    );
    CREATE INDEX reservations_by_reviewer ON reservations (reviewer, expires_at);
    CREATE TABLE webhooks (
        id          TEXT PRIMARY KEY,
        url         TEXT NOT NULL,
        events      TEXT NOT NULL DEFAULT '[]',
        secret      TEXT NOT NULL,
        cursor      BIGINT NOT NULL,
        created_at  DOUBLE PRECISION NOT NULL,
        retry_gid   BIGINT,
        retry_since DOUBLE PRECISION,
        retry_tries INTEGER NOT NULL DEFAULT 0,
        next_retry  DOUBLE PRECISION
    );
    CREATE TABLE webhook_attempts (
        id          BIGSERIAL PRIMARY KEY,
        webhook_id  TEXT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
        message_id  TEXT NOT NULL,
        gid         BIGINT NOT NULL,
        type        TEXT NOT NULL,
        try         INTEGER NOT NULL,
        at          DOUBLE PRECISION NOT NULL,
        status_code INTEGER,
        error       TEXT,
        outcome     TEXT NOT NULL,
        next_retry  DOUBLE PRECISION
    );
    CREATE INDEX webhook_attempts_by_webhook ON webhook_attempts (webhook_id, id);
    CREATE TABLE jobs (
        task_id       TEXT NOT NULL REFERENCES tasks (task_id) ON DELETE CASCADE,
        attempt       INTEGER NOT NULL,
        state         TEXT NOT NULL CHECK (state IN ('queued', 'claimed', 'done', 'failed')),
        tries         INTEGER NOT NULL DEFAULT 1,
        queued_at     DOUBLE PRECISION NOT NULL,
        worker        TEXT,
        worker_user   TEXT,
        lease_id      TEXT,
        lease_seconds DOUBLE PRECISION,
        lease_expires DOUBLE PRECISION,
        claimed_at    DOUBLE PRECISION,
        taken_over    INTEGER NOT NULL DEFAULT 0,
        output        TEXT,
        error         TEXT,
        PRIMARY KEY (task_id, attempt)
    );
    CREATE INDEX jobs_open ON jobs (queued_at) WHERE state IN ('queued', 'claimed');
    """,
    # The rules SQLite keeps in triggers (hitl.store's migrations 9 and 11).
    """
    CREATE FUNCTION hitl_one_decision_per_timeout() RETURNS trigger AS $$
    BEGIN
      IF EXISTS (SELECT 1 FROM reviews AS earlier
                  WHERE earlier.task_id = NEW.task_id AND earlier.attempt = NEW.attempt
                    AND earlier.reviewer = 'timeout' AND earlier.auth_method = 'system')
         OR (NEW.reviewer = 'timeout' AND NEW.auth_method = 'system' AND (
             EXISTS (SELECT 1 FROM reviews AS earlier
                      WHERE earlier.task_id = NEW.task_id AND earlier.attempt = NEW.attempt
                        AND earlier.decision = 'rejected')
             OR (SELECT count(*) FROM reviews AS vote
                  WHERE vote.task_id = NEW.task_id AND vote.attempt = NEW.attempt
                    AND vote.decision = 'approved')
                >= (SELECT quorum FROM tasks WHERE tasks.task_id = NEW.task_id))) THEN
        RAISE EXCEPTION 'this attempt is already decided' USING ERRCODE = 'P0001';
      END IF;
      RETURN NEW;
    END $$ LANGUAGE plpgsql;
    CREATE TRIGGER reviews_one_decision_per_timeout BEFORE INSERT ON reviews
      FOR EACH ROW EXECUTE FUNCTION hitl_one_decision_per_timeout();
    CREATE FUNCTION hitl_end_reservations_on_escalation() RETURNS trigger AS $$
    BEGIN
      DELETE FROM reservations WHERE task_id = NEW.task_id;
      RETURN NULL;
    END $$ LANGUAGE plpgsql;
    CREATE TRIGGER reservations_end_on_escalation AFTER UPDATE OF reviewers ON tasks
      FOR EACH ROW WHEN (NEW.reviewers IS DISTINCT FROM OLD.reviewers)
      EXECUTE FUNCTION hitl_end_reservations_on_escalation();
    CREATE FUNCTION hitl_end_jobs_with_their_task() RETURNS trigger AS $$
    BEGIN
      UPDATE jobs SET state = 'failed', error = 'the task ended (' || NEW.status || ')'
       WHERE task_id = NEW.task_id AND state IN ('queued', 'claimed');
      RETURN NULL;
    END $$ LANGUAGE plpgsql;
    CREATE TRIGGER jobs_end_with_their_task AFTER UPDATE OF status ON tasks
      FOR EACH ROW WHEN (NEW.status IN ('completed', 'failed', 'cancelled'))
      EXECUTE FUNCTION hitl_end_jobs_with_their_task();
    """,
    # Webhook leases (hitl.delivery): each endpoint's deliveries are made by one process at
    # a time, its holder until holder_until (the database's clock), renewed while it lives.
    """
    ALTER TABLE webhooks ADD COLUMN holder TEXT, ADD COLUMN holder_until DOUBLE PRECISION;
    """,
)

# A task's row, written only over an older one: a process writing from an outdated copy
# (another process changed the task meanwhile) writes nothing, and is told.
_UPSERT_TASK = """
    INSERT INTO tasks (task_id, task_input, status, attempt, processed_output, final_result,
                       error, last_seq, created_at, updated_at, submitted_by, reviewers,
                       allow_self_review, title, metadata, quorum, review_timeout, on_timeout,
                       escalate_to, max_attempts, review_deadline, escalated, owner, owner_until)
    VALUES (:task_id, :task_input, :status, :attempt, :processed_output, :final_result,
            :error, :last_seq, :created_at, :updated_at, :submitted_by, :reviewers,
            :allow_self_review, :title, :metadata, :quorum, :review_timeout, :on_timeout,
            :escalate_to, :max_attempts, :review_deadline, :escalated, :owner,
            """ + PG_NOW + """ + :lease)
    ON CONFLICT (task_id) DO UPDATE SET
        status = excluded.status, attempt = excluded.attempt,
        processed_output = excluded.processed_output, final_result = excluded.final_result,
        error = excluded.error, last_seq = excluded.last_seq, updated_at = excluded.updated_at,
        reviewers = excluded.reviewers, review_deadline = excluded.review_deadline,
        escalated = excluded.escalated
     WHERE tasks.last_seq <= excluded.last_seq
    RETURNING task_id
"""
_UPSERT_ATTEMPT = """
    INSERT INTO attempts (task_id, attempt, output, started_at, finished_at, error, tries, known,
                          edited_by)
    VALUES (:task_id, :attempt, :output, :started_at, :finished_at, :error, :tries, :known,
            :edited_by)
    ON CONFLICT (task_id, attempt) DO UPDATE SET
        output = excluded.output, started_at = excluded.started_at,
        finished_at = excluded.finished_at, error = excluded.error, tries = excluded.tries,
        known = excluded.known, edited_by = excluded.edited_by
"""
_TAKE_GIDS = "UPDATE counters SET value = value + $1 WHERE name = 'gid' RETURNING value"
_COUNTER_IN_TURN = "SELECT value FROM counters WHERE name = 'gid' FOR UPDATE"
# Unfinished tasks with no live owner (lapsed, or let go), oldest first, for this process.
_TAKE_OVER = f"""
    WITH free AS (SELECT task_id, owner AS was FROM tasks
                   WHERE status NOT IN ({_TERMINAL})
                     AND (owner IS NULL OR owner_until < {PG_NOW})
                   ORDER BY created_at LIMIT $3 FOR UPDATE SKIP LOCKED)
    UPDATE tasks SET owner = $1, owner_until = {PG_NOW} + $2 FROM free
     WHERE tasks.task_id = free.task_id
    RETURNING tasks.task_id, free.was IS NOT NULL AS lapsed
"""
_RENEW = f"""
    UPDATE tasks SET owner_until = {PG_NOW} + $2
     WHERE owner = $1 AND task_id = ANY($3::text[]) AND status NOT IN ({_TERMINAL})
    RETURNING task_id, last_seq
"""


def process_name() -> str:
    """This process, as the owner of tasks: host, pid and a random part (a pid is reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class PostgresStore(Store):
    """The database shared by every process of one hitl service."""

    dialect = "postgresql"
    shared = True
    numbers_messages = True

    def __init__(self, url: str, *, lease: float = 9.0, pool_size: int = 10) -> None:
        super().__init__(url)
        self.url = url
        self.lease = lease  # seconds a task's flow stays this process's without renewal
        self.pool_size = pool_size
        self.owner = process_name()
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.url, min_size=2, max_size=self.pool_size, command_timeout=30,
                server_settings={"application_name": "hitl",
                                 # a process frozen inside a transaction holds the counter
                                 # row, so every commit of the service, for at most this
                                 "idle_in_transaction_session_timeout": "30000"})
            async with self._pool.acquire() as conn:
                await self._migrate_pg(conn)
        except StartupError:
            await self.close()
            raise
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
            await self.close()
            raise StartupError(f"cannot use database {_safe(self.url)}: {exc}") from None
        self._reader = PoolReader(self._pool)  # type: ignore[assignment]
        self._who = PoolReader(self._pool)  # type: ignore[assignment]

    async def _migrate_pg(self, conn: asyncpg.Connection) -> None:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER)")
            version = await conn.fetchval("SELECT max(version) FROM schema_version") or 0
            if version > len(PG_MIGRATIONS):
                raise StartupError(
                    f"database {_safe(self.url)} has schema version {version}, newer than "
                    f"this hitl knows ({len(PG_MIGRATIONS)}): upgrade hitl")
            for number, script in enumerate(PG_MIGRATIONS[version:], start=version + 1):
                await conn.execute(script)
                await conn.execute("INSERT INTO schema_version VALUES ($1)", number)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        self._reader = self._who = None
        if pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.close(), 10)

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("store is not open")
        return self._pool

    @property
    def writer(self) -> Any:
        raise RuntimeError("a PostgreSQL store has no single writer: use transaction()")

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:  # type: ignore[override]
        """One transaction on a connection of the pool; errors as :meth:`Store.transaction`."""
        try:
            async with self.pool.acquire() as raw, raw.transaction():
                yield Connection(raw)
        except asyncpg.UniqueViolationError as exc:
            raise _unique(exc) from exc
        except asyncpg.RaiseError as exc:
            if "already decided" in str(exc):
                raise VoteRefused("this attempt is already decided") from exc
            raise StorageUnavailable(str(exc)) from exc
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StorageUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def write(self, batch: Sequence[Write]) -> Sequence[Write]:
        """Apply a batch in one transaction, numbering its messages from the counter row
        (taken first: it orders this commit after every earlier one)."""
        count = sum(1 for write in batch if write.event is not None)
        newest: dict[str, dict[str, Any]] = {}  # per task, the row of its latest change
        for write in batch:
            kept = newest.get(write.task_id)
            if kept is None or write.task["last_seq"] >= kept["last_seq"]:
                newest[write.task_id] = write.task
        tasks = list(newest.values())
        async with self.transaction() as conn:
            last = await conn.raw.fetchval(_TAKE_GIDS, count)
            gid = last - count + 1
            numbered = []
            for write in batch:
                if write.event is not None:
                    write = replace(write, event=replace(write.event, gid=gid))
                    gid += 1
                numbered.append(write)
            text, names = translate(_UPSERT_TASK)
            for task in tasks:
                row = {**task, "owner": self.owner, "lease": self.lease}
                if await conn.raw.fetchval(text, *(row[name] for name in names)) is None:
                    raise Superseded(f"task {task['task_id']} was changed by another process "
                                     "meanwhile; send it again")
            for write in numbered:
                if write.review is None:
                    continue
                review = {"task_id": write.task_id, **_review_row(write.review)}
                taken = await conn.execute(_INSERT_REVIEW, review)
                if taken.rowcount != 1:
                    raise VoteRefused(f"attempt {review['attempt']} of task {review['task_id']} "
                                      "is already decided")
                await conn.execute(_END_RESERVATION, {"task_id": review["task_id"],
                                                      "reviewer": review["reviewer"]})
            await conn.executemany(_INSERT_MESSAGE, [_message_row(w.event) for w in numbered
                                                     if w.event is not None])
            await conn.executemany(_UPSERT_ATTEMPT, list(
                {(w.task_id, w.attempt["attempt"]): w.attempt
                 for w in numbered if w.attempt is not None}.values()))
            for write in numbered:
                if write.idempotency is None:
                    continue
                key = {"key": write.idempotency.key, "request_hash":
                       write.idempotency.request_hash, "task_id": write.task_id,
                       "created_at": write.task["created_at"],
                       "cutoff": time.time() - IDEMPOTENCY_WINDOW}
                await conn.execute(_FORGET_EXPIRED_KEY, key)
                await conn.execute(_INSERT_KEY, key)
        return numbered

    async def probe(self) -> None:
        async with self.transaction() as conn:
            await conn.raw.execute(_COUNTER_IN_TURN)

    async def last_stored_gid(self) -> int:
        return await self.latest_gid()

    async def latest_gid(self) -> int:
        rows = await self.reader.execute_fetchall(
            "SELECT value FROM counters WHERE name = 'gid'")
        return int(list(rows)[0][0])

    async def last_gid(self) -> int:
        return await self.latest_gid()

    async def iter_tasks(self, batch: int = 500) -> AsyncIterator[Task]:
        after: tuple[float, str] = (float("-inf"), "")
        while True:
            rows = list(await self.reader.execute_fetchall(
                f"""SELECT {_TASK_COLUMNS} FROM tasks WHERE (created_at, task_id) > (:at, :id)
                     ORDER BY created_at, task_id LIMIT :limit""",
                {"at": after[0], "id": after[1], "limit": batch}))
            for row in rows:
                task = _task(row)
                task.reviews = await self.reviews(task.task_id)
                task.attempts = await self.attempts(task.task_id)
                yield task
            if len(rows) < batch:
                return
            after = (rows[-1]["created_at"], rows[-1]["task_id"])

    # Flow leases (hitl.runner): which process runs each unfinished task's flow.

    async def take_over(self, limit: int = 100) -> list[tuple[Task, bool]]:
        """Own the unfinished tasks whose owner's lease lapsed (or that nobody owns), with
        whether each was taken from a lapsed owner; as stored, with reviews and attempts."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(_TAKE_OVER, self.owner, self.lease, limit)
        taken = []
        for row in rows:
            task = await self.get_task(row["task_id"])
            if task is not None:
                taken.append((task, bool(row["lapsed"])))
        return taken

    async def renew(self, tracked: Collection[str]) -> dict[str, int]:
        """Extend this process's leases of the ``tracked`` tasks (those it runs, or is about
        to resume); the unfinished ones it still owns, each with its last message number as
        stored. A task it owns but no longer tracks (its flow never started) lapses, and is
        taken over."""
        rows = await self._in_turn(_RENEW, self.owner, self.lease, list(tracked))
        return {row["task_id"]: row["last_seq"] for row in rows}

    async def owns(self, task_id: str) -> bool:
        rows = await self.reader.execute_fetchall(
            "SELECT 1 FROM tasks WHERE task_id = :task_id AND owner = :owner",
            {"task_id": task_id, "owner": self.owner})
        return bool(rows)

    async def let_go(self) -> None:
        """Shutting down: this process's tasks may be taken over at once."""
        await self._in_turn("UPDATE tasks SET owner = NULL WHERE owner = $1 RETURNING 1",
                            self.owner)

    async def _in_turn(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """A statement over many task rows, taken in turn with the journal's commits: the
        counter row first, as they take it. Locking the rows in another order than a
        commit of the same tasks would deadlock with it (PostgreSQL then aborts one, after
        its deadlock_timeout, while every commit of the service waits)."""
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(_COUNTER_IN_TURN)
                return list(await conn.fetch(sql, *args))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StorageUnavailable(f"{type(exc).__name__}: {exc}") from exc


def _unique(exc: asyncpg.UniqueViolationError) -> Exception:
    constraint = exc.constraint_name or ""
    if constraint.startswith("idempotency_keys"):
        return DuplicateKey(str(exc))
    if constraint == "reviews_one_vote":
        return VoteRefused("this reviewer has already voted on this attempt")
    if constraint.startswith("messages"):
        return Superseded("the task was changed by another process meanwhile; send it again")
    return StorageUnavailable(f"{type(exc).__name__}: {exc}")


def _safe(url: str) -> str:
    """A database URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        credentials, _, host = rest.rpartition("@")
        rest = credentials.split(":", 1)[0] + "@" + host
    return repr(scheme + sep + rest)
