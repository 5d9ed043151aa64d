"""The dashboard as a review queue: the longest waiting first with how long each has
waited, pages that hold still while tasks change, a search that takes any text, the same
on ``GET /api/tasks``, ``GET /next`` for the oldest waiting task, and every page's title
counting the tasks that wait for review."""

from __future__ import annotations

import asyncio
import html
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from hitl import Config, create_app
from hitl.models import Status, Task, iso
from hitl.pages import DASHBOARD
from hitl.runner import Runner
from hitl.store import Store, View, Write, open_store

from .conftest import OPERATOR, LiveServer, ReviewActions, reach
from .test_ui_streams import Named, read_named

WAITING = Status.WAITING_FOR_REVIEW
ODD = ["100% sure", "snake_case name", "it's mine", 'say "hi"', "back\\slash", "plain text"]


def tid(n: int) -> str:
    return f"{n:032x}"


def task(n: int, status: Status = WAITING, *, since: float, text: str = "") -> Task:
    """Task ``n``, submitted at time ``n``, in ``status`` since ``since``."""
    return Task(tid(n), text or f"task number {n}", status, processed_output=f"output {n}",
                created_at=float(n), updated_at=since)


# Submitted 1, 2, 3, 4; waiting since 50, 20, 30 (task 1 came back after a rejection).
QUEUE = [task(1, since=50), task(2, since=20), task(3, since=30),
         task(4, Status.COMPLETED, since=10)]


async def add(store: Store, *tasks: Task) -> None:
    await store.write([Write(task.row()) for task in tasks])


@pytest.fixture
def seed() -> list[Task]:
    return QUEUE


@pytest.fixture
async def app(config: Config, seed: list[Task]) -> AsyncIterator[Quart]:
    """The app on a database that already holds ``seed`` (waiting tasks resume waiting)."""
    store = open_store(config.db)
    await store.open()
    await add(store, *seed)
    await store.close()
    app = create_app(config)
    async with app.test_app():
        yield app


async def ids(store: Store, view: View, limit: int = 50, after: str | None = None
              ) -> list[str]:
    return [row.task_id for row in (await store.task_page(view, limit, after)).rows]


# The store: order, waiting time, pages, search

async def test_waiting_for_review_lists_the_longest_waiting_first(store: Store) -> None:
    await add(store, *QUEUE)
    page = await store.task_page(View(WAITING, order="waiting"), 10)
    assert [row.task_id for row in page.rows] == [tid(2), tid(3), tid(1)]
    assert [row.waiting_since for row in page.rows] == [20, 30, 50]
    assert page.total == 3 and page.next is None
    every = await store.task_page(View(), 10)  # every task: newest first, as before
    assert [row.task_id for row in every.rows] == [tid(4), tid(3), tid(2), tid(1)]
    assert every.rows[0].waiting_since is None  # completed: waits for no one
    assert every.rows[0].to_json()["waiting_since"] is None
    assert every.rows[1].to_json()["waiting_since"] == iso(30)


@pytest.mark.parametrize("seed", [[]])
async def test_waiting_time_counts_from_when_the_current_attempt_came_up(
    app: Quart,
) -> None:
    runner: Runner = app.extensions["runner"]
    first = (await runner.submit("first", by=OPERATOR)).task_id
    await reach(runner, first, WAITING)
    other = (await runner.submit("second", by=OPERATOR)).task_id
    await reach(runner, other, WAITING)
    rejected_at = time.time()
    await runner.decide(first, "rejected", "again", by=OPERATOR)
    await reach(runner, first, WAITING, attempt=2)
    page = await runner.task_page(View(WAITING, order="waiting"), 10, by=OPERATOR)
    assert [row.task_id for row in page.rows] == [other, first]  # back: at the end
    again = page.rows[1]
    assert again.attempt == 2 and again.waiting_since is not None
    assert again.waiting_since >= rejected_at
    assert (await runner.oldest_waiting(by=OPERATOR)) == other


