"""Every response carries the security headers, whichever layer answers it: Quart, the lean
stream path, the app's last-resort 500, and hypercorn's own answers to broken requests."""

from __future__ import annotations

import asyncio
import json

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from hitl.security import CSP

from .conftest import LiveServer
from .test_api import submit

EVERY_RESPONSE = {"x-content-type-options": "nosniff", "referrer-policy": "same-origin",
                  "x-frame-options": "DENY", "content-security-policy": CSP}


def assert_secured(headers: dict[str, str], cache: str | None = "no-store") -> None:
    """The headers every response carries (names in lower case), and its caching."""
    for name, value in EVERY_RESPONSE.items():
        assert headers.get(name) == value, (name, headers)
    if cache is not None:
        assert headers.get("cache-control") == cache, headers


def lower(headers: object) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}  # type: ignore[attr-defined]


async def test_csp_forbids_framing_as_x_frame_options_does() -> None:
    assert "frame-ancestors 'none'" in CSP


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/", 200), ("GET", "/dashboard", 200), ("GET", "/healthz", 200),
    ("GET", "/api/tasks", 200), ("GET", "/openapi.json", 200), ("GET", "/api/tasks/nope", 404),
    ("GET", "/no/such/page", 404), ("POST", "/submit", 415), ("GET", "/submit", 405),
    ("GET", "/stream/nope", 404), ("GET", "/stream?last_event_id=x", 400),
])
async def test_api_answers_pages_and_errors_are_secured_and_never_cached(
    client: Client, method: str, path: str, status: int
) -> None:
    response = await client.open(path, method=method)
    assert response.status_code == status
    assert_secured(lower(response.headers))


async def test_streams_are_secured_and_revalidated_and_static_files_keep_caching(
    client: Client,
) -> None:
    task_id = await submit(client)
    await client.post(f"/api/tasks/{task_id}/cancel")
    for path in ("/stream?last_event_id=0", f"/stream/{task_id}", f"/tasks/{task_id}/stream"):
        async with client.request(path) as connection:
            await connection.send_complete()
            start = await asyncio.wait_for(connection.receive(), 5)  # response start: headers
            await connection.disconnect()
        assert connection.status_code == 200, path
        assert_secured(lower(connection.headers), cache="no-cache")
    response = await client.get("/static/hitl.css")
    assert_secured(lower(response.headers), cache=None)
    assert "max-age" in response.headers["Cache-Control"]
    del start


async def test_an_exception_escaping_quart_is_a_secured_json_500(
    app: Quart, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(request: object) -> None:
        raise RuntimeError("below the error handlers")

    monkeypatch.setattr(app, "handle_request", broken)
    response = await client.get("/healthz")
    assert response.status_code == 500
    assert await response.get_json() == {"error": "internal error; it has been logged"}
    assert_secured(lower(response.headers))


async def raw_exchange(server: LiveServer, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` bytes on a new connection; the status, headers and body answered."""
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)  # the server closes after it
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


async def test_hypercorns_own_answers_are_secured_json(live_server: LiveServer) -> None:
    huge = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"x" * 100_000 + b"\r\n\r\n"
    for request, status in ((huge, 431), (b"NONSENSE\r\n\r\n", 400),
                            (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\r\n\r\n", 400)):
        answered, headers, body = await raw_exchange(live_server, request)
        assert answered == status, (request[:40], answered)
        assert_secured(headers)
        assert headers["content-type"] == "application/json"
        assert set(json.loads(body)) == {"error"}


async def test_an_exception_escaping_the_app_is_a_secured_json_500_over_http(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(request: object) -> None:
        raise RuntimeError("below the error handlers")

    monkeypatch.setattr(live_server.app, "handle_request", broken)
    async with live_server.http() as http:
        response = await http.get("/api/tasks")
        assert response.status_code == 500
        assert response.json() == {"error": "internal error; it has been logged"}
        assert_secured(lower(response.headers))
        monkeypatch.undo()
        assert (await http.get("/healthz")).status_code == 200
