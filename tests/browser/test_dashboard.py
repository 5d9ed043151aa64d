"""The dashboard as a review queue, in a real browser: the oldest waiting of 150 within
reach, search, cards at phone width, a skip link, the count in every title kept live,
rows that hold still while their tasks change, and no axe-core violations."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, expect

from hitl import Config

from ..conftest import LiveServer, ReviewActions
from .conftest import (
    Session,
    axe_test,
    axe_violations,
    browser_test,
    eventually,
    marker_kept,
    new_session,
)

pytestmark = browser_test

DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
LONG = ("Draft a reply to the customer who wrote a very long message about a refund "
        "that never arrived, " * 4 + "x" * 120)  # and one word longer than a phone


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """Processing at once: 150 tasks come up for review in a moment."""
    return Config(db=str(tmp_path / "hitl.db"), process_delay=0, retry_wait=0,
                  shutdown_timeout=1, auth="none")


async def waiting_total(actions: ReviewActions) -> int:
    query = {"status": "waiting_for_review", "limit": 1}
    return int((await actions.http.get("/api/tasks", params=query)).json()["total"])


async def until_waiting(actions: ReviewActions, count: int) -> None:
    async def all_waiting() -> bool:
        return await waiting_total(actions) == count

    await eventually(all_waiting, 30)


async def queue_of(actions: ReviewActions, count: int, text: str = "task") -> list[str]:
    """``count`` tasks waiting for review; the first returned has waited longest."""
    oldest = await actions.submit(f"{text} 0 (the oldest)")
    await actions.watch(oldest).wait_for("waiting_for_review")
    rest = await asyncio.gather(*(actions.submit(f"{text} {n}") for n in range(1, count)))
    await until_waiting(actions, count)
    return [oldest, *rest]


async def rows(page: Page) -> list[str]:
    return list(await page.locator("#task-rows tr[data-status]").evaluate_all(
        "rows => rows.map(row => row.id.slice(5))"))


async def test_the_oldest_waiting_of_150_is_within_reach(
    session: Session, actions: ReviewActions
) -> None:
    oldest, *_ = await queue_of(actions, 150)
    dashboard = await session.open("/dashboard")  # every task, the newest first
    assert len(await rows(dashboard)) == 50
    for _ in range(2):
        await dashboard.get_by_role("link", name="Load more").click()
    await expect(dashboard.locator(f"#task-{oldest}")).to_be_visible()
    listed = await rows(dashboard)
    assert len(listed) == 150 and len(set(listed)) == 150 and listed[-1] == oldest
    await expect(dashboard.get_by_role("link", name="Load more")).to_have_count(0)
    await expect(dashboard.locator(f"#task-{listed[100]} a")).to_be_focused()  # what came
    assert await marker_kept(dashboard)

    queue = await session.open("/dashboard?status=waiting_for_review")
    assert (await rows(queue))[0] == oldest  # the longest waiting first
    waited = queue.locator(f"#task-{oldest} .waited time")
    assert re.fullmatch(r"\d+ (s|min)", await waited.inner_text())
    await expect(queue.locator("#list-heading")).to_contain_text("150 waiting for review")

    await queue.get_by_role("link", name="Review next").click()
    await queue.wait_for_url(f"**/tasks/{oldest}")


async def test_search_finds_tasks_by_their_text(
    session: Session, actions: ReviewActions
) -> None:
    texts = ["refund for order 100% late", "rename snake_case fields", "it's \"quoted\"",
             "summarise the quarterly report"]
    ids = [await actions.submit(text) for text in texts]
    await until_waiting(actions, len(texts))
    dashboard = await session.open("/dashboard")
    for term, found in (("100%", 0), ("_", 1), ("'s \"", 2), ("QUARTERLY", 3)):
        await dashboard.get_by_role("searchbox").fill(term)
        await dashboard.get_by_role("searchbox").press("Enter")
        await expect(dashboard.locator("#task-rows tr[data-status]")).to_have_count(1)
        assert await rows(dashboard) == [ids[found]], term
        await expect(dashboard.get_by_role("searchbox")).to_have_value(term)
    await dashboard.get_by_role("searchbox").fill("nothing like this")
    await dashboard.get_by_role("button", name="Search").click()
    await expect(dashboard.locator(".empty-row")).to_contain_text("No tasks match")


@pytest.mark.parametrize("path", ["/dashboard", "/dashboard?status=waiting_for_review", "/"])
async def test_at_phone_width_rows_are_cards_and_nothing_scrolls_sideways(
    session: Session, actions: ReviewActions, path: str
) -> None:
    for n in range(3):
        await actions.submit(f"{n}: {LONG}")
    await until_waiting(actions, 3)
    page = await session.open(path)
    await page.set_viewport_size(PHONE)
    await expect(page.locator("#task-rows tr[data-status]")).to_have_count(3)
    assert await page.evaluate(
        "document.scrollingElement.scrollWidth <= window.innerWidth"), "scrolls sideways"
    row = page.locator("#task-rows tr[data-status]").first
    assert await row.evaluate("row => getComputedStyle(row).display") != "table-row"
    excerpt = row.locator(".excerpt")
    await expect(excerpt).to_be_visible()
    box = await excerpt.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
    assert box["height"] > 30, "the input shows on more than one line"
    if path.startswith("/dashboard"):
        counts = await page.locator("#counts").bounding_box()
        assert counts is not None and counts["height"] < 120, "count cards not collapsed"


async def test_a_skip_link_leads_to_the_first_row(
    session: Session, actions: ReviewActions
) -> None:
    task_id = await actions.submit("reach me by keyboard")
    await until_waiting(actions, 1)
    dashboard = await session.open("/dashboard")
    await dashboard.keyboard.press("Tab")
    skip = dashboard.get_by_role("link", name="Skip to the task list")
    await expect(skip).to_be_focused()
    await expect(skip).to_be_visible()
    await dashboard.keyboard.press("Enter")
    await dashboard.keyboard.press("Tab")
    await expect(dashboard.locator(f"#task-{task_id} a")).to_be_focused()  # 3 keys, not 15


async def test_every_title_counts_the_tasks_waiting_and_keeps_it_live(
    session: Session, actions: ReviewActions
) -> None:
    first = await actions.submit("one")
    await until_waiting(actions, 1)
    dashboard = await session.open("/dashboard")
    index, task_page = await timed(session, "/"), await timed(session, f"/tasks/{first}")
    for page, title in ((dashboard, "Dashboard · hitl"), (index, "Submit a task · hitl"),
                        (task_page, f"Task {first[:8]} · hitl")):
        await expect(page).to_have_title(f"(1) {title}")
    await actions.submit("two")
    await until_waiting(actions, 2)
    await expect(dashboard).to_have_title("(2) Dashboard · hitl")  # from its stream
    await index.clock.fast_forward(15_000)
    await expect(index).to_have_title("(2) Submit a task · hitl")
    await actions.approve(first)
    await until_waiting(actions, 1)
    await expect(dashboard).to_have_title("(1) Dashboard · hitl")
    await task_page.clock.fast_forward(15_000)
    await expect(task_page).to_have_title(f"(1) Task {first[:8]} · hitl")


async def timed(session: Session, path: str) -> Page:
    """A page whose clock the test moves on, so it need not wait for the page's next look."""
    page = await session.context.new_page()
    session.pages.append(page)
    await page.clock.install()
    await page.goto(session.origin + path)
    return page


