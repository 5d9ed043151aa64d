"""One path per endpoint: every request but the JSON event streams goes through Quart,
so one hook on the app guards them all, and bodies are read, sized and timed there."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from hitl import Config, create_app
from hitl.errors import BODY_TIMEOUT_ERROR, ConfigError
from hitl.runner import Runner

from .conftest import OPERATOR, LiveServer
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


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/api/tasks"), ("POST", "/submit"), ("POST", "/feedback/abc"), ("GET", "/healthz"),
    ("GET", "/stream"), ("GET", "/stream/abc"), ("HEAD", "/stream"), ("GET", "/"),
    ("GET", "/static/hitl.js"), ("GET", "/no/such/page"), ("GET", "/tasks//abc"),
    ("POST", "/tasks"), ("GET", "/dashboard/stream"),
])
async def test_a_host_not_ours_is_refused_on_every_path(
    app: Quart, client: Client, method: str, path: str
) -> None:
    """A DNS-rebinding page (evil.example resolving to 127.0.0.1) can neither read nor act."""
    response = await client.open(path, method=method, json={"data": "x", "feedback": "approved"},
                                 headers={"Host": "evil.example:8000"})
    assert response.status_code == 400, await response.get_data()
    assert "Location" not in response.headers
    if method != "HEAD":  # JSON, or a page for the browser UI's own routes
        text = await response.get_data(as_text=True)
        assert "evil.example" in text and "--allowed-hosts" in text
    runner: Runner = app.extensions["runner"]
    assert (await runner.list_tasks(None, 10, 0, by=OPERATOR))[1] == 0


async def test_a_browser_sent_to_a_host_not_ours_gets_a_readable_page(client: Client) -> None:
    for path in ("/", "/stream", "/nowhere"):
        response = await client.get(path, headers={"Host": "evil.example",
                                                   "Accept": CHROMIUM_ACCEPT})
        assert response.status_code == 400
        assert response.content_type.startswith("text/html"), path
        assert "evil.example" in await response.get_data(as_text=True)


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "LOCALHOST:8000", "127.0.0.1",
                                  "127.0.0.1:45123", "[::1]", "[::1]:8000"])
async def test_the_default_hosts_are_loopback_names_with_or_without_a_port(
    client: Client, host: str
) -> None:
    assert (await client.get("/healthz", headers={"Host": host})).status_code == 200
    assert (await client.post("/submit", json={"data": "x"}, headers={"Host": host})
            ).status_code == 202


@pytest.mark.parametrize("host", ["", "evil.example", "localhost.evil.example", "127.0.0.2",
                                  "localhost:x", "user@localhost", "[::2]"])
async def test_other_hosts_are_refused_by_default(client: Client, host: str) -> None:
    assert (await client.get("/healthz", headers={"Host": host})).status_code == 400


async def test_allowed_hosts_replace_the_defaults(config: Config) -> None:
    config = config.with_changes(allowed_hosts=("hitl.example", "review.example:8443"))
    app = create_app(config)
    async with app.test_app():
        client = app.test_client()
        for host, status in (("hitl.example", 200), ("hitl.example:80", 200),
                             ("review.example:8443", 200), ("review.example", 400),
                             ("review.example:8000", 400), ("localhost", 400)):
            response = await client.get("/healthz", headers={"Host": host})
            assert response.status_code == status, host


async def test_a_star_allows_any_host(config: Config) -> None:
    app = create_app(config.with_changes(allowed_hosts=("*",)))
    async with app.test_app():
        response = await app.test_client().get("/healthz", headers={"Host": "anything.example"})
        assert response.status_code == 200


async def test_listening_on_every_interface_allows_the_machines_names_and_addresses(
    config: Config,
) -> None:
    app = create_app(config.with_changes(host="0.0.0.0"))
    async with app.test_app():
        client = app.test_client()
        for host, status in ((socket.gethostname(), 200), ("192.168.1.20:8000", 200),
                             ("[fe80::1]:8000", 200), ("localhost", 200),
                             ("evil.example", 400), ("192.168.1.20.nip.io", 400)):
            response = await client.get("/healthz", headers={"Host": host})
            assert response.status_code == status, host


async def test_an_unknown_url_is_a_page_for_browsers_and_json_for_api_clients(
    client: Client,
) -> None:
    response = await client.get("/no/such/page", headers={"Accept": CHROMIUM_ACCEPT})
    assert response.status_code == 404 and response.content_type.startswith("text/html")
    assert "<h1>Not Found" in await response.get_data(as_text=True)
    for accept in ("*/*", "application/json", "application/json, text/html"):
        response = await client.get("/no/such/page", headers={"Accept": accept})
        assert response.status_code == 404 and "error" in await response.get_json(), accept


def test_allowed_hosts_come_from_the_flag_then_the_environment() -> None:
    env = {"HITL_ALLOWED_HOSTS": " Hitl.Example , [::1]:8000,"}
    assert Config.load({}, env).allowed_hosts == ("hitl.example", "[::1]:8000")
    assert Config.load({"allowed_hosts": "a.example"}, env).allowed_hosts == ("a.example",)
    assert Config.load({}, {}).allowed_hosts == ()
    with pytest.raises(ConfigError, match="HITL_ALLOWED_HOSTS"):
        Config.load({}, {"HITL_ALLOWED_HOSTS": " , "})
    with pytest.raises(ConfigError, match="--allowed-hosts"):
        Config.load({"allowed_hosts": "http://x.example/"}, {})


async def test_the_host_check_holds_over_real_http(live_server: LiveServer) -> None:
    async with live_server.http() as http:
        assert (await http.get("/healthz")).status_code == 200  # Host: 127.0.0.1:<port>
        for method, path in (("GET", "/stream"), ("HEAD", "/stream"), ("POST", "/submit"),
                             ("GET", "/api/tasks")):
            response = await http.request(method, path, json={"data": "x"},
                                          headers={"Host": "evil.example"})
            assert response.status_code == 400, (method, path)
            assert response.headers["content-type"] == "application/json"
        assert live_server.app.extensions["broker"].subscriber_count() == 0


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
