"""Reviewers in a real browser: every open page follows each step live, with no reload."""

from __future__ import annotations

import asyncio
import re

import pytest
from playwright.async_api import Browser, expect

from hitl import Config

from ..conftest import LiveServer, ReviewActions, stop_server
from .conftest import (
    Session,
    browser_test,
    eventually,
    flashes,
    marker_kept,
    new_session,
    restart_server,
    seen,
)

pytestmark = browser_test

HOSTILE = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'


async def test_review_loop_is_live_on_task_page_and_dashboard(
    session: Session, live_server: LiveServer
) -> None:
    dashboard = await session.open("/dashboard")
    page = await session.open("/")
    await page.get_by_label("What should be processed?").fill("summarise the quarterly report")
    await page.get_by_role("button", name="Submit").click()
    await page.wait_for_url(re.compile(r"/tasks/[0-9a-f]{32}$"))
    task_id = page.url.rsplit("/", 1)[1]
    await page.evaluate("window.__hitl_marker = 'kept'")  # a new page after the form post
    status = page.locator("#task-status [data-status]")
    row = dashboard.locator(f"#task-{task_id}")
    await dashboard.get_by_role("link", name="1 new task — show").click()  # announced

    await expect(status).to_have_attribute("data-status", "waiting_for_review")
    await expect(row).to_have_attribute("data-status", "waiting_for_review")
    await expect(page.locator("#task-review .output")).to_contain_text("quarterly report")

    await page.get_by_label("Comment").fill("Shorter, please")
    await page.get_by_label("Your name").fill("Ann")
    await page.get_by_role("button", name="Reject").click()
    await expect(page.locator("#flash")).to_contain_text("was recorded")
    await expect(page.locator("#task-history")).to_contain_text("Rejected by Ann")
    await expect(page.locator("#task-history")).to_contain_text("Shorter, please")
    await expect(page.locator("#task-status .attempt")).to_have_text("Attempt 2")
    await expect(status).to_have_attribute("data-status", "waiting_for_review")
    await expect(page.locator("#task-review .output")).to_contain_text("Shorter, please")
    await expect(row.locator("td.num")).to_have_text("2")
    progress = [html for html in await seen(page, "status") if "<progress" in html]
    assert any("Processing attempt 2" in html for html in progress), "no live progress shown"

    third = await session.open(f"/tasks/{task_id}")  # mid-task: current state at once
    assert await third.locator("#task-status [data-status]").get_attribute(
        "data-status") == "waiting_for_review"
    assert "Attempt 2" in await third.locator("#task-status .attempt").inner_text()
    # in the first attempt's entry, collapsed: in the page's text, not on screen
    assert "Rejected by Ann" in (await third.locator("#task-history").text_content() or "")
    assert await third.get_by_label("Your name").input_value() == "Ann"  # remembered

    await third.get_by_role("button", name="Approve").click()
    for watcher in (page, third):
        await expect(watcher.locator("#task-status [data-status]")).to_have_attribute(
            "data-status", "completed")
        await expect(watcher.locator("#task-result")).to_contain_text("Shorter, please")
        await expect(watcher.locator("#task-history")).to_contain_text("Approved by Ann")
    await expect(row).to_have_attribute("data-status", "completed")
    await expect(dashboard.locator('[data-count="completed"] .count-n')).to_have_text("1")
    await expect(dashboard.locator('[data-count="waiting_for_review"] .count-n')).to_have_text("0")
    assert await page.evaluate("window.__hitl_closed === true"), "task stream not closed"
    for watcher in (page, dashboard, third):
        assert await marker_kept(watcher), f"{watcher.url} was reloaded"


async def test_dashboard_uses_one_stream_and_announces_new_tasks_live(
    session: Session, actions: ReviewActions
) -> None:
    dashboard = await session.open("/dashboard")
    streams: list[str] = []
    dashboard.on("request", lambda r: streams.append(r.url) if "stream" in r.url else None)
    await dashboard.reload()
    await expect(dashboard.locator("#task-rows .empty-row")).to_be_visible()
    await dashboard.evaluate("window.__hitl_marker = 'kept'")
    ids = [await actions.submit(f"task number {n}") for n in range(3)]
    show = dashboard.get_by_role("link", name="3 new tasks — show")
    await expect(show).to_be_visible()  # announced; the list holds still until asked
    await expect(dashboard.locator(".count-all .count-n")).to_have_text("3")
    await show.click()
    for task_id in ids:
        await expect(dashboard.locator(f"#task-{task_id}")).to_have_attribute(
            "data-status", "waiting_for_review")
    await expect(dashboard.locator("#task-rows tr[data-status]")).to_have_count(3)
    await expect(dashboard.locator("#task-rows .empty-row")).to_be_hidden()
    await actions.approve(ids[0])
    await expect(dashboard.locator(f"#task-{ids[0]}")).to_have_attribute(
        "data-status", "completed")
    assert await marker_kept(dashboard)
    assert len(streams) == 1, streams

    waiting = await session.open("/dashboard?status=waiting_for_review")
    await expect(waiting.locator("#task-rows tr[data-status]")).to_have_count(2)
    await actions.approve(ids[1])  # leaves the filtered view: its row stays, marked
    await expect(waiting.locator(f"#task-{ids[1]}")).to_have_attribute(
        "data-status", "completed")
    new_id = await actions.submit("arrives while filtered")  # announced once it waits
    await waiting.get_by_role("link", name="1 new task — show").click()
    await expect(waiting.locator(f"#task-{new_id}")).to_be_visible()
    await expect(waiting.locator("#task-rows tr[data-status]")).to_have_count(2)
    assert await marker_kept(waiting)