async def test_rows_keep_their_place_and_new_work_is_announced(
    session: Session, actions: ReviewActions
) -> None:
    ids: list[str] = []
    for n in range(3):  # one after another: the queue's order is theirs
        ids.append(await actions.submit(f"task {n}"))
        await actions.watch(ids[-1]).wait_for("waiting_for_review")
    queue = await session.open("/dashboard?status=waiting_for_review")
    assert await rows(queue) == ids
    middle = queue.locator(f"#task-{ids[1]}")
    before = await middle.bounding_box()
    await middle.hover()  # the reviewer's pointer is on it

    assert (await actions.reject(ids[1], "shorter")).status_code == 200  # it comes back
    await actions.watch(ids[1]).wait_for("waiting_for_review")
    await expect(middle.locator("td.num")).to_have_text("2")
    await expect(middle).to_have_attribute("data-status", "waiting_for_review")
    assert await rows(queue) == ids  # still in its place
    assert await middle.bounding_box() == before

    assert (await actions.approve(ids[0])).status_code == 200  # decided: stays, marked
    await expect(queue.locator(f"#task-{ids[0]}")).to_have_attribute("data-status", "completed")
    assert await rows(queue) == ids and await middle.bounding_box() == before

    new = await actions.submit("new work")
    fresh = queue.get_by_role("link", name=re.compile("1 new task"))
    await expect(fresh).to_be_visible()
    assert await rows(queue) == ids and await middle.bounding_box() == before
    await fresh.click()  # the reviewer asks for it: the queue anew, in its order
    await expect(queue.locator(f"#task-{new}")).to_be_visible()
    assert await rows(queue) == [ids[2], ids[1], new]
    await expect(fresh).to_be_hidden()
    assert await marker_kept(queue)


async def test_without_javascript_load_more_is_a_plain_link(
    browser: Browser, live_server: LiveServer, actions: ReviewActions
) -> None:
    oldest, *_ = await queue_of(actions, 60)
    session = await new_session(browser, live_server.url, java_script_enabled=False)
    try:
        page = await session.open("/dashboard")
        await page.get_by_role("link", name="Load more").click()
        await expect(page.locator(f"#task-{oldest}")).to_be_visible()
        await expect(page.get_by_role("link", name="From the start")).to_be_visible()
        await page.get_by_role("link", name="Review next").click()
        await page.wait_for_url(f"**/tasks/{oldest}")
    finally:
        await session.context.close()
    assert session.outside == []


async def axe_pages(browser: Browser, origin: str, paths: list[str]) -> list[str]:
    """axe-core's violations on each page at desktop and phone size."""
    session = await new_session(browser, origin, bypass_csp=True)
    found: list[str] = []
    try:
        for size in (DESKTOP, PHONE):
            for path in paths:
                page = await session.open(path)
                await page.set_viewport_size(size)
                found += [f"{path} at {size['width']} px: {violation}"
                          for violation in await axe_violations(page)]
                await page.close()
    finally:
        await session.context.close()
    return found


@axe_test
async def test_axe_finds_nothing_on_the_empty_dashboard_and_index(
    browser: Browser, live_server: LiveServer
) -> None:
    assert await axe_pages(browser, live_server.url, ["/dashboard", "/"]) == []


@axe_test
async def test_axe_finds_nothing_on_a_full_dashboard(
    browser: Browser, live_server: LiveServer, actions: ReviewActions
) -> None:
    ids = await queue_of(actions, 150, LONG)
    await actions.approve(ids[0])
    paths = ["/dashboard", "/dashboard?status=waiting_for_review",
             "/dashboard?status=waiting_for_review&q=refund", "/dashboard?q=nothing+matches",
             "/"]
    assert await axe_pages(browser, live_server.url, paths) == []
