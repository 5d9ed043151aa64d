"""Signing in, in a real browser, and what a page of another site can do in it: nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, Page, Response, Route, expect

from hitl import Config
from hitl.accounts import Accounts, Role

from ..conftest import LiveServer
from ..serverproc import ServerProcess
from ..test_auth_pages import LINK
from .conftest import Session, browser_test, eventually, new_session, seen, server_with_session

pytestmark = browser_test

PASSWORD = "correct horse battery"
BOB = "\u05d1\u05d5\u05d1 (Bob)"  # right-to-left letters: isolated, they reorder nothing else


@pytest.fixture
def config(config: Config) -> Config:
    return config.with_changes(auth="accounts")


def accounts_of(server: LiveServer) -> Accounts:
    return server.app.extensions["identity"].accounts  # type: ignore[no-any-return]


async def sign_in(page: Page, name: str, password: str = PASSWORD) -> Response | None:
    """Fill in the sign-in form the page shows, and send it; the answer to the post."""
    await page.get_by_label("User name").fill(name)
    await page.get_by_label("Password").fill(password)
    async with page.expect_response(lambda r: r.request.method == "POST") as answer:
        await page.get_by_role("button", name="Sign in").click()
    return await answer.value


async def goto(session: Session, path: str) -> tuple[Page, Response | None]:
    """Open ``path`` in a new page of the session, with the answer to the navigation."""
    page = await session.context.new_page()
    session.pages.append(page)
    return page, await page.goto(session.origin + path)


async def test_the_first_start_link_signs_the_admin_in_once(browser: Browser,
                                                            tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "hitl.db", env={"HITL_AUTH": "accounts"})
    await asyncio.to_thread(server.start)
    try:
        match = LINK.search(server.log())
        assert match, server.log()
        link = match[1].removeprefix(server.url)
        first = await new_session(browser, server.url)
        page, response = await goto(first, link)
        assert response is not None and response.ok
        assert page.url == server.url + "/"
        await expect(page.locator("header .who bdi")).to_have_text("Administrator")
        await expect(page.get_by_role("button", name="Sign out")).to_be_visible()
        second = await new_session(browser, server.url)
        page, response = await goto(second, link)
        assert response is not None and response.status == 410
        await expect(page.locator("main")).to_contain_text("sign-in link is used, expired")
        await expect(page.locator("header .who")).to_have_count(0)
        for session in (first, second):
            await session.context.close()
            assert session.outside == []
    finally:
        await asyncio.to_thread(server.stop)


async def test_sign_in_with_a_password_then_sign_out(session: Session,
                                                     live_server: LiveServer) -> None:
    await accounts_of(live_server).add_user("ann", Role.REVIEWER, password=PASSWORD,
                                            display_name="Ann Example")
    page = await session.open("/dashboard")
    await expect(page).to_have_url(live_server.url + "/login?next=%2Fdashboard")
    response = await sign_in(page, "ann")
    assert response is not None and response.status == 303
    await expect(page).to_have_url(live_server.url + "/dashboard")
    await expect(page.locator("header .who bdi")).to_have_text("Ann Example")
    [cookie] = [c for c in await session.context.cookies() if c["name"] == "hitl_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and not cookie["secure"]
    assert "hitl_session" not in await page.evaluate("document.cookie")  # no script reads it

    await page.get_by_role("button", name="Sign out").click()
    await expect(page).to_have_url(live_server.url + "/login")
    await expect(page.locator("header .who")).to_have_count(0)
    assert not [c for c in await session.context.cookies() if c["name"] == "hitl_session"]
    await page.goto(live_server.url + "/dashboard")
    await expect(page).to_have_url(live_server.url + "/login?next=%2Fdashboard")


async def test_the_sixth_failed_sign_in_is_refused_even_with_the_right_password(
    session: Session, live_server: LiveServer
) -> None:
    await accounts_of(live_server).add_user("ann", Role.REVIEWER, password=PASSWORD)
    page = await session.open("/login")
    for attempt in range(5):
        response = await sign_in(page, "ann", f"guess number {attempt}")
        assert response is not None and response.status == 401
        await expect(page.get_by_role("alert")).to_have_text("Wrong user name or password.")
    response = await sign_in(page, "ann", PASSWORD)
    assert response is not None and response.status == 429
    assert 1 <= int(await response.header_value("retry-after") or 0) <= 60
    await expect(page.get_by_role("alert")).to_contain_text("Too many failed sign-ins")
    await expect(page.get_by_label("User name")).to_have_value("ann")
    assert not [c for c in await session.context.cookies() if c["name"] == "hitl_session"]


async def test_two_browsers_each_see_their_own_name(browser: Browser, session: Session,
                                                    live_server: LiveServer) -> None:
    accounts = accounts_of(live_server)
    await accounts.add_user("ann", Role.REVIEWER, password=PASSWORD, display_name="Ann")
    await accounts.add_user("bob", Role.VIEWER, password=PASSWORD, display_name=BOB)
    other = await new_session(browser, live_server.url)
    try:
        pages = {}
        for who, profile in (("ann", session), ("bob", other)):
            page = await profile.open("/login")
            await sign_in(page, who)
            await expect(page).to_have_url(live_server.url + "/")
            pages[who] = page
        await expect(pages["ann"].locator("header .who bdi")).to_have_text("Ann")
        await expect(pages["bob"].locator("header .who bdi")).to_have_text(BOB)
        tokens = [await page.locator('meta[name="csrf-token"]').get_attribute("content")
                  for page in pages.values()]
        assert tokens[0] and tokens[1] and tokens[0] != tokens[1]
        for page in pages.values():
            await page.reload()
        await expect(pages["ann"].locator("header .who bdi")).to_have_text("Ann")
    finally:
        await other.context.close()
    assert other.outside == []


@asynccontextmanager
async def other_site(html: str) -> AsyncIterator[str]:
    """A page served from another loopback port: another origin, though the same site
    (so a browser sends hitl's SameSite=Lax cookie with its requests)."""
    body = html.encode()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


def forging_page(hitl: str, task_id: str) -> str:
    """Tries to decide and cancel the task: by plain form posts, and by fetch (simple
    requests, which need no preflight: the browser sends them, with the cookie)."""
    return f"""<!doctype html><title>cute cats</title>
<form id="decide" method="post" action="{hitl}/tasks/{task_id}/decision">
  <input name="feedback" value="approved"><input name="attempt" value="1">
  <input name="reviewer" value="mallory"><input name="csrf_token" value="guessed">
</form>
<form id="cancel" method="post" action="{hitl}/api/tasks/{task_id}/cancel"></form>
<script>
window.forge = function () {{
  var tries = [
    fetch("{hitl}/tasks/{task_id}/decision", {{method: "POST", mode: "no-cors",
      credentials: "include", body: new URLSearchParams({{feedback: "approved", attempt: "1"}})}}),
    fetch("{hitl}/feedback/{task_id}", {{method: "POST", mode: "no-cors",
      credentials: "include", headers: {{"Content-Type": "text/plain"}},
      body: JSON.stringify({{feedback: "approved"}})}}),
    fetch("{hitl}/feedback/{task_id}", {{method: "POST", credentials: "include",
      headers: {{"Content-Type": "application/json"}},
      body: JSON.stringify({{feedback: "approved"}})}})
  ];
  return Promise.allSettled(tries).then(function (results) {{
    return results.map(function (r) {{ return r.status; }});
  }});
}};
</script>"""


async def forge(session: Session, hitl: str, task_id: str) -> dict[str, int]:
    """Open the forging page in the session's browser and let it try; what hitl answered."""
    answers: dict[str, int] = {}
    async with other_site(forging_page(hitl, task_id)) as site:
        async def let_through(route: Route) -> None:
            await route.continue_()

        await session.context.route(site + "/**", let_through)  # past the fence, for this
        page = await session.context.new_page()
        session.pages.append(page)

        def record(response: Response) -> None:
            if response.url.startswith(hitl) and response.request.method == "POST":
                kind = response.request.headers.get("content-type", "none").split(";")[0]
                answers[f"fetch {response.url.removeprefix(hitl)} {kind}"] = response.status

        page.on("response", record)
        await page.goto(site + "/")
        assert await page.evaluate("window.forge()") == ["fulfilled", "fulfilled", "rejected"]
        page.remove_listener("response", record)
        for form in ("decide", "cancel"):
            await page.goto(site + "/")
            async with page.expect_navigation() as navigation:
                await page.evaluate(f"document.getElementById('{form}').submit()")
            response = await navigation.value
            assert response is not None
            answers[f"form {form}"] = response.status
            await expect(page.locator("body")).to_contain_text("cross-site request refused")
    return answers


async def wait_for_review(http: httpx.AsyncClient, task_id: str) -> dict[str, object]:
    for _ in range(200):
        task: dict[str, object] = (await http.get(f"/api/tasks/{task_id}")).json()
        if task["status"] == "waiting_for_review":
            return task
        await asyncio.sleep(0.05)
    raise AssertionError(f"never waited for review: {task}")


async def refused_then_decided_here(session: Session, http: httpx.AsyncClient, hitl: str,
                                    task_id: str) -> None:
    """Every forged request is refused, the task is unchanged, and the same browser
    decides it from hitl's own page."""
    answers = await forge(session, hitl, task_id)
    assert answers == {
        f"fetch /tasks/{task_id}/decision application/x-www-form-urlencoded": 403,
        f"fetch /feedback/{task_id} text/plain": 403,
        "form decide": 403, "form cancel": 403,
    }, answers  # the JSON fetch needs a preflight, which hitl never answers: not sent
    task = await wait_for_review(http, task_id)
    assert task["reviews"] == [] and task["attempt"] == 1
    page = await session.open(f"/tasks/{task_id}")
    await page.get_by_role("button", name="Approve").click()
    await expect(page.locator("#task-status [data-status]")).to_have_attribute(
        "data-status", "completed")


async def test_another_site_cannot_decide_in_a_signed_in_browser(
    session: Session, live_server: LiveServer
) -> None:
    accounts = accounts_of(live_server)
    await accounts.add_user("ann", Role.REVIEWER, password=PASSWORD)
    await accounts.add_user("sub", Role.SUBMITTER)
    _, token = await accounts.create_token("sub")
    async with live_server.http(headers={"Authorization": f"Bearer {token}"}) as http:
        task_id = (await http.post("/submit", json={"data": "forge me"})).json()["task_id"]
        await wait_for_review(http, task_id)
        page = await session.open("/login")
        await sign_in(page, "ann")
        await expect(page.locator("header .who bdi")).to_have_text("ann")
        await refused_then_decided_here(session, http, live_server.url, task_id)


async def test_another_site_cannot_decide_with_sign_in_off(
    browser: Browser, config: Config
) -> None:
    """The original report: with no sign-in at all, a cross-site form post approved."""
    async with (server_with_session(browser, config.with_changes(auth="none"))
                as (server, session), server.http() as http):
        task_id = (await http.post("/submit", json={"data": "forge me"})).json()["task_id"]
        await wait_for_review(http, task_id)
        await refused_then_decided_here(session, http, server.url, task_id)


async def test_htmx_sends_the_pages_token_and_fills_swapped_in_forms(
    browser: Browser, config: Config
) -> None:
    async with server_with_session(browser, config.with_changes(auth="none")) as (server,
                                                                                  session):
        async with server.http() as http:
            task_id = (await http.post("/submit", json={"data": "decide me"})).json()["task_id"]
            await wait_for_review(http, task_id)
        page = await session.open(f"/tasks/{task_id}")
        token = await page.locator('meta[name="csrf-token"]').get_attribute("content")
        assert token

        async def redrawn() -> bool:  # the stream has redrawn the form, with no token in it
            return bool(await seen(page, "review"))

        await eventually(redrawn)
        fields = await page.locator('#task-review input[name="csrf_token"]').all()
        assert len(fields) == 3  # the decision's, Edit's and Cancel's
        for field in fields:
            await expect(field).to_have_value(token)
        async with page.expect_request(lambda r: r.method == "POST") as posted:
            await page.get_by_role("button", name="Approve").click()
        request = await posted.value
        assert await request.header_value("x-csrf-token") == token
        assert f"csrf_token={token}" in (request.post_data or "")
        await expect(page.locator("#flash")).to_contain_text("was recorded")
