"""The task page in Chromium: every attempt and its diff, keys, a comment kept when
someone else decides, Cancel, local times, and no accessibility violations (axe-core)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, Page, Route, expect

from ..conftest import LiveServer, ReviewActions
from .conftest import Session, axe_violations, browser_test, marker_kept, new_session

pytestmark = browser_test

DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


async def waiting_on(actions: ReviewActions, task_id: str, attempt: int) -> None:
    """Until the task waits for review on ``attempt`` (asked of the API)."""
    async def poll() -> None:
        while True:
            task = (await actions.http.get(f"/api/tasks/{task_id}")).json()
            if task["status"] == "waiting_for_review" and task["attempt"] == attempt:
                return
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), 10)


async def decide_on_page(page: Page, button: str, comment: str = "", name: str = "Ann") -> None:
    await expect(page.get_by_role("button", name=button)).to_be_enabled()
    if comment:
        await page.get_by_label("Comment").fill(comment)
    await page.get_by_label("Your name").fill(name)
    await page.get_by_role("button", name=button).click()


async def test_a_task_rejected_twice_then_approved_shows_every_output_and_diff(
    session: Session, actions: ReviewActions
) -> None:
    task_id = await actions.submit("a reply to the customer")
    page = await session.open(f"/tasks/{task_id}")
    review = page.locator("#task-review")
    await decide_on_page(page, "Reject", "Use her name")
    await expect(page.locator("#task-status .attempt")).to_have_text("Attempt 2")
    await expect(page.get_by_role("button", name="Approve")).to_be_enabled()
    await expect(review.locator(".asked")).to_have_text(
        "Attempt 2, after Ann’s comment: “Use her name”")
    await expect(review.locator(".diff del").first).to_have_text("1)")
    await expect(review.locator(".diff ins").first).to_have_text(
        "2), revised for the comment 'Use her name'")
    await decide_on_page(page, "Reject", "Say how much", name="Bob")
    await expect(page.locator("#task-status .attempt")).to_have_text("Attempt 3")
    await expect(review.locator(".asked")).to_have_text(
        "Attempt 3, after Bob’s comment: “Say how much”")
    await decide_on_page(page, "Approve")
    await expect(page.locator("#task-status [data-status]")).to_have_attribute(
        "data-status", "completed")

    attempts = page.locator("#task-history details.attempt")
    await expect(attempts).to_have_count(3)
    assert [await item.get_attribute("open") for item in await attempts.all()] == [
        None, None, ""]
    await expect(attempts.nth(2).locator("pre.text").last).to_be_visible()
    await expect(attempts.nth(0).locator("pre.text")).to_be_hidden()
    await attempts.nth(0).locator("summary").click()  # open the first to read it
    await expect(attempts.nth(0).locator("pre.text")).to_have_text(
        "Processed 'a reply to the customer' (attempt 1)")
    await expect(attempts.nth(1).locator("pre.text").last).to_contain_text(
        "revised for the comment 'Use her name'")
    await expect(attempts.nth(2).locator("pre.text").last).to_contain_text(
        "revised for the comment 'Say how much'")
    await expect(attempts.nth(1).locator(".diff del").first).to_have_text("1)")
    await expect(attempts.nth(2).locator(".diff del").last).to_have_text("'Use her name'")
    await expect(attempts.nth(2).locator(".diff ins").last).to_have_text("'Say how much'")
    assert await marker_kept(page)


async def test_history_keeps_an_attempt_the_reader_opened_across_live_updates(
    session: Session, actions: ReviewActions
) -> None:
    task_id = await actions.submit("a reply to the customer")
    await waiting_on(actions, task_id, 1)
    assert (await actions.reject(task_id, "shorter")).status_code == 200
    await waiting_on(actions, task_id, 2)
    page = await session.open(f"/tasks/{task_id}")
    first = page.locator("#task-history details.attempt").first
    await first.locator("summary").click()
    await expect(first).to_have_attribute("open", "")
    assert (await actions.reject(task_id, "shorter still")).status_code == 200
    await expect(page.locator("#task-history details.attempt")).to_have_count(3)
    await expect(page.locator("#task-history details.attempt").first).to_have_attribute(
        "open", "")


async def test_keys_approve_reject_and_open_the_next_task(
    session: Session, actions: ReviewActions
) -> None:
    first = await actions.submit("first in the queue")
    await waiting_on(actions, first, 1)
    second = await actions.submit("second in the queue")
    await waiting_on(actions, second, 1)
    page = await session.open(f"/tasks/{first}")
    await expect(page.locator(".keys")).to_contain_text("a approve")
    await expect(page.get_by_role("button", name="Approve")).to_be_enabled()

    await page.keyboard.press("r")
    await expect(page.locator("#comment")).to_be_focused()
    await expect(page.locator("#comment")).to_have_value("")  # the r was not typed
    await page.keyboard.type("a n r")  # typed in the field: no shortcut fires
    await expect(page.locator("#comment")).to_have_value("a n r")
    assert page.url.endswith(f"/tasks/{first}")
    await page.locator("#comment").fill("")
    await page.locator("h1").click()  # leave the field

    await page.keyboard.press("a")
    await expect(page.locator("#task-status [data-status]")).to_have_attribute(
        "data-status", "completed")
    await page.keyboard.press("n")
    await page.wait_for_url(re.compile(f"/tasks/{second}$"))
    await expect(page.get_by_role("button", name="Approve")).to_be_enabled()
    await page.keyboard.press("n")  # skips the task on screen: none other waits
    await page.wait_for_url(re.compile(r"/dashboard\?status=waiting_for_review$"))


async def test_a_half_typed_comment_survives_someone_elses_decision(
    session: Session, actions: ReviewActions
) -> None:
    task_id = await actions.submit("a reply to the customer")
    mine, theirs = [await session.open(f"/tasks/{task_id}") for _ in range(2)]
    await expect(mine.get_by_role("button", name="Reject")).to_be_enabled()
    await mine.get_by_label("Comment").fill("Half of my thou")
    await decide_on_page(theirs, "Reject", "Use her name", name="Bob")

    kept = mine.locator("#comment-kept")
    await expect(kept).to_contain_text("Attempt 1 was rejected by Bob while you were writing")
    await expect(mine.locator("#task-status .attempt")).to_have_text("Attempt 2")
    await expect(mine.get_by_role("button", name="Approve")).to_be_enabled()
    await expect(mine.get_by_label("Comment")).to_have_value("Half of my thou")

    await decide_on_page(theirs, "Approve", name="Bob")
    await expect(mine.locator("#task-status [data-status]")).to_have_attribute(
        "data-status", "completed")
    await expect(kept).to_contain_text("Attempt 2 was approved by Bob while you were writing")
    await expect(kept.locator("textarea")).to_have_value("Half of my thou")
    await expect(theirs.locator("#comment-kept")).to_be_empty()  # their own decisions
    assert await marker_kept(mine)


async def test_a_lost_race_keeps_the_comment_sent(
    session: Session, actions: ReviewActions
) -> None:
    task_id = await actions.submit("a reply to the customer")
    page = await session.open(f"/tasks/{task_id}")
    await expect(page.get_by_role("button", name="Reject")).to_be_enabled()
    await page.get_by_label("Comment").fill("Mine, sent too late")

    async def approved_first(route: Route) -> None:
        """Another reviewer's approval lands while this page's decision is on its way."""
        assert (await actions.approve(task_id, reviewer="Bob")).status_code == 200
        await asyncio.sleep(0.3)  # the page's stream shows Bob's decision meanwhile
        await route.continue_()

    await page.route(f"**/tasks/{task_id}/decision", approved_first)
    await page.get_by_role("button", name="Reject").click()
    await expect(page.locator("#flash")).to_contain_text("Your decision was not recorded")
    await expect(page.locator("#comment-kept")).to_contain_text("Attempt 1 was approved by Bob")
    await expect(page.locator("#comment-kept textarea")).to_have_value("Mine, sent too late")


async def test_the_cancel_button_stops_the_task_in_place(
    session: Session, actions: ReviewActions
) -> None:
    task_id = await actions.submit("a reply to the customer")
    page = await session.open(f"/tasks/{task_id}")
    await expect(page.get_by_role("button", name="Approve")).to_be_enabled()
    page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await page.get_by_role("button", name="Cancel task").click()
    await expect(page.locator("#task-status [data-status]")).to_have_attribute(
        "data-status", "cancelled")
    await expect(page.locator("#flash")).to_contain_text("The task was cancelled.")
    await expect(page.locator("#task-result")).to_contain_text("Cancelled")
    await expect(page.get_by_role("button", name="Cancel task")).to_have_count(0)
    assert await marker_kept(page)


async def test_times_show_in_the_browsers_time_zone_with_utc_in_the_tooltip(
    browser: Browser, live_server: LiveServer, actions: ReviewActions
) -> None:
    task_id = await actions.submit("a reply to the customer")
    session = await new_session(browser, live_server.url, timezone_id="Asia/Kolkata",
                                locale="en-GB")
    try:
        page = await session.open(f"/tasks/{task_id}")
        submitted = page.locator(".task-head time")
        utc = await submitted.get_attribute("title")
        assert utc and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", utc)
        await expect(submitted).not_to_have_text(re.compile("UTC"))
        local = await page.evaluate("""time => new Date(time).toLocaleTimeString('en-GB',
            {timeZone: 'Asia/Kolkata'})""", await submitted.get_attribute("datetime"))
        await expect(submitted).to_have_text(local)  # 05:30 ahead of UTC
        await expect(page.locator("#task-status time")).not_to_have_text(re.compile("UTC"))
    finally:
        await session.context.close()


@pytest.fixture
async def axe_session(browser: Browser, live_server: LiveServer) -> AsyncIterator[Session]:
    """Pages that let the test inject axe-core (the CSP forbids inline script)."""
    session = await new_session(browser, live_server.url, bypass_csp=True)
    yield session
    await session.context.close()
    assert session.outside == []


@pytest.mark.parametrize("size", [DESKTOP, PHONE], ids=["desktop", "phone"])
@pytest.mark.parametrize("state", ["waiting", "three-attempts", "completed"])
async def test_axe_finds_no_violations_on_the_task_page(
    axe_session: Session, actions: ReviewActions, state: str, size: dict[str, int]
) -> None:
    long_text = "A long paragraph of output, " * 3600  # 100 KB: no inner scroll boxes
    task_id = await actions.submit(long_text if state == "waiting" else "a short reply")
    await waiting_on(actions, task_id, 1)
    if state != "waiting":
        for attempt, comment in ((1, "Use her name"), (2, "Say how much")):
            assert (await actions.reject(task_id, comment, reviewer="Ann")).status_code == 200
            await waiting_on(actions, task_id, attempt + 1)
    if state == "completed":
        assert (await actions.approve(task_id, reviewer="Ann")).status_code == 200
    page = await axe_session.open(f"/tasks/{task_id}")
    await page.set_viewport_size(size)
    expected = "completed" if state == "completed" else "waiting_for_review"
    await expect(page.locator("#task-status [data-status]")).to_have_attribute(
        "data-status", expected)
    assert await axe_violations(page) == []
