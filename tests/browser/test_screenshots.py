"""The README's screenshots, from a real browser on a server with tasks in every state.

Runs with the browser tests (into test-artifacts/); to refresh docs/screenshots/:

    HITL_UPDATE_SCREENSHOTS=1 .venv/bin/pytest -m screenshots
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from playwright.async_api import expect

from hitl.processors import Job, Processor, simulate

from ..conftest import ReviewActions
from .conftest import ARTIFACTS, Session, browser_test
from .test_task_page import waiting_on

pytestmark = [*browser_test, pytest.mark.screenshots]

DOCS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


async def showcase(job: Job) -> str:
    """The simulator, except that some inputs stay running or fail, for the pictures."""
    if "quarterly" in job.task_input:
        job.report(0.6, "reading section 3 of 5")
        await asyncio.sleep(60)  # still running when the picture is taken
    if "broken" in job.task_input:
        raise RuntimeError("the upstream model is unavailable")
    return await simulate(job)


@pytest.fixture
def processor() -> Processor:
    return showcase


async def test_screenshots_of_task_page_and_dashboard(
    session: Session, actions: ReviewActions
) -> None:
    target = DOCS if os.environ.get("HITL_UPDATE_SCREENSHOTS") else ARTIFACTS
    target.mkdir(parents=True, exist_ok=True)
    done = await actions.submit("Translate the release notes into French")
    await actions.watch(done).wait_for("waiting_for_review")
    assert (await actions.approve(done, reviewer="Chloé")).status_code == 200
    await actions.submit("Summarise the quarterly sales report for the board")
    await actions.submit("Tag this support ticket: broken login on mobile")
    reply = await actions.submit("Draft a polite reply to a customer asking about a late refund")
    await actions.submit("Write alt text for the product photo of the blue kettle")
    page = await session.open(f"/tasks/{reply}")
    await expect(page.get_by_role("button", name="Reject")).to_be_enabled()
    await page.get_by_label("Comment").fill("Mention the refund date, and keep it under 80 words.")
    await page.get_by_label("Your name").fill("Ann Lee")
    await page.get_by_role("button", name="Reject").click()
    await expect(page.locator("#task-status .attempt")).to_have_text("Attempt 2")
    await expect(page.get_by_role("button", name="Approve")).to_be_enabled()
    await page.get_by_label("Comment").fill("Better. Could it sound a little warmer?")
    await page.get_by_label("Comment").blur()
    await page.locator("#flash").evaluate("flash => flash.replaceChildren()")
    await page.screenshot(path=str(target / "task.png"), full_page=True, caret="initial")

    dashboard = await session.open("/dashboard")
    await expect(dashboard.locator('[data-count="failed"] .count-n')).to_have_text("1")
    await dashboard.screenshot(path=str(target / "dashboard.png"), full_page=True,
                               caret="initial")

    await page.set_viewport_size({"width": 390, "height": 844})
    await page.screenshot(path=str(target / "task-narrow.png"), full_page=True, caret="initial")

    letter = await actions.submit("Write to Ann: her refund is late")
    for attempt, comment in ((1, "Use her name"), (2, "Say how much and when")):
        await waiting_on(actions, letter, attempt)
        assert (await actions.reject(letter, comment, reviewer="Ann Lee")).status_code == 200
    await waiting_on(actions, letter, 3)
    history = await session.open(f"/tasks/{letter}")
    await history.get_by_role("button", name="Approve").click()
    await expect(history.locator("#task-status [data-status]")).to_have_attribute(
        "data-status", "completed")
    await history.locator("#task-history summary").nth(1).click()
    await history.locator("#flash").evaluate("flash => flash.replaceChildren()")
    await history.screenshot(path=str(target / "task-attempts.png"), full_page=True,
                             caret="initial")
