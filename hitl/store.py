"""All persistence: tasks, review decisions and published messages, in SQLite.

One writer connection takes every change, batched into one transaction per batch
(WAL, ``synchronous=NORMAL``); a second connection serves reads so that a page of
tasks never waits behind a write. ``:memory:`` uses one connection for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import aiosqlite
from quart import Quart

from .broker import GLOBAL, HistoryPage
from .errors import DuplicateKey, Invalid, StartupError, StorageUnavailable, VoteRefused
from .lifecycle import attach
from .models import (
    EXCERPT,
    TERMINAL,
    Attempt,
    Message,
    Reservation,
    Review,
    Status,
    Task,
    TaskEvent,
    TaskRow,
    excerpt,
)

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
    """
    CREATE TABLE idempotency_keys (
        key          TEXT PRIMARY KEY,
        task_id      TEXT NOT NULL REFERENCES tasks (task_id) ON DELETE CASCADE,
        request_hash TEXT NOT NULL,
        created_at   REAL NOT NULL
    );
    CREATE INDEX idempotency_keys_by_task ON idempotency_keys (task_id);
    """,
    """
    CREATE TABLE attempts (
        task_id     TEXT NOT NULL REFERENCES tasks (task_id) ON DELETE CASCADE,
        attempt     INTEGER NOT NULL,
        output      TEXT,
        started_at  REAL,
        finished_at REAL,
        error       TEXT,
        tries       INTEGER NOT NULL DEFAULT 0,
        known       INTEGER NOT NULL DEFAULT 1,
        PRIMARY KEY (task_id, attempt)
    );
    INSERT INTO attempts (task_id, attempt, output, known)
        WITH RECURSIVE numbers (n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM numbers
                                       WHERE n < (SELECT max(attempt) FROM tasks))
        SELECT task_id, n, CASE WHEN n = attempt THEN processed_output END, n = attempt
          FROM tasks JOIN numbers ON n <= attempt;
    """,
    """
    CREATE TABLE users (
        name          TEXT PRIMARY KEY,
        display_name  TEXT NOT NULL,
        role          TEXT NOT NULL,
        groups        TEXT NOT NULL DEFAULT '[]',
        password_hash TEXT,
        created_at    REAL NOT NULL,
        disabled_at   REAL
    );
    CREATE TABLE tokens (
        id           TEXT PRIMARY KEY,
        user_name    TEXT NOT NULL REFERENCES users (name),
        label        TEXT NOT NULL DEFAULT '',
        token_hash   TEXT NOT NULL UNIQUE,
        created_at   REAL NOT NULL,
        expires_at   REAL,
        revoked_at   REAL,
        last_used_at REAL
    );
    CREATE TABLE sessions (
        id_hash    TEXT PRIMARY KEY,
        user_name  TEXT NOT NULL REFERENCES users (name),
        method     TEXT NOT NULL,
        csrf       TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        ended_at   REAL
    );
    CREATE INDEX sessions_by_user ON sessions (user_name);
    CREATE TABLE login_links (
        token_hash TEXT PRIMARY KEY,
        user_name  TEXT NOT NULL REFERENCES users (name),
        expires_at REAL NOT NULL,
        used_at    REAL
    );
    CREATE TABLE login_failures (
        key TEXT NOT NULL,
        at  REAL NOT NULL
    );
    CREATE INDEX login_failures_by_key ON login_failures (key, at);
    CREATE TABLE settings (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    # Who submitted each task and who may decide it; who decided, and how they signed in.
    # Earlier tasks and reviews were made with sign-in off: NULL submitter, method 'none'.
    """
    ALTER TABLE tasks ADD COLUMN submitted_by TEXT;
    ALTER TABLE tasks ADD COLUMN reviewers TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE tasks ADD COLUMN allow_self_review INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX tasks_by_submitter ON tasks (submitted_by, created_at);
    ALTER TABLE reviews ADD COLUMN display_name TEXT NOT NULL DEFAULT '';
    ALTER TABLE reviews ADD COLUMN auth_method TEXT NOT NULL DEFAULT 'none';
    ALTER TABLE reviews ADD COLUMN token_label TEXT;
    ALTER TABLE reviews ADD COLUMN admin_override INTEGER NOT NULL DEFAULT 0;
    """,
    # The options given at submission; the deadline of the review under way. Earlier tasks
    # had the defaults of then: quorum 1, no timeout, the server's --max-attempts (NULL).
    """
    ALTER TABLE tasks ADD COLUMN title TEXT NOT NULL DEFAULT '';
    ALTER TABLE tasks ADD COLUMN metadata TEXT;
    ALTER TABLE tasks ADD COLUMN quorum INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE tasks ADD COLUMN review_timeout REAL;
    ALTER TABLE tasks ADD COLUMN on_timeout TEXT NOT NULL DEFAULT 'fail';
    ALTER TABLE tasks ADD COLUMN escalate_to TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE tasks ADD COLUMN max_attempts INTEGER;
    ALTER TABLE tasks ADD COLUMN review_deadline REAL;
    ALTER TABLE tasks ADD COLUMN escalated INTEGER NOT NULL DEFAULT 0;
    """,
    # Votes: one per reviewer per attempt, whatever process takes it (a quorum counts
    # distinct people). An approval with an edit keeps the text approved; an attempt made
    # by a reviewer's edit (quorum above 1) says whose.
    """
    ALTER TABLE reviews ADD COLUMN edited_output TEXT;
    CREATE UNIQUE INDEX reviews_one_vote ON reviews (task_id, attempt, reviewer);
    ALTER TABLE attempts ADD COLUMN edited_by TEXT;
    """,
    # The review queue: who holds which task's current attempt, until when (hitl.queue);
    # and the waiting tasks in queue order, so that a claim stops at the first that fits.
    """
    CREATE TABLE reservations (
        task_id      TEXT NOT NULL REFERENCES tasks (task_id) ON DELETE CASCADE,
        attempt      INTEGER NOT NULL,
        reviewer     TEXT NOT NULL,
        display_name TEXT NOT NULL DEFAULT '',
        created_at   REAL NOT NULL,
        expires_at   REAL NOT NULL,
        PRIMARY KEY (task_id, attempt, reviewer)
    );
    CREATE INDEX reservations_by_reviewer ON reservations (reviewer, expires_at);
    CREATE INDEX tasks_by_waiting ON tasks (status, updated_at, task_id);
    """,
    # Deadlines (hitl.deadlines), kept by the store too, for a second process: a review
    # timeout decides only an undecided attempt, and nothing decides a timed-out one; an
    # escalation (new reviewers) ends the task's reservations. (A trigger's body is one
    # line: statements split at a semicolon that ends a line.)
    """
    CREATE TRIGGER reviews_one_decision_per_timeout BEFORE INSERT ON reviews
      WHEN EXISTS (SELECT 1 FROM reviews AS earlier
                    WHERE earlier.task_id = NEW.task_id AND earlier.attempt = NEW.attempt
                      AND earlier.reviewer = 'timeout' AND earlier.auth_method = 'system')
        OR (NEW.reviewer = 'timeout' AND NEW.auth_method = 'system' AND (
            EXISTS (SELECT 1 FROM reviews AS earlier
                     WHERE earlier.task_id = NEW.task_id AND earlier.attempt = NEW.attempt
                       AND earlier.decision = 'rejected')
            OR (SELECT count(*) FROM reviews AS vote
                 WHERE vote.task_id = NEW.task_id AND vote.attempt = NEW.attempt
                   AND vote.decision = 'approved')
               >= (SELECT quorum FROM tasks WHERE tasks.task_id = NEW.task_id)))
    BEGIN SELECT RAISE(ABORT, 'this attempt is already decided'); END;
    CREATE TRIGGER reservations_end_on_escalation AFTER UPDATE OF reviewers ON tasks
      WHEN NEW.reviewers IS NOT OLD.reviewers
    BEGIN DELETE FROM reservations WHERE task_id = NEW.task_id; END;
    """,
    # Webhook endpoints (hitl.webhooks): each with its cursor in the message log (the
    # outbox: the last message handled) and the state of the one event it is retrying;
    # and a short log of each endpoint's recent delivery attempts.
    """
    CREATE TABLE webhooks (
        id            TEXT PRIMARY KEY,
        url           TEXT NOT NULL,
        events        TEXT NOT NULL DEFAULT '[]',
        secret        TEXT NOT NULL,
        cursor        INTEGER NOT NULL,
        created_at    REAL NOT NULL,
        retry_gid     INTEGER,
        retry_since   REAL,
        retry_tries   INTEGER NOT NULL DEFAULT 0,
        next_retry    REAL
    );
    CREATE TABLE webhook_attempts (
        id          INTEGER PRIMARY KEY,
        webhook_id  TEXT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
        message_id  TEXT NOT NULL,
        gid         INTEGER NOT NULL,
        type        TEXT NOT NULL,
        try         INTEGER NOT NULL,
        at          REAL NOT NULL,
        status_code INTEGER,
        error       TEXT,
        outcome     TEXT NOT NULL,
        next_retry  REAL
    );
    CREATE INDEX webhook_attempts_by_webhook ON webhook_attempts (webhook_id, id);
    """,
    # External work (hitl.work, --processor external): one job per task's attempt, queued,
    # claimed by a worker under a lease, then done (its output) or failed (its error; a
    # retry queues it again as its next try). Claims and reports are conditional
    # statements on this table, so a second process could enforce the same leases.
    """
    CREATE TABLE jobs (
        task_id       TEXT NOT NULL REFERENCES tasks (task_id) ON DELETE CASCADE,
        attempt       INTEGER NOT NULL,
        state         TEXT NOT NULL CHECK (state IN ('queued', 'claimed', 'done', 'failed')),
        tries         INTEGER NOT NULL DEFAULT 1,
        queued_at     REAL NOT NULL,
        worker        TEXT,
        worker_user   TEXT,
        lease_id      TEXT,
        lease_seconds REAL,
        lease_expires REAL,
        claimed_at    REAL,
        taken_over    INTEGER NOT NULL DEFAULT 0,  -- its last claim took an expired lease over
        output        TEXT,
        error         TEXT,
        PRIMARY KEY (task_id, attempt)
    );
    CREATE INDEX jobs_open ON jobs (queued_at) WHERE state IN ('queued', 'claimed');
    CREATE TRIGGER jobs_end_with_their_task AFTER UPDATE OF status ON tasks
      WHEN NEW.status IN ('completed', 'failed', 'cancelled')
    BEGIN UPDATE jobs SET state = 'failed', error = 'the task ended (' || NEW.status || ')'
           WHERE task_id = NEW.task_id AND state IN ('queued', 'claimed'); END;
    """,
)

