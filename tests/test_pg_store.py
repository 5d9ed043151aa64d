"""The PostgreSQL store's rules, with two or more stores on one database standing for processes."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

import pytest

from hitl.errors import VoteRefused
from hitl.models import Review, Status, Task, TaskEvent
from hitl.pg_store import PG_MIGRATIONS, PostgresStore
from hitl.store import Write


@pytest.fixture
async def stores(postgres_url: str) -> AsyncIterator[list[PostgresStore]]:
    opened = [PostgresStore(postgres_url, lease=1.0) for _ in range(3)]
    await asyncio.gather(*(store.open() for store in opened))  # concurrent start-ups
    yield opened
    await asyncio.gather(*(store.close() for store in opened))


def change(task: Task, status: Status, **payload: object) -> Write:
    task.status = status
    task.last_seq += 1
    event = TaskEvent.create(task.task_id, task.last_seq, 0, {"status": status.value,
                                                             **payload})
    return Write(task.row(), event)


async def test_concurrent_start_ups_migrate_once(stores: list[PostgresStore]) -> None:
    rows = await stores[0].reader.execute_fetchall("SELECT version FROM schema_version")
    assert sorted(row[0] for row in rows) == list(range(1, len(PG_MIGRATIONS) + 1))


async def test_gids_are_contiguous_and_commit_in_order_across_processes(
        stores: list[PostgresStore]) -> None:
    tasks = [Task(f"t{n}", "input") for n in range(30)]

    async def write_all(store: PostgresStore, mine: list[Task]) -> None:
        for task in mine:
            for status in (Status.PENDING, Status.RUNNING, Status.WAITING_FOR_REVIEW):
                await store.write([change(task, status)])

    await asyncio.gather(*(write_all(store, tasks[n::3]) for n, store in enumerate(stores)))
    events = await stores[1].events_after(0, limit=1000)
    assert [event.gid for event in events] == list(range(1, 91))
    assert await stores[2].latest_gid() == 90
    for task in tasks:  # each task's own numbers follow its commits
        assert [e.seq for e in events if e.task_id == task.task_id] == [1, 2, 3]


async def test_a_reader_never_meets_a_gap_that_fills_later(
        stores: list[PostgresStore]) -> None:
    """Commits race while a reader follows: every id it reads below the latest is there."""
    stop = asyncio.Event()
    seen: list[int] = []

    async def follow() -> None:
        after = 0
        while not stop.is_set() or after < await stores[2].latest_gid():
            for event in await stores[2].events_after(after):
                assert event.gid == after + 1, (event.gid, after)
                after = event.gid
                seen.append(event.gid)
            await asyncio.sleep(0)

    async def write(store: PostgresStore, prefix: str) -> None:
        for n in range(40):
            task = Task(f"{prefix}{n}", "x")
            await store.write([change(task, Status.PENDING)])

    reader = asyncio.create_task(follow())
    await asyncio.gather(write(stores[0], "a"), write(stores[1], "b"))
    stop.set()
    await asyncio.wait_for(reader, 10)
    assert seen == list(range(1, 81))


async def test_of_two_processes_deciding_one_attempt_exactly_one_is_stored(
        stores: list[PostgresStore]) -> None:
    task = Task("t", "input")
    await stores[0].write([change(task, Status.PENDING)])
    await stores[0].write([change(task, Status.WAITING_FOR_REVIEW)])
    for _ in range(5):
        copies = [dataclasses.replace(task, reviews=[], attempts=[]) for _ in stores]
        writes = []
        for n, copy in enumerate(copies):
            write = change(copy, Status.PROCESSING_FEEDBACK)
            writes.append(Write(write.task, write.event,
                                Review("approved", copy.attempt, "", f"r{n}", time.time())))
        results = await asyncio.gather(*(store.write([write])
                                         for store, write in zip(stores, writes, strict=True)),
                                       return_exceptions=True)
        assert sum(not isinstance(r, Exception) for r in results) == 1, results
        assert all(isinstance(r, VoteRefused) for r in results if isinstance(r, Exception))
        stored = await stores[1].get_task("t")
        assert stored is not None
        assert len([r for r in stored.reviews if r.attempt == task.attempt]) == 1
        # Next round: a new attempt up for review.
        task = stored
        task.attempt += 1
        await stores[0].write([change(task, Status.WAITING_FOR_REVIEW)])


async def test_a_process_writing_from_an_outdated_copy_is_refused(
        stores: list[PostgresStore]) -> None:
    task = Task("t", "input")
    await stores[0].write([change(task, Status.PENDING)])
    outdated = dataclasses.replace(task)
    await stores[1].write([change(task, Status.RUNNING)])
    await stores[1].write([change(task, Status.WAITING_FOR_REVIEW)])
    with pytest.raises(VoteRefused):  # no message, an older row: nothing written
        await stores[0].write([Write(outdated.row())])
    with pytest.raises(VoteRefused):  # a message number taken meanwhile
        await stores[0].write([change(outdated, Status.RUNNING)])
    stored = await stores[2].get_task("t")
    assert stored is not None and stored.status is Status.WAITING_FOR_REVIEW


async def test_a_lapsed_lease_is_taken_over_by_one_process(
        stores: list[PostgresStore]) -> None:
    first, second, third = stores
    tasks = [Task(f"t{n}", "x") for n in range(5)]
    for task in tasks:
        await first.write([change(task, Status.PENDING)])
    assert await second.take_over() == []  # first holds them
    ids = [task.task_id for task in tasks]
    assert set(await first.renew(ids)) == set(ids)
    await asyncio.sleep(1.2)  # first stops renewing: its leases lapse
    taken = await asyncio.gather(second.take_over(), third.take_over())
    ids = [task.task_id for batch in taken for task, _ in batch]
    assert sorted(ids) == sorted(task.task_id for task in tasks)  # each by one process
    assert all(lapsed for batch in taken for _, lapsed in batch)
    assert await first.renew(ids) == {}
    assert not await first.owns("t0")
    await second.let_go()
    await third.let_go()
    again = await first.take_over()
    assert sorted(task.task_id for task, _ in again) == sorted(ids)
    assert not any(lapsed for _, lapsed in again)  # let go, not lapsed


async def test_a_task_owned_but_not_run_lapses_and_is_taken_over(
        stores: list[PostgresStore]) -> None:
    """Renewal extends only the tasks a process runs: one it owns without a flow (its
    take-over's read failed, say) is not held forever."""
    first, second, _ = stores
    running, orphan = Task("running", "x"), Task("orphan", "x")
    for task in (running, orphan):
        await first.write([change(task, Status.PENDING)])
    for _ in range(3):
        assert set(await first.renew(["running"])) == {"running"}
        await asyncio.sleep(0.45)
    taken = await second.take_over()
    assert [task.task_id for task, _ in taken] == ["orphan"]
