"""The journal, the store and the tracker on their own: write first, then publish; a failed
write fails only its own change; a task's messages never skip a number."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hitl.broker import GLOBAL, Broker
from hitl.errors import Conflict, DuplicateKey, StartupError, StorageUnavailable
from hitl.journal import Journal
from hitl.models import Review, Status, Task
from hitl.store import IdempotencyKey, Store, Write, lock_exclusively
from hitl.tracker import Tracker

ON_POSTGRESQL = True  # and on SQLite (tests/conftest.py)


@pytest.fixture
async def journal(store: Store) -> AsyncIterator[Journal]:
    journal = Journal(store, Broker(heartbeat=0, loader=store.load_history))
    await journal.broker.start()
    await journal.start()
    yield journal
    await journal.close()
    await journal.broker.close()


async def test_a_change_is_published_only_once_committed(journal: Journal,
                                                         store: Store) -> None:
    task = Task("t1", "input")
    async with journal.broker.subscribe("t1", 0) as subscription:
        stored = journal.record(task, {"status": "pending"})
        assert not subscription.ready()  # queued for the writer, not yet visible
        await asyncio.wait_for(stored, 5)
        message = await asyncio.wait_for(subscription.__anext__(), 5)
    assert (message.id, message.status) == (1, "pending")
    assert (await store.get_task("t1")) is not None


async def test_a_failed_write_fails_only_its_own_change(journal: Journal, store: Store) -> None:
    first = Task("first", "a")
    await journal.record(first, {"status": "pending"}, idempotency=IdempotencyKey("k", "h"))
    clash, other = Task("clash", "b"), Task("other", "c")
    async with journal.broker.subscribe(GLOBAL, 1) as everything:
        # queued together, so they meet in one batch: the clash fails, the other lands
        clashed = journal.record(clash, {"status": "pending"}, idempotency=IdempotencyKey("k", "h"))
        landed = journal.record(other, {"status": "pending"})
        with pytest.raises(DuplicateKey):
            await asyncio.wait_for(clashed, 5)
        await asyncio.wait_for(landed, 5)
        message = await asyncio.wait_for(everything.__anext__(), 5)
    assert (message.task_id, message.id) == ("other", 2)  # no gap where the clash was
    assert await store.get_task("clash") is None
    assert await store.get_task("other") is not None
    assert journal.failure is None  # a broken rule is not a storage failure
    assert "clash" in journal.refused and "other" not in journal.refused


async def test_a_refused_task_skips_no_message_number(journal: Journal, store: Store) -> None:
    task = Task("t1", "input")
    await journal.record(task, {"status": "pending"})
    journal.refused.add("t1")  # as after a failed write of its
    with pytest.raises(StorageUnavailable):
        await journal.record(task, {"status": "running"})
    assert task.last_seq == 1  # nothing numbered for a refused change
    reloaded = await store.get_task("t1")
    assert reloaded is not None
    journal.forgive("t1")
    await journal.record(reloaded, {"status": "running"})
    assert [m.id for m in await store.task_messages("t1", 0)] == [1, 2]


async def test_a_failed_commit_leaves_the_writer_usable(store: Store) -> None:
    row = Task("t1", "input").row()
    await store.write([Write(row, idempotency=IdempotencyKey("k", "h"))])
    with pytest.raises(DuplicateKey):
        await store.write([Write(Task("t2", "x").row(), idempotency=IdempotencyKey("k", "h"))])
    if store.dialect == "sqlite":  # PostgreSQL has no one writer: each commit its own
        assert not store.writer.in_transaction
    await store.write([Write(Task("t3", "y").row())])
    assert await store.get_task("t3") is not None


@pytest.mark.sqlite_only("the database made read-only is SQLite's PRAGMA query_only")
async def test_a_probe_reports_a_database_that_takes_no_writes(store: Store) -> None:
    await store.probe()
    await store.writer.execute("PRAGMA query_only = ON")
    with pytest.raises(StorageUnavailable, match="readonly|read-only|query_only"):
        await store.probe()
    await store.writer.execute("PRAGMA query_only = OFF")
    await store.probe()


@pytest.mark.sqlite_only("a SQLite file is locked to one process; PostgreSQL is shared")
async def test_a_database_is_served_by_one_process_at_a_time(store: Store,
                                                             tmp_path: Path) -> None:
    lock = lock_exclusively(store.path)
    try:
        link = tmp_path / "link.db"
        link.symlink_to(store.path)
        for path in (store.path, str(link)):  # the same file by another name too
            with pytest.raises(StartupError, match="in use by another hitl serve"):
                lock_exclusively(path)
        reader = Store(store.path)  # the CLI reads while the server runs
        await reader.open()
        await reader.close()
    finally:
        assert lock is not None
        os.close(lock)
    again = lock_exclusively(store.path)  # released with its descriptor
    assert again is not None
    os.close(again)


async def test_a_version_1_database_is_migrated_keeping_its_tasks(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    from hitl.store import MIGRATIONS

    with sqlite3.connect(path) as conn:
        conn.executescript(MIGRATIONS[0])
        conn.execute("CREATE TABLE schema_version (version INTEGER)")
        conn.execute("INSERT INTO schema_version VALUES (1)")
        conn.execute("""INSERT INTO tasks VALUES ('old', 'input', 'waiting_for_review', 1,
                        'out', NULL, NULL, 3, 1.0, 1.0)""")
    store = Store(str(path))
    await store.open()
    try:
        task = await store.get_task("old")
        assert task is not None and task.status is Status.WAITING_FOR_REVIEW
        assert await store.find_idempotent("nope") is None  # the new table is there
    finally:
        await store.close()


async def test_of_two_claims_on_one_attempt_the_first_wins(journal: Journal) -> None:
    task = Task("t1", "input", status=Status.WAITING_FOR_REVIEW, attempt=2)
    tracker = Tracker(task, journal)
    with pytest.raises(Conflict, match="attempt 1 is no longer under review"):
        tracker.claim_decision(Review("approved", 1))
    tracker.claim_decision(Review("approved", 2, reviewer="ann"))
    with pytest.raises(Conflict, match="already approved by ann"):
        tracker.claim_decision(Review("rejected", 2, reviewer="bob"))


async def test_a_stopped_tracker_ignores_progress(journal: Journal) -> None:
    task = Task("t1", "input", status=Status.RUNNING)
    tracker = Tracker(task, journal)
    report = tracker.reporter(1)
    report(0.5, "half")
    assert task.last_seq == 1
    tracker.active = False
    report(0.9, "late")
    assert task.last_seq == 1
