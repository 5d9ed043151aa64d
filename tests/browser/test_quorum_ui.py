"""Quorum and edit-then-approve in real Chromium: two signed-in reviewers vote on one
task from two browser profiles, each seeing the tally live; a reviewer edits, then
approves their edit."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, Page, expect

from hitl import Config
from hitl.accounts import Role

from ..conftest import LiveServer
from .conftest import Session, browser_test, new_session
from .test_sign_in import PASSWORD, accounts_of, sign_in

pytestmark = browser_test


@pytest.fixture
def config(config: Config) -> Config:
    return config.with_changes(auth="accounts")


@pytest.fixture
async def token(live_server: LiveServer) -> str:
    """sam's API token; ann and bob review with a password, in the browser."""
    accounts = accounts_of(live_server)
    await accounts.add_user("sam", Role.SUBMITTER)
    for name in ("ann", "bob"):
        await accounts.add_user(name, Role.REVIEWER, password=PASSWORD,
                                display_name=name.title())
    return (await accounts.create_token("sam", "tests"))[1]


async def submit(server: LiveServer, token: str, **options: object) -> str:
    async with server.http(headers={"Authorization": f"Bearer {token}"}) as http:
        response = await http.post("/submit", json={"data": "draft a reply", **options})
        assert response.status_code == 202, response.text
        return str(response.json()["task_id"])


@pytest.fixture
async def other(browser: Browser, live_server: LiveServer) -> AsyncIterator[Session]:
    session = await new_session(browser, live_server.url)
    yield session
    await session.context.close()
    assert session.outside == [] and session.csp_reports == []


async def open_signed_in(session: Session, name: str, task_id: str) -> Page:
    page = await session.open(f"/tasks/{task_id}")
    await sign_in(page, name)
    await expect(page.locator(".review .output")).to_be_visible()
    return page


async def test_two_reviewers_vote_on_a_quorum_2_task(session: Session, other: Session,
                                                     live_server: LiveServer,
                                                     token: str) -> None:
    task_id = await submit(live_server, token, quorum=2)
    ann = await open_signed_in(session, "ann", task_id)
    bob = await open_signed_in(other, "bob", task_id)
    for page in (ann, bob):
        await expect(page.locator(".tally")).to_have_text("0 of 2 approvals")
    await bob.locator("summary", has_text="Edit").click()  # bob starts an edit ...
    await bob.get_by_label("Edited output").fill("Bob's half-done edit")
    await ann.locator("#comment").fill("fine by me")
    await ann.get_by_role("button", name="Approve", exact=True).click()
    await expect(ann.locator(".my-vote")).to_contain_text("You approved attempt 1")
    await expect(ann.locator("#task-review blockquote.comment")).to_have_text("fine by me")
    await expect(ann.locator("#flash")).to_contain_text("was recorded")
    await expect(ann.locator("#comment-kept")).to_be_empty()  # sent, so not "kept"
    await expect(ann.get_by_role("button", name="Approve", exact=True)).to_have_count(0)
    await expect(ann.locator(".tally")).to_have_text("1 of 2 approvals: ann")
    await expect(bob.locator(".tally")).to_have_text("1 of 2 approvals: ann")  # live
    await expect(bob.locator(".my-vote")).to_have_count(0)
    await expect(bob.get_by_label("Edited output")).to_have_value("Bob's half-done edit")
    await expect(bob.locator("details.edit")).to_have_attribute("open", "")  # ... kept
    await bob.get_by_role("button", name="Approve", exact=True).click()
    for page in (ann, bob):
        await expect(page.locator("#task-status [data-status]")).to_have_text("completed")
        await expect(page.locator(".result-completed .final")).to_be_visible()
    await expect(bob.locator(".history")).to_contain_text("Approved by Ann")


async def test_edit_then_approve(session: Session, other: Session, live_server: LiveServer,
                                 token: str) -> None:
    task_id = await submit(live_server, token)
    ann = await open_signed_in(session, "ann", task_id)
    await ann.locator("summary", has_text="Edit").click()
    box = ann.get_by_label("Edited output")
    output = await box.input_value()
    await box.fill(output + " Kind regards, Ann.")
    await ann.get_by_role("button", name="Approve edited").click()
    await expect(ann.locator("#task-status [data-status]")).to_have_text("completed")
    await expect(ann.locator(".result-completed .final")).to_have_text(
        output + " Kind regards, Ann.")
    await expect(ann.locator(".edited-note")).to_contain_text("3 words added, 0 removed")
    await expect(ann.locator(".edit-diff ins")).to_contain_text("Kind")

    edited = await submit(live_server, token, quorum=2)  # above quorum 1: a new attempt
    ann = await session.open(f"/tasks/{edited}")  # signed in already
    bob = await open_signed_in(other, "bob", edited)
    await expect(ann.locator(".review .output")).to_be_visible()
    await ann.locator("summary", has_text="Edit").click()
    await ann.get_by_label("Edited output").fill("A shorter reply.")
    await ann.get_by_role("button", name="Approve edited").click()
    await expect(bob.locator(".review .edited-by")).to_contain_text("ann’s edit of attempt 1")
    await expect(bob.locator(".review .output")).to_have_text("A shorter reply.")
    await expect(bob.locator(".tally")).to_have_text("1 of 2 approvals: ann")
    await expect(ann.locator(".my-vote")).to_contain_text("You approved attempt 2")
    await bob.get_by_role("button", name="Approve", exact=True).click()
    await expect(bob.locator(".result-completed .final")).to_have_text("A shorter reply.")
    async with live_server.http(headers={"Authorization": f"Bearer {token}"}) as http:
        task = (await http.get(f"/api/tasks/{edited}")).json()
    assert [(v["reviewer"], v["decision"]) for v in task["attempts"][1]["votes"]] == [
        ("ann", "approved"), ("bob", "approved")]
