"""The request guard (:mod:`hitl.guard`): the Host check on every path, both paths."""

from __future__ import annotations

import asyncio
import socket

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from hitl import Config, create_app
from hitl.errors import ConfigError
from hitl.runner import Runner

from .conftest import OPERATOR, LiveServer
from .test_request_path import CHROMIUM_ACCEPT


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
    response = await asyncio.wait_for(client.open(  # bounded: a stream let through would hang
        path, method=method, json={"data": "x", "feedback": "approved"},
        headers={"Host": "evil.example:8000"}), 5)
    assert response.status_code == 400, await response.get_data()
    assert "Location" not in response.headers
    if method != "HEAD":  # JSON, or a page for the browser UI's own routes
        text = await response.get_data(as_text=True)
        assert "evil.example" in text and "--allowed-hosts" in text
    runner: Runner = app.extensions["runner"]
    assert (await runner.list_tasks(None, 10, 0, by=OPERATOR))[1] == 0


async def test_a_browser_sent_to_a_host_not_ours_gets_a_readable_page(client: Client) -> None:
    for path in ("/", "/stream", "/nowhere"):
        response = await asyncio.wait_for(client.get(path, headers={
            "Host": "evil.example", "Accept": CHROMIUM_ACCEPT}), 5)
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
