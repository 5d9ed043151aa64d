"""Options at submit: checked (a 400 naming the bad one), stored with the task, returned
with it and in lists, shown on its page, kept across the migration from the schema before."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from quart.typing import TestClientProtocol as Client

from hitl import Config
from hitl.models import Status
from hitl.store import MIGRATIONS, Store

from .conftest import LiveServer, post_form

OPTIONS: dict[str, Any] = {
    "title": "Refund reply", "metadata": {"ticket": 42, "tags": ["vip", "ünï"], "nested": {}},
    "quorum": 2, "review_timeout": 90.5, "on_timeout": "escalate",
    "escalate_to": ["lead", "group:legal"], "max_attempts": 3,
}


async def test_the_options_are_stored_and_returned_over_http(live_server: LiveServer
                                                             ) -> None:
    async with live_server.http() as http:
        response = await http.post("/submit", json={"data": "draft", **OPTIONS})
        assert response.status_code == 202, response.text
        task_id = response.json()["task_id"]
        task = (await http.get(f"/api/tasks/{task_id}")).json()
        for name, given in OPTIONS.items():
            assert task[name] == given, name
        assert task["escalated"] is False and "review_deadline" in task
        [row] = (await http.get("/api/tasks")).json()["tasks"]
        for name, given in OPTIONS.items():
            assert row[name] == given, name
        page = (await http.get(f"/tasks/{task_id}")).text
        assert "Refund reply" in page and "2 distinct reviewers" in page
        assert "then escalate to" in page and "ticket" in page, page[page.find("options"):][:900]


async def test_left_out_options_are_the_servers_defaults(tmp_path: Path) -> None:
    from .conftest import start_server, stop_server

    config = Config(db=str(tmp_path / "d.db"), process_delay=0, retry_wait=0, auth="none",
                    quorum=3, review_timeout=60, on_timeout="reject")
    server = await start_server(config)
    try:
        async with server.http() as http:
            task_id = (await http.post("/submit", json={"data": "x"})).json()["task_id"]
            task = (await http.get(f"/api/tasks/{task_id}")).json()
    finally:
        await stop_server(server)
    assert (task["title"], task["metadata"], task["quorum"], task["review_timeout"],
            task["on_timeout"], task["escalate_to"], task["max_attempts"]) == (
        "", None, 3, 60, "reject", [], None)


@pytest.mark.parametrize(("options", "named"), [
    ({"quorum": 0}, "quorum: must be at least 1"),
    ({"quorum": "two"}, "quorum: must be a whole number"),
    ({"quorum": 51}, "quorum: must be at most 50"),
    ({"quorum": 3, "reviewers": ["ann", "bob"]}, "quorum: must be at most 2, the users named"),
    ({"max_attempts": 0}, "max_attempts: must be at least 1"),
    ({"review_timeout": 0}, "review_timeout"),
    ({"review_timeout": -5}, "review_timeout"),
    ({"on_timeout": "explode"}, "on_timeout: must be"),
    ({"on_timeout": "escalate"}, "escalate_to: is required with on_timeout escalate"),
    ({"escalate_to": ["ann"]}, "escalate_to: is only for on_timeout escalate"),
    ({"on_timeout": "escalate", "escalate_to": ["Bad Name!"]}, "escalate_to"),
    ({"metadata": [1, 2]}, "metadata: must be a JSON object"),
    ({"metadata": "text"}, "metadata: must be a JSON object"),
    ({"metadata": {"big": "x" * 17000}}, "metadata: must be at most 16384 bytes"),
    ({"title": "x" * 201}, "title: must be at most 200 characters"),
    ({"title": "two\nlines"}, "title: must be one line"),
])
async def test_a_bad_option_is_a_400_that_names_it(client: Client, options: dict[str, Any],
                                                   named: str) -> None:
    response = await client.post("/submit", json={"data": "x", **options})
    assert response.status_code == 400
    assert named in (await response.get_json())["error"]
    listed = await (await client.get("/api/tasks")).get_json()
    assert listed["total"] == 0  # nothing was created


async def test_the_form_takes_the_options(client: Client) -> None:
    response = await post_form(client, "/tasks", {
        "data": "from the form", "title": "Form title", "quorum": "2", "max_attempts": "",
        "review_timeout": "", "on_timeout": "", "escalate_to": "", "metadata": '{"a": 1}'})
    assert response.status_code == 303, await response.get_data(as_text=True)
    task_id = response.headers["Location"].rsplit("/", 1)[1]
    task = await (await client.get(f"/api/tasks/{task_id}")).get_json()
    assert (task["title"], task["quorum"], task["metadata"], task["max_attempts"]) == (
        "Form title", 2, {"a": 1}, None)
    bad = await post_form(client, "/tasks", {"data": "x", "quorum": "0"})
    assert bad.status_code == 400
    assert "Approvals needed: must be at least 1" in await bad.get_data(as_text=True)
    bad = await post_form(client, "/tasks", {"data": "x", "metadata": "{not json"})
    assert bad.status_code == 400
    deep = await post_form(client, "/tasks", {"data": "x", "metadata": "[" * 5000 + "]" * 5000})
    assert deep.status_code == 400


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity"])
async def test_metadata_refuses_what_json_cannot_carry(client: Client, number: str) -> None:
    """Python's parser takes NaN; stored, it would make the task's JSON (and its webhook
    bodies) invalid for every strict reader."""
    response = await client.post("/submit", data=f'{{"data": "x", "metadata": {{"a": {number}}}}}',
                                 headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert "metadata: must hold only finite numbers" in (await response.get_json())["error"]


async def test_max_attempts_of_the_task_overrides_the_server(client: Client) -> None:
    response = await client.post("/submit", json={"data": "x", "max_attempts": 1})
    task_id = (await response.get_json())["task_id"]
    runner = client.app.extensions["runner"]  # type: ignore[attr-defined]
    from .conftest import OPERATOR, reach

    await reach(runner, task_id, Status.WAITING_FOR_REVIEW)
    await runner.decide(task_id, "rejected", "no", by=OPERATOR)
    await reach(runner, task_id, Status.FAILED)
    task = await runner.get_task(task_id, by=OPERATOR)
    assert "after 1 attempts" in (task.error or "")


async def test_the_migration_gives_earlier_tasks_the_defaults_of_then(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    options_migration = next(number for number, script in enumerate(MIGRATIONS)
                             if "ADD COLUMN quorum" in script)
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER)")
        for version, script in enumerate(MIGRATIONS[:options_migration], start=1):
            conn.executescript(script)
            conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
        conn.execute("""INSERT INTO tasks (task_id, task_input, status, attempt,
                        processed_output, last_seq, created_at, updated_at)
                        VALUES ('old', 'input', 'waiting_for_review', 1, 'out', 2, 1.0, 1.0)""")
    store = Store(str(db))
    await store.open()
    try:
        task = await store.get_task("old")
        [row], _ = await store.list_tasks()
    finally:
        await store.close()
    assert task is not None
    assert (task.title, task.metadata, task.quorum, task.review_timeout, task.on_timeout,
            task.escalate_to, task.max_attempts, task.review_deadline, task.escalated) == (
        "", None, 1, None, "fail", (), None, None, False)
    assert row.quorum == 1 and row.to_json()["metadata"] is None