IDEMPOTENCY_WINDOW = 24 * 3600  # seconds an Idempotency-Key stands for its task

_UPSERT_TASK = """
    INSERT INTO tasks (task_id, task_input, status, attempt, processed_output, final_result,
                       error, last_seq, created_at, updated_at, submitted_by, reviewers,
                       allow_self_review, title, metadata, quorum, review_timeout, on_timeout,
                       escalate_to, max_attempts, review_deadline, escalated)
    VALUES (:task_id, :task_input, :status, :attempt, :processed_output, :final_result,
            :error, :last_seq, :created_at, :updated_at, :submitted_by, :reviewers,
            :allow_self_review, :title, :metadata, :quorum, :review_timeout, :on_timeout,
            :escalate_to, :max_attempts, :review_deadline, :escalated)
    ON CONFLICT (task_id) DO UPDATE SET
        status = excluded.status, attempt = excluded.attempt,
        processed_output = excluded.processed_output, final_result = excluded.final_result,
        error = excluded.error, last_seq = excluded.last_seq, updated_at = excluded.updated_at,
        reviewers = excluded.reviewers, review_deadline = excluded.review_deadline,
        escalated = excluded.escalated
"""
# A vote is taken only while its attempt is undecided: no rejection (a veto) on it, and
# fewer approvals than the task's quorum, counted in the same transaction. (One vote per
# reviewer: the unique index reviews_one_vote.) So a second process could not over-count.
_INSERT_REVIEW = """
    INSERT INTO reviews (task_id, attempt, decision, comment, reviewer, created_at,
                         display_name, auth_method, token_label, admin_override, edited_output)
    SELECT :task_id, :attempt, :decision, :comment, :reviewer, :created_at,
           :display_name, :auth_method, :token_label, :admin_override, :edited_output
     WHERE NOT EXISTS (SELECT 1 FROM reviews WHERE task_id = :task_id AND attempt = :attempt
                          AND decision = 'rejected')
       AND (SELECT count(*) FROM reviews WHERE task_id = :task_id AND attempt = :attempt
               AND decision = 'approved')
           < (SELECT quorum FROM tasks WHERE task_id = :task_id)
"""
# A decision ends its reviewer's reservation of the task, in the decision's own commit.
_END_RESERVATION = """
    DELETE FROM reservations WHERE task_id = :task_id AND reviewer = :reviewer
"""
_INSERT_MESSAGE = """
    INSERT INTO messages (gid, task_id, seq, status, data)
    VALUES (:gid, :task_id, :seq, :status, :data)
"""
_FORGET_EXPIRED_KEY = """
    DELETE FROM idempotency_keys WHERE key = :key AND created_at <= :cutoff
"""
_INSERT_KEY = """
    INSERT INTO idempotency_keys (key, task_id, request_hash, created_at)
    VALUES (:key, :task_id, :request_hash, :created_at)
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
# A message, with its task's submitter: a stream filters replayed messages as live ones.
_MESSAGE_COLUMNS = """messages.gid AS gid, messages.task_id AS task_id, seq,
                      messages.status AS status, data, submitted_by"""
_GLOBAL_PAGE = f"""
    SELECT {_MESSAGE_COLUMNS} FROM messages JOIN tasks USING (task_id)
     WHERE gid > :after ORDER BY gid LIMIT :limit
