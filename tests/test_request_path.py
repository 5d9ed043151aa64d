"""One path per endpoint: every request but the JSON event streams goes through Quart,
so one hook on the app guards them all, and bodies are read, sized and timed there."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from hitl.errors import BODY_TIMEOUT_ERROR
from hitl.runner import Runner

from .test_api import submit, wait_status

Exchange = tuple[int, dict[str, str], bytes]


async def asgi_call(app: Quart, path: str, chunks: list[bytes], headers: dict[str, str],
                    complete: bool = True,
                    then: Callable[[], Awaitable[dict[str, Any]]] | None = None) -> Exchange:
    """POST ``chunks`` through the app's ASGI callable (more to come unless ``complete``),
    then whatever ``then()`` says."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80), "extensions": {},
             "headers": [(k.lower().encode(), v.encode())
                         for k, v in {"host": "localhost", **headers}.items()]}
    messages = [{"type": "http.request", "body": chunk,
                 "more_body": n < len(chunks) - 1 or not complete}
                for n, chunk in enumerate(chunks)][::-1]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        if then is not None:
            return await then()
        await asyncio.Event().wait()  # the client stays connected
        raise AssertionError

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(app.asgi_app(scope, receive, send), 10)
    if not sent:
        return 0, {}, b""
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


async def test_a_hook_on_the_app_guards_every_endpoint(app: Quart, client: Client) -> None:
    task_id = await submit(client)
    await wait_status(client, task_id, "waiting_for_review")

    @app.before_request
    async def refuse() -> tuple[dict[str, str], int]:
        return {"error": "who are you?"}, 401

    for method, path, body in (("POST", "/submit", {"data": "sneak in"}),
                               ("POST", f"/feedback/{task_id}", {"feedback": "approved"}),
                               ("GET", "/api/tasks", None), ("GET", "/healthz", None)):
        response = await client.open(path, method=method, json=body)
        assert response.status_code == 401, (method, path)
        assert await response.get_json() == {"error": "who are you?"}
    runner: Runner = app.extensions["runner"]
    assert (await runner.list_tasks(None, 10, 0))[1] == 1
    assert (await runner.get_task(task_id)).status == "waiting_for_review"


async def test_a_body_in_chunks_is_read_whole_and_kept_to_the_limit(app: Quart) -> None:
    json_only = {"content-type": "application/json"}  # no length: chunked encoding
    status, _, body = await asgi_call(app, "/submit", [b'{"da', b'ta": "in pieces"}'], json_only)
    assert status == 202 and "task_id" in json.loads(body)
    app.config["MAX_CONTENT_LENGTH"] = 64
    status, _, body = await asgi_call(app, "/submit", [b'{"data": "', b"x" * 60, b'"}'],
                                      json_only)
    assert status == 413 and "too large" in json.loads(body)["error"]


async def test_a_body_that_never_arrives_is_408(app: Quart) -> None:
    app.config["BODY_TIMEOUT"] = 0.1
    status, _, body = await asgi_call(app, "/submit", [b'{"data": '],
                                      {"content-type": "application/json",
                                       "content-length": "20"}, complete=False)
    assert (status, json.loads(body)) == (408, {"error": BODY_TIMEOUT_ERROR})


async def test_a_client_leaving_mid_body_creates_nothing(app: Quart) -> None:
    async def disconnect() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    status, _, _ = await asgi_call(app, "/submit", [b'{"data": '],
                                   {"content-type": "application/json", "content-length": "20"},
                                   complete=False, then=disconnect)
    assert status == 0  # nobody to answer
    runner: Runner = app.extensions["runner"]
    assert (await runner.list_tasks(None, 10, 0))[1] == 0


async def test_an_unexpected_error_is_a_logged_json_500_and_the_service_goes_on(
    app: Quart, client: Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    runner: Runner = app.extensions["runner"]

    async def broken(task_input: str) -> None:
        raise RuntimeError("a bug")

    with monkeypatch.context() as patch:
        patch.setattr(runner, "submit", broken)
        with caplog.at_level(logging.ERROR):
            response = await client.post("/submit", json={"data": "x"})
    assert response.status_code == 500
    assert await response.get_json() == {"error": "internal error; it has been logged"}
    assert "a bug" in caplog.text
    await submit(client)
