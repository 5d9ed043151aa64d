"""Nothing is lost across restarts and crashes: a real server process on one database file."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hitl.models import Review, Status, Task, TaskEvent
from hitl.store import Store, Write

from .conftest import ReviewActions, assert_contiguous
from .serverproc import ServerProcess, run_cli


@pytest.fixture
def gate(tmp_path: Path) -> Path:
    return tmp_path / "gate"


@pytest.fixture
def server(tmp_path: Path, gate: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path / "hitl.db", env={"HITL_TEST_GATE": str(gate)},
                           extra=["--processor", "tests.procs:gated"])
    yield server
    server.stop()


def task(server: ServerProcess, task_id: str) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/api/tasks/{task_id}")
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


async def reach(server: ServerProcess, task_id: str, status: str, attempt: int = 1,
                timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = task(server, task_id)
        if body["status"] == status and body["attempt"] == attempt:
            return body
        await asyncio.sleep(0.02)
    raise AssertionError(f"{task_id} never reached {status}/{attempt}: {body}")


def restart(server: ServerProcess, how: signal.Signals) -> None:
    server.signal(how)
    server.wait(10)
    server.start()


def message_ids(server: ServerProcess, task_id: str, last_id: int = 0,
                timeout: float = 10) -> list[dict[str, Any]]:
    """Read a finished task's stream to its end (with Last-Event-ID), in ``timeout`` s."""
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    with httpx.stream("GET", f"{server.url}/stream/{task_id}", timeout=timeout,
                      headers={"Last-Event-ID": str(last_id)}) as response:
        current: dict[str, Any] = {}
        for line in response.iter_lines():  # heartbeats or a read timeout keep this bounded
            if time.monotonic() > deadline:
                raise AssertionError(f"{task_id}'s stream did not end within {timeout} s")
            if line.startswith("id:"):
                current["id"] = int(line[3:])
            elif line.startswith("data:"):
                current.update(json.loads(line[5:]))
            elif not line and current:
                events.append(current)
                current = {}
    return events


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
async def test_task_waiting_for_review_survives_a_restart(server: ServerProcess,
                                                          how: signal.Signals) -> None:
    server.start()
    task_id = httpx.post(f"{server.url}/submit", json={"data": "quick"}).json()["task_id"]
    before = await reach(server, task_id, "waiting_for_review")
    restart(server, how)
    after = await reach(server, task_id, "waiting_for_review")
    assert after["processed_output"] == before["processed_output"]
    assert after["last_seq"] == before["last_seq"]  # nothing re-published, nothing lost
    approved = httpx.post(f"{server.url}/feedback/{task_id}",
                          json={"feedback": "approved", "reviewer": "ann", "attempt": 1})
    assert approved.status_code == 200
    done = await reach(server, task_id, "completed")
    assert done["final_result"] == before["processed_output"]
    events = message_ids(server, task_id)
    assert_contiguous([e["id"] for e in events[:-1]], start=1)
    assert [e["status"] for e in events][-3:] == ["processing_feedback", "completed",
                                                  "stream_closed"]


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
async def test_running_task_is_processed_again_for_the_same_attempt(
    server: ServerProcess, gate: Path, how: signal.Signals
) -> None:
    server.start()
    task_id = httpx.post(f"{server.url}/submit", json={"data": "hold on"}).json()["task_id"]
    running = await reach(server, task_id, "running")
    restart(server, how)
    gate.touch()
    waiting = await reach(server, task_id, "waiting_for_review")
    assert waiting["last_seq"] > running["last_seq"]
    httpx.post(f"{server.url}/feedback/{task_id}", json={"feedback": "approved"})
    await reach(server, task_id, "completed")
    events = message_ids(server, task_id, last_id=0)
    assert_contiguous([e["id"] for e in events if "id" in e], start=1)  # ids continue, never reused
    assert [e["status"] for e in events].count("pending") == 1


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
async def test_task_killed_just_after_a_rejection_reruns_with_the_comment(
    server: ServerProcess, gate: Path, how: signal.Signals
) -> None:
    server.start()
    task_id = httpx.post(f"{server.url}/submit", json={"data": "hold later"}).json()["task_id"]
    await reach(server, task_id, "waiting_for_review")
    rejected = httpx.post(f"{server.url}/feedback/{task_id}",
                          json={"feedback": "rejected", "comment": "add a title",
                                "reviewer": "bob"})
    assert rejected.status_code == 200
    await reach(server, task_id, "running", attempt=2)
    restart(server, how)
    gate.touch()
    waiting = await reach(server, task_id, "waiting_for_review", attempt=2)
    assert waiting["processed_output"] == "hold later (attempt 2) add a title"
    assert [(r["decision"], r["comment"], r["reviewer"]) for r in waiting["reviews"]] == [
        ("rejected", "add a title", "bob")]