async def test_pages_follow_on_while_tasks_are_decided_and_new_ones_arrive(
    store: Store,
) -> None:
    await add(store, *(task(n, since=1000 + n) for n in range(1, 151)))
    view = View(WAITING, order="waiting")
    first = await store.task_page(view, 50)
    assert first.total == 150 and first.next is not None
    seen = [row.task_id for row in first.rows]
    # While the reviewer reads page 1: ten of its tasks are decided, five new ones wait.
    await add(store, *(task(n, Status.PROCESSING_FEEDBACK, since=5000) for n in range(1, 11)))
    await add(store, *(task(n, since=6000 + n) for n in range(151, 156)))
    after = first.next
    while after is not None:
        page = await store.task_page(view, 50, after)
        seen += [row.task_id for row in page.rows]
        after = page.next
    assert seen == [tid(n) for n in range(1, 156)]  # nothing skipped, nothing twice

    newest = View()
    top = await store.task_page(newest, 50)
    await add(store, *(task(n, since=7000) for n in range(156, 166)))  # newer than the top
    rest = await ids(store, newest, 200, top.next)
    listed = [row.task_id for row in top.rows] + rest
    assert listed == [tid(n) for n in range(155, 0, -1)]


async def test_a_page_of_exactly_the_rest_has_no_next(store: Store) -> None:
    await add(store, *(task(n, since=n) for n in range(1, 5)))
    page = await store.task_page(View(), 2)
    assert page.next is not None
    last = await store.task_page(View(), 2, page.next)
    assert [row.task_id for row in last.rows] == [tid(2), tid(1)] and last.next is None


@pytest.mark.parametrize(("search", "found"), [
    ("%", [0]), ("_", [1]), ("'", [2]), ('"', [3]), ("\\", [4]), ("SNAKE", [1]),
    ("% s", [0]), ("I", [2, 3, 5]), ("nowhere", []), ("e_c", [1]), ("s%", []),
])
async def test_search_finds_text_literally_whatever_it_holds(
    store: Store, search: str, found: list[int]
) -> None:
    await add(store, *(task(n + 1, since=n, text=text) for n, text in enumerate(ODD)))
    page = await store.task_page(View(search=search), 50)
    assert sorted(row.task_input for row in page.rows) == sorted(ODD[n] for n in found)
    assert page.total == len(found)


async def test_search_looks_at_the_output_and_the_id_too(store: Store) -> None:
    await add(store, task(1, since=1), Task(tid(2), "input", WAITING, processed_output="a needle",
                                           created_at=2, updated_at=2))
    assert await ids(store, View(search="needle")) == [tid(2)]
    assert await ids(store, View(search=tid(1)[-8:])) == [tid(1)]
    assert await ids(store, View(WAITING, search="needle")) == [tid(2)]
    assert await ids(store, View(Status.COMPLETED, search="needle")) == []


async def test_a_search_over_ten_thousand_tasks_is_quick(store: Store) -> None:
    await add(store, *(task(n, since=n, text=f"customer {n} asks about order {n * 7}" * 10)
                       for n in range(1, 10_001)))
    started = time.perf_counter()
    page = await store.task_page(View(WAITING, search="order 70000", order="waiting"), 50)
    waited = time.perf_counter() - started
    assert [row.task_id for row in page.rows] == [tid(10_000)]
    assert waited < 2, f"{waited:.2f} s"  # a scan; about 20 ms here


async def test_oldest_waiting_goes_round_the_queue(store: Store) -> None:
    assert await store.oldest_waiting() is None
    await add(store, *QUEUE)
    assert await store.oldest_waiting() == tid(2)
    assert await store.oldest_waiting(tid(2)) == tid(3)  # the one after it in the queue
    assert await store.oldest_waiting(tid(3)) == tid(1)
    assert await store.oldest_waiting(tid(1)) == tid(2)  # past the last: from the start
    assert await store.oldest_waiting(tid(4)) == tid(2)  # decided: the oldest
    assert await store.oldest_waiting("f" * 32) == tid(2)  # no such task: the oldest
    await add(store, task(2, Status.COMPLETED, since=99), task(3, Status.COMPLETED, since=99))
    assert await store.oldest_waiting(tid(1)) is None  # only itself is left: nothing next


# The API

