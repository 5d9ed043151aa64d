"""Review deadlines over real HTTP: each ``on_timeout`` outcome, a deadline that passes
while the server is down (SIGKILL, then a new process), and a timeout racing a decision."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from hitl.accounts import Accounts, Role
from hitl.errors import Invalid

from .conftest import LiveServer, ReviewActions, within
from .serverproc import ServerProcess, run_cli

ON_POSTGRESQL = True  # and on SQLite (tests/conftest.py)


def stamp(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


async def submit(actions: ReviewActions, **options: Any) -> str:
    response = await actions.http.post("/submit", json={"data": "draft a reply", **options})
    assert response.status_code == 202, response.text
    return str(response.json()["task_id"])


async def task_of(http: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    task: dict[str, Any] = (await http.get(f"/api/tasks/{task_id}")).json()
    return task


async def settled(http: httpx.AsyncClient, task_id: str, status: str, attempt: int = 1,
                  timeout: float = 10) -> dict[str, Any]:
    async def reached() -> dict[str, Any]:
        while True:
            task = await task_of(http, task_id)
            if task["status"] == status and task["attempt"] == attempt:
                return task
            await asyncio.sleep(0.02)

    return await within(reached(), timeout, f"{task_id} to be {status}/{attempt}")


def by_timeout(review: dict[str, Any]) -> bool:
    return (review["reviewer"], review["auth_method"]) == ("timeout", "system")


async def test_fail_fails_the_task_and_the_record_says_timeout(actions: ReviewActions,
                                                               live_server: LiveServer) -> None:
    task_id = await submit(actions, review_timeout=0.3, on_timeout="fail")
    watcher = actions.watch(task_id, last_id=0)
    waiting = await watcher.wait_for("waiting_for_review")
    due = stamp(waiting.data["review_deadline"])
    assert 0 < due - time.time() <= 0.3 and waiting.data["review_deadline"].endswith("+00:00")
    feedback = await watcher.wait_for("processing_feedback")
    failed = await watcher.wait_for("failed")
    assert time.time() >= due
    assert (feedback.data["reviewer"], feedback.data["feedback_value"],
            feedback.data["comment"], feedback.data["timed_out"]) == (
        "timeout", "rejected", "review timed out", True)
    assert failed.data["error"].startswith("review timed out")
    task = await task_of(actions.http, task_id)
    [review] = task["reviews"]
    assert by_timeout(review) and task["review_deadline"] is None
    exported = run_cli("export", "--db", live_server.app.extensions["store"].path)
    [line] = [json.loads(row) for row in exported.stdout.splitlines()
              if task_id in row]
    assert [by_timeout(r) for r in line["reviews"]] == [True], exported.stderr


async def test_reject_rejects_and_the_next_attempt_runs(actions: ReviewActions) -> None:
    task_id = await submit(actions, review_timeout=0.2, on_timeout="reject", max_attempts=2)
    watcher = actions.watch(task_id, last_id=0)
    await watcher.wait_for("running", attempt=2)
    second = await watcher.wait_for("waiting_for_review", attempt=2)
    assert "review_deadline" in second.data  # each attempt gets its own deadline
    failed = await watcher.wait_for("failed")  # ... and the last one's timeout ends it
    assert "max attempts" in failed.data["error"]
    task = await task_of(actions.http, task_id)
    assert [(r["attempt"], r["decision"], r["comment"], by_timeout(r))
            for r in task["reviews"]] == [(1, "rejected", "review timed out", True),
                                          (2, "rejected", "review timed out", True)]


async def test_approve_approves_as_it_is(actions: ReviewActions) -> None:
    task_id = await submit(actions, review_timeout=0.2, on_timeout="approve")
    watcher = actions.watch(task_id, last_id=0)
    waiting = await watcher.wait_for("waiting_for_review")
    done = await watcher.wait_for("completed")
    assert done.data["final_result"] == waiting.data["output_to_review"]
    [review] = (await task_of(actions.http, task_id))["reviews"]
    assert by_timeout(review) and review["decision"] == "approved"


async def test_escalate_hands_over_once_then_a_second_timeout_fails(
    actions: ReviewActions
) -> None:
    task_id = await submit(actions, review_timeout=0.4, on_timeout="escalate",
                           escalate_to=["lead", "group:legal"])
    watcher = actions.watch(task_id, last_id=0)
    first = await watcher.wait_for("waiting_for_review")
    again = await watcher.wait_for("waiting_for_review", escalated_to=["lead", "group:legal"],
                                   timed_out=True)
    assert stamp(again.data["review_deadline"]) - stamp(first.data["review_deadline"]) >= 0.35
    task = await task_of(actions.http, task_id)
    assert (task["reviewers"], task["escalated"], task["reviews"]) == (
        ["lead", "group:legal"], True, [])
    failed = await watcher.wait_for("failed")
    assert failed.data["error"].startswith("review timed out after escalation")
    [review] = (await task_of(actions.http, task_id))["reviews"]
    assert by_timeout(review)


async def test_a_timeout_racing_a_decision_exactly_one_wins(actions: ReviewActions) -> None:
    outcomes = set()
    for lag in (-0.02, -0.01, -0.005, 0, 0.002, 0.005, 0.01, 0.02):
        task_id = await submit(actions, review_timeout=0.25, on_timeout="approve")
        watcher = actions.watch(task_id, last_id=0)
        due = stamp((await watcher.wait_for("waiting_for_review")).data["review_deadline"])
        await asyncio.sleep(max(0.0, due + lag - time.time()))
        answer = await actions.reject(task_id, comment="no", reviewer="ann")
        # Either way it completes: approved by the timeout on attempt 1, or on attempt 2.
        task = await settled(actions.http, task_id, "completed",
                             1 if answer.status_code == 409 else 2)
        first = [review for review in task["reviews"] if review["attempt"] == 1]
        assert len(first) == 1, first  # one decision of attempt 1, never two
        if answer.status_code == 200:
            assert first[0]["reviewer"] == "ann"
        else:
            assert answer.status_code == 409 and by_timeout(first[0]), answer.text
        outcomes.add(answer.status_code)
    assert outcomes <= {200, 409}


async def test_the_store_lets_no_decision_follow_a_timeout(tmp_path: Path) -> None:
    """What a second process would meet: the store itself refuses a decision of a
    timed-out attempt, and a timeout of an attempt already decided."""
    from hitl.store import Store

    store = Store(str(tmp_path / "s.db"))
    await store.open()
    await store.close()
    db = sqlite3.connect(tmp_path / "s.db")
    db.execute("""INSERT INTO tasks (task_id, task_input, status, attempt, last_seq,
                  created_at, updated_at) VALUES ('t', 'x', 'waiting_for_review', 1, 1, 1, 1),
                  ('u', 'x', 'waiting_for_review', 1, 1, 1, 1)""")
    insert = """INSERT INTO reviews (task_id, attempt, decision, comment, reviewer,
                created_at, auth_method) VALUES (?, 1, ?, '', ?, 1, ?)"""
    db.execute(insert, ("t", "approved", "timeout", "system"))
    with pytest.raises(sqlite3.IntegrityError, match="already decided"):
        db.execute(insert, ("t", "rejected", "ann", "password"))
    db.execute(insert, ("u", "rejected", "ann", "password"))
    with pytest.raises(sqlite3.IntegrityError, match="already decided"):
        db.execute(insert, ("u", "approved", "timeout", "system"))
    db.close()


async def test_timeout_is_no_ones_name(tmp_path: Path, actions: ReviewActions) -> None:
    from hitl.store import Store

    store = Store(str(tmp_path / "n.db"))
    await store.open()
    try:
        with pytest.raises(Invalid, match="service's own"):
            await Accounts(store).add_user("Timeout", Role.REVIEWER)
    finally:
        await store.close()
    task_id = await submit(actions)
    watcher = actions.watch(task_id)
    await watcher.wait_for("waiting_for_review")
    answer = await actions.approve(task_id, reviewer="timeout")
    assert answer.status_code == 400 and "service's own" in answer.json()["error"]


def test_deadlines_fire_after_a_crash_at_their_stored_time(tmp_path: Path) -> None:
    """SIGKILL while two tasks wait; one's deadline passes while the server is down (it
    fires at start-up), the other's after the restart (at its stored time, not anew)."""
    db = tmp_path / "hitl.db"
    server = ServerProcess(db)
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            soon = http.post("/submit", json={"data": "a", "review_timeout": 1.0,
                                              "on_timeout": "approve"}).json()["task_id"]
            later = http.post("/submit", json={"data": "b", "review_timeout": 5.0,
                                               "on_timeout": "reject",
                                               "max_attempts": 1}).json()["task_id"]
            deadlines = {}
            for task_id in (soon, later):
                stop = time.monotonic() + 10
                while (task := http.get(f"/api/tasks/{task_id}").json())["status"] != (
                        "waiting_for_review"):
                    assert time.monotonic() < stop, task
                    time.sleep(0.02)
                deadlines[task_id] = stamp(task["review_deadline"])
        server.signal(9)
        server.wait()
        time.sleep(max(0.0, deadlines[soon] + 0.3 - time.time()))
        assert time.time() < deadlines[later] - 1.5, "too slow to test the second deadline"
        restarted = ServerProcess(db, port=server.port)
        restarted.start()
        try:
            with httpx.Client(base_url=restarted.url, timeout=10) as http:
                stop = time.monotonic() + 5
                while (task := http.get(f"/api/tasks/{soon}").json())["status"] != "completed":
                    assert time.monotonic() < stop, task
                    time.sleep(0.02)
                [review] = task["reviews"]
                assert by_timeout(review) and review["decision"] == "approved"
                waiting = http.get(f"/api/tasks/{later}").json()
                assert waiting["status"] == "waiting_for_review"  # not yet: at its time
                assert stamp(waiting["review_deadline"]) == pytest.approx(deadlines[later])
                stop = time.monotonic() + 10
                while (task := http.get(f"/api/tasks/{later}").json())["status"] != "failed":
                    assert time.monotonic() < stop, task
                    time.sleep(0.02)
                [review] = task["reviews"]
                assert by_timeout(review)
                assert stamp(review["created_at"]) >= deadlines[later]
        finally:
            restarted.stop()
    finally:
        server.stop()