async def test_two_reviewers_at_once_one_wins_and_both_pages_show_it(
    session: Session, actions: ReviewActions
) -> None:
    task_id = await actions.submit("race me")
    pages = [await session.open(f"/tasks/{task_id}") for _ in range(2)]
    for page, name in zip(pages, ("Ann", "Bob"), strict=True):
        await expect(page.get_by_role("button", name="Approve")).to_be_enabled()
        await page.get_by_label("Your name").fill(name)
    await pages[1].get_by_label("Comment").fill("Not yet")  # a rejection needs one
    # Clicks without Playwright's actionability checks, so both land at the same moment
    # (a click that arrives after the winner's update finds the buttons disabled).
    await asyncio.gather(pages[0].get_by_role("button", name="Approve").dispatch_event("click"),
                         pages[1].get_by_role("button", name="Reject").dispatch_event("click"))

    async def recorded() -> bool:
        shown = [flash for page in pages for flash in await flashes(page)]
        return any("was recorded" in flash for flash in shown)

    await eventually(recorded)
    task = (await actions.http.get(f"/api/tasks/{task_id}")).json()
    assert len(task["reviews"]) == 1
    winner = task["reviews"][0]["reviewer"]
    for page in pages:
        await expect(page.locator("#task-history")).to_contain_text(f"by {winner}")
        # Each fragment shows the task as it is when rendered: after an approval that may
        # already be completed, which has no form left; after a rejection, the buttons
        # stay disabled until the next attempt waits for review.
        decided = [html for html in await seen(page, "review")
                   if f'by <strong><bdi class="reviewer">{winner}</bdi>' in html]
        assert decided, "the decision was not shown"
        assert all("<fieldset disabled>" in html or "<fieldset" not in html
                   for html in decided), "buttons stayed enabled with the decision shown"
    shown = [flash for page in pages for flash in await flashes(page)]
    assert sum("was recorded" in flash for flash in shown) == 1, shown
    assert all("was recorded" in flash or "not recorded" in flash for flash in shown), shown


async def test_hostile_text_is_shown_literally_and_runs_nothing(
    session: Session, live_server: LiveServer
) -> None:
    page = await session.open("/")
    await page.get_by_label("What should be processed?").fill(HOSTILE)
    await page.get_by_role("button", name="Submit").click()
    await expect(page.locator("#task-status [data-status]")).to_have_attribute(
        "data-status", "waiting_for_review")
    await page.get_by_label("Comment").fill(HOSTILE)
    await page.get_by_label("Your name").fill("<b>Mallory</b>")
    await page.get_by_role("button", name="Reject").click()
    await expect(page.locator("#task-history")).to_contain_text("by <b>Mallory</b>")
    await expect(page.locator("#task-status .attempt")).to_have_text("Attempt 2")
    dashboard = await session.open("/dashboard")

    assert await page.locator("main pre.text").first.inner_text() == HOSTILE
    assert HOSTILE in (await page.locator("#task-history blockquote").text_content() or "")
    assert HOSTILE[:40] in await dashboard.locator("#task-rows .excerpt").inner_text()
    for watcher in (page, dashboard):
        assert await watcher.evaluate("window.__pwned") is None
        assert await watcher.locator("main img, main script, main b").count() == 0
    assert not [url for url in session.requests if url.endswith("/x")]


async def test_open_pages_reconnect_after_a_restart_and_catch_up(
    session: Session, live_server: LiveServer, actions: ReviewActions, config: Config
) -> None:
    task_id = await actions.submit("survive a restart")
    page = await session.open(f"/tasks/{task_id}")
    dashboard = await session.open("/dashboard")
    await expect(page.locator("#task-status [data-status]")).to_have_attribute(
        "data-status", "waiting_for_review")
    await expect(dashboard.locator(f"#task-{task_id}")).to_be_visible()

    server = await restart_server(live_server, config)
    try:
        async with server.http() as http:
            response = await ReviewActions(http).approve(task_id, reviewer="Ann")
            assert response.status_code == 200, response.text
        await expect(page.locator("#task-status [data-status]")).to_have_attribute(
            "data-status", "completed")
        await expect(page.locator("#task-history")).to_contain_text("Approved by Ann")
        await expect(dashboard.locator(f"#task-{task_id}")).to_have_attribute(
            "data-status", "completed")
        assert await marker_kept(page) and await marker_kept(dashboard)
    finally:
        await stop_server(server)


@pytest.mark.parametrize("path", ["/", "/dashboard"])
async def test_pages_meet_the_content_security_policy(session: Session, path: str) -> None:
    page = await session.open(path)
    assert await page.evaluate("typeof htmx") == "object"
    assert await page.locator("style, [style]").count() == 0


async def test_without_javascript_the_forms_still_work(
    browser: Browser, live_server: LiveServer
) -> None:
    session = await new_session(browser, live_server.url, java_script_enabled=False)
    try:
        page = await session.open("/")
        await page.get_by_label("What should be processed?").fill("no scripts here")
        await page.get_by_role("button", name="Submit").click()
        await page.wait_for_url(re.compile(r"/tasks/[0-9a-f]{32}$"))

        async def waiting_after_reload() -> bool:
            await page.reload()  # no stream without JavaScript
            return await page.locator('[data-status="waiting_for_review"]').count() > 0

        await eventually(waiting_after_reload)
        await page.get_by_label("Your name").fill("Ann")
        await page.get_by_role("button", name="Approve").click()  # POST, 303, GET
        await expect(page.locator("#task-review .decided")).to_contain_text("approved by Ann")
        await page.get_by_role("link", name="Dashboard").click()
        await expect(page.locator("#task-rows tr[data-status]")).to_have_count(1)
    finally:
        await session.context.close()
    assert session.outside == []
