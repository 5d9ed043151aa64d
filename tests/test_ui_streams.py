"""The UI's HTML streams, read from a real server: current state first, one render per
message, a close event for finished tasks, and a prompt end on shutdown."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx

from hitl.ui_streams import FragmentCache

from .conftest import LiveServer, ReviewActions, stop_server, until, within

HOSTILE = '<img src=x onerror="alert(1)"><script>alert(2)</script>'


@dataclass
class Named:
    event: str
    html: str


async def read_named(http: httpx.AsyncClient, path: str, count: int | None = None
                     ) -> list[Named]:
    """Named SSE events from ``path``: ``count`` of them, or all until the stream ends."""
    events: list[Named] = []
    async with http.stream("GET", path) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        name, data = "message", []
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[6:] if line.startswith("data: ") else line[5:])
            elif line == "" and data:
                events.append(Named(name, "\n".join(data)))
                name, data = "message", []
                if count is not None and len(events) == count:
                    break
    return events


async def test_a_task_stream_starts_with_the_current_state_then_follows_it(
    actions: ReviewActions,
) -> None:
    task_id = await actions.submit(HOSTILE)
    await actions.watch(task_id).wait_for("waiting_for_review")
    path = f"/tasks/{task_id}/stream"
    first = await within(read_named(actions.http, path, 4), 5, "the current state")
    assert [e.event for e in first] == ["status", "review", "history", "result"]
    assert 'data-status="waiting_for_review"' in first[0].html
    assert "&lt;img src=x" in first[1].html and "<img" not in first[1].html
    reader = asyncio.create_task(read_named(actions.http, path))
    await asyncio.sleep(0.2)
    assert (await actions.approve(task_id, reviewer="Ann")).status_code == 200
    events = await within(reader, 5, "the task stream to close after the approval")
    assert events[-1].event == "close"
    assert 'data-status="completed"' in events[-5].html
    again = await within(read_named(actions.http, path), 5,  # finished: state, close
                         "the finished task's stream to close")
    assert [e.event for e in again] == ["status", "review", "history", "result", "close"]


async def test_the_dashboard_stream_sends_counts_then_rows_and_announces_new_work(
    actions: ReviewActions,
) -> None:
    await actions.watch(await actions.submit("already there")).wait_for("waiting_for_review")
    reader = asyncio.create_task(read_named(actions.http, "/dashboard/stream", 3))
    await asyncio.sleep(0.3)
    task_id = await actions.submit("brand new")
    counts, row, new = await within(reader, 5, "the counts, the row and its announcement")
    assert counts.event == "counts" and 'data-count="pending"' in counts.html
    assert "already there" not in counts.html + row.html  # the page has it already
    assert row.event == f"task-{task_id}" and f'id="task-{task_id}"' in row.html
    assert "brand new" in row.html
    assert (new.event, new.html) == ("task-new", task_id)  # announced; the page places it


async def test_each_message_is_rendered_once_however_many_pages_watch(
    live_server: LiveServer, actions: ReviewActions
) -> None:
    cache: FragmentCache = live_server.app.extensions["fragments"]
    task_id = await actions.submit()
    await actions.watch(task_id).wait_for("waiting_for_review")
    before = cache.renders
    path = f"/tasks/{task_id}/stream"
    broker = live_server.app.extensions["broker"]
    watching = broker.subscriber_count(task_id)  # the JSON watcher above
    readers = [asyncio.create_task(read_named(actions.http, path)) for _ in range(5)]
    await until(lambda: broker.subscriber_count(task_id) == watching + 5,
                "five pages to subscribe")
    assert cache.renders == before + 1  # the current state, once for all five
    assert (await actions.approve(task_id)).status_code == 200
    results = await within(asyncio.gather(*readers), 5, "five streams to close")
    assert all(result == results[0] for result in results)
    assert cache.renders == before + 3  # + processing_feedback + completed


async def test_ui_streams_end_promptly_when_the_server_stops(
    live_server: LiveServer, actions: ReviewActions
) -> None:
    task_id = await actions.submit()
    readers = [asyncio.create_task(read_named(actions.http, path))
               for path in (f"/tasks/{task_id}/stream", "/dashboard/stream")]
    broker = live_server.app.extensions["broker"]
    await until(lambda: broker.subscriber_count() == 2, "both streams to subscribe")
    started = time.monotonic()
    await stop_server(live_server)
    await within(asyncio.gather(*readers, return_exceptions=True), 5,
                 "both streams to end on shutdown")
    assert time.monotonic() - started < 3