async def test_an_escalation_ends_the_tasks_reservations_in_the_store(tmp_path: Path) -> None:
    from hitl.store import Store

    store = Store(str(tmp_path / "e.db"))
    await store.open()
    await store.close()
    db = sqlite3.connect(tmp_path / "e.db")
    db.execute("""INSERT INTO tasks (task_id, task_input, status, attempt, last_seq,
                  created_at, updated_at) VALUES ('t', 'x', 'waiting_for_review', 1, 1, 1, 1)""")
    db.execute("""INSERT INTO reservations (task_id, attempt, reviewer, created_at, expires_at)
                  VALUES ('t', 1, 'ann', 1, 9e9)""")
    db.execute("UPDATE tasks SET updated_at = 2 WHERE task_id = 't'")
    assert db.execute("SELECT count(*) FROM reservations").fetchone() == (1,)
    db.execute("""UPDATE tasks SET reviewers = '["lead"]' WHERE task_id = 't'""")
    assert db.execute("SELECT count(*) FROM reservations").fetchone() == (0,)
    db.close()


async def test_a_timeout_decides_an_attempt_that_has_some_of_its_votes(
    actions: ReviewActions
) -> None:
    task_id = await submit(actions, review_timeout=0.5, on_timeout="approve", quorum=3)
    watcher = actions.watch(task_id, last_id=0)
    await watcher.wait_for("waiting_for_review")
    assert (await actions.approve(task_id, reviewer="ann")).status_code == 200
    done = await watcher.wait_for("completed")
    task = await task_of(actions.http, task_id)
    assert [(r["reviewer"], r["decision"]) for r in task["reviews"]] == [
        ("ann", "approved"), ("timeout", "approved")]
    assert done.data["final_result"] == task["processed_output"]
