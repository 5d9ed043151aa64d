"""Every attempt is kept: its output, its times, the processor's error and tries, and the
decisions on it; a database from before attempts were kept says their outputs are unknown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from quart import Quart

from hitl import Config, create_app
from hitl.models import Status
from hitl.processors import Job, Processor
from hitl.runner import Runner

from .conftest import OPERATOR, old_database, reach

ON_POSTGRESQL = True  # and on SQLite (tests/conftest.py)

BOUND = 10


def numbered(job: Job) -> str:
    if job.task_input == "fail":
        raise RuntimeError("no model today")
    return f"output {job.attempt}" + (f" after {job.last_comment}" if job.last_comment else "")


@pytest.fixture
def processor() -> Processor:
    return numbered


@pytest.fixture
def runner(app: Quart) -> Runner:
    runner: Runner = app.extensions["runner"]
    return runner


async def api_task(app: Quart, task_id: str) -> dict[str, Any]:
    response = await app.test_client().get(f"/api/tasks/{task_id}")
    assert response.status_code == 200
    body: dict[str, Any] = await response.get_json()
    return body


async def test_every_attempt_keeps_its_output_and_its_decisions(app: Quart,
                                                                runner: Runner) -> None:
    task = await runner.submit("draft", by=OPERATOR)
    await reach(runner, task.task_id, Status.WAITING_FOR_REVIEW, 1)
    await runner.decide(task.task_id, "rejected", "shorter", "ann", by=OPERATOR)
    await reach(runner, task.task_id, Status.WAITING_FOR_REVIEW, 2)
    await runner.decide(task.task_id, "rejected", "politer", "bob", by=OPERATOR)
    await reach(runner, task.task_id, Status.WAITING_FOR_REVIEW, 3)
    await runner.decide(task.task_id, "approved", "good", "ann", by=OPERATOR)
    await reach(runner, task.task_id, Status.COMPLETED, 3)
    body = await api_task(app, task.task_id)
    attempts = body["attempts"]
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    assert [a["output"] for a in attempts] == ["output 1", "output 2 after shorter",
                                               "output 3 after politer"]
    assert [[r["comment"] for r in a["reviews"]] for a in attempts] == [
        ["shorter"], ["politer"], ["good"]]
    for attempt in attempts:
        assert attempt["output_known"] is True and attempt["error"] is None
        assert attempt["tries"] == 1
        assert attempt["started_at"] <= attempt["finished_at"]
    assert body["final_result"] == "output 3 after politer"  # every key kept as it was
    assert body["processed_output"] == "output 3 after politer"
    assert len(body["reviews"]) == 3


async def test_a_failed_attempt_keeps_the_error_and_the_tries(app: Quart, runner: Runner,
                                                              config: Config) -> None:
    task = await runner.submit("fail", by=OPERATOR)
    await reach(runner, task.task_id, Status.FAILED, 1)
    [attempt] = (await api_task(app, task.task_id))["attempts"]
    assert attempt["output"] is None and attempt["finished_at"] is not None
    assert attempt["tries"] == config.retries
    assert "no model today" in attempt["error"]


async def test_earlier_outputs_of_a_migrated_task_are_unknown(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    old_database(db)  # from before attempts were kept
    app = create_app(Config(db=str(db), process_delay=0, auth="none"), processor=numbered)
    async with app.test_app():
        attempts = (await api_task(app, "old"))["attempts"]
    assert [(a["attempt"], a["output"], a["output_known"]) for a in attempts] == [
        (1, None, False), (2, None, False), (3, "third output", True)]
    assert [[r["comment"] for r in a["reviews"]] for a in attempts] == [["no"], ["still no"],
                                                                        []]


async def test_export_and_show_include_the_attempts(app: Quart, runner: Runner) -> None:
    task = await runner.submit("draft", by=OPERATOR)
    await reach(runner, task.task_id, Status.WAITING_FOR_REVIEW, 1)
    store = app.extensions["store"]
    exported = [t.to_json() async for t in store.iter_tasks()]
    assert [a["output"] for a in exported[0]["attempts"]] == ["output 1"]
    shown = await store.get_task(task.task_id)
    assert [a["output"] for a in shown.to_json()["attempts"]] == ["output 1"]
