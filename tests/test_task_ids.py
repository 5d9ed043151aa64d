"""A task may be named by the 8 characters the UI shows, or any longer unique prefix."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from hitl.models import Task
from hitl.store import Store, Write

from .conftest import csrf_token, post_form
from .serverproc import run_cli
from .test_api import submit, wait_status

TWINS = ("abcdef01" + "0" * 24, "abcdef01" + "f" * 24)  # two ids sharing 8 characters


async def waiting_task(client: Client) -> str:
    task_id = await submit(client)
    await wait_status(client, task_id, "waiting_for_review")
    return task_id


async def test_the_api_takes_a_prefix_of_eight_characters_or_more(client: Client) -> None:
    task_id = await waiting_task(client)
    for prefix in (task_id[:8], task_id[:20], task_id):
        response = await client.get(f"/api/tasks/{prefix}")
        assert response.status_code == 200, prefix
        assert (await response.get_json())["task_id"] == task_id
    response = await client.post(f"/feedback/{task_id[:8]}", json={"feedback": "rejected",
                                                                   "comment": "again"})
    assert response.status_code == 200
    body = await wait_status(client, task_id, "waiting_for_review")
    assert body["attempt"] == 2 and body["reviews"][0]["comment"] == "again"
    response = await client.post(f"/api/tasks/{task_id[:8]}/cancel")
    assert response.status_code == 200 and (await response.get_json())["status"] == "cancelled"


async def test_the_pages_take_a_prefix(client: Client) -> None:
    task_id = await waiting_task(client)
    response = await client.get(f"/tasks/{task_id[:8]}")
    assert response.status_code == 303 and response.headers["Location"] == f"/tasks/{task_id}"
    response = await post_form(client, f"/tasks/{task_id[:8]}/decision",
                               {"feedback": "approved", "attempt": "1"})
    assert response.status_code == 303 and response.headers["Location"] == f"/tasks/{task_id}"
    await wait_status(client, task_id, "completed")
    response = await client.get(f"/tasks/{task_id[:10]}/stream")
    assert response.status_code == 200
    assert 'data-status="completed"' in await response.get_data(as_text=True)


async def test_a_short_or_unknown_prefix_is_404_as_before(client: Client) -> None:
    task_id = await waiting_task(client)
    unknown = "0123456789" if not task_id.startswith("0123456789") else "9876543210"
    upper = task_id[:8].upper()  # an all-digit prefix is its own upper case: then skip it
    for path in (f"/api/tasks/{task_id[:7]}", f"/api/tasks/{unknown}", f"/tasks/{task_id[:7]}",
                 *([f"/api/tasks/{upper}"] if upper != task_id[:8] else [])):
        response = await client.get(path)
        assert response.status_code == 404, path
    response = await client.post(f"/feedback/{task_id[:7]}", json={"feedback": "approved"})
    assert response.status_code == 404
    assert (await client.post(f"/api/tasks/{unknown}/cancel")).status_code == 404


async def test_an_ambiguous_prefix_is_400_saying_how_many_match(
    app: Quart, client: Client
) -> None:
    await app.extensions["store"].write([Write(Task(task_id, "twin").row()) for task_id in TWINS])
    for method, path in (("GET", "/api/tasks/abcdef01"), ("POST", "/api/tasks/abcdef01/cancel"),
                         ("POST", "/feedback/abcdef01"), ("GET", "/tasks/abcdef01"),
                         ("POST", "/tasks/abcdef01/decision"), ("GET", "/tasks/abcdef01/stream")):
        kwargs = {"json": {"feedback": "approved"}} if path.startswith("/feedback") else {}
        if path.endswith("/decision"):
            kwargs = {"form": {"feedback": "approved", "attempt": "1",
                               "csrf_token": await csrf_token(client)}}
        response = await client.open(path, method=method, **kwargs)  # type: ignore[arg-type]
        assert response.status_code == 400, path
        assert "ambiguous: 2 tasks" in await response.get_data(as_text=True), path
    for task_id in (TWINS[0], TWINS[1][:9]):  # the whole id, or enough of it
        response = await client.get(f"/api/tasks/{task_id}")
        assert (await response.get_json())["task_id"] in TWINS


async def test_the_resolver_searches_the_primary_key_never_scans(tmp_path: Path) -> None:
    from hitl.store import _MATCHING_PREFIX  # the resolver's query, asked to explain itself

    store = Store(str(tmp_path / "hitl.db"))
    await store.open()
    try:
        for owner in (None, "sam"):  # every task, or a submitter's own
            plan = await store.reader.execute_fetchall(
                "EXPLAIN QUERY PLAN " + _MATCHING_PREFIX, {"prefix": "abcdef01", "owner": owner})
            details = " ".join(str(row[-1]) for row in plan)
            assert "SEARCH" in details and "SCAN" not in details, details
            assert "sqlite_autoindex_tasks_1" in details, details
    finally:
        await store.close()


async def test_whole_ids_and_names_that_are_no_prefix_take_no_query(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "hitl.db"))  # never opened: any query would raise
    for name in ("a" * 32, "abcdef0", "craftedpending", "ABCDEF0123", "a" * 64):
        assert await store.resolve_task_id(name) == name
    with pytest.raises(RuntimeError, match="not open"):
        await store.resolve_task_id("abcdef01")


def stored(db: Path, *task_ids: str) -> None:
    async def write() -> None:
        store = Store(str(db))
        await store.open()
        await store.write([Write(Task(task_id, "stored").row()) for task_id in task_ids])
        await store.close()

    asyncio.run(write())


@pytest.mark.parametrize(("name", "code", "says"), [
    (TWINS[0][:12], 0, '"task_id": "' + TWINS[0]),
    (TWINS[0][:8], 1, "ambiguous: 2 tasks"),
    (TWINS[0][:7], 1, "no task with id"),
])
def test_tasks_show_takes_a_unique_prefix(tmp_path: Path, name: str, code: int, says: str
                                          ) -> None:
    db = tmp_path / "hitl.db"
    stored(db, *TWINS)
    result = run_cli("tasks", "show", name, "--db", str(db))
    assert result.returncode == code, result.stderr
    assert says in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
