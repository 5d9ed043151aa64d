"""A review deadline in Chromium: the page counts it down live, and when it passes the
timeout's decision arrives on the open page (no reload), signed by the system."""

from __future__ import annotations

import re

from playwright.async_api import expect

from ..conftest import ReviewActions
from .conftest import Session, browser_test, marker_kept

pytestmark = browser_test


async def test_the_countdown_runs_and_the_timeout_decides_on_the_open_page(
    session: Session, actions: ReviewActions
) -> None:
    response = await actions.http.post("/submit", json={
        "data": "a reply", "review_timeout": 5, "on_timeout": "approve"})
    task_id = response.json()["task_id"]
    page = await session.open(f"/tasks/{task_id}")
    countdown = page.locator(".deadline time[data-deadline]")
    await expect(countdown).to_have_text(re.compile(r"^in [1-5] s$"))
    first = await countdown.text_content()
    await expect(countdown).not_to_have_text(first or "", timeout=3000)  # it ticks
    await expect(page.locator(".deadline")).to_contain_text("then it is approved as it is")
    decided = page.locator("#task-review .decided")
    await expect(decided).to_contain_text("approved", timeout=10_000)
    await expect(decided.locator("bdi.reviewer")).to_have_text("review timeout")
    await expect(page.locator(".deadline")).to_have_count(0)
    assert await marker_kept(page)  # live, not a reload
