"""Lists carry excerpts, never whole texts, and take bounded page queries.

The API's list, the dashboard (page and stream), the index page's recent tasks and
``hitl tasks list`` show each text cut to an excerpt plus its full length; only a task's
own page and ``GET /api/tasks/<id>`` carry the whole text.
"""

from __future__ import annotations

import asyncio
import random
import string
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from quart.typing import TestClientProtocol as Client

from hitl import models
from hitl.models import Status, Task
from hitl.processors import Processor
from hitl.schemas import MAX_LIMIT
from hitl.store import Store, Write

from .procs import echo
from .serverproc import ServerProcess, run_cli
from .test_docs import README

EXCERPT = 300  # characters of each text a list shows
LARGE = 200_000  # characters: the largest input /submit takes
SMALL = 200_000  # bytes: what a list of 100 large tasks may answer (it was 40 MB)


@pytest.fixture
def processor() -> Processor:
    return echo


async def add(store: Store, *tasks: Task) -> None:
    await store.write([Write(task.row()) for task in tasks])


async def test_a_list_row_cuts_each_text_at_a_character_and_says_how_long_it_was(
    store: Store,
) -> None:
    text = "é" + "😀" * (EXCERPT + 50)  # characters of two and four bytes in UTF-8
    await add(store, Task("a" * 32, text, Status.COMPLETED, processed_output=text,
                          final_result="short", created_at=1, updated_at=1))
    rows, total = await store.list_tasks()
    row = rows[0]
    assert total == 1
    assert row.task_input == text[:EXCERPT] + "…" and row.task_input_length == len(text)
    assert row.processed_output == text[:EXCERPT] + "…"
    assert row.processed_output_length == len(text)
    assert row.final_result == "short" and row.final_result_length == 5
    assert row.error is None and row.error_length is None
    assert row.to_json()["task_input_length"] == len(text)
    assert (await store.get_task("a" * 32)).task_input == text  # type: ignore[union-attr]


async def test_a_text_of_exactly_the_excerpt_length_is_not_marked_cut(store: Store) -> None:
    await add(store, Task("b" * 32, "x" * EXCERPT))
    rows, _ = await store.list_tasks()
    assert rows[0].task_input == "x" * EXCERPT and rows[0].task_input_length == EXCERPT


async def test_the_api_list_carries_excerpts_and_the_task_its_whole_text(
    client: Client,
) -> None:
    text = "".join(random.choices(string.ascii_letters, k=5_000))
    response = await client.post("/submit", json={"data": text})
    task_id = (await response.get_json())["task_id"]
    for _ in range(500):
        task = await (await client.get(f"/api/tasks/{task_id}")).get_json()
        if task["status"] == "waiting_for_review":
            break
        await asyncio.sleep(0.01)
    assert task["task_input"] == text and task["processed_output"] == text
    listed = (await (await client.get("/api/tasks")).get_json())["tasks"][0]
    assert listed["task_input"] == text[:EXCERPT] + "…"
    assert listed["processed_output"] == text[:EXCERPT] + "…"
    assert listed["task_input_length"] == listed["processed_output_length"] == 5_000
    assert listed["final_result"] is None and listed["final_result_length"] is None
    assert {"task_id", "status", "attempt", "error", "created_at", "updated_at"} <= set(listed)


@pytest.mark.parametrize(("query", "message"), [
    ("limit=201", "limit: must be at most 200"),
    ("limit=0", "limit: must be at least 1"),
    ("limit=-1", "limit: must be at least 1"),
    ("offset=-1", "offset: must be at least 0"),
    ("limit=99999999999999999999", "limit: must be at most 200"),
    ("offset=99999999999999999999", "offset: must be at most 9223372036854775807"),
    ("offset=9223372036854775808", "offset: must be at most 9223372036854775807"),
    ("limit=" + "9" * 5000, "limit:"),
    ("limit=ten", "limit:"),
    ("order=oldest", "order:"),
    ("after=yesterday", "after:"),
    ("after=1.5_" + "a" * 65, "after:"),
    ("after=1e400_abc", "after:"),
    ("q=" + "x" * 201, "q: "),
])
async def test_page_queries_out_of_range_are_a_400_saying_why(
    client: Client, query: str, message: str
) -> None:
    response = await client.get(f"/api/tasks?{query}")
    assert response.status_code == 400
    body = await response.get_json()
    assert set(body) == {"error"} and message in body["error"], body


