"""Signing in with a browser: /login, the session cookie, /logout, one-time links, the
throttle, and where a signed-out browser or program is sent."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http.cookies import SimpleCookie
from pathlib import Path

import httpx
import pytest
from quart import Quart, Response
from quart.typing import TestClientProtocol as Client

from hitl import Config, create_app
from hitl.accounts import Accounts, Role, User

from .conftest import LiveServer, csrf_token
from .serverproc import ServerProcess

PASSWORD = "correct horse battery"
WRONG = "Wrong user name or password."
LINK = re.compile(r"^\s*(http://\S+/login/once/(\S+))\s*$", re.MULTILINE)


@pytest.fixture
def config(config: Config) -> Config:
    return config.with_changes(auth="accounts")


def accounts_of(app: Quart) -> Accounts:
    return app.extensions["identity"].accounts  # type: ignore[no-any-return]


@pytest.fixture
async def ann(app: Quart) -> User:
    return await accounts_of(app).add_user("ann", Role.REVIEWER, password=PASSWORD,
                                           display_name="Ann Example")


async def sign_in(client: Client, username: str = "ann", password: str = PASSWORD,
                  next: str = "/", address: str = "127.0.0.1",
                  headers: dict[str, str] | None = None, scheme: str = "http") -> Response:
    return await client.post("/login", form={"username": username, "password": password,
                                             "next": next},
                             headers=headers, scheme=scheme,
                             scope_base={"client": (address, 40000)})


async def text(response: Response) -> str:
    return await response.get_data(as_text=True)


def session_cookie(response: Response) -> SimpleCookie:
    cookies = [value for value in response.headers.getlist("Set-Cookie")
               if value.startswith("hitl_session=")]
    assert len(cookies) == 1, response.headers.getlist("Set-Cookie")
    return SimpleCookie(cookies[0])


def cookie_attributes(response: Response) -> set[str]:
    [raw] = [value for value in response.headers.getlist("Set-Cookie")
             if value.startswith("hitl_session=")]
    return {part.strip().split("=")[0].lower() for part in raw.split(";")[1:]}


async def test_a_signed_out_browser_signs_in_and_comes_back(app: Quart, client: Client,
                                                            ann: User) -> None:
    response = await client.get("/dashboard?status=pending")
    assert response.status_code == 303
    assert response.headers["Location"] == "/login?next=%2Fdashboard%3Fstatus%3Dpending"
    page = await text(await client.get(response.headers["Location"]))
    assert '<input type="hidden" name="next" value="/dashboard?status=pending">' in page
    assert 'name="username"' in page and 'name="password" type="password"' in page
    assert "Sign out" not in page
    response = await sign_in(client, next="/dashboard?status=pending")
    assert response.status_code == 303
    assert response.headers["Location"] == "/dashboard?status=pending"
    page = await text(await client.get("/dashboard"))
    assert "Signed in as <bdi>Ann Example</bdi>" in page
    assert re.search(r'<form method="post" action="/logout"[^>]*>\s*<input type="hidden" '
                     r'name="csrf_token" value="[^"]+">', page)
    assert ">Sign out</button>" in page
    response = await client.get("/login?next=/dashboard")  # signed in already: on you go
    assert (response.status_code, response.headers["Location"]) == (303, "/dashboard")


async def test_the_api_and_pages_answer_a_signed_out_client(client: Client) -> None:
    for response in (await client.get("/api/tasks"), await client.get("/api/tasks/" + "a" * 32),
                     await client.post("/submit", json={"data": "x"})):
        assert response.status_code == 401
        assert "sign in first" in (await response.get_json())["error"]
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/static/hitl.css")).status_code == 200
    assert (await client.get("/login")).status_code == 200


async def test_the_streams_answer_401_json_over_a_real_server(live_server: LiveServer) -> None:
    async with live_server.http() as http:
        for path in ("/stream", "/stream/" + "a" * 32):
            for accept in ("*/*", "text/event-stream"):
                response = await http.get(path, headers={"Accept": accept})
                assert response.status_code == 401, (path, accept)
                assert response.headers["Content-Type"].startswith("application/json")
                assert "sign in first" in response.json()["error"]


async def test_the_session_cookie_is_httponly_lax_and_secure_over_https(
    app: Quart, client: Client, ann: User
) -> None:
    response = await sign_in(client)
    cookie = session_cookie(response)["hitl_session"]
    assert cookie["path"] == "/" and cookie["samesite"] == "Lax" and cookie["httponly"]
    assert "secure" not in cookie_attributes(response)  # a browser drops it on plain http
    signer = app.extensions["identity"].cookie
    session_id = signer.load_token(cookie.value, app)
    assert session_id and await accounts_of(app).by_session(session_id) is not None
    assert app.secret_key == await accounts_of(app).secret_key()  # the key kept in the store
    response = await sign_in(app.test_client(), scheme="https")
    assert response.status_code == 303
    assert {"secure", "httponly", "samesite"} <= cookie_attributes(response)


@asynccontextmanager
async def restarted(config: Config) -> AsyncIterator[Client]:
    """Another app on the same database, as after a restart."""
    app = create_app(config)
    async with app.test_app():
        yield app.test_client()


async def test_a_session_survives_a_restart_and_another_key_refuses_it(
    config: Config, client: Client, ann: User
) -> None:
    cookie = session_cookie(await sign_in(client))["hitl_session"].value
    headers = {"Cookie": f"hitl_session={cookie}"}
    async with restarted(config) as again:  # same database, same key
        assert (await again.get("/", headers=headers)).status_code == 200
    async with restarted(config.with_changes(secret_key="another key")) as other:
        assert other.app.secret_key == "another key"  # type: ignore[attr-defined]
        response = await other.get("/", headers=headers)
        assert response.status_code == 303 and response.headers["Location"].startswith(
            "/login")


async def test_a_wrong_password_and_an_unknown_user_get_the_same_answer(
    client: Client, ann: User
) -> None:
    answers = [await sign_in(client, "ann", "not the password"),
               await sign_in(client, "nobody", "not the password"),
               await sign_in(client, "nobody", PASSWORD)]
    for response in answers:
        assert response.status_code == 401
        assert WRONG in await text(response)
        assert not [c for c in response.headers.getlist("Set-Cookie") if "hitl_session" in c]
    response = await sign_in(client, "nobody", "x", headers={"Accept": "application/json"})
    assert (response.status_code, await response.get_json()) == (401, {"error": WRONG})


async def test_failed_sign_ins_are_throttled_per_account_and_per_address(
    app: Quart, client: Client, ann: User
) -> None:
    await accounts_of(app).add_user("bob", Role.REVIEWER, password=PASSWORD)
    for _ in range(5):
        assert (await sign_in(client, "ann", "guess", address="10.0.0.1")).status_code == 401
    for address in ("10.0.0.1", "10.0.0.2"):  # the account is throttled, from anywhere
        response = await sign_in(client, "ann", PASSWORD, address=address)
        assert response.status_code == 429
        assert 1 <= int(response.headers["Retry-After"]) <= 60
        assert "Too many failed sign-ins" in await text(response)
        assert not [c for c in response.headers.getlist("Set-Cookie") if "hitl_session" in c]
    # ... and so is the address, for every account.
    response = await sign_in(client, "bob", PASSWORD, address="10.0.0.1",
                             headers={"Accept": "application/json"})
    assert response.status_code == 429 and "Retry-After" in response.headers
    assert "Too many failed sign-ins" in (await response.get_json())["error"]
    assert (await sign_in(client, "bob", PASSWORD, address="10.0.0.3")).status_code == 303


@pytest.mark.parametrize("target", [
    "//evil.example/x", "https://evil.example/", "/\\evil.example", "\\\\evil.example",
    "javascript:alert(1)", "/\t/evil.example", "/\n/evil.example", "http:/evil.example",
    "", "dashboard", "/" + "x" * 3000,
])
async def test_next_is_a_local_path_only(client: Client, ann: User, target: str) -> None:
    page = await text(await client.get("/login", query_string={"next": target}))
    assert '<input type="hidden" name="next" value="/">' in page
    response = await sign_in(client, next=target)
    assert (response.status_code, response.headers["Location"]) == (303, "/")


@pytest.mark.parametrize(("target", "location"), [
    ("/tasks/abcdef01?x=1&y=%2F", "/tasks/abcdef01?x=1&y=%2F"),
    ("/caf\u00e9", "/caf%C3%A9"),  # a header carries ASCII only
    ("/\u00a0/evil.example", "/%C2%A0/evil.example"),  # a path, not a host
])
async def test_next_keeps_a_local_path_and_its_query(client: Client, ann: User, target: str,
                                                      location: str) -> None:
    response = await sign_in(client, next=target)
    assert response.headers["Location"] == location


@pytest.mark.parametrize(("origin", "status"), [
    ("http://127.0.0.1:9999", 403), ("http://localhost:8001", 403), ("null", 403),
    ("http://localhost", 303), (None, 303),
])
async def test_sign_in_is_refused_from_another_origin(
    client: Client, ann: User, origin: str | None, status: int
) -> None:
    """Login CSRF: another site's page must not sign a visitor in (as the attacker)."""
    headers = {"Origin": origin} if origin else {}
    response = await sign_in(client, headers=headers)
    assert response.status_code == status
    signed = [c for c in response.headers.getlist("Set-Cookie") if "hitl_session" in c]
    assert bool(signed) == (status == 303)


