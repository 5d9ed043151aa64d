"""The review queue: hand each reviewer the next task they may decide, reserved for them.

A reservation is a row (task, attempt, reviewer, until when) that the store alone decides
on: a claim is one ``INSERT ... SELECT`` that picks the oldest waiting task the caller may
decide and has not voted on, and only while fewer others hold it than it still needs
votes (its quorum less its approvals on that attempt). It runs in a write transaction
(``BEGIN IMMEDIATE`` on SQLite; on PostgreSQL, under a lock the claims of every process
take in turn), so two processes sharing the database cannot both take a task's last
place. A reservation ends when it expires, when its reviewer decides (in the decision's
own commit: :meth:`hitl.store.Store.write`), on release, or when its reviewer takes the
next one (one at a time). It never stops anyone from deciding directly.

Pages show reservations live: after each change, watchers of the task and of the
dashboard get a signal (:meth:`hitl.broker.Broker.signal`) and read the store again.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

from quart import Quart

from . import policy
from .accounts import Identity
from .broker import GLOBAL, Broker
from .config import Config
from .errors import NotFound
from .models import Message, Task
from .store import _DECIDABLE, Store

SIGNAL = "reservation"  # the status of a signal message (never a task's status)
FRAME = b": reservation\n\n"  # an SSE comment: a JSON stream's reader skips it

# Votes the task's current attempt still needs: its quorum
# less the approvals it has.
QUORUM = "tasks.quorum"
_NEEDED = f"""({QUORUM}) - (SELECT count(*) FROM reviews AS vote
                             WHERE vote.task_id = tasks.task_id
                               AND vote.attempt = tasks.attempt
                               AND vote.decision = 'approved')"""
# Others holding the task's current attempt now, who have not voted on it yet.
_HELD_BY_OTHERS = """(SELECT count(*) FROM reservations AS held
                       WHERE held.task_id = tasks.task_id AND held.attempt = tasks.attempt
                         AND held.expires_at > :now AND held.reviewer != :me
                         AND NOT EXISTS (SELECT 1 FROM reviews AS vote
                                          WHERE vote.task_id = held.task_id
                                            AND vote.attempt = held.attempt
                                            AND vote.reviewer = held.reviewer))"""


def _not_voted(table: str) -> str:
    """The caller has not voted on the attempt of ``table``'s row yet."""
    return f"""NOT EXISTS (SELECT 1 FROM reviews AS mine
                            WHERE mine.task_id = {table}.task_id
                              AND mine.attempt = {table}.attempt AND mine.reviewer = :me)"""


# The claim, in one statement: the oldest task that fits, reserved (or held longer).
_CLAIM = f"""
    INSERT INTO reservations (task_id, attempt, reviewer, display_name, created_at, expires_at)
    SELECT task_id, attempt, :me, :display_name, :now, :until FROM tasks
     WHERE status = 'waiting_for_review' AND task_id IS NOT :after {{beyond}}
       {_DECIDABLE}
       AND {_not_voted('tasks')}
       AND {_HELD_BY_OTHERS} < {_NEEDED}
     ORDER BY updated_at, task_id LIMIT 1
    ON CONFLICT (task_id, attempt, reviewer) DO UPDATE
       SET created_at = excluded.created_at, expires_at = excluded.expires_at
    RETURNING task_id
"""
# After ``after`` in queue order (the queue goes round: a second claim starts at its head).
_BEYOND = """AND (updated_at, task_id) > (SELECT updated_at, task_id FROM tasks AS shown
                                          WHERE shown.task_id = :after)"""
# The task the caller holds already, if it still waits for them: held longer.
_KEEP = f"""
    UPDATE reservations SET expires_at = :until
     WHERE reviewer = :me AND expires_at > :now
       AND EXISTS (SELECT 1 FROM tasks WHERE tasks.task_id = reservations.task_id
                      AND tasks.attempt = reservations.attempt
                      AND tasks.status = 'waiting_for_review'
                      AND {_not_voted("reservations")})
    RETURNING task_id
"""
_LET_GO = """DELETE FROM reservations WHERE reviewer = :me AND task_id IS NOT :kept
             RETURNING task_id"""