async def api(client: Client, query: str) -> dict[str, Any]:
    response = await client.get(f"/api/tasks?{query}")
    assert response.status_code == 200, await response.get_data(as_text=True)
    body: dict[str, Any] = await response.get_json()
    return body


async def test_the_api_takes_the_same_order_search_and_pages(client: Client) -> None:
    body = await api(client, "status=waiting_for_review&order=waiting&limit=2")
    assert [t["task_id"] for t in body["tasks"]] == [tid(2), tid(3)]
    assert body["total"] == 3 and body["next"]
    assert body["tasks"][0]["waiting_since"] == iso(20)
    queue = "status=waiting_for_review&order=waiting&limit=2"
    rest = await api(client, f"{queue}&after={body['next']}")
    assert [t["task_id"] for t in rest["tasks"]] == [tid(1)] and rest["next"] is None
    assert [t["task_id"] for t in (await api(client, "q=NUMBER%204"))["tasks"]] == [tid(4)]
    assert (await api(client, "q="))["total"] == 4  # an empty search is no search
    newest = await api(client, "limit=50")
    assert [t["task_id"] for t in newest["tasks"]] == [tid(4), tid(3), tid(2), tid(1)]




# The pages

async def text(client: Client, path: str, status: int = 200) -> str:
    response = await client.get(path)
    assert response.status_code == status, path
    return await response.get_data(as_text=True)


def row_ids(page: str) -> list[str]:
    return re.findall(r'<tr id="task-([0-9a-f]{32})"', page)


async def test_the_waiting_view_shows_the_queue_with_how_long_each_waited(
    client: Client,
) -> None:
    page = await text(client, "/dashboard?status=waiting_for_review")
    assert row_ids(page) == [tid(2), tid(3), tid(1)]
    assert f'<time datetime="{iso(20)}" data-age' in page  # waited since 20
    assert row_ids(await text(client, "/dashboard")) == [tid(4), tid(3), tid(2), tid(1)]


@pytest.mark.parametrize("seed", [[task(n, since=1000 + n) for n in range(1, 151)]])
async def test_the_whole_queue_is_reachable_by_plain_links(client: Client) -> None:
    path = "/dashboard"
    seen: list[str] = []
    for _ in range(10):
        page = await text(client, path)
        seen += row_ids(page)
        more = re.search(r'<a class="more" href="([^"]+)"', page)
        if more is None:
            break
        path = html.unescape(more[1])
        assert "after=" in path
    assert seen == [tid(n) for n in range(150, 0, -1)]  # the oldest waiting reached
    assert len(row_ids(await text(client, "/dashboard"))) == DASHBOARD


@pytest.mark.parametrize("seed", [[task(n, since=1000 + n) for n in range(1, 151)]])
async def test_load_more_answers_the_next_rows_alone(client: Client) -> None:
    page = await text(client, "/dashboard?status=waiting_for_review")
    more = re.search(r'hx-get="([^"]+)"', page.split('class="more-row"', 1)[1])
    assert more is not None
    rows = await text(client, html.unescape(more[1]))
    assert "<html" not in rows and "<tbody" not in rows
    assert row_ids(rows) == [tid(n) for n in range(DASHBOARD + 1, 2 * DASHBOARD + 1)]
    assert 'class="more-row"' in rows


async def test_the_dashboard_searches_and_says_when_nothing_matches(client: Client) -> None:
    page = await text(client, "/dashboard?q=number+3")
    assert row_ids(page) == [tid(3)]
    assert 'role="search"' in page and 'value="number 3"' in page
    hostile = await text(client, "/dashboard?q=%3Cscript%3E%25_%27")
    assert "<script>%" not in hostile and "&lt;script&gt;%_&#39;" in hostile
    assert row_ids(hostile) == [] and "No tasks match" in hostile
    await text(client, "/dashboard?q=" + "x" * 201, 400)
    await text(client, "/dashboard?after=bogus", 400)


async def test_the_dashboard_has_a_skip_link_to_its_list(client: Client) -> None:
    page = await text(client, "/dashboard")
    first_link = re.search(r"<a [^>]*>", page.split("<body", 1)[1])
    assert first_link is not None and 'href="#task-list"' in first_link[0]
    assert re.search(r'id="task-list"[^>]*tabindex="-1"', page)


