"""``--auth proxy``: who is asking comes from X-Forwarded-User (-Groups, -Email), believed
only from a ``--trusted-proxies`` address; from any other, the headers count for nothing."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from hitl import Config
from hitl.accounts import Accounts, Role

from .conftest import CSRF_META, LiveServer, start_server, stop_server

CAROL = {"X-Forwarded-User": "carol", "X-Forwarded-Groups": "legal, ops",
         "X-Forwarded-Email": "carol@example.com"}


@asynccontextmanager
async def proxied(config: Config, trusted: str, **changes: str) -> AsyncIterator[LiveServer]:
    """A live server in proxy mode that believes ``trusted`` (the test talks from 127.0.0.1)."""
    server = await start_server(config.with_changes(auth="proxy", trusted_proxies=(trusted,),
                                                    **changes))
    try:
        yield server
    finally:
        await stop_server(server)


def accounts_of(server: LiveServer) -> Accounts:
    return server.app.extensions["identity"].accounts  # type: ignore[no-any-return]


async def stream_status(http: httpx.AsyncClient, path: str, headers: dict[str, str]) -> int:
    async with http.stream("GET", path, headers=headers) as response:
        return response.status_code


async def test_a_trusted_proxy_says_who_is_asking(config: Config) -> None:
    async with proxied(config, "127.0.0.0/8") as server, server.http(headers=CAROL) as http:
        assert (await http.get("/api/tasks")).status_code == 200
        response = await http.post("/submit", json={"data": "from behind the proxy"})
        assert response.status_code == 202
        assert await stream_status(http, "/stream", CAROL) == 200
        carol = await accounts_of(server).user("carol")
        assert carol is not None and carol.role is Role.REVIEWER  # --proxy-default-role
        assert carol.groups == ("legal", "ops") and carol.display_name == "carol@example.com"
        page = (await http.get("/")).text
        assert "Signed in as <bdi>carol@example.com</bdi>" in page
        assert "Sign out" not in page  # the proxy keeps the session, not hitl
        token = CSRF_META.search(page)
        assert token, "the page carries the form token"
        response = await http.post("/tasks", data={"data": "a form", "csrf_token": token[1]})
        assert response.status_code == 303, response.text
        response = await http.post("/tasks", data={"data": "a forged form"})
        assert response.status_code == 403


async def test_an_untrusted_address_is_not_believed(config: Config) -> None:
    """127.0.0.1 is outside 10.0.0.0/8: its X-Forwarded-User is anyone's claim."""
    async with proxied(config, "10.0.0.0/8") as server, server.http(headers=CAROL) as http:
        for response in (await http.get("/api/tasks"),
                         await http.post("/submit", json={"data": "sneak in"})):
            assert response.status_code == 401
            assert "sign in first" in response.json()["error"]
        assert await stream_status(http, "/stream", CAROL) == 401
        response = await http.get("/dashboard", headers={"Accept": "text/html"})
        assert response.status_code == 303 and response.headers["Location"].startswith("/login")
        assert await accounts_of(server).user("carol") is None
        # A token still works from anywhere.
        await accounts_of(server).add_user("bot", Role.SUBMITTER)
        _, token = await accounts_of(server).create_token("bot")
        response = await http.get("/api/tasks", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200


@pytest.mark.parametrize(("headers", "says"), [
    ({}, "sign in first"),
    ({"X-Forwarded-User": ""}, "sign in first"),
    ({"X-Forwarded-User": "carol (CEO)"}, "X-Forwarded-User is not usable"),
    ({"X-Forwarded-User": "c\u0430rol".encode()}, "X-Forwarded-User is not usable"),  # Cyrillic
])
async def test_a_trusted_proxy_without_a_usable_user_signs_no_one_in(
    config: Config, headers: dict[str, str | bytes], says: str
) -> None:
    async with proxied(config, "127.0.0.0/8") as server, server.http() as http:
        response = await http.get("/api/tasks", headers=headers)
        assert response.status_code == 401 and says in response.json()["error"]


async def test_a_user_first_seen_gets_the_default_role_unless_an_account_says(
    config: Config
) -> None:
    async with proxied(config, "127.0.0.0/8", proxy_default_role="viewer") as server:
        await accounts_of(server).add_user("dave", Role.ADMIN)
        async with server.http() as http:
            for name in ("erin", "dave"):
                response = await http.get("/", headers={"X-Forwarded-User": name})
                assert re.search(rf"<bdi>{name}</bdi>", response.text), name
        erin, dave = [await accounts_of(server).user(name) for name in ("erin", "dave")]
        assert erin is not None and erin.role is Role.VIEWER
        assert dave is not None and dave.role is Role.ADMIN


async def signed_in_cookie(server: LiveServer, name: str) -> str:
    """A browser session's cookie value, for a user who signed in with a password."""
    user = await accounts_of(server).add_user(name, Role.REVIEWER)
    session_id = await accounts_of(server).start_session(user, "password")
    return server.app.extensions["identity"].cookie.dump_token(  # type: ignore[no-any-return]
        session_id, server.app)


@pytest.mark.parametrize(("trusted", "status"), [("127.0.0.0/8", 303), ("10.0.0.0/8", 403)])
async def test_a_trusted_proxy_that_terminates_https_says_so(
    config: Config, trusted: str, status: int
) -> None:
    """Browsers behind a TLS proxy send ``Origin: https://...`` while hitl hears plain
    http: X-Forwarded-Proto, from a trusted proxy only, says which scheme they used."""
    headers = {**CAROL, "Host": "hitl.example.com", "X-Forwarded-Proto": "https"}
    async with proxied(config, trusted, allowed_hosts=("hitl.example.com",)) as server:
        async with server.http(headers=headers) as http:
            http.cookies.set("hitl_session", await signed_in_cookie(server, "dave"))
            page = (await http.get("/")).text
            token = CSRF_META.search(page)
            assert token, page
            response = await http.post("/tasks", headers={"Origin": "https://hitl.example.com"},
                                       data={"data": "through TLS", "csrf_token": token[1]})
            assert response.status_code == status, response.text