# PostgreSQL: the claims of every process take turns (a lock held to the commit), so each
# counts the places the others took, committed, as under SQLite's one writer: two
# reviewers never both take a task's last place.
_ONE_CLAIM_AT_A_TIME = "SELECT pg_advisory_xact_lock(1751741548, 1)"  # ("hitl", 1)
_EXPIRED = "DELETE FROM reservations WHERE expires_at <= :now"
_RELEASE = """DELETE FROM reservations WHERE task_id = :task_id AND reviewer = :me
              RETURNING task_id"""


class ReviewQueue:
    """``app.extensions["queue"]``: next and release, each asking :mod:`hitl.policy`."""

    def __init__(self, config: Config, store: Store, broker: Broker) -> None:
        self.config = config
        self.store = store
        self.broker = broker
        self._signals = itertools.count(1)

    def init_app(self, app: Quart) -> None:
        app.extensions["queue"] = self

    async def next(self, after: str | None = None, *, by: Identity) -> Task | None:
        """The oldest waiting task ``by`` may decide and has not voted on (after ``after``
        in the queue, round to its start, never ``after`` itself), reserved for them for
        ``--reservation`` seconds; None when none waits for them.

        With sign-in off everyone is the one operator: the oldest waiting task, reserved
        for no one.
        """
        policy.can_read(by).require()
        if not policy.decides_any(by):  # a viewer's or a submitter's queue is empty
            return None
        scope = policy.review_scope(by)
        if scope is None:
            task_id = await self.store.oldest_waiting(after)
            return await self.store.get_task(task_id) if task_id is not None else None
        now = time.time()
        params: dict[str, Any] = {
            "me": by.name, "display_name": by.user.display_name, "now": now,
            "until": now + self.config.reservation, "after": after,
            "any_named": scope.names is None, "names": json.dumps(scope.names or [])}
        async with self.store.transaction() as conn:
            if self.store.dialect == "postgresql":  # one claim at a time, as SQLite's writer
                await conn.execute(_ONE_CLAIM_AT_A_TIME)
            await conn.execute(_EXPIRED, params)
            kept = None
            if after is None:
                kept = _first(await conn.execute_fetchall(_KEEP, params))
            if kept is None and after is not None:
                kept = _first(await conn.execute_fetchall(
                    _CLAIM.format(beyond=_BEYOND), params))
            if kept is None:
                kept = _first(await conn.execute_fetchall(
                    _CLAIM.format(beyond=""), params))
            let_go = [str(row[0]) for row in
                      await conn.execute_fetchall(_LET_GO, {**params, "kept": kept})]
        for task_id in {*let_go, *([kept] if kept else [])}:
            await self._signal(task_id)
        return await self.store.get_task(kept) if kept is not None else None

    async def release(self, task_id: str, *, by: Identity) -> bool:
        """End ``by``'s reservation of the task; whether they held one."""
        policy.can_read(by).require()
        task = await self.store.get_task(task_id)
        if task is None or not policy.can_see(by, task):
            raise NotFound(f"no task with id {task_id!r}")
        async with self.store.transaction() as conn:
            released = bool(await conn.execute_fetchall(
                _RELEASE, {"task_id": task_id, "me": by.name}))
        if released:
            await self._signal(task_id)
        return released

    async def _signal(self, task_id: str) -> None:
        """Tell this process's watchers of the task, and of every task, to read it anew."""
        state = await self.store.task_state(task_id)
        if state is None:
            return
        data = json.dumps({"task_id": task_id, "signal": next(self._signals)},
                          separators=(",", ":"))
        message = Message(0, task_id, SIGNAL, data, FRAME, state.submitted_by)
        self.broker.signal(task_id, message)
        self.broker.signal(GLOBAL, message)


def _first(rows: Any) -> str | None:
    return next((str(row[0]) for row in rows), None)
