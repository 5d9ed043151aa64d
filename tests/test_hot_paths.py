"""The hot endpoints answered ahead of Quart (:mod:`hitl.asgi`) agree with the Quart routes.

Well-formed JSON to ``/submit`` and ``/feedback`` never reaches Quart; everything else
does, and either way the client gets the same answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from hitl.asgi import HotPaths
from hitl.errors import BODY_TIMEOUT_ERROR
from hitl.runner import Runner

from .test_api import submit, wait_status

Exchange = tuple[int, dict[str, str], bytes]


@pytest.fixture
def quart_calls(app: Quart) -> list[str]:
    """``METHOD path`` of every request that reached Quart."""
    hot = app.asgi_app
    assert isinstance(hot, HotPaths)
    calls: list[str] = []
    inner = hot.inner

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        calls.append(f"{scope['method']} {scope['path']}")
        await inner(scope, receive, send)

    hot.inner = recording
    return calls


async def asgi_call(app: Quart, path: str, chunks: list[bytes], headers: dict[str, str],
                    complete: bool = True,
                    then: Callable[[], Awaitable[dict[str, Any]]] | None = None) -> Exchange:
    """POST ``chunks`` through the app's ASGI callable (more to come unless ``complete``),
    then whatever ``then()`` says."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80), "extensions": {},
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
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


async def test_well_formed_posts_are_answered_without_quart(
    client: Client, quart_calls: list[str]
) -> None:
    response = await client.post("/submit", json={"data": "fast"})
    assert response.status_code == 202
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    task_id = (await response.get_json())["task_id"]
    await wait_status(client, task_id, "waiting_for_review")
    response = await client.post(f"/feedback/{task_id}", json={"feedback": "approved",
                                                               "reviewer": "Ann"})
    assert response.status_code == 200
    assert await response.get_json() == {"message": "Feedback 'approved' received"}
    task = await wait_status(client, task_id, "completed")
    assert task["reviews"][0]["reviewer"] == "Ann"
    assert not [call for call in quart_calls if call.startswith("POST")], quart_calls


async def test_both_paths_give_the_same_answers(client: Client, quart_calls: list[str]) -> None:
    """Each request once as ``application/json`` (answered ahead of Quart when well formed)
    and once as ``application/vnd.hitl+json`` (always Quart's), with the same results."""
    waiting = await submit(client)
    finished = await submit(client)
    await wait_status(client, waiting, "waiting_for_review")
    await wait_status(client, finished, "waiting_for_review")
    await client.post(f"/feedback/{finished}", json={"feedback": "approved"})
    await wait_status(client, finished, "completed")
    cases: list[tuple[str, bytes, int, bool]] = [  # path, body, status, body well formed
        ("/submit", b'{"data": "the same"}', 202, True),
        ("/submit", b'{"data": "  "}', 400, False),
        ("/submit", b'{"data": 42}', 400, False),
        ("/submit", b"{not json", 400, False),
        ("/submit", b"[]", 400, False),
        ("/submit", b'{"data": "\xff"}', 400, False),  # not UTF-8
        (f"/feedback/{waiting}", b'{"feedback": "maybe"}', 400, False),
        (f"/feedback/{waiting}", b'{"feedback": "approved", "attempt": 7}', 409, True),
        (f"/feedback/{finished}", b'{"feedback": "approved"}', 409, True),
        ("/feedback/unknown", b'{"feedback": "rejected"}', 404, True),
        ("/feedback/" + "x" * 65, b'{"feedback": "rejected"}', 400, True),
    ]
    for path, body, status, well_formed in cases:
        answers = []
        for content_type in ("application/json", "application/vnd.hitl+json"):
            quart_calls.clear()
            response = await client.post(path, data=body, headers={"Content-Type": content_type})
            raw = await response.get_data()
            answer = json.loads(raw)
            if answer.pop("task_id", None) is None:  # else a new id: only the rest compares
                answer["raw"] = raw
            answers.append((response.status_code, answer))
            reached_quart = bool(quart_calls)
            assert reached_quart == (content_type != "application/json" or not well_formed), (
                path, body, content_type)
        assert answers[0] == answers[1], (path, body, answers)
        assert answers[0][0] == status, (path, body, answers)


async def test_a_body_in_chunks_is_read_whole_and_kept_to_the_limit(
    app: Quart, quart_calls: list[str]
) -> None:
    json_only = {"content-type": "application/json"}  # no length: chunked encoding
    status, _, body = await asgi_call(app, "/submit", [b'{"da', b'ta": "in pieces"}'], json_only)
    assert status == 202 and "task_id" in json.loads(body)
    assert not quart_calls
    app.config["MAX_CONTENT_LENGTH"] = 64
    status, _, body = await asgi_call(app, "/submit", [b'{"data": "', b"x" * 60, b'"}'],
                                      json_only)
    assert status == 413 and "too large" in json.loads(body)["error"]
    assert quart_calls == ["POST /submit"]  # Quart read the rest and said why


async def test_a_body_that_never_arrives_is_408_on_both_paths(
    app: Quart, quart_calls: list[str]
) -> None:
    app.config["BODY_TIMEOUT"] = 0.1
    answers = []
    for content_type in ("application/json", "application/vnd.hitl+json"):
        status, _, body = await asgi_call(app, "/submit", [b'{"data": '],
                                          {"content-type": content_type,
                                           "content-length": "20"}, complete=False)
        answers.append((status, json.loads(body)))
    assert answers[0] == answers[1] == (408, {"error": BODY_TIMEOUT_ERROR})
    assert quart_calls == ["POST /submit"]  # only the second


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
