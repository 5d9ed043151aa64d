"""The rules of the job queue, the review queue and webhooks, kept across processes on
one PostgreSQL database: each "process" is a store of its own (``open_store`` on the
same URL: its own pool of connections, its own process name), as two ``hitl serve``
would be. Claims race through the database, news between them goes (or is lost) as the
broker's notices, and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from hitl import Config
from hitl.accounts import Accounts, Identity, Role
from hitl.broker import Broker, Receiver
from hitl.delivery import Dispatcher
from hitl.journal import Journal
from hitl.models import Message, TaskEvent
from hitl.processors import Job
from hitl.queue import ReviewQueue
from hitl.store import Store, open_store
from hitl.webhooks import Webhooks
from hitl.work import WorkerError, WorkQueue

from . import receiver as hooks
from .conftest import OPERATOR, until, within


@pytest.fixture
async def two(postgres_url: str) -> AsyncIterator[list[Store]]:
    """Two processes' stores on one PostgreSQL database."""
    stores = [open_store(postgres_url), open_store(postgres_url)]
    for store in stores:
        await store.open()
    try:
        yield stores
    finally:
        for store in stores:
            await store.close()


async def add_tasks(store: Store, count: int, status: str) -> list[str]:
    """Tasks t0..t<count-1> in ``status`` on attempt 1, oldest first; with a queued job
    each when running."""
    ids = [f"t{number}" for number in range(count)]
    async with store.transaction() as conn:
        for number, task_id in enumerate(ids):
            await conn.execute(
                """INSERT INTO tasks (task_id, task_input, status, attempt, last_seq,
                                      created_at, updated_at)
                   VALUES (:id, 'x', :status, 1, 1, :at, :at)""",
                {"id": task_id, "status": status, "at": 1000.0 + number})
            if status == "running":
                await conn.execute("INSERT INTO jobs (task_id, attempt, state, queued_at) "
                                   "VALUES (:id, 1, 'queued', :at)",
                                   {"id": task_id, "at": float(number)})
    return ids


def job_of(task_id: str, reports: list[tuple[float, str]] | None = None) -> Job:
    def report(fraction: float, partial: str) -> None:
        if reports is not None:
            reports.append((fraction, partial))

    return Job("x", 1, (), report, task_id=task_id)


class Linked:
    """A backend that carries notices to every broker linked to it (as Redis would carry
    them between processes); the rest stays in its own process."""

    def __init__(self, receivers: list[Receiver]) -> None:
        self.receivers = receivers
        self.own: Receiver | None = None

    async def connect(self, receiver: Receiver) -> None:
        self.own = receiver
        self.receivers.append(receiver)

    async def disconnect(self) -> None:
        if self.own in self.receivers:
            self.receivers.remove(self.own)

    def publish(self, topic: str, message: Message) -> None:
        if self.own is not None:
            self.own.deliver(topic, message)

    def publish_event(self, event: TaskEvent) -> None:
        if self.own is not None:
            self.own.receive(event)

    def signal(self, topic: str, message: Message) -> None:
        if self.own is not None:
            self.own.hint(topic, message)

    def notify(self, kind: str, text: str) -> None:
        for receiver in list(self.receivers):
            receiver.notice(kind, text)


# External work ------------------------------------------------------------------------

async def test_claims_racing_on_two_processes_take_each_job_once(two: list[Store]) -> None:
    ids = await add_tasks(two[0], 5, "running")
    queues = [WorkQueue(Config(), store) for store in two]
    claims = await within(asyncio.gather(*(
        queues[number % 2].claim(f"w{number}", by=OPERATOR) for number in range(20))),
        20, "twenty claims")
    taken = [job.task_id for job in claims if job is not None]
    assert sorted(taken) == ids  # each job to exactly one claim, none left over
    rows = await two[1].reader.execute_fetchall(
        "SELECT task_id, state, tries FROM jobs ORDER BY task_id")
    assert [tuple(row) for row in rows] == [(task_id, "claimed", 1) for task_id in ids]


async def test_an_expired_lease_is_taken_over_by_one_of_two_processes(
        two: list[Store]) -> None:
    [task_id] = await add_tasks(two[0], 1, "running")
    queues = [WorkQueue(Config(), store) for store in two]
    first = await queues[0].claim("w0", lease=0.2, by=OPERATOR)
    assert first is not None
    await asyncio.sleep(0.3)
    again = await asyncio.gather(*(queues[n % 2].claim(f"w{n}", by=OPERATOR)
                                   for n in range(1, 9)))
    assert [job.task_id for job in again if job is not None] == [task_id]
    rows = await two[0].reader.execute_fetchall("SELECT tries, taken_over FROM jobs")
    assert [tuple(row) for row in rows] == [(2, 1)]