async def test_every_page_title_counts_the_tasks_waiting_for_review(client: Client) -> None:
    for path, status in (("/", 200), ("/dashboard", 200), (f"/tasks/{tid(1)}", 200),
                         ("/tasks/" + "f" * 32, 404)):
        page = await text(client, path, status)
        title = re.search(r"<title>(.*?)</title>", page, re.S)
        assert title and title[1].startswith("(3) ") and title[1].endswith(" · hitl"), path
        assert 'href="/next' in page, path  # and "Review next" on each


@pytest.mark.parametrize("seed", [[]])
async def test_no_count_in_the_title_when_none_wait(client: Client) -> None:
    assert "<title>Dashboard · hitl</title>" in await text(client, "/dashboard")


async def test_review_next_opens_the_oldest_waiting_task(client: Client) -> None:
    response = await client.get("/next")
    assert response.status_code == 303 and response.headers["Location"] == f"/tasks/{tid(2)}"
    response = await client.get(f"/next?after={tid(2)}")
    assert response.headers["Location"] == f"/tasks/{tid(3)}"
    assert f'href="/next?after={tid(3)}"' in await text(client, f"/tasks/{tid(3)}")
    await text(client, "/next?after=" + "a" * 65, 400)


@pytest.mark.parametrize("seed", [[task(4, Status.COMPLETED, since=10)]])
async def test_review_next_with_none_waiting_shows_the_empty_queue(client: Client) -> None:
    response = await client.get("/next")
    assert response.status_code == 303
    assert response.headers["Location"] == "/dashboard?status=waiting_for_review"


# The dashboard's stream

async def test_the_stream_catches_up_from_the_page_and_announces_new_work(
    live_server: LiveServer, actions: ReviewActions
) -> None:
    early = await actions.submit("on the page")
    await actions.watch(early).wait_for("waiting_for_review")
    page = (await actions.http.get("/dashboard?status=waiting_for_review")).text
    stream = html.unescape(re.search(r'sse-connect="([^"]+)"', page)[1])  # type: ignore[index]
    assert "since=" in stream
    await actions.approve(early)  # after the page was read, before its stream connects
    await actions.watch(early).wait_for("completed")
    events = await asyncio.wait_for(read_named(actions.http, stream, 2), 5)
    assert events[0].event == f"task-{early}" and 'data-status="completed"' in events[0].html
    assert events[1].event == "counts"

    reader = asyncio.create_task(read_until(actions.http, stream, "task-new"))
    await asyncio.sleep(0.3)
    new = await actions.submit("new work")
    received = await asyncio.wait_for(reader, 5)
    names = [event.event for event in received]
    assert names[:2] == [f"task-{early}", "counts"]
    assert f"task-{new}" in names  # every change of every task, for rows loaded later
    announced = [event.html for event in received if event.event == "task-new"]
    assert announced == [new]  # once: when it comes up for review
    assert names.index("task-new") > names.index(f"task-{new}")


async def read_until(http: Any, path: str, last: str) -> list[Named]:
    """Named events from ``path`` up to the first ``last`` event."""
    events: list[Named] = []
    async with http.stream("GET", path) as response:
        name, data = "message", []
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[6:])
            elif line == "" and data:
                events.append(Named(name, "\n".join(data)))
                if name == last:
                    return events
                name, data = "message", []
    return events


async def test_a_long_catch_up_says_to_read_the_list_anew(
    live_server: LiveServer, actions: ReviewActions, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("hitl.ui_streams.CATCH_UP", 2)
    for n in range(3):
        await actions.watch(await actions.submit(f"task {n}")).wait_for("waiting_for_review")
    events = await asyncio.wait_for(read_until(actions.http, "/dashboard/stream?since=0",
                                               "counts"), 5)
    names = [event.event for event in events]
    assert names[-2:] == ["stale", "counts"] and "Reload the list" in events[-2].html
    assert len([name for name in names if name.startswith("task-") and name != "task-new"]) == 2
    assert names.count("task-new") == 2  # submitted after message 0: new to every task's view
