"""The PocketFlow reference page, served from hitl's own origin, works against hitl
unchanged: it submits, opens the task's stream at once, and decides with a bare
``{"feedback"}``, signed in (its same-origin fetches send the session cookie) or with
sign-in off.

The page is served at hitl's origin by the browser's router, as a proxy in front of
hitl would serve it, so it runs under its own headers (its inline script included)
rather than hitl's Content-Security-Policy.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, Route, expect

from hitl import Config
from hitl.accounts import Role

from ..conftest import LiveServer
from .conftest import Session, browser_test, server_with_session
from .test_sign_in import PASSWORD, accounts_of, sign_in

pytestmark = browser_test

PAGE = (Path(__file__).parent / "pages" / "pocketflow_hitl.html").read_text()
PATH = "/pocketflow/"  # a path hitl does not serve


async def open_reference_page(session: Session) -> Page:
    async def serve(route: Route) -> None:
        await route.fulfill(status=200, content_type="text/html; charset=utf-8", body=PAGE)

    await session.context.route(session.origin + PATH, serve)  # the last route added wins
    return await session.open(PATH)


async def submit(page: Page, text: str) -> str:
    await page.get_by_label("Enter data to process").fill(text)
    await page.get_by_role("button", name="Submit").click()
    await expect(page.locator("#task-id")).not_to_have_text("none")
    return await page.locator("#task-id").inner_text()


async def under_review(page: Page, attempt: int) -> str:
    """Wait until the page shows attempt ``attempt`` for review; its output."""
    await expect(page.locator("#status")).to_have_text("waiting_for_review")
    await expect(page.locator("#output")).to_contain_text(f"attempt {attempt}")
    return await page.locator("#output").inner_text()


async def statuses(page: Page) -> list[str]:
    return [entry.split('"status":"')[1].split('"')[0]
            for entry in await page.locator("#log li").all_inner_texts() if '"status":"' in entry]


@pytest.fixture
def config(config: Config) -> Config:
    return config.with_changes(auth="accounts")


async def test_the_reference_page_runs_a_task_to_the_end_with_sign_in_off(
    browser: Browser, config: Config
) -> None:
    async with server_with_session(browser, config.with_changes(auth="none")) as running:
        await run_to_the_end(running[1], running[0])


async def run_to_the_end(session: Session, live_server: LiveServer) -> None:
    page = await open_reference_page(session)
    task_id = await submit(page, "Translate the release notes")
    first = await under_review(page, 1)
    await page.get_by_role("button", name="Reject").click()  # no comment: the API takes it
    second = await under_review(page, 2)
    assert second != first
    await page.get_by_role("button", name="Approve").click()
    await expect(page.locator("#status")).to_have_text("stream_closed")
    await expect(page.locator("#final")).to_have_text(second)
    await expect(page.locator("#error")).to_have_text("")
    seen = await statuses(page)
    assert seen[-3:] == ["processing_feedback", "completed", "stream_closed"], seen
    assert seen.count("waiting_for_review") == 2, seen  # each attempt, once: nothing missed
    async with live_server.http() as http:
        task = (await http.get(f"/api/tasks/{task_id}")).json()
    assert [r["decision"] for r in task["reviews"]] == ["rejected", "approved"]
    assert task["status"] == "completed" and task["final_result"] == second


async def test_the_reference_page_works_for_a_signed_in_browser(
    session: Session, live_server: LiveServer
) -> None:
    accounts = accounts_of(live_server)
    await accounts.add_user("ann", Role.REVIEWER,
                            password=PASSWORD)
    await accounts.add_user("bob", Role.REVIEWER)
    _, bobs_token = await accounts.create_token("bob")
    signed_out = await open_reference_page(session)
    await signed_out.get_by_label("Enter data to process").fill("refused")
    await signed_out.get_by_role("button", name="Submit").click()
    await expect(signed_out.locator("#error")).to_contain_text("sign in first")

    login = await session.open("/login")
    await sign_in(login, "ann")
    page = await open_reference_page(session)
    task_id = await submit(page, "Summarise the report")
    await under_review(page, 1)
    async with live_server.http(headers={"Authorization": f"Bearer {bobs_token}"}) as bob:
        assert (await bob.post(f"/feedback/{task_id}", json={"feedback": "rejected"})
                ).status_code == 200
        second = await under_review(page, 2)
        # ann's own fetch reaches the policy (the cookie went with it, the Origin is hitl's):
        # she submitted the task, so she may not decide it.
        await page.get_by_role("button", name="Approve").click()
        await expect(page.locator("#error")).to_contain_text("you submitted this task")
        assert (await bob.post(f"/feedback/{task_id}", json={"feedback": "approved"})
                ).status_code == 200
        await expect(page.locator("#status")).to_have_text("stream_closed")
        await expect(page.locator("#final")).to_have_text(second)
        task = (await bob.get(f"/api/tasks/{task_id}")).json()
    assert task["submitted_by"] == "ann"
    assert [(r["reviewer"], r["decision"]) for r in task["reviews"]] == [
        ("bob", "rejected"), ("bob", "approved")]
