"""Replay from the store is exact however far back, or an explicit reset: never a gap."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from hitl import Config
from hitl.broker import GLOBAL, RESET, Broker, HistoryPage
from hitl.models import Message, Status, Task, TaskEvent
from hitl.store import Store, Write

from .conftest import Watcher, read_sse, start_server, stop_server

ON_POSTGRESQL = True  # and on SQLite (tests/conftest.py)


async def fill(store: Store, count: int, tasks: int = 3, *, age_days: float = 0,
               first_gid: int = 1, prefix: str = "t") -> list[str]:
    """``count`` messages over ``tasks`` finished tasks, interleaved (gids from ``first_gid``)."""
    ids = [f"{prefix}{n}" for n in range(tasks)]
    records = {task_id: Task(task_id, "x", Status.COMPLETED,
                             updated_at=time.time() - age_days * 86400) for task_id in ids}
    writes = []
    for gid in range(first_gid, first_gid + count):
        task = records[ids[gid % tasks]]
        task.last_seq += 1
        writes.append(Write(task.row(), TaskEvent.create(
            task.task_id, task.last_seq, gid, {"status": "running", "n": gid})))
    await store.write(writes)
    return ids


def store_broker(store: Store, **options: int) -> Broker:
    return Broker(heartbeat=0, loader=store.load_history, **options)


async def read(broker: Broker, topic: str, last_id: int, count: int) -> list[Message]:
    async with broker.subscribe(topic, last_id) as sub:
        return [await asyncio.wait_for(anext(sub), 5) for _ in range(count)]


async def test_the_global_stream_replays_exactly_however_far_back(store: Store) -> None:
    await fill(store, 12_000)
    pages: list[HistoryPage] = []

    async def loader(topic: str, after: int, limit: int, max_bytes: int) -> HistoryPage:
        pages.append(await store.load_history(topic, after, limit, max_bytes))
        return pages[-1]

    broker = Broker(heartbeat=0, loader=loader)
    await broker.start()
    messages = await read(broker, GLOBAL, 1, 11_999)
    assert [m.id for m in messages] == list(range(2, 12_001))
    assert max(len(page.messages) for page in pages) <= 500  # a page at a time
    await broker.close()


async def test_a_task_stream_replays_exactly_however_far_back(store: Store) -> None:
    task_id = (await fill(store, 3_000, tasks=1))[0]
    broker = store_broker(store, page_size=128)
    await broker.start()
    assert [m.id for m in await read(broker, task_id, 0, 3_000)] == list(range(1, 3_001))
    await broker.close()


async def test_pages_of_large_messages_are_bounded_by_bytes(store: Store) -> None:
    task = Task("big", "x", Status.COMPLETED)
    writes = []
    for seq in range(1, 41):
        task.last_seq = seq
        writes.append(Write(task.row(), TaskEvent.create(
            "big", seq, seq, {"status": "running", "partial_output": "y" * 100_000})))
    await store.write(writes)
    page = await store.load_history("big", 0, 500, 256 * 1024)
    assert [m.id for m in page.messages] == [1, 2, 3] and page.latest == 40


async def test_a_last_event_id_above_the_latest_gets_a_reset(store: Store) -> None:
    task_id = (await fill(store, 10, tasks=1))[0]
    broker = store_broker(store)
    await broker.start()
    [reset] = await read(broker, GLOBAL, 50, 1)
    assert (reset.status, reset.id, reset.data) == (RESET, 10, '{"status":"reset"}')
    [state] = await read(broker, task_id, 50, 1)  # a task's: its current state, marked
    assert state.id == 10 and json.loads(state.data)["replay"] == "reset"
    assert state.status != RESET
    await broker.close()


async def test_replay_from_before_what_the_store_keeps_gets_a_reset(store: Store) -> None:
    await fill(store, 30, age_days=9, prefix="old")  # gids 1..30, deleted by retention
    await fill(store, 10, first_gid=31, prefix="new")  # gids 31..40, kept
    assert await store.purge_finished(older_than_days=7) == 3
    broker = store_broker(store)
    await broker.start()
    [reset] = await read(broker, GLOBAL, 5, 1)
    assert (reset.status, reset.id) == (RESET, 40)
    replay = await read(broker, GLOBAL, 30, 10)  # from what is kept: exact
    assert [m.id for m in replay] == list(range(31, 41))
    await broker.close()


async def test_streams_over_http_replay_far_back_or_reset(tmp_path: Path) -> None:
    config = Config(db=str(tmp_path / "hitl.db"), process_delay=0, retry_wait=0, auth="none")
    store = Store(config.db)
    await store.open()
    await fill(store, 12_000)
    await store.close()
    server = await start_server(config)
    try:
        async with server.http() as http:
            far_back, ahead = Watcher(), Watcher()
            readers = [asyncio.create_task(read_sse(http, "/stream", far_back,
                                                    {"Last-Event-ID": "1"})),
                       asyncio.create_task(read_sse(http, "/stream", ahead,
                                                    {"Last-Event-ID": "99999"}))]

            async def both_done() -> None:
                while not (far_back.ids()[-1:] == [12_000] and ahead.events):
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(both_done(), 30)
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
        assert far_back.ids() == list(range(2, 12_001))
        assert (ahead.events[0].id, ahead.events[0].data) == (12_000, {"status": "reset"})
    finally:
        await stop_server(server)


async def test_clients_that_leave_during_their_replay_leave_no_subscriber(
    tmp_path: Path,
) -> None:
    config = Config(db=str(tmp_path / "hitl.db"), process_delay=0, retry_wait=0, auth="none")
    store = Store(config.db)
    await store.open()
    task_id = (await fill(store, 12_000))[0]
    await store.close()
    server = await start_server(config)
    host, port = server.url.removeprefix("http://").split(":")
    try:
        for path in ["/stream", f"/stream/{task_id}"] * 25:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nLast-Event-ID: 1\r\n\r\n"
                         .encode())
            await writer.drain()
            if len(path) > len("/stream"):
                await reader.readexactly(1)  # some leave once the replay has begun
            writer.close()
        async with server.http() as http:
            async def healthz_subscribers() -> int:
                return int((await http.get("/healthz")).json()["subscribers"])

            async def back_to_zero() -> None:
                while await healthz_subscribers() != 0:
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(back_to_zero(), 10)
        assert server.app.extensions["broker"].topic_count() == 0
    finally:
        await stop_server(server)