async def test_the_largest_page_queries_are_answered(client: Client) -> None:
    for query in ("limit=200", "offset=9223372036854775807"):
        assert (await client.get(f"/api/tasks?{query}")).status_code == 200, query


def test_the_readme_states_the_excerpt_and_the_cap() -> None:
    row = next(line for line in README.splitlines()
               if line.startswith("| `GET /api/tasks` | tasks, newest first"))
    assert models.EXCERPT == EXCERPT and f"first {EXCERPT} characters" in row
    assert f"`limit` at most {MAX_LIMIT}" in row
    assert "task_input_length" in row and "processed_output_length" in row


def test_the_command_line_list_takes_a_bounded_limit(tmp_path: Path) -> None:
    db = str(tmp_path / "hitl.db")
    assert run_cli("tasks", "list", "--limit", "1000", "--db", db).returncode == 0
    for bad in ("0", "-5", str(2**64), "x"):
        result = run_cli("tasks", "list", "--limit", bad, "--db", db)
        assert result.returncode == 2 and "--limit" in result.stderr, bad
        assert "Traceback" not in result.stderr


async def first_frames(http: httpx.AsyncClient, path: str, opened: list[int],
                       hold: asyncio.Event) -> None:
    """Read a dashboard stream up to its counts (its first state), then stay connected."""
    received = b""
    async with http.stream("GET", path) as response:
        async for chunk in response.aiter_bytes():
            received += chunk
            if b"event: counts" in received or len(received) > 50 * SMALL:
                break
        opened.append(len(received))
        await hold.wait()


async def test_lists_of_large_tasks_stay_small_and_watchers_hold_no_texts(
    tmp_path: Path,
) -> None:
    """100 tasks of 200,000 characters, outputs as large (an echoing processor): every
    list stays small, and ten dashboard watchers add little to the server's memory."""
    server = ServerProcess(tmp_path / "hitl.db", extra=["--processor", "tests.procs:echo"])
    server.start()
    try:
        assert server.proc is not None
        memory = psutil.Process(server.proc.pid)
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            ids = [await submit_large(http) for _ in range(100)]
            await all_waiting(http, len(ids))
            for path in ("/api/tasks?limit=200", "/dashboard", "/"):
                response = await http.get(path)
                assert response.status_code == 200
                assert len(response.content) < SMALL, (path, len(response.content))
            whole = (await http.get(f"/api/tasks/{ids[0]}")).json()
            assert len(whole["task_input"]) == len(whole["processed_output"]) == LARGE
            before = memory.memory_info().rss
            opened: list[int] = []
            hold = asyncio.Event()
            watchers = [asyncio.create_task(first_frames(http, "/dashboard/stream", opened, hold))
                        for _ in range(10)]
            await asyncio.wait_for(until(lambda: len(opened) == len(watchers)), 30)
            grown = memory.memory_info().rss - before
            hold.set()
            await asyncio.wait_for(asyncio.gather(*watchers), 10)
    finally:
        server.stop()
    assert all(size < SMALL for size in opened), opened
    assert grown < 30 * 2**20, f"10 dashboard watchers added {grown / 2**20:.0f} MiB"


async def submit_large(http: httpx.AsyncClient) -> str:
    text = "".join(random.choices(string.ascii_letters, k=LARGE))
    response = await http.post("/submit", json={"data": text})
    assert response.status_code == 202, response.text
    return str(response.json()["task_id"])


async def all_waiting(http: httpx.AsyncClient, count: int) -> None:
    async def waiting() -> bool:
        query = {"status": "waiting_for_review", "limit": 1}
        return bool((await http.get("/api/tasks", params=query)).json()["total"] == count)

    for _ in range(600):
        if await waiting():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the tasks never all waited for review")


async def until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0.05)
