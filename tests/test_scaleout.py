"""Three real ``hitl serve`` processes on one PostgreSQL database and one Redis: one service.

Each test starts its processes on a throwaway database (tests/services.py), with a short
flow lease so that take-overs happen within a test's patience, and reads streams with a
real HTTP client, as a load balancer's clients would, from whichever process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import Watcher, read_sse
from .serverproc import ServerProcess, free_port

pytestmark = pytest.mark.slow

LEASE = 3.0  # --flow-lease: a killed process's tasks move on within about 4 s


def processes(tmp_path: Path, database: str, broker: str, count: int = 3,
              env: dict[str, str] | None = None) -> list[ServerProcess]:
    return [ServerProcess(tmp_path / f"p{n}.db", database=database,
                          extra=["--broker", broker, "--flow-lease", str(LEASE),
                                 "--heartbeat", "1"],
                          env={**(env or {})})
            for n in range(count)]


async def start_all(servers: list[ServerProcess]) -> None:
    await asyncio.gather(*(asyncio.to_thread(server.start) for server in servers))


@contextlib.asynccontextmanager
async def running(servers: list[ServerProcess]) -> AsyncIterator[list[httpx.AsyncClient]]:
    try:
        await start_all(servers)
        clients = [httpx.AsyncClient(base_url=server.url, timeout=10) for server in servers]
        try:
            yield clients
        finally:
            for client in clients:
                await client.aclose()
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
async def three(tmp_path: Path, postgres_url: str, redis_url: str
                ) -> AsyncIterator[tuple[list[ServerProcess], list[httpx.AsyncClient]]]:
    servers = processes(tmp_path, postgres_url, redis_url)
    async with running(servers) as clients:
        yield servers, clients


def watch(client: httpx.AsyncClient, path: str, last_id: int | None = None) -> Watcher:
    watcher = Watcher()
    headers = {"Last-Event-ID": str(last_id)} if last_id is not None else None
    watcher.task = asyncio.create_task(read_sse(client, path, watcher, headers))
    return watcher


async def stop_watching(*watchers: Watcher) -> None:
    for watcher in watchers:
        assert watcher.task is not None
        watcher.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher.task


async def status_of(client: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/tasks/{task_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def reach(client: httpx.AsyncClient, task_id: str, status: str, timeout: float = 15,
                attempt: int | None = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        task = await status_of(client, task_id)
        if task["status"] == status and (attempt is None or task["attempt"] == attempt):
            return task
        if time.monotonic() > deadline:
            raise AssertionError(f"task {task_id} is {task['status']} (attempt "
                                 f"{task['attempt']}), not {status} after {timeout} s")
        await asyncio.sleep(0.05)


async def submit(client: httpx.AsyncClient, data: str = "draft a reply") -> str:
    response = await client.post("/submit", json={"data": data})
    assert response.status_code in (200, 201, 202), response.text
    return str(response.json()["task_id"])


async def until_seen(watchers: list[Watcher], count: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while any(len(w.events) < count for w in watchers):
        if time.monotonic() > deadline:
            raise AssertionError(f"watchers saw {[len(w.events) for w in watchers]} of "
                                 f"{count} messages after {timeout} s")
        await asyncio.sleep(0.02)


def as_sent(watcher: Watcher) -> list[tuple[int | None, dict[str, Any]]]:
    return [(event.id, event.data) for event in watcher.events]


async def test_watchers_on_every_process_get_every_message_with_the_same_ids(
        three: tuple[list[ServerProcess], list[httpx.AsyncClient]]) -> None:
    _, clients = three
    dashboards = [watch(client, "/stream") for client in clients]
    await asyncio.sleep(0.5)  # the all-tasks stream starts live: let them open
    task_ids = [await submit(clients[n % 3], f"task {n}") for n in range(6)]
    for n, task_id in enumerate(task_ids):  # each decided on another process than its own
        await reach(clients[(n + 1) % 3], task_id, "waiting_for_review")
        decision = {"feedback": "rejected", "comment": "again"} if n % 2 else {
            "feedback": "approved"}
        response = await clients[(n + 1) % 3].post(f"/feedback/{task_id}", json=decision)
        assert response.status_code == 200, response.text
    for n, task_id in enumerate(task_ids):
        if n % 2:
            await reach(clients[n % 3], task_id, "waiting_for_review", attempt=2)
            response = await clients[(n + 2) % 3].post(f"/feedback/{task_id}",
                                                      json={"feedback": "approved"})
            assert response.status_code == 200, response.text
        await reach(clients[n % 3], task_id, "completed")
    # Every message of those tasks, on each process's dashboard, with the same ids.
    reviews = [(await clients[0].get(f"/api/tasks/{t}")).json()["reviews"] for t in task_ids]
    assert sum(map(len, reviews)) == 9
    expected = await history_of(clients[2], task_ids)
    await until_seen(dashboards, len(expected))
    first = as_sent(dashboards[0])
    assert [event_id for event_id, _ in first] == list(range(first[0][0] or 0,
                                                             (first[0][0] or 0) + len(first)))
    for dashboard in dashboards[1:]:
        assert as_sent(dashboard) == first
    # A task's stream, read from each process, is the same too, and ends.
    streams = [watch(client, f"/stream/{task_ids[1]}", last_id=0) for client in clients]
    for stream in streams:
        await stream.ended()
    assert as_sent(streams[0]) == as_sent(streams[1]) == as_sent(streams[2])
    assert streams[0].ids() == list(range(1, len(streams[0].ids()) + 1))
    await stop_watching(*dashboards)


async def history_of(client: httpx.AsyncClient, task_ids: list[str]) -> list[Any]:
    messages: list[Any] = []
    for task_id in task_ids:
        watcher = watch(client, f"/stream/{task_id}", last_id=0)
        await watcher.ended()
        messages += [event for event in watcher.events if event.id is not None]
    return messages


async def test_of_twenty_concurrent_approvals_over_three_processes_exactly_one_wins(
        three: tuple[list[ServerProcess], list[httpx.AsyncClient]]) -> None:
    _, clients = three
    for round_ in range(3):
        task_id = await submit(clients[round_])
        await reach(clients[0], task_id, "waiting_for_review")
        answers = await asyncio.gather(*(
            clients[n % 3].post(f"/feedback/{task_id}",
                                json={"feedback": "approved", "reviewer": f"r{n}"})
            for n in range(20)))
        codes = sorted(answer.status_code for answer in answers)
        assert codes == [200] + [409] * 19, [answer.text for answer in answers]
        task = await reach(clients[2], task_id, "completed")
        assert [review["decision"] for review in task["reviews"]] == ["approved"]
        winner = next(a for a in answers if a.status_code == 200)
        assert task["reviews"][0]["reviewer"] == json.loads(winner.request.content)["reviewer"]


async def test_a_killed_owner_s_waiting_task_is_decided_and_completed_elsewhere(
        three: tuple[list[ServerProcess], list[httpx.AsyncClient]]) -> None:
    servers, clients = three
    task_id = await submit(clients[0])
    await reach(clients[1], task_id, "waiting_for_review")
    watcher = watch(clients[2], f"/stream/{task_id}", last_id=0)  # all of it, from the start
    await watcher.wait_for("waiting_for_review")
    servers[0].signal(signal.SIGKILL)
    servers[0].wait(5)
    killed = time.monotonic()
    response = await clients[1].post(f"/feedback/{task_id}", json={"feedback": "approved"})
    assert response.status_code == 200, response.text  # the store takes it at once
    await reach(clients[2], task_id, "completed", timeout=15)
    taken_over = time.monotonic() - killed
    assert taken_over < 15, taken_over
    await watcher.ended()
    assert watcher.statuses()[-3:] == ["processing_feedback", "completed", "stream_closed"], \
        as_sent(watcher)
    assert watcher.ids() == list(range(1, len(watcher.ids()) + 1)), as_sent(watcher)


async def test_a_killed_owner_s_running_task_is_processed_again_for_the_same_attempt(
        tmp_path: Path, postgres_url: str, redis_url: str) -> None:
    servers = processes(tmp_path, postgres_url, redis_url)
    servers[0].env["HITL_PROCESS_DELAY"] = "60"  # its tasks run until it is killed
    async with running(servers) as clients:
        task_id = await submit(clients[0])
        await reach(clients[1], task_id, "running")
        servers[0].signal(signal.SIGKILL)
        servers[0].wait(5)
        task = await reach(clients[2], task_id, "waiting_for_review", timeout=15)
        assert task["attempt"] == 1
        response = await clients[2].post(f"/feedback/{task_id}", json={"feedback": "approved"})
        assert response.status_code == 200, response.text
        await reach(clients[1], task_id, "completed")


async def test_a_dashboard_reconnects_to_another_process_with_last_event_id(
        three: tuple[list[ServerProcess], list[httpx.AsyncClient]]) -> None:
    _, clients = three
    first = watch(clients[0], "/stream")
    await asyncio.sleep(0.5)
    task_ids = [await submit(clients[n % 3]) for n in range(3)]
    for task_id in task_ids:
        await reach(clients[0], task_id, "waiting_for_review")
    await until_seen([first], 6)
    await stop_watching(first)
    seen = first.ids()
    for task_id in task_ids:
        response = await clients[1].post(f"/feedback/{task_id}", json={"feedback": "approved"})
        assert response.status_code == 200, response.text
        await reach(clients[1], task_id, "completed")
    again = watch(clients[2], "/stream", last_id=seen[-1])
    await until_seen([again], 6)  # each task: processing_feedback, completed
    assert again.ids()[:6] == list(range(seen[-1] + 1, seen[-1] + 7))
    assert again.statuses()[:6] == ["processing_feedback", "completed"] * 3
    everything = watch(clients[1], "/stream", last_id=seen[0] - 1)
    await until_seen([everything], len(seen) + 6)
    assert as_sent(everything)[:len(seen)] == as_sent(first)
    assert as_sent(everything)[len(seen):len(seen) + 6] == as_sent(again)[:6]
    await stop_watching(again, everything)


@contextlib.contextmanager
def own_redis(tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """A redis-server of this test's own, which it may stop and start again."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("needs Redis: no redis-server to start")
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", str(tmp_path)]
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        procs.append(subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                import socket
                with socket.create_connection(("127.0.0.1", port), 0.2):
                    return
            time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def stop() -> None:
        procs[-1].terminate()
        procs[-1].wait(5)

    class Control:
        pass

    control = Control()
    control.start = start  # type: ignore[attr-defined]
    control.stop = stop  # type: ignore[attr-defined]
    start()
    try:
        yield f"redis://127.0.0.1:{port}/0", control
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


async def test_streams_pause_while_redis_is_down_and_catch_up_from_the_database(
        tmp_path: Path, postgres_url: str) -> None:
    with own_redis(tmp_path) as (redis, control):
        servers = processes(tmp_path, postgres_url, redis)
        async with running(servers) as clients:
            dashboards = [watch(client, "/stream") for client in clients]
            await asyncio.sleep(0.5)
            before = await submit(clients[0])
            await reach(clients[1], before, "waiting_for_review")
            await until_seen(dashboards, 3)
            control.stop()
            during = await submit(clients[1])  # stored, then news cannot travel
            await reach(clients[2], during, "waiting_for_review")
            response = await clients[2].post(f"/feedback/{before}",
                                             json={"feedback": "approved"})
            assert response.status_code == 200, response.text
            await reach(clients[0], before, "completed")
            await until_seen(dashboards, 8)  # caught up from the database, Redis down
            control.start()
            await asyncio.sleep(1)
            response = await clients[0].post(f"/feedback/{during}",
                                             json={"feedback": "approved"})
            assert response.status_code == 200, response.text
            await reach(clients[1], during, "completed")
            await until_seen(dashboards, 10)
            first = as_sent(dashboards[0])
            ids = [event_id for event_id, _ in first]
            assert ids == list(range(ids[0] or 0, (ids[0] or 0) + len(ids)))
            assert as_sent(dashboards[1]) == first == as_sent(dashboards[2])
            await stop_watching(*dashboards)


async def test_a_review_deadline_fires_once_across_processes_and_after_a_kill(
        three: tuple[list[ServerProcess], list[httpx.AsyncClient]]) -> None:
    servers, clients = three
    options = {"review_timeout": 2, "on_timeout": "approve"}
    survivor = await submit_with(clients[1], options)
    victim = await submit_with(clients[0], options)
    await reach(clients[2], victim, "waiting_for_review")
    servers[0].signal(signal.SIGKILL)  # its deadline is due while nobody owns it
    servers[0].wait(5)
    for task_id in (survivor, victim):
        task = await reach(clients[2], task_id, "completed", timeout=15)
        assert [(r["reviewer"], r["decision"]) for r in task["reviews"]] == [
            ("timeout", "approved")], task["reviews"]


async def submit_with(client: httpx.AsyncClient, options: dict[str, Any]) -> str:
    response = await client.post("/submit", json={"data": "draft", **options})
    assert response.status_code in (200, 201, 202), response.text
    return str(response.json()["task_id"])


async def test_a_process_stopped_with_sigterm_lets_its_tasks_go_at_once(
        tmp_path: Path, postgres_url: str, redis_url: str) -> None:
    """Its leases are given up as it stops: the others take over at their next look (every
    third of the lease), not once the lease would have lapsed."""
    servers = processes(tmp_path, postgres_url, redis_url, count=2)
    for server in servers:
        server.extra[server.extra.index("--flow-lease") + 1] = "12"  # looks every 4 s
    async with running(servers) as clients:
        task_id = await submit(clients[0])
        await reach(clients[1], task_id, "waiting_for_review")
        servers[0].signal(signal.SIGTERM)
        assert servers[0].wait(10) == 0
        stopped = time.monotonic()
        response = await clients[1].post(f"/feedback/{task_id}", json={"feedback": "approved"})
        assert response.status_code == 200, response.text
        await reach(clients[1], task_id, "completed", timeout=15)
        assert time.monotonic() - stopped < 7, "taken over only once the lease lapsed"


async def test_votes_of_a_quorum_taken_at_once_on_two_processes_both_count(
        three: tuple[list[ServerProcess], list[httpx.AsyncClient]]) -> None:
    """Neither vote decides: each is made again from a fresh read when the other won the
    race for the task's next message number (not a 409)."""
    _, clients = three
    for _ in range(3):
        response = await clients[0].post("/submit", json={"data": "draft", "quorum": 3})
        task_id = str(response.json()["task_id"])
        await reach(clients[1], task_id, "waiting_for_review")
        answers = await asyncio.gather(*(
            clients[n].post(f"/feedback/{task_id}",
                            json={"feedback": "approved", "reviewer": f"r{n}"})
            for n in (1, 2)))
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
        task = await status_of(clients[0], task_id)
        assert sorted(r["reviewer"] for r in task["reviews"]) == ["r1", "r2"]
        assert task["status"] == "waiting_for_review"