"""
_TASK_PAGE = f"""
    SELECT {_MESSAGE_COLUMNS} FROM messages JOIN tasks USING (task_id)
     WHERE messages.task_id = :task_id AND seq > :after ORDER BY seq LIMIT :limit
"""
_LATEST_GID = """
    SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0),
               coalesce((SELECT max(gid) FROM messages), 0))
"""
_OPTION_COLUMNS = """title, metadata, quorum, review_timeout, on_timeout, escalate_to,
                     max_attempts, review_deadline, escalated"""
_TASK_COLUMNS = f"""task_id, task_input, status, attempt, processed_output, final_result,
                   error, last_seq, created_at, updated_at, submitted_by, reviewers,
                   allow_self_review, {_OPTION_COLUMNS}"""
_REVIEW_COLUMNS = """decision, attempt, comment, reviewer, created_at, display_name,
                     auth_method, token_label, admin_override, edited_output"""
# SQL's clock, in seconds since the epoch (as time.time()): unixepoch('subsec') needs 3.42.
NOW = "((julianday('now') - 2440587.5) * 86400.0)"
# A waiting task's live reservations (of its current attempt), as a JSON array, oldest
# first: once it is decided, nobody holds it.
LIVE_RESERVATIONS = f"""
    SELECT json_group_array(json_object('reviewer', reviewer, 'display_name', display_name,
                                        'attempt', attempt, 'created_at', created_at,
                                        'expires_at', expires_at))
      FROM (SELECT * FROM reservations AS held
             WHERE held.task_id = tasks.task_id AND held.attempt = tasks.attempt
               AND tasks.status = 'waiting_for_review' AND held.expires_at > {NOW}
             ORDER BY created_at) AS live
