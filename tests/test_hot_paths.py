"""The JSON event streams take the lean path (:mod:`hitl.sse_asgi`); nothing else does."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from hitl.asgi import Edge

from .conftest import LiveServer, ReviewActions
from .test_api import submit, wait_status


@pytest.fixture
def quart_calls(app: Quart) -> list[str]:
    """``METHOD path`` of every request that reached Quart."""
    hot = app.asgi_app
    assert isinstance(hot, Edge)
    calls: list[str] = []
    inner = hot.inner

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        calls.append(f"{scope['method']} {scope['path']}")
        await inner(scope, receive, send)

    hot.inner = recording
    return calls


async def test_only_the_json_streams_skip_quart(client: Client, quart_calls: list[str]) -> None:
    task_id = await submit(client)
    await wait_status(client, task_id, "waiting_for_review")
    assert (await client.post(f"/feedback/{task_id}", json={"feedback": "approved"})
            ).status_code == 200
    await wait_status(client, task_id, "completed")
    quart_calls.clear()
    response = await client.get(f"/stream/{task_id}")
    assert response.status_code == 200 and b"stream_closed" in await response.get_data()
    assert quart_calls == []
    await client.get(f"/tasks/{task_id}")
    await client.post("/submit", json={"data": "through Quart"})
    assert quart_calls == [f"GET /tasks/{task_id}", "POST /submit"]


async def test_head_on_a_stream_answers_at_once_with_its_headers_and_no_body(
    app: Quart, client: Client
) -> None:
    task_id = await submit(client)
    await wait_status(client, task_id, "waiting_for_review")
    for path in ("/stream", f"/stream/{task_id}", "/stream?last_event_id=3"):
        response = await asyncio.wait_for(client.head(path), 5)
        assert response.status_code == 200, path
        assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert response.headers["Cache-Control"] == "no-cache"
        assert await response.get_data() == b""
    response = await asyncio.wait_for(client.head("/stream/nope"), 5)
    assert response.status_code == 404
    assert app.extensions["broker"].subscriber_count() == 0


async def test_head_on_a_stream_over_real_http_leaves_no_subscriber(
    live_server: LiveServer, actions: ReviewActions
) -> None:
    task_id = await actions.submit()
    for path in ("/stream", f"/stream/{task_id}"):
        response = await asyncio.wait_for(actions.http.head(path), 5)
        assert response.status_code == 200 and response.content == b""
        assert response.headers["content-type"].startswith("text/event-stream")
    assert (await actions.http.get("/healthz")).json()["subscribers"] == 0
