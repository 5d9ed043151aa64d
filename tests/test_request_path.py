"""The request path: every request but the JSON event streams goes through Quart, so one
hook guards them all; the Host check on every path; redirects that name no host; bad
input that is a 4xx, said plainly; and what Quart's answer costs (one task of its own)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from hitl.asgi import ANSWERS_IN_SERVER_TASK
from hitl.errors import BODY_TIMEOUT_ERROR, HitlError
from hitl.runner import Runner

from .conftest import OPERATOR, LiveServer, post_form
from .test_api import submit, wait_status

Exchange = tuple[int, dict[str, str], bytes]


def http_scope(method: str, path: str, body: bytes = b"") -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
            "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 8000), "extensions": {},
            "headers": [(b"host", b"localhost"), (b"content-type", b"application/json"),
                        (b"content-length", b"%d" % len(body))]}


async def asgi_call(app: Quart, path: str, chunks: list[bytes], headers: dict[str, str],
                    complete: bool = True,
                    then: Callable[[], Awaitable[dict[str, Any]]] | None = None) -> Exchange:
    """POST ``chunks`` through the app's ASGI callable (more to come unless ``complete``),
    then whatever ``then()`` says."""
    scope = http_scope("POST", path)
    scope["headers"] = [(k.lower().encode(), v.encode())
                        for k, v in {"host": "localhost", **headers}.items()]
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
    assert (await runner.list_tasks(None, 10, 0, by=OPERATOR))[1] == 1
    assert (await runner.get_task(task_id, by=OPERATOR)).status == "waiting_for_review"


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
    assert (await runner.list_tasks(None, 10, 0, by=OPERATOR))[1] == 0


async def test_an_unexpected_error_is_a_logged_json_500_and_the_service_goes_on(
    app: Quart, client: Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    runner: Runner = app.extensions["runner"]

    async def broken(task_input: str, idempotency_key: str | None = None,
                     **options: object) -> None:
        raise RuntimeError("a bug")

    with monkeypatch.context() as patch:
        patch.setattr(runner, "submit", broken)
        with caplog.at_level(logging.ERROR):
            response = await client.post("/submit", json={"data": "x"})
    assert response.status_code == 500
    assert await response.get_json() == {"error": "internal error; it has been logged"}
    assert "a bug" in caplog.text
    await submit(client)


CHROMIUM_ACCEPT = ("text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,"
                   "image/webp,image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7")


async def test_an_unknown_url_is_a_page_for_browsers_and_json_for_api_clients(
    client: Client,
) -> None:
    response = await client.get("/no/such/page", headers={"Accept": CHROMIUM_ACCEPT})
    assert response.status_code == 404 and response.content_type.startswith("text/html")
    assert "<h1>Not Found" in await response.get_data(as_text=True)
    for accept in ("*/*", "application/json", "application/json, text/html"):
        response = await client.get("/no/such/page", headers={"Accept": accept})
        assert response.status_code == 404 and "error" in await response.get_json(), accept


@pytest.mark.parametrize(("path", "location"), [
    ("/tasks//abc", "/tasks/abc"), ("/static//hitl.css", "/static/hitl.css"),
    ("/api//tasks?limit=2", "/api/tasks?limit=2"), ("/tasks//abc//", None),
])
async def test_redirects_name_no_host(client: Client, path: str, location: str | None) -> None:
    response = await client.get(path, headers={"Host": "localhost:8000"})
    if location is None:
        assert "Location" not in response.headers
        return
    assert response.status_code == 308
    assert response.headers["Location"] == location


async def test_redirects_name_no_host_over_real_http(live_server: LiveServer) -> None:
    async with live_server.http() as http:
        for host in (live_server.url.removeprefix("http://"), "localhost"):
            response = await http.get("/tasks//abc", headers={"Host": host})
            assert (response.status_code, response.headers["location"]) == (308, "/tasks/abc")
        response = await http.get("//evil.example/", headers={"Host": "localhost"})
        assert not response.headers.get("location", "/").startswith("//")


DEEP = ["[" * 1000 + "]" * 1000, '{"data": ' + "[" * 5000 + "]" * 5000 + "}",
        '{"feedback": "approved", "comment": ' + '{"a": ' * 100_000 + "1" + "}" * 100_001]


@pytest.mark.parametrize("body", DEEP, ids=["list-1000", "data-5000", "object-100000"])
@pytest.mark.parametrize("path", ["/submit", "/feedback/abc", "/api/tasks/abc/cancel",
                                  "/tasks", "/tasks/abc/decision"])
async def test_json_nested_too_deep_is_a_4xx_on_every_post(
    client: Client, path: str, body: str
) -> None:
    response = await client.post(path, data=body.encode(),
                                 headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, (path, response.status_code)
    if path in ("/submit", "/feedback/abc"):
        assert (await response.get_json())["error"] == "request body is nested too deeply"


@pytest.mark.parametrize("raw", ["²", "٣", "１", "３٣", "1²"])
async def test_only_ascii_digits_make_a_last_event_id(client: Client, raw: str) -> None:
    task_id = await submit(client)
    for path in ("/stream", f"/stream/{task_id}"):
        response = await asyncio.wait_for(
            client.get(path, query_string={"last_event_id": raw}), 5)
        assert response.status_code == 400, (path, raw)
        assert "is not a message id" in (await response.get_json())["error"]


async def test_a_last_event_id_header_of_other_bytes_is_a_400_over_real_http(
    live_server: LiveServer,
) -> None:
    host, port = live_server.url.removeprefix("http://").split(":")
    for raw in (b"\xb2", b"\xb9", "٣".encode(), b"1\xb2"):  # latin-1 superscripts; UTF-8
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(b"GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                         b"Last-Event-ID: " + raw + b"\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 400"), (raw, answer[:200])
        assert b"is not a message id" in answer


@pytest.mark.parametrize(("path", "body", "error"), [
    ("/submit", {"data": ""}, "data: must not be empty"),
    ("/submit", {"data": "  "}, "data: must not be empty"),
    ("/submit", {}, "data: is required"),
    ("/submit", {"data": 42}, "data: must be a string"),
    ("/submit", ["data"], "body: must be a JSON object"),
    ("/submit", {"data": "x" * 200_001}, "data: must be at most 200000 characters"),
    ("/feedback/abc", {"feedback": "maybe"}, "feedback: must be 'approved' or 'rejected'"),
    ("/feedback/abc", {}, "feedback: is required"),
    ("/feedback/abc", {"feedback": "approved", "attempt": 0}, "attempt: must be at least 1"),
    ("/feedback/abc", {"feedback": "approved", "attempt": "x"},
     "attempt: must be a whole number"),
    ("/feedback/abc", {"feedback": "approved", "attempt": 1.5},
     "attempt: must be a whole number"),
    ("/feedback/abc", {"feedback": "approved", "comment": 7}, "comment: must be a string"),
    ("/feedback/abc", {"feedback": 1, "reviewer": "r" * 201},
     "feedback: must be 'approved' or 'rejected'; reviewer: must be at most 64 characters"),
])
async def test_validation_errors_are_said_plainly(
    client: Client, path: str, body: object, error: str
) -> None:
    response = await client.post(path, json=body)
    assert response.status_code == 400
    assert await response.get_json() == {"error": error}


@pytest.mark.parametrize(("query", "error"), [
    ("limit=0", "limit: must be at least 1"), ("limit=201", "limit: must be at most 200"),
    ("limit=abc", "limit: must be a whole number"),
    ("status=bogus", "status: must be 'pending', 'running', 'waiting_for_review', "
                     "'processing_feedback', 'completed', 'failed' or 'cancelled'"),
])
async def test_query_errors_are_said_plainly(client: Client, query: str, error: str) -> None:
    response = await client.get(f"/api/tasks?{query}")
    assert (response.status_code, await response.get_json()) == (400, {"error": error})


async def test_form_errors_are_said_plainly_too(client: Client) -> None:
    response = await post_form(client, "/tasks/abc/decision", {"feedback": "maybe"})
    assert response.status_code == 400
    page = await response.get_data(as_text=True)
    assert "Decision: must be &#39;approved&#39; or &#39;rejected&#39;" in page
    assert "Input should" not in page


class Busy(HitlError):
    """Stands for any domain error with its own status (the storage one to come: 503)."""

    status = 503


async def test_any_domain_error_keeps_its_status_on_every_path(
    app: Quart, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner: Runner = app.extensions["runner"]

    async def busy(*args: object, **kwargs: object) -> None:
        raise Busy("storage unavailable: disk full")

    monkeypatch.setattr(runner, "submit", busy)
    monkeypatch.setattr(runner, "task_state", busy)
    for response in (await client.post("/submit", json={"data": "x"}),
                     await asyncio.wait_for(client.get("/stream/abc"), 5),
                     await asyncio.wait_for(client.head("/stream/abc"), 5)):
        assert response.status_code == 503
        assert response.headers["X-Frame-Options"] == "DENY"
    response = await client.post("/submit", json={"data": "x"})
    assert await response.get_json() == {"error": "storage unavailable: disk full"}


async def test_a_client_leaving_cancels_its_answer_and_the_request_ends_cleanly(
    app: Quart, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner: Runner = app.extensions["runner"]
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def slow(task_id: str, **kwargs: object) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    monkeypatch.setattr(runner, "get_task", slow)
    messages = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await started.wait()
        return {"type": "http.disconnect"}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(app.asgi_app(http_scope("GET", "/api/tasks/abc"), receive, send), 5)
    assert cancelled.is_set() and sent == []


async def test_a_server_stopping_cancels_a_request_through_it(
    app: Quart, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner: Runner = app.extensions["runner"]
    started = asyncio.Event()

    async def slow(task_id: str, **kwargs: object) -> None:
        started.set()
        await asyncio.sleep(30)

    monkeypatch.setattr(runner, "get_task", slow)
    messages = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.Event().wait()
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        pass

    request = asyncio.ensure_future(app.asgi_app(http_scope("GET", "/api/tasks/abc"), receive,
                                                 send))
    await asyncio.wait_for(started.wait(), 5)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(request, 5)


@pytest.mark.skipif(not ANSWERS_IN_SERVER_TASK, reason="this Quart answers in its own way")
@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/healthz", b""), ("POST", "/feedback/abc", b'{"feedback": "approved"}')])
async def test_quart_answers_a_request_with_one_task_of_its_own(
    app: Quart, method: str, path: str, body: bytes
) -> None:
    """Its receiver; the answer runs in the server's task for the request (profiled cost)."""
    loop = asyncio.get_running_loop()
    created: list[object] = []
    factory = loop.get_task_factory()

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        created.append(coro)
        return (factory or asyncio.Task)(coro, loop=loop, **kwargs)  # type: ignore[operator]

    messages = [{"type": "http.request", "body": body, "more_body": False}]
    done = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    request = asyncio.ensure_future(app.asgi_app(http_scope(method, path, body), receive, send))
    loop.set_task_factory(counting)
    try:
        await asyncio.wait([request], timeout=5)
    finally:
        loop.set_task_factory(factory)
    assert request.done() and request.exception() is None
    # asyncpg hands a connection back to its pool in a task of its own (a shielded release):
    # the pool's cost, not the request path's.
    ours = [coro for coro in created if "PoolConnectionHolder" not in repr(coro)]
    assert len(ours) == 1, created