@pytest.mark.parametrize("news", ["notices", "lost"])
async def test_a_job_queued_on_one_process_and_done_on_another_reaches_its_flow(
        two: list[Store], news: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The flow on process A queues the job; a claim waiting on process B takes it; B's
    worker completes it; A's flow gets the output. With notices carried between the two
    (B's worker's progress reaches A's flow too), and with every notice lost (the
    second-by-second look finds the job, and its output)."""
    import hitl.work

    await add_tasks(two[0], 1, "completed")
    async with two[0].transaction() as conn:
        await conn.execute("UPDATE tasks SET status = 'running' WHERE task_id = 't0'")
    brokers: list[Broker | None] = [None, None]
    if news == "notices":
        monkeypatch.setattr(hitl.work, "RECHECK", 3600.0)  # only a notice can wake them
        linked: list[Receiver] = []
        brokers = [Broker(Linked(linked)), Broker(Linked(linked))]
        for broker in brokers:
            assert broker is not None
            await broker.start()
    queues = [WorkQueue(Config(), store, broker) for store, broker in zip(two, brokers,
                                                                         strict=True)]
    for queue in queues:
        await queue.start()
    try:
        claim = asyncio.create_task(queues[1].claim("w", wait=15, by=OPERATOR))
        await until(lambda: queues[1].asleep == 1, "the claim on B asleep")
        reports: list[tuple[float, str]] = []
        flow = asyncio.create_task(queues[0].process(job_of("t0", reports)))
        claimed = await within(claim, 5, "B's claim to take the job queued on A")
        assert claimed is not None and claimed.task_id == "t0"
        if news == "notices":
            await queues[1].progress("t0", 1, claimed.lease_id, 0.5, "half", by=OPERATOR)
            await until(lambda: reports == [(0.5, "half")], "B's progress passed on by A")
        started = time.monotonic()
        await queues[1].complete("t0", 1, claimed.lease_id, "done on B", by=OPERATOR)
        assert await within(flow, 5, "A's flow to get the output") == "done on B"
        assert time.monotonic() - started < 3
    finally:
        for queue in queues:
            await queue.close()
        for broker in brokers:
            if broker is not None:
                await broker.close()


async def test_a_failure_reported_on_another_process_fails_the_try_of_the_flow(
        two: list[Store]) -> None:
    await add_tasks(two[0], 1, "completed")
    async with two[0].transaction() as conn:
        await conn.execute("UPDATE tasks SET status = 'running' WHERE task_id = 't0'")
    queues = [WorkQueue(Config(), store) for store in two]
    for queue in queues:
        await queue.start()
    try:
        flow = asyncio.create_task(queues[0].process(job_of("t0")))
        claimed = await within(queues[1].claim("w", wait=5, by=OPERATOR), 6, "a claim")
        assert claimed is not None
        await queues[1].fail("t0", 1, claimed.lease_id, "no luck", by=OPERATOR)
        with pytest.raises(WorkerError, match="no luck"):
            await within(flow, 5, "A's flow to get the failure")
    finally:
        for queue in queues:
            await queue.close()


# The review queue ---------------------------------------------------------------------

async def test_reservations_racing_on_two_processes_hand_each_task_once(
        two: list[Store]) -> None:
    accounts = Accounts(two[0])
    identities = []
    for number in range(20):
        user = await accounts.add_user(f"r{number:02d}", Role.REVIEWER)
        identities.append(Identity(user, "token"))
    ids = await add_tasks(two[0], 5, "waiting_for_review")
    queues = [ReviewQueue(Config(), store, Broker()) for store in two]
    handed = await within(asyncio.gather(*(queues[at % 2].next(by=identity)
                                           for at, identity in enumerate(identities))),
                          20, "twenty reservations")
    assert sorted(task.task_id for task in handed if task is not None) == ids
    rows = await two[1].reader.execute_fetchall(
        "SELECT task_id, count(*) FROM reservations GROUP BY task_id ORDER BY task_id")
    assert [tuple(row) for row in rows] == [(task_id, 1) for task_id in ids]


async def test_a_quorum_of_two_goes_to_two_reviewers_across_processes(
        two: list[Store]) -> None:
    accounts = Accounts(two[0])
    identities = [Identity(await accounts.add_user(f"q{n}", Role.REVIEWER), "token")
                  for n in range(10)]
    [task_id] = await add_tasks(two[0], 1, "waiting_for_review")
    async with two[0].transaction() as conn:
        await conn.execute("UPDATE tasks SET quorum = 2")
    queues = [ReviewQueue(Config(), store, Broker()) for store in two]
    handed = await asyncio.gather(*(queues[at % 2].next(by=identity)
                                    for at, identity in enumerate(identities)))
    assert [task.task_id for task in handed if task is not None] == [task_id, task_id]


# Webhooks -----------------------------------------------------------------------------

async def store_events(store: Store, count: int) -> list[int]:
    """``count`` tasks, each with one waiting_for_review message (an event), numbered from
    the counter row as a commit numbers them; their gids."""
    gids = []
    async with store.transaction() as conn:
        start = len(list(await conn.execute_fetchall("SELECT task_id FROM tasks")))
        for number in range(start, start + count):
            rows = await conn.execute_fetchall(
                "UPDATE counters SET value = value + 1 WHERE name = 'gid' RETURNING value")
            gid = int(next(iter(rows))[0])
            task_id = f"e{number}"
            await conn.execute(
                """INSERT INTO tasks (task_id, task_input, status, attempt, last_seq,
                                      created_at, updated_at)
                   VALUES (:id, 'x', 'waiting_for_review', 1, 1, 1, 1)""", {"id": task_id})
            await conn.execute(
                "INSERT INTO messages (gid, task_id, seq, status, data) "
                "VALUES (:gid, :id, 1, 'waiting_for_review', :data)",
                {"gid": gid, "id": task_id,
                 "data": json.dumps({"status": "waiting_for_review", "attempt": 1})})
            gids.append(gid)
    return gids


def dispatchers(stores: list[Store], url: str) -> list[Dispatcher]:
    config = Config(db=url, webhook_poll=0.05, flow_lease=1.0, webhook_first_retry=0.05)
    return [Dispatcher(config, store, Journal(store, Broker())) for store in stores]


def delivered(receiver: hooks.Receiver) -> list[Any]:
    return sorted(request.json()["data"]["task_id"] for request in receiver.taken)


async def test_two_dispatchers_on_one_endpoint_deliver_each_event_once(
        two: list[Store], postgres_url: str) -> None:
    async with hooks.Receiver() as receiver:
        await Webhooks(two[0]).add(receiver.url)
        workers = dispatchers(two, postgres_url)
        for worker in workers:
            await worker.start()
        try:
            await store_events(two[1], 30)
            await until(lambda: len(receiver.taken) >= 30, "thirty deliveries")
            await asyncio.sleep(0.5)  # a second deliverer would be sending them again now
            assert len(receiver.requests) == 30
            assert delivered(receiver) == sorted(f"e{n}" for n in range(30))
            assert len({request.id for request in receiver.requests}) == 30
            holders = [worker for worker in workers if worker._held]
            assert len(holders) == 1  # one process holds the endpoint
        finally:
            for worker in workers:
                await worker.close()


async def stored_cursor(store: Store, endpoint_id: str, gid: int) -> None:
    while (endpoint := await Webhooks(store).get(endpoint_id)) is None or (
            endpoint.cursor < gid):
        await asyncio.sleep(0.02)


async def test_a_dead_holder_s_endpoint_is_taken_over_after_its_lease(
        two: list[Store], postgres_url: str) -> None:
    """The holder dies (stops without letting go): the other process takes the endpoint
    once its lease lapses and delivers what came after, each event once."""
    async with hooks.Receiver() as receiver:
        endpoint = await Webhooks(two[0]).add(receiver.url)
        first, second = dispatchers(two, postgres_url)
        await first.start()
        gids = await store_events(two[0], 5)
        await until(lambda: len(receiver.taken) >= 5, "five deliveries by the first")
        await within(stored_cursor(two[0], endpoint.id, gids[-1]), 5,
                     "the first to store its cursor")  # else a crash sends them again
        await second.start()
        first._held = set()  # dies: it will not let the endpoint go as it stops
        await first.close()
        died = time.monotonic()
        await store_events(two[0], 5)
        try:
            await until(lambda: len(receiver.taken) >= 10, "the second to deliver the rest",
                        timeout=15)
            took = time.monotonic() - died
            assert took >= 0.5, took  # not before the dead holder's lease lapsed
            await asyncio.sleep(0.3)
            assert len(receiver.requests) == 10
            assert delivered(receiver) == sorted(f"e{n}" for n in range(10))
        finally:
            await second.close()


async def test_a_holder_that_stops_lets_its_endpoint_go_at_once(
        two: list[Store], postgres_url: str) -> None:
    async with hooks.Receiver() as receiver:
        endpoint = await Webhooks(two[0]).add(receiver.url)
        first, second = dispatchers(two, postgres_url)
        await first.start()
        gids = await store_events(two[0], 1)
        await until(lambda: len(receiver.taken) >= 1, "a delivery by the first")
        await within(stored_cursor(two[0], endpoint.id, gids[-1]), 5, "its cursor stored")
        await second.start()
        await first.close()  # lets go
        stopped = time.monotonic()
        await store_events(two[0], 1)
        try:
            await until(lambda: len(receiver.taken) >= 2, "the second to deliver")
            assert time.monotonic() - stopped < 0.9  # before a lease (1 s) could lapse
            assert delivered(receiver) == ["e0", "e1"]
        finally:
            await second.close()