"""
# A list's columns: each text cut in SQL, so a list never reads a whole text. (SQLite's
# text functions stop at a NUL character: such a text is cut and measured up to it.)
_TEXTS = ("task_input", "processed_output", "final_result", "error")
_ROW_COLUMNS = ("task_id, status, attempt, last_seq, created_at, updated_at, submitted_by, "
                f"reviewers, allow_self_review, {_OPTION_COLUMNS}, ") + ", ".join(
    f"substr({text}, 1, {EXCERPT}) AS {text}, length({text}) AS {text}_length" for text in _TEXTS
) + f", ({LIVE_RESERVATIONS}) AS reserved"
# A list's orders: each its sort key and direction, and how the rows after a cursor
# compare. "waiting" is the oldest change first: for tasks waiting for review, the longest
# waiting (a waiting task changes no more until it is decided).
Order = Literal["newest", "waiting"]
_ORDERS: dict[str, tuple[str, str, str]] = {
    "newest": ("created_at", "DESC", "<"),
    "waiting": ("updated_at", "ASC", ">"),
}
_SEARCHED = ("task_id", "task_input", "processed_output")
ID_LENGTH = 32  # a task id: a uuid4 in hex
MIN_PREFIX = 8  # the characters of an id the UI shows
_HEX = frozenset("0123456789abcdef")
# The ids that start with a hex prefix sort from it up to it + 'g': a range on the primary key.
_MATCHING_PREFIX = """
    SELECT count(*) AS matches, min(task_id) AS first FROM tasks
     WHERE task_id >= :prefix AND task_id < :prefix || 'g'
       AND (:owner IS NULL OR submitted_by = :owner)
"""


class ReviewScope(NamedTuple):
    """Whose review queue: a signed-in reviewer's name and the names that stand for them
    in a task's ``reviewers`` (themselves and their groups); ``names`` None for an admin,
    who may decide any task. The same rule as :func:`hitl.policy.can_decide`, in SQL."""

    name: str
    names: tuple[str, ...] | None


# The tasks a ReviewScope may decide: not their own (unless allowed), naming them or no one,
# and whose attempt under review they have not voted on yet (quorum above 1).
_DECIDABLE = """
    AND (submitted_by IS NOT :me OR allow_self_review <> 0)
    AND (:any_named OR reviewers = '[]'
         OR EXISTS (SELECT 1 FROM json_each(tasks.reviewers)
                     WHERE value IN (SELECT value FROM json_each(:names))))
    AND NOT EXISTS (SELECT 1 FROM reviews WHERE reviews.task_id = tasks.task_id
                       AND reviews.attempt = tasks.attempt AND reviews.reviewer = :me)
"""


class TaskState(NamedTuple):
    """What a stream needs to know of a task before it opens: where it stands, whose it is."""

    status: Status
    last_seq: int
    submitted_by: str | None


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    """A client's key for one submit, stored with the task it created."""

    key: str
    request_hash: str


@dataclass(frozen=True, slots=True)
class View:
    """Which tasks a list shows, and in which order."""

    status: Status | None = None
    search: str = ""  # text found literally in a task's input, output or id
    order: Order = "newest"
    submitted_by: str | None = None  # only this user's tasks (what a submitter may see)


@dataclass(frozen=True, slots=True)
class TaskPage:
    """One page of a view: its rows, how many tasks the view holds, where the next starts."""

    rows: list[TaskRow]
    total: int
    next: str | None  # the ``after`` of the next page; None on the last one
    since: int  # the last message stored before the page was read: changes come after it


@dataclass(frozen=True, slots=True)
class Write:
    """One state change: the task's row as it now is, plus what it adds."""

    task: dict[str, Any]
    event: TaskEvent | None = None
    review: Review | None = None
    idempotency: IdempotencyKey | None = None
    attempt: dict[str, Any] | None = None  # the attempt's row, as it now is

    @property
    def task_id(self) -> str:
        return str(self.task["task_id"])


