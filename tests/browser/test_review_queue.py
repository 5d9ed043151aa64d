"""The review queue in real Chromium: two signed-in reviewers, "Review next" hands each a
different task, each sees who holds the other's live, and a decision offers the next."""

from __future__ import annotations

import asyncio

import pytest
from playwright.async_api import Browser, expect

from hitl import Config
from hitl.accounts import Role

from ..conftest import LiveServer
from .conftest import Session, browser_test, new_session
from .test_sign_in import PASSWORD, accounts_of, sign_in

pytestmark = browser_test


@pytest.fixture
def config(config: Config) -> Config:
    return config.with_changes(auth="accounts", process_delay=0)


async def signed_in(browser: Browser, server: LiveServer, name: str) -> Session:
    session = await new_session(browser, server.url)
    page = await session.open("/login")
    await sign_in(page, name)
    await expect(page.locator("header .who bdi")).to_have_text(name.title())
    return session


async def test_review_next_reserves_shows_live_and_offers_the_next(
    browser: Browser, live_server: LiveServer
) -> None:
    accounts = accounts_of(live_server)
    for name, role in (("ann", Role.REVIEWER), ("bob", Role.REVIEWER), ("sam", Role.SUBMITTER)):
        await accounts.add_user(name, role, password=PASSWORD, display_name=name.title())
    token = (await accounts.create_token("sam"))[1]
    async with live_server.http(headers={"Authorization": f"Bearer {token}"}) as http:
        ids = [(await http.post("/submit", json={"data": f"task {n}"})).json()["task_id"]
               for n in range(3)]
        for task_id in ids:
            while (await http.get(f"/api/tasks/{task_id}")).json()["status"] != (
                    "waiting_for_review"):
                await asyncio.sleep(0.02)
    ann = await signed_in(browser, live_server, "ann")
    bob = await signed_in(browser, live_server, "bob")
    sessions = [ann, bob]
    try:
        ann_page, bob_page = ann.pages[0], bob.pages[0]
        await ann_page.get_by_role("link", name="Review next").click()
        await expect(ann_page).to_have_url(f"{live_server.url}/tasks/{ids[0]}")
        await bob_page.get_by_role("link", name="Review next").click()
        await expect(bob_page).to_have_url(f"{live_server.url}/tasks/{ids[1]}")  # ann's skipped
        # Bob's dashboard shows who holds which, live.
        board = await bob.open("/dashboard?status=waiting_for_review")
        await expect(board.locator(f"#task-{ids[0]} .reserved")).to_contain_text(
            "Ann is reviewing")
        await expect(board.locator(f"#task-{ids[1]} .reserved")).to_contain_text(
            "Bob is reviewing")
        await ann_page.get_by_role("button", name="Approve").click()
        notice = ann_page.locator("#flash .notice")
        await expect(notice).to_contain_text("was recorded")
        await expect(board.locator(f"#task-{ids[0]} .reserved")).to_have_count(0)
        await notice.get_by_role("link", name="Review next").click()
        await expect(ann_page).to_have_url(f"{live_server.url}/tasks/{ids[2]}")  # not Bob's
        await expect(board.locator(f"#task-{ids[2]} .reserved")).to_contain_text(
            "Ann is reviewing")
        await expect(bob_page.locator(".review .reserved")).to_contain_text("Bob is reviewing")
    finally:
        for session in sessions:
            await session.context.close()
    for session in sessions:
        assert session.outside == [] and session.csp_reports == []

