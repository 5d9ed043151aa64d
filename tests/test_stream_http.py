"""The SSE endpoints over real HTTP: headers, heartbeats, finished tasks, shutdown."""

from __future__ import annotations

import httpx
import pytest

from hitl import Config

from .conftest import LiveServer, ReviewActions, within


@pytest.fixture
def config(config: Config) -> Config:
    return config.with_changes(heartbeat=0.05)


async def test_stream_headers_and_heartbeats(live_server: LiveServer,
                                             actions: ReviewActions) -> None:
    task_id = await actions.submit()
    async with live_server.http() as http, http.stream("GET", f"/stream/{task_id}") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        lines: list[str] = []

        async def until_heartbeat() -> None:
            async for line in response.aiter_lines():
                lines.append(line)
                if line == ": keep-alive":
                    return
            raise AssertionError(f"stream ended without a heartbeat: {lines}")

        await within(until_heartbeat(), 5, "a heartbeat")
    assert lines[0] == "retry: 3000" and '"status":"waiting_for_review"' in "".join(lines)


async def test_a_finished_task_replays_and_closes_or_just_closes(actions: ReviewActions) -> None:
    task_id = await actions.submit()
    await actions.watch(task_id).wait_for("waiting_for_review")
    assert (await actions.approve(task_id)).status_code == 200
    full = actions.watch(task_id)
    await full.ended(5)
    assert full.statuses()[-2:] == ["completed", "stream_closed"]
    caught_up = actions.watch(task_id, last_id=full.ids()[-1])
    await caught_up.ended(5)
    assert caught_up.statuses() == ["stream_closed"] and caught_up.retry == 3000


async def test_server_shutdown_ends_open_streams(live_server: LiveServer,
                                                 actions: ReviewActions) -> None:
    task_id = await actions.submit()
    watchers = [actions.watch(task_id), actions.watch()]
    await watchers[0].wait_for("waiting_for_review")
    live_server.stop.set()
    for watcher in watchers:
        await watcher.ended(5)
    with pytest.raises(httpx.TransportError):
        await actions.http.get("/healthz")
