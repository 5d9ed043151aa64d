"""Redis Streams between processes (hitl.redis_news), on a real Redis and a real store.

Several Broker + RedisBackend pairs in one test process stand for hitl processes: each
reads the same SQLite database through a Store of its own, and changes are committed by
:class:`Committer` (standing for the database's gid counter: one commit at a time, gids
in commit order) or a real Journal, then published by the "process" that made them.
The shared Redis is used with a key prefix per test; the outage tests start a
redis-server of their own on a free port, and stop and start it again.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

from hitl.broker import GLOBAL, Broker, MemoryBackend
from hitl.errors import ConfigError
from hitl.journal import Journal
from hitl.models import Message, Task, TaskEvent, sse_frame
from hitl.redis_news import RedisBackend, make_backend, parse_broker_url
from hitl.store import Store, Write

from .conftest import until, within


@dataclass
class Proc:
    """One stand-in process: its store (for catching up), broker and backend."""

    store: Store
    broker: Broker
    backend: RedisBackend
    got: list[TaskEvent] = field(default_factory=list)  # every change its broker received

    def gids(self) -> list[int]:
        return [event.gid for event in self.got]

    def publish(self, event: TaskEvent) -> None:
        self.broker.publish_event(event)


class Committer:
    """Commits changes to the shared database one at a time, gids in commit order (as the
    PostgreSQL counter row does); the caller publishes each through its own process."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.gid = 0
        self.lock = asyncio.Lock()
        self.tasks: dict[str, Task] = {}
        self.events: list[TaskEvent] = []

    async def commit(self, task_id: str, status: str = "pending",
                     submitted_by: str | None = None) -> TaskEvent:
        async with self.lock:
            task = self.tasks.setdefault(task_id, Task(task_id, "input",
                                                       submitted_by=submitted_by))
            task.last_seq += 1
            event = TaskEvent.create(task_id, task.last_seq, self.gid + 1,
                                     {"task_id": task_id, "status": status}, submitted_by)
            await self.store.write([Write(task.row(), event)])
            self.gid += 1
            self.events.append(event)
            return event


Procs = Callable[..., Awaitable[list[Proc]]]


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Store]:
    """The shared database, opened for the committer (the processes open their own)."""
    store = Store(str(tmp_path / "shared.db"))
    await store.open()
    yield store
    await store.close()