class Store:
    """The database of one hitl service (or of the CLI reading it): SQLite, one process."""

    dialect = "sqlite"
    shared = False  # several processes may share it (hitl.pg_store: PostgreSQL)
    numbers_messages = False  # the journal gives gids (one writer); a shared store, itself

    def __init__(self, path: str) -> None:
        self.path = path
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._who: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()  # one transaction at a time on the writer

    def init_app(self, app: Quart) -> None:
        attach(app, "store", self, self.open, self.close)

    async def open(self) -> None:
        """Connect, check the file is usable and bring its schema up to date."""
        in_memory = self.path == ":memory:" or self.path.startswith("file::memory:")
        try:
            self._writer = await self._connect()
            await self._migrate(self._writer)  # StartupError if the schema is too new
            self._reader = self._writer if in_memory else await self._connect()
            self._who = self._reader if in_memory else await self._connect()
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
                for statement in filter(str.strip, re.split(r";[ \t]*$", script, flags=re.M)):
                    await conn.execute(statement)
                await conn.execute("INSERT INTO schema_version VALUES (?)", (number,))
            await conn.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")  # a real write
            await conn.execute("COMMIT")
        except BaseException:
            await _rollback(conn)
            raise

    async def close(self) -> None:
        """Close every connection; safe to call twice."""
        for conn in {id(c): c for c in (self._who, self._reader, self._writer)
                     if c is not None}.values():
            await conn.close()
        self._writer = self._reader = self._who = None

    @property
    def writer(self) -> aiosqlite.Connection:
        if self._writer is None:
            raise RuntimeError("store is not open")
        return self._writer

    @property
    def identity_reader(self) -> aiosqlite.Connection:
        """A reader of its own for who is asking, looked up on every request: it waits
        behind no list or page read."""
        if self._who is None:
            raise RuntimeError("store is not open")
        return self._who

    @property
    def reader(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise RuntimeError("store is not open")
        return self._reader

    async def write(self, batch: Sequence[Write]) -> Sequence[Write]:
        """Apply a batch of changes in one transaction: all of them or none; the batch as
        stored (a store that :attr:`numbers_messages` gives each event its gid).

        Raises :class:`StorageUnavailable` when the database cannot take writes, and
        :class:`DuplicateKey` when a change breaks a uniqueness rule.
        """
        tasks = list({w.task_id: w.task for w in batch}.values())  # newest row wins
        reviews = [{"task_id": w.task_id, **_review_row(w.review)}
                   for w in batch if w.review is not None]
        messages = [_message_row(w.event) for w in batch if w.event is not None]
        attempts = list({(w.task_id, w.attempt["attempt"]): w.attempt
                         for w in batch if w.attempt is not None}.values())
        keys = [{"key": w.idempotency.key, "request_hash": w.idempotency.request_hash,
                 "task_id": w.task_id, "created_at": w.task["created_at"],
                 "cutoff": time.time() - IDEMPOTENCY_WINDOW}
                for w in batch if w.idempotency is not None]
        async with self.transaction() as conn:
            await conn.executemany(_UPSERT_TASK, tasks)
            for review in reviews:
                taken = await conn.execute(_INSERT_REVIEW, review)
                if taken.rowcount != 1:
                    raise VoteRefused(f"attempt {review['attempt']} of task {review['task_id']} "
                                      "is already decided")
                await conn.execute(_END_RESERVATION, {"task_id": review["task_id"],
                                                      "reviewer": review["reviewer"]})
            if messages:
                await conn.executemany(_INSERT_MESSAGE, messages)
            if attempts:
                await conn.executemany(_UPSERT_ATTEMPT, attempts)
            for key in keys:  # a key older than its window may be used again
                await conn.execute(_FORGET_EXPIRED_KEY, key)
                await conn.execute(_INSERT_KEY, key)
        return batch

    async def probe(self) -> None:
        """A tiny real write: raises :class:`StorageUnavailable` while writes still fail."""
        async with self.transaction() as conn:
            await conn.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``), for a module that owns its own
        statements (accounts, webhooks, jobs); a failed one (commit included) is rolled
        back, and a database that cannot take it is reported as
        :class:`StorageUnavailable`."""
        async with self._write_lock:
            conn = self.writer
            try:
                await conn.execute("BEGIN IMMEDIATE")
                yield conn
                await conn.execute("COMMIT")
            except BaseException as exc:
                await _rollback(conn)
                if isinstance(exc, sqlite3.IntegrityError) and "idempotency_keys" in str(exc):
                    raise DuplicateKey(str(exc)) from exc
                if isinstance(exc, sqlite3.IntegrityError) and "reviews.reviewer" in str(exc):
                    raise VoteRefused("this reviewer has already voted on this attempt") from exc
                if isinstance(exc, sqlite3.IntegrityError) and "already decided" in str(exc):
                    raise VoteRefused("this attempt is already decided") from exc  # the trigger
                if isinstance(exc, sqlite3.Error | OSError):
                    raise StorageUnavailable(str(exc)) from exc
                raise

    async def find_idempotent(self, key: str) -> tuple[str, str] | None:
        """The task an Idempotency-Key created within its window, and the request's hash."""
        rows = await self.reader.execute_fetchall(
            """SELECT task_id, request_hash FROM idempotency_keys
                WHERE key = :key AND created_at > :cutoff""",
            {"key": key, "cutoff": time.time() - IDEMPOTENCY_WINDOW},
        )
        return next(((str(row[0]), str(row[1])) for row in rows), None)

    async def resolve_task_id(self, prefix: str, submitted_by: str | None = None) -> str:
        """The id of the one task whose id starts with ``prefix`` (8 hex characters or more),
        among those ``submitted_by`` that user if given.

        Anything else, a whole id included, is returned as it is, with no query: looking it
        up then finds the task or says there is none. More than one match is Invalid.
        """
        if not MIN_PREFIX <= len(prefix) < ID_LENGTH or not _HEX.issuperset(prefix):
            return prefix
        rows = await self.reader.execute_fetchall(_MATCHING_PREFIX, {"prefix": prefix,
                                                                     "owner": submitted_by})
        matches, first = next(iter(rows))
        if matches > 1 and first != prefix:
            raise Invalid(f"task id {prefix!r} is ambiguous: {matches} tasks start with it; "
                          "give more of the id")
        return str(first) if matches else prefix

    async def get_task(self, task_id: str) -> Task | None:
        rows = await self.reader.execute_fetchall(
            f"SELECT {_TASK_COLUMNS} FROM tasks WHERE task_id = :task_id", {"task_id": task_id}
        )
        if not rows:
            return None
        task = _task(next(iter(rows)))
        task.reviews = await self.reviews(task_id)
        task.attempts = await self.attempts(task_id)
        task.reservations = await self.reservations(task_id)
        return task

    async def reservations(self, task_id: str) -> list[Reservation]:
        """Who holds the task's current attempt in the review queue now (hitl.queue)."""
        rows = await self.reader.execute_fetchall(
            f"SELECT ({LIVE_RESERVATIONS}) FROM tasks WHERE task_id = :task_id",
            {"task_id": task_id})
        return list(next((reservations(row[0]) for row in rows), ()))

    async def task_state(self, task_id: str) -> TaskState | None:
        """A task's status, last message number and submitter, without loading the rest."""
        rows = await self.reader.execute_fetchall(
            "SELECT status, last_seq, submitted_by FROM tasks WHERE task_id = :task_id",
            {"task_id": task_id}
        )
        return next((TaskState(Status(row[0]), int(row[1]), row[2]) for row in rows), None)

    async def attempts(self, task_id: str) -> list[Attempt]:
        rows = await self.reader.execute_fetchall(
            """SELECT attempt, output, started_at, finished_at, error, tries, known, edited_by
                 FROM attempts WHERE task_id = :task_id ORDER BY attempt""",
            {"task_id": task_id},
        )
        return [Attempt(**{**dict(row), "known": bool(row["known"])}) for row in rows]

    async def reviews(self, task_id: str) -> list[Review]:
        rows = await self.reader.execute_fetchall(
            f"""SELECT {_REVIEW_COLUMNS}
                  FROM reviews WHERE task_id = :task_id ORDER BY id""",
            {"task_id": task_id},
        )
        return [Review(**{**dict(row), "admin_override": bool(row["admin_override"])})
                for row in rows]

    async def list_tasks(
        self, status: Status | None = None, limit: int = 50, offset: int = 0,
        submitted_by: str | None = None,
    ) -> tuple[list[TaskRow], int]:
        """One page of tasks (excerpts), newest first, and how many match in all; only
        those ``submitted_by`` that user, if given."""
        page = await self.task_page(View(status, submitted_by=submitted_by), limit,
                                    offset=offset)
        return page.rows, page.total

    async def task_page(self, view: View, limit: int, after: str | None = None,
                        offset: int = 0) -> TaskPage:
        """One page of a view's tasks (excerpts), from the cursor ``after`` on.

        A cursor is the sort key and id of a page's last row, not a position: the next
        page follows on however many tasks ahead of it were decided or added meanwhile.
        """
        since = await self.last_stored_gid()  # first: a change after it is newer than the page
        clauses, params = _view_clauses(view)
        key, direction, beyond = _ORDERS[view.order]
        page_clauses = list(clauses)
        if after is not None:
            params["after_key"], params["after_id"] = parse_cursor(after)
            page_clauses.append(f"({key}, task_id) {beyond} (:after_key, :after_id)")
        rows = list(await self.reader.execute_fetchall(
            f"""SELECT {_ROW_COLUMNS} FROM tasks {_where(page_clauses)}
                 ORDER BY {key} {direction}, task_id {direction} LIMIT :limit OFFSET :offset""",
            {**params, "limit": limit + 1, "offset": offset},
        ))
        total = await self.reader.execute_fetchall(
            f"SELECT count(*) FROM tasks {_where(clauses)}", params)
        tasks = [_task_row(row) for row in rows[:limit]]
        more = len(rows) > limit
        return TaskPage(tasks, next(iter(total))[0],
                        cursor(tasks[-1], view.order) if more else None, since)

    async def oldest_waiting(self, after: str | None = None,
                             scope: ReviewScope | None = None) -> str | None:
        """The id of the task that has waited longest for review; with ``after`` (a task
        id), of the one after it in that queue, round to the start, never ``after`` itself.
        With a ``scope``, only among the tasks that reviewer may decide."""
        params: dict[str, Any] = {"after": after}
        scoped = ""
        if scope is not None:
            scoped = _DECIDABLE
            params |= {"me": scope.name, "any_named": scope.names is None,
                       "names": json.dumps(scope.names or [])}
        rows = await self.reader.execute_fetchall(
            f"""SELECT task_id FROM tasks
                 WHERE status = 'waiting_for_review' AND task_id IS NOT :after {scoped}
                 ORDER BY (updated_at, task_id) < (SELECT updated_at, task_id FROM tasks
                                                    WHERE task_id = :after
                                                      AND status = 'waiting_for_review'),
                          updated_at, task_id
                 LIMIT 1""",
            params,
        )
        return next((str(row[0]) for row in rows), None)

    async def changes_since(self, since: int, limit: int, submitted_by: str | None = None
                            ) -> list[tuple[TaskRow, bool]]:
        """The tasks changed after message ``since`` (at most ``limit``, the least recently
        changed first), each with whether it was submitted after it; only those
        ``submitted_by`` that user, if given."""
        rows = await self.reader.execute_fetchall(
            f"""SELECT {_ROW_COLUMNS}, EXISTS (
                       SELECT 1 FROM messages AS first WHERE first.task_id = tasks.task_id
                          AND first.seq = 1 AND first.gid > :since) AS submitted_since
                  FROM tasks WHERE task_id IN (SELECT task_id FROM messages WHERE gid > :since)
                   AND (:submitted_by IS NULL OR submitted_by = :submitted_by)
                 ORDER BY updated_at, task_id LIMIT :limit""",
            {"since": since, "limit": limit, "submitted_by": submitted_by},
        )
        return [(_task_row(row, skip=("submitted_since",)), bool(row["submitted_since"]))
                for row in rows]

    async def last_stored_gid(self) -> int:
        """The number of the last message committed (read on the reader: what pages see)."""
        rows = await self.reader.execute_fetchall(
            "SELECT seq FROM sqlite_sequence WHERE name = 'messages'"
        )
        return int(next(iter(rows))[0]) if rows else 0

    async def task_row(self, task_id: str) -> TaskRow | None:
        """One task as lists show it (a live dashboard row)."""
        rows = await self.reader.execute_fetchall(
            f"SELECT {_ROW_COLUMNS} FROM tasks WHERE task_id = :task_id", {"task_id": task_id}
        )
        return next((_task_row(row) for row in rows), None)

    async def status_counts(self, submitted_by: str | None = None) -> dict[str, int]:
        clauses, params = _view_clauses(View(submitted_by=submitted_by))
        rows = await self.reader.execute_fetchall(
            f"SELECT status, count(*) FROM tasks {_where(clauses)} GROUP BY status", params
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
            task.attempts = await self.attempts(task.task_id)
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
                task.attempts = await self.attempts(task.task_id)
                yield task
            if len(rows) < batch:
                return
            offset += batch

    async def task_messages(self, task_id: str, after: int) -> list[Message]:
        rows = await self.reader.execute_fetchall(
            f"""SELECT {_MESSAGE_COLUMNS} FROM messages JOIN tasks USING (task_id)
                 WHERE messages.task_id = :task_id AND seq > :after ORDER BY seq""",
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

    async def events_after(self, gid: int, limit: int = 500,
                           max_bytes: int = 256 * 1024) -> list[TaskEvent]:
        """Committed changes after global message ``gid``, in order (a page of them): what
        a process that missed some news (hitl.redis_news) reads to catch up."""
        rows = await self._page(_GLOBAL_PAGE, {"after": gid, "limit": limit}, max_bytes)
        return [_event(row) for row in rows]

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

    # Flow leases: with one process (SQLite) it owns every task; hitl.pg_store shares them.
    lease = 0.0

    async def take_over(self, limit: int = 100) -> list[tuple[Task, bool]]:
        return []

    async def renew(self, tracked: Collection[str]) -> dict[str, int]:
        return {}

    async def owns(self, task_id: str) -> bool:
        return True

    async def let_go(self) -> None:
        return None

    async def forget_expired_keys(self) -> int:
        """Delete Idempotency-Keys past their window; how many went."""
        async with self.transaction() as conn:
            cursor = await conn.execute(
                "DELETE FROM idempotency_keys WHERE created_at <= :cutoff",
                {"cutoff": time.time() - IDEMPOTENCY_WINDOW},
            )
            return cursor.rowcount

    async def purge_finished(self, older_than_days: float) -> int:
        """Delete finished tasks last updated before the cut-off; how many went."""
        cutoff = time.time() - older_than_days * 86400
        async with self.transaction() as conn:
            cursor = await conn.execute(
                f"""DELETE FROM tasks WHERE updated_at < :cutoff AND status IN
                     ({", ".join(repr(s.value) for s in TERMINAL)})""",
                {"cutoff": cutoff},
            )
            return cursor.rowcount


async def _rollback(conn: aiosqlite.Connection) -> None:
    """Roll back if a transaction is open: SQLite ends some failed ones by itself (a full
    disk), and a failing ROLLBACK must not hide the error that caused it."""
    with contextlib.suppress(sqlite3.Error):
        if conn.in_transaction:
            await conn.execute("ROLLBACK")


def open_store(target: str, **options: Any) -> Store:
    """The store of ``--db``: a SQLite file (or ``:memory:``), or a ``postgresql://`` URL
    (hitl.pg_store, shared by several processes; ``options`` are its)."""
    if target.startswith(("postgresql://", "postgres://")):
        from .pg_store import PostgresStore  # asyncpg only where it is used

        return PostgresStore(target, **options)
    return Store(target)


def lock_exclusively(path: str) -> int | None:
    """Hold ``<path>.lock`` for this process (its file descriptor; None for ``:memory:``):
    a second server on one file would fail every write. The lock ends with the process,
    however it ends, or when the descriptor is closed."""
    if path == ":memory:" or path.startswith(("file::memory:", "postgresql://", "postgres://")):
        return None  # nothing to lock, or a database made to be shared
    lock_path = os.path.realpath(path.removeprefix("file:").split("?", 1)[0]) + ".lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StartupError(f"cannot use database {path!r}: {exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StartupError(f"database {path!r} is in use by another hitl serve "
                           f"(pid {holder}); stop it or use another --db") from None
    with contextlib.suppress(OSError):  # the pid is only for that message
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    return fd


def _assignment(data: dict[str, Any]) -> dict[str, Any]:
    data["status"] = Status(data["status"])
    data["reviewers"] = tuple(json.loads(data["reviewers"]))
    data["allow_self_review"] = bool(data["allow_self_review"])
    data["metadata"] = json.loads(data["metadata"]) if data["metadata"] is not None else None
    data["escalate_to"] = tuple(json.loads(data["escalate_to"]))
    data["escalated"] = bool(data["escalated"])
    return data


def _task(row: sqlite3.Row) -> Task:
    return Task(**_assignment(dict(row)))


def escape_like(text: str) -> str:
    """``text`` as a LIKE pattern (``ESCAPE '\\'``) that matches it literally."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _view_clauses(view: View) -> tuple[list[str], dict[str, Any]]:
    clauses: list[str] = []
    params: dict[str, Any] = {}
    if view.status is not None:
        clauses.append("status = :status")
        params["status"] = view.status.value
    if view.submitted_by is not None:
        clauses.append("submitted_by = :submitted_by")
        params["submitted_by"] = view.submitted_by
    if view.search:  # a scan: about 20 ms over 10,000 tasks
        clauses.append("(" + " OR ".join(f"{column} LIKE :pattern ESCAPE '\\'"
                                         for column in _SEARCHED) + ")")
        params["pattern"] = f"%{escape_like(view.search)}%"
    return clauses, params


def _where(clauses: list[str]) -> str:
    return "WHERE " + " AND ".join(clauses) if clauses else ""


def cursor(row: TaskRow, order: Order) -> str:
    """Where the page after ``row`` starts: its sort key (exactly, as ``repr``) and id."""
    key = row.created_at if order == "newest" else row.updated_at
    return f"{key!r}_{row.task_id}"


def parse_cursor(after: str) -> tuple[float, str]:
    key, _, task_id = after.partition("_")
    try:
        return float(key), task_id
    except ValueError:
        raise Invalid(f"after: not a cursor: {after[:80]!r}") from None


def reservations(text: str | None) -> tuple[Reservation, ...]:
    """The reservations of :data:`LIVE_RESERVATIONS`' JSON."""
    return tuple(Reservation(**item) for item in json.loads(text or "[]"))


def _task_row(row: sqlite3.Row, skip: tuple[str, ...] = ()) -> TaskRow:
    data = _assignment({name: row[name] for name in row.keys() if name not in skip})
    data["reservations"] = reservations(data.pop("reserved"))
    for text in _TEXTS:
        data[text] = excerpt(data[text], data[f"{text}_length"])
    return TaskRow(**data)


def _event(row: sqlite3.Row) -> TaskEvent:
    return TaskEvent(row["task_id"], row["seq"], row["gid"], row["status"], row["data"],
                     row["submitted_by"])


def _review_row(review: Review) -> dict[str, Any]:
    return {"attempt": review.attempt, "decision": review.decision, "comment": review.comment,
            "reviewer": review.reviewer, "created_at": review.created_at,
            "display_name": review.display_name, "auth_method": review.auth_method,
            "token_label": review.token_label, "admin_override": review.admin_override,
            "edited_output": review.edited_output}


def _message_row(event: TaskEvent) -> dict[str, Any]:
    return {"gid": event.gid, "task_id": event.task_id, "seq": event.seq,
            "status": event.status, "data": event.data}