async def test_reconnect_with_last_event_id_after_a_restart_gets_what_it_missed(
    server: ServerProcess,
) -> None:
    server.start()
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        actions = ReviewActions(http)
        task_id = await actions.submit("quick")
        watcher = actions.watch(task_id)
        await watcher.wait_for("waiting_for_review")
        seen = watcher.ids()[-1]
        server.signal(signal.SIGKILL)
        server.wait()
        await watcher.ended(5)
        server.start()
        assert (await actions.approve(task_id)).status_code == 200
        again = actions.watch(task_id, last_id=seen)
        await again.ended(10)
    assert again.statuses() == ["processing_feedback", "completed", "stream_closed"]
    assert again.ids() == [seen + 1, seen + 2]


def stored_task(db: Path, status: Status, reviews: list[Review]) -> str:
    """Write a task as a crashed server would have left it (no server running)."""

    async def write() -> str:
        store = Store(str(db))
        await store.open()
        record = Task("crafted" + status.value[:10], "crafted input", status, attempt=1,
                      processed_output="crafted output", last_seq=1, reviews=reviews)
        event = TaskEvent.create(record.task_id, 1, 1, {"status": "pending"})
        await store.write([Write(record.row(), event)] +
                          [Write(record.row(), None, review) for review in reviews])
        await store.close()
        return record.task_id

    return asyncio.run(write())


@pytest.mark.parametrize(
    ("status", "reviews", "ends"),
    [
        (Status.PENDING, [], "waiting_for_review"),
        (Status.PROCESSING_FEEDBACK, [Review("approved", 1, "ok", "ann")], "completed"),
        (Status.PROCESSING_FEEDBACK, [Review("rejected", 1, "redo", "ann")], "waiting_for_review"),
    ],
)
def test_tasks_caught_between_steps_resume_from_what_was_recorded(
    server: ServerProcess, status: Status, reviews: list[Review], ends: str
) -> None:
    task_id = stored_task(server.db, status, reviews)
    server.start()
    attempt = 2 if reviews and reviews[0].decision == "rejected" else 1
    body = asyncio.run(reach(server, task_id, ends, attempt=attempt))
    if ends == "completed":
        assert body["final_result"] == "crafted output"
    if attempt == 2:
        assert body["processed_output"] == "crafted input (attempt 2) redo"


def test_command_line_reads_the_same_database(server: ServerProcess, tmp_path: Path) -> None:
    server.start()
    task_id = httpx.post(f"{server.url}/submit", json={"data": "audit me"}).json()["task_id"]
    asyncio.run(reach(server, task_id, "waiting_for_review"))
    httpx.post(f"{server.url}/feedback/{task_id}", json={"feedback": "approved",
                                                         "reviewer": "carol"})
    asyncio.run(reach(server, task_id, "completed"))
    db = str(server.db)
    listing = run_cli("tasks", "list", "--status", "completed", "--db", db)
    assert listing.returncode == 0 and task_id in listing.stdout and "audit me" in listing.stdout
    shown = json.loads(run_cli("tasks", "show", task_id, "--db", db).stdout)
    assert shown["reviews"][0]["reviewer"] == "carol"
    assert run_cli("tasks", "show", "nope", "--db", db).returncode == 1
    lines = run_cli("export", "--db", db).stdout.splitlines()
    assert [json.loads(line)["task_id"] for line in lines] == [task_id]


async def test_retention_deletes_old_finished_tasks_only(tmp_path: Path) -> None:
    from hitl import Config, create_app

    db = tmp_path / "hitl.db"
    store = Store(str(db))
    await store.open()
    old = Task("old", "x", Status.COMPLETED, updated_at=time.time() - 3 * 86400)
    fresh = Task("fresh", "y", Status.COMPLETED)
    waiting = Task("waiting", "z", Status.WAITING_FOR_REVIEW, processed_output="out",
                   updated_at=time.time() - 9 * 86400)
    await store.write([Write(t.row(), TaskEvent.create(t.task_id, 1, n, {"status": "pending"}))
                       for n, t in enumerate((old, fresh, waiting), start=1)])
    await store.close()
    app = create_app(Config(db=str(db), retain_days=2, process_delay=0, auth="none"))
    async with app.test_app():
        await asyncio.sleep(0.1)
        client = app.test_client()
        assert (await client.get("/api/tasks/old")).status_code == 404
        assert (await client.get("/api/tasks/fresh")).status_code == 200
        assert (await client.get("/api/tasks/waiting")).status_code == 200
        assert await app.extensions["store"].task_messages("old", 0) == []