@pytest.fixture
async def procs(db: Store) -> AsyncIterator[Procs]:
    """``await procs(url, n, **timings)``: n processes on ``url``, closed after the test."""
    async with AsyncExitStack() as stack:
        async def start(url: str, count: int = 2, **timings: Any) -> list[Proc]:
            made = []
            for _ in range(count):
                store = Store(db.path)
                await store.open()
                stack.push_async_callback(store.close)
                backend = RedisBackend(url, store.events_after, store.latest_gid, **timings)
                broker = Broker(backend, heartbeat=0)
                proc = Proc(store, broker, backend)
                broker.listeners.append(proc.got.append)
                await broker.start()
                stack.push_async_callback(broker.close)
                made.append(proc)
            return made

        yield start


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OwnRedis:
    """A redis-server of this test's own (no persistence), to stop and start again."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0?prefix=t"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("needs Redis: no redis-server on PATH")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
            try:
                if await client.ping():
                    return
            except (OSError, redis.RedisError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.skip(f"needs Redis: redis-server on port {self.port} did not start")
                await asyncio.sleep(0.05)
            finally:
                await client.aclose()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    await server.start()
    try:
        yield server
    finally:
        server.stop()


async def until_each(procs: list[Proc], count: int, what: str, timeout: float = 5) -> None:
    await until(lambda: all(len(proc.got) >= count for proc in procs), what, timeout)


async def until_gone(url: str, origin: str) -> None:
    """Wait until Redis has no connection of the backend ``origin`` (closed, not leaked)."""
    client = redis.Redis.from_url(parse_broker_url(url)[0])
    try:
        async def gone() -> None:
            while any(c.get("name") == f"hitl-news-{origin}" for c in await client.client_list()):
                await asyncio.sleep(0.02)
        await within(gone(), 3, "the backend's connections closed")
    finally:
        await client.aclose()


def hitl_tasks() -> list[asyncio.Task[Any]]:
    return [task for task in asyncio.all_tasks() if task.get_name().startswith("hitl-redis")]


async def test_two_processes_each_get_every_change_once_in_gid_order(
        redis_url: str, procs: Procs, db: Store) -> None:
    a, b = await procs(redis_url, idle_poll=30)  # no store polling: the news must carry it
    committer = Committer(db)

    async def change(proc: Proc, task_id: str) -> None:
        proc.publish(await committer.commit(task_id))

    for round_ in range(100):  # both processes commit at once, each publishes its own
        await asyncio.gather(change(a, f"a{round_ % 7}"), change(b, f"b{round_ % 5}"))
    await until_each([a, b], 200, "every change", 10)
    await asyncio.sleep(0.2)  # any repeat would land now
    for proc in (a, b):
        assert proc.gids() == list(range(1, 201))
        assert proc.got == committer.events  # the same changes, field for field
        assert proc.backend.delivered == 200
    async with a.broker.subscribe(GLOBAL, 190) as sub:  # the broker's global topic has them
        assert [(await within(sub.__anext__(), 5, "replay")).id for _ in range(10)] == list(
            range(191, 201))


async def test_a_change_crosses_as_it_was_published(redis_url: str, procs: Procs) -> None:
    a, b = await procs(redis_url, idle_poll=30)
    sent = [TaskEvent("t1", 1, 1, "pending", '{"task_id":"t1","status":"pending"}', None),
            TaskEvent("t1", 2, 2, "running", '{"x":"ü \\n 😀","status":"running"}', "ann"),
            TaskEvent("t2", 1, 3, "pending", '{"status":"pending"}', "bob@example.org")]
    for event in sent:  # not in the store: only Redis can bring them to b
        a.publish(event)
    await until(lambda: len(b.got) == 3, "the changes on b", 5)
    assert b.got == sent
    assert b.backend.filled == 0 and a.got == sent


async def test_a_change_whose_news_was_lost_is_read_from_the_store_at_the_next_one(
        redis_url: str, procs: Procs, db: Store) -> None:
    a, b = await procs(redis_url, idle_poll=30)
    committer = Committer(db)
    await committer.commit("t1")  # committed, then its process died before publishing
    a.publish(await committer.commit("t2"))  # gid 2: so gid 1 is committed
    await until_each([a, b], 2, "both changes")
    for proc in (a, b):
        assert proc.gids() == [1, 2]
        assert proc.got == committer.events
    assert b.backend.filled == 1 and a.backend.filled == 1


async def test_lost_news_of_the_latest_change_comes_from_the_store_soon(
        redis_url: str, procs: Procs, db: Store) -> None:
    a, b = await procs(redis_url, idle_poll=0.3, block=0.2)
    committer = Committer(db)
    a.publish(await committer.commit("t1"))
    await committer.commit("t1", "running")  # its news lost, and nothing after it
    started = time.monotonic()
    await until_each([a, b], 2, "the last change", 3)
    for proc in (a, b):
        assert proc.got == committer.events
    assert time.monotonic() - started < 2
    assert b.backend.filled == 1


async def test_news_trimmed_away_by_a_stream_deleted_is_made_up(
        redis_url: str, procs: Procs, db: Store) -> None:
    a, b = await procs(redis_url, idle_poll=30)
    committer = Committer(db)
    a.publish(await committer.commit("t1"))
    await until(lambda: len(b.got) == 1, "the first change", 5)
    client = redis.Redis.from_url(parse_broker_url(redis_url)[0])
    try:  # as a restart of Redis without persistence would: the stream is gone
        await client.delete(a.backend.messages_key)
    finally:
        await client.aclose()
    for _ in range(3):
        await committer.commit("t1", "running")  # lost with the stream
    b.publish(await committer.commit("t2"))
    await until_each([a, b], 5, "all five")
    for proc in (a, b):
        assert proc.got == committer.events


async def test_redis_stopped_then_started_delays_news_and_loses_none(
        own_redis: OwnRedis, procs: Procs, db: Store,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "hitl.redis_news")
    a, b = await procs(own_redis.url, idle_poll=5, down_poll=0.2, retry_cap=0.5)
    journal = Journal(a.store, a.broker)  # a real journal: a's changes, published after commit
    await journal.start()
    try:
        task = Task("t1", "input")

        async def record(count: int) -> None:
            for _ in range(count):
                await within(journal.record(task, {"status": "running"}), 5, "a commit")

        await record(20)
        await until(lambda: len(b.got) == 20, "b has the first 20 (over Redis)", 5)
        assert b.backend.filled == 0

        own_redis.stop()
        await record(20)  # committed while Redis is down
        assert a.gids() == list(range(1, 41))  # a's own changes reach its watchers at once
        await until(lambda: b.backend.down, "b sees Redis down", 5)
        await until(lambda: len(b.got) == 40, "b catching up from the store", 5)
        assert b.gids() == list(range(1, 41))
        assert a.backend.queued > 0 or a.backend.dropped > 0  # kept to send, bounded

        await own_redis.start()
        await until(lambda: not (a.backend.down or b.backend.down), "Redis back", 5)
        await until(lambda: a.backend.queued == 0, "a's queued news sent", 5)
        filled = b.backend.filled
        await record(20)
        await until(lambda: len(b.got) == 60, "b has the last 20", 5)
        await asyncio.sleep(0.3)  # any repeat would land now
        for proc in (a, b):
            assert proc.gids() == list(range(1, 61))  # nothing lost, repeated or reordered
        assert b.backend.filled == filled  # after the restart, Redis carries the news again
    finally:
        await journal.close()
    downs = [r for r in caplog.records if "Redis unreachable" in r.getMessage()]
    backs = [r for r in caplog.records if "Redis answers again" in r.getMessage()]
    assert len(downs) == 2 and all(r.levelno == logging.WARNING for r in downs)  # once each
    assert len(backs) == 2


async def test_memory_stays_bounded_and_publishing_never_waits_while_redis_is_down(
        own_redis: OwnRedis, procs: Procs, caplog: pytest.LogCaptureFixture) -> None:
    (a,) = await procs(own_redis.url, count=1, down_poll=0.2, retry_cap=0.5)
    own_redis.stop()
    a.publish(TaskEvent("t", 1, 1, "pending", "{}"))  # the sender finds Redis gone
    await until(lambda: a.backend.down, "Redis down", 5)
    assert a.backend.queued == 1
    started = time.perf_counter()
    for gid in range(2, 25_002):
        a.publish(TaskEvent("t", gid, gid, "running", '{"status":"running"}'))
        a.broker.notify("job", "queued")
    elapsed = time.perf_counter() - started
    assert elapsed < 5, f"50,000 publishes took {elapsed:.1f} s"
    assert a.backend.queued == 10_000  # the newest; the oldest went (the store covers them)
    assert a.backend.dropped == 50_001 - 10_000
    assert len(a.got) == 25_001  # this process's watchers had every one, at once
    assert sum("dropping the oldest" in r.getMessage() for r in caplog.records) == 1

    await own_redis.start()
    await until(lambda: a.backend.sent >= 10_000, "the queue sent once Redis is back", 10)
    assert a.backend.sent == 10_000 and a.backend.queued == 0


async def test_hints_and_notices_cross_once(redis_url: str, procs: Procs) -> None:
    a, b = await procs(redis_url)
    data = '{"task_id":"t1","status":"signal"}'
    hint = Message(0, "t1", "signal", data, sse_frame(data, event="signal"), "ann")
    on_a: list[str] = []
    on_b: list[str] = []
    a.broker.on_notice("job", on_a.append)
    b.broker.on_notice("job", on_b.append)
    async with a.broker.subscribe("t1", 0) as here, b.broker.subscribe("t1", 0) as there:
        a.broker.signal("t1", hint)
        a.broker.notify("job", "queued j1")
        assert await within(here.__anext__(), 1, "the hint here") == hint  # at once
        assert on_a == ["queued j1"]
        assert await within(there.__anext__(), 5, "the hint there") == hint
        await until(lambda: on_b == ["queued j1"], "the notice there", 5)
        b.broker.notify("job", "queued j2")  # after a's entries in the stream: a barrier
        await until(lambda: on_a == ["queued j1", "queued j2"], "b's notice on a", 5)
        assert on_b == ["queued j1", "queued j2"]  # its own, once
        assert here.idle() and there.idle()  # the hint came once to each


async def test_disconnect_is_clean_and_safe_twice(redis_url: str, db: Store) -> None:
    backend = RedisBackend(redis_url, db.events_after, db.latest_gid)
    broker = Broker(backend, heartbeat=0)
    got: list[TaskEvent] = []
    broker.listeners.append(got.append)
    await broker.start()
    assert len(hitl_tasks()) == 2
    broker.publish_event(TaskEvent("t", 1, 1, "pending", "{}"))
    await within(broker.close(), 3, "close")
    await within(backend.disconnect(), 3, "a second disconnect")
    assert hitl_tasks() == [] and got == [TaskEvent("t", 1, 1, "pending", "{}")]
    assert backend.sent == 1  # what was queued went before closing
    await until_gone(redis_url, backend.origin)
    broker.publish_event(TaskEvent("t", 2, 2, "pending", "{}"))  # closed: never raises
    assert got == [TaskEvent("t", 1, 1, "pending", "{}")]


async def test_disconnect_while_redis_is_down_is_prompt(own_redis: OwnRedis, db: Store) -> None:
    backend = RedisBackend(own_redis.url, db.events_after, db.latest_gid, down_poll=0.2)
    await backend.connect(Broker(heartbeat=0))
    own_redis.stop()
    backend.publish_event(TaskEvent("t", 1, 1, "pending", "{}"))
    await until(lambda: backend.down, "Redis down", 5)
    await within(backend.disconnect(), 3, "disconnect with Redis down")
    assert hitl_tasks() == []


async def test_a_process_starting_with_redis_down_starts_and_catches_up(
        own_redis: OwnRedis, procs: Procs, db: Store) -> None:
    own_redis.stop()
    committer = Committer(db)
    await committer.commit("t1")  # before it started: not news to it
    (a,) = await procs(own_redis.url, count=1, down_poll=0.2, retry_cap=0.5)
    assert a.backend.down and a.backend.last_gid == 1
    await committer.commit("t1", "running")
    await until(lambda: a.gids() == [2], "the change, from the store", 5)
    await own_redis.start()
    await until(lambda: not a.backend.down, "Redis found", 5)
    a.publish(await committer.commit("t1", "completed"))
    await until(lambda: a.gids() == [2, 3], "the last change", 5)


def test_make_backend_reads_the_setting(db: Store) -> None:
    assert isinstance(make_backend("memory", db), MemoryBackend)
    backend = make_backend("redis://127.0.0.1:6379/2?prefix=team-a", db)
    assert isinstance(backend, RedisBackend)
    assert (backend.url, backend.prefix) == ("redis://127.0.0.1:6379/2", "team-a")
    assert (backend.messages_key, backend.signals_key) == ("team-a:messages", "team-a:signals")
    assert parse_broker_url("redis://h") == ("redis://h", "hitl")
    assert parse_broker_url("rediss://u:pw@h:7000/0")[1] == "hitl"


@pytest.mark.parametrize("setting", [
    "redis://", "http://h:6379", "mem", "redis://h:99999/0", "redis://h:x/0",
    "redis://h/abc", "redis://h/0?prefix=", "redis://h/0?prefix=a b", "redis://h/0?timeout=1",
    "redis://u:s3cret@h/x",
])
def test_a_bad_broker_setting_says_so_in_one_line(setting: str, db: Store) -> None:
    with pytest.raises(ConfigError) as caught:
        make_backend(setting, db)
    message = str(caught.value)
    assert message.startswith("broker: ") and "\n" not in message
    assert "s3cret" not in message