async def test_sign_out_needs_the_token_and_ends_the_session(
    app: Quart, client: Client, ann: User
) -> None:
    cookie = session_cookie(await sign_in(client))["hitl_session"].value
    for forged in ({"csrf_token": ""}, {"csrf_token": "guessed"}):  # a form from elsewhere
        assert (await client.post("/logout", form=forged)).status_code == 403
    assert (await client.get("/")).status_code == 200  # still signed in
    response = await client.post("/logout", form={"csrf_token": await csrf_token(client)})
    assert (response.status_code, response.headers["Location"]) == (303, "/login")
    assert session_cookie(response)["hitl_session"].value == ""  # the browser forgets it
    replay = app.test_client()  # the old cookie, kept by someone: the session has ended
    response = await replay.get("/", headers={"Cookie": f"hitl_session={cookie}"})
    assert response.status_code == 303 and response.headers["Location"].startswith("/login")


async def test_a_one_time_link_signs_in_once(app: Quart, client: Client, ann: User) -> None:
    secret = await accounts_of(app).create_link("ann")
    response = await client.get(f"/login/once/{secret}")
    assert (response.status_code, response.headers["Location"]) == (303, "/")
    session_id = app.extensions["identity"].cookie.load_token(
        session_cookie(response)["hitl_session"].value, app)
    identity = await accounts_of(app).by_session(session_id)
    assert identity is not None and (identity.name, identity.method) == ("ann", "link")
    assert "<bdi>Ann Example</bdi>" in await text(await client.get("/"))
    for path, status in ((f"/login/once/{secret}", 410), ("/login/once/unknown", 410),
                         ("/login/once/" + "x" * 300, 400)):
        response = await app.test_client().get(path)
        assert response.status_code == status, path
        page = await text(response)
        assert "<!doctype html>" in page and "sign-in link" in page, path
        assert not [c for c in response.headers.getlist("Set-Cookie") if "hitl_session" in c]


async def test_signing_in_again_ends_the_previous_session(
    app: Quart, client: Client, ann: User
) -> None:
    first = session_cookie(await sign_in(client))["hitl_session"].value
    await client.post("/login", form={"username": "ann", "password": PASSWORD,
                                      "csrf_token": await csrf_token(client)})
    response = await app.test_client().get("/", headers={"Cookie": f"hitl_session={first}"})
    assert response.status_code == 303


async def test_sign_in_is_off_with_auth_none(tmp_path: Path) -> None:
    app = create_app(Config(db=str(tmp_path / "none.db"), auth="none", process_delay=0))
    async with app.test_app():
        client = app.test_client()
        response = await client.get("/login?next=/dashboard")
        assert (response.status_code, response.headers["Location"]) == (303, "/dashboard")
        page = await text(await client.get("/"))
        assert "Sign out" not in page and "Signed in as" not in page


@pytest.mark.slow
def test_the_first_start_prints_a_link_that_signs_in_the_admin_once(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "hitl.db", env={"HITL_AUTH": "accounts"}).start()
    try:
        match = LINK.search(server.log())
        assert match, server.log()
        assert match[1].startswith(server.url + "/login/once/")
        with httpx.Client(base_url=server.url) as browser:
            response = browser.get(match[1])
            assert (response.status_code, response.headers["Location"]) == (303, "/")
            page = browser.get("/")
            assert page.status_code == 200 and "<bdi>Administrator</bdi>" in page.text
        with httpx.Client(base_url=server.url) as again:
            response = again.get(match[1], headers={"Accept": "text/html"})
            assert response.status_code == 410 and "sign-in link" in response.text
        assert match[2] not in (tmp_path / "hitl.db").read_bytes().decode("latin-1")
    finally:
        server.stop()
    restart = ServerProcess(tmp_path / "hitl.db", env={"HITL_AUTH": "accounts"}).start()
    try:
        assert LINK.search(restart.log()) is None, restart.log()  # an admin now: no new link
    finally:
        restart.stop()
