"""The task page without a browser: every attempt with its output, the comment that led
to it and its diff; the review card; the reject form's comment; Cancel; /next; times."""

from __future__ import annotations

import asyncio
import html
import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from quart import Quart

from hitl import Config, create_app
from hitl.models import Status
from hitl.processors import Job, Processor
from hitl.runner import Runner

from .conftest import OPERATOR, LiveServer, ReviewActions, old_database, post_form, reach
from .test_ui_streams import read_named

ON_POSTGRESQL = True  # and on SQLite (tests/conftest.py)

if TYPE_CHECKING:  # imported for annotations only: pytest would collect a Test* class
    from quart.typing import TestClientProtocol as Client

HOSTILE = '<img src=x onerror="alert(1)"><script>alert(2)</script>'
DRAFTS = ("Dear customer, your refund is late.",
          "Dear Ann, your refund is on its way.",
          "Dear Ann, your refund of 20 EUR is on its way.")
BOUND = 10


def drafts(job: Job) -> str:
    """Each attempt rewrites the letter a little, and says what it was asked."""
    text = DRAFTS[min(job.attempt, len(DRAFTS)) - 1]
    return text + (f" Asked: {job.last_comment}" if job.last_comment else "")


@pytest.fixture
def processor() -> Processor:
    return drafts


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(db=str(tmp_path / "hitl.db"), process_delay=0, retry_wait=0, max_attempts=3,
                  auth="none")


@pytest.fixture
def runner(app: Quart) -> Runner:
    runner: Runner = app.extensions["runner"]
    return runner


async def rejected_twice(runner: Runner, approve: bool = False) -> str:
    """A task whose first two attempts were rejected (by ann, then bob)."""
    task = await runner.submit("write to the customer", by=OPERATOR)
    await reach(runner, task.task_id, Status.WAITING_FOR_REVIEW, 1)
    await runner.decide(task.task_id, "rejected", "use her name", "ann", by=OPERATOR)
    await reach(runner, task.task_id, Status.WAITING_FOR_REVIEW, 2)
    await runner.decide(task.task_id, "rejected", "say how much", "bob", by=OPERATOR)
    await reach(runner, task.task_id, Status.WAITING_FOR_REVIEW, 3)
    if approve:
        await runner.decide(task.task_id, "approved", "good", "ann", by=OPERATOR)
        await reach(runner, task.task_id, Status.COMPLETED, 3)
    return task.task_id


async def page_of(client: Client, task_id: str) -> str:
    response = await client.get(f"/tasks/{task_id}")
    assert response.status_code == 200
    return await response.get_data(as_text=True)


def region(page: str, name: str) -> str:
    """One live region of the task page (``<section id="task-NAME">``), as HTML."""
    match = re.search(rf'<section id="task-{name}"[^>]*>(.*?)</section>', page, re.S)
    assert match, f"no {name} region"
    return match[1]


def readable(fragment: str) -> str:
    """The text a reader sees: tags dropped, entities decoded, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", fragment)).split())


def attempts_of(history: str) -> list[str]:
    return re.findall(r"<details class=\"attempt[^\"]*\"[^>]*>.*?</details>", history, re.S)


async def test_every_attempt_is_shown_oldest_first_the_latest_open(
    client: Client, runner: Runner
) -> None:
    task_id = await rejected_twice(runner, approve=True)
    history = region(await page_of(client, task_id), "history")
    first, second, third = attempts_of(history)
    assert [" open" in item.split(">", 1)[0] for item in (first, second, third)] == [
        False, False, True]
    assert DRAFTS[0] in readable(first)
    assert f"{DRAFTS[1]} Asked: use her name" in readable(second)
    assert f"{DRAFTS[2]} Asked: say how much" in readable(third)
    assert "Attempt 2, after ann’s comment: “use her name”" in readable(second)
    assert "Attempt 3, after bob’s comment: “say how much”" in readable(third)
    assert "Rejected by ann" in readable(first) and "Approved by ann" in readable(third)


async def test_each_attempt_is_compared_word_by_word_with_the_one_before(
    client: Client, runner: Runner
) -> None:
    task_id = await rejected_twice(runner, approve=True)
    first, second, third = attempts_of(region(await page_of(client, task_id), "history"))
    assert "<ins>" not in first and "<del>" not in first
    assert "<del>customer, </del><ins>Ann,</ins> " in second
    assert "<del>late.</del><ins>on its way. Asked: use her name</ins>" in second
    assert "refund <ins>of 20 EUR</ins> is on its way. Asked: <del>use her name</del>" \
           "<ins>say how much</ins>" in third
    assert "Changes since attempt 2" in readable(third)


async def test_the_review_card_shows_what_was_asked_and_what_changed(
    client: Client, runner: Runner
) -> None:
    task = await runner.submit("write to the customer", by=OPERATOR)
    await reach(runner, task.task_id, Status.WAITING_FOR_REVIEW, 1)
    review = region(await page_of(client, task.task_id), "review")
    assert "<ins>" not in review and "Changes since" not in review  # nothing before it
    await runner.decide(task.task_id, "rejected", "use her name", "ann", by=OPERATOR)
    await reach(runner, task.task_id, Status.WAITING_FOR_REVIEW, 2)
    page = await page_of(client, task.task_id)
    review = region(page, "review")
    assert "Attempt 2, after ann’s comment: “use her name”" in readable(review)
    assert "Changes since attempt 1: 8 words added, 2 removed" in readable(review)
    assert "<del>customer, </del><ins>Ann,</ins> " in review
    # the attempt under review is in the card; its history entry points there
    latest = attempts_of(region(page, "history"))[-1]
    assert "Under review" in readable(latest) and DRAFTS[1] not in latest


async def test_the_review_card_says_when_the_attempt_is_the_last_allowed(
    client: Client, runner: Runner
) -> None:
    task = await runner.submit("write to the customer", by=OPERATOR)
    await reach(runner, task.task_id, Status.WAITING_FOR_REVIEW, 1)
    assert "last attempt" not in readable(region(await page_of(client, task.task_id), "review"))
    task_id = await rejected_twice(runner)
    review = readable(region(await page_of(client, task_id), "review"))
    assert "Attempt 3 is the last one allowed (3 at most): rejecting it fails the task." in review


async def test_a_failed_attempt_shows_the_processors_error(tmp_path: Path) -> None:
    def broken(job: Job) -> str:
        raise RuntimeError("the model is away")

    config = Config(db=str(tmp_path / "hitl.db"), process_delay=0, retry_wait=0, retries=2,
                    auth="none")
    app = create_app(config, processor=broken)
    async with app.test_app():
        runner: Runner = app.extensions["runner"]
        task = await runner.submit("anything", by=OPERATOR)
        await reach(runner, task.task_id, Status.FAILED)
        [attempt] = attempts_of(region(await page_of(app.test_client(), task.task_id),
                                       "history"))
    assert "processing failed after 2 tries: RuntimeError: the model is away" in readable(
        attempt)


async def test_hostile_text_in_outputs_and_diffs_is_escaped(
    client: Client, runner: Runner
) -> None:
    task = await runner.submit(HOSTILE, by=OPERATOR)
    await reach(runner, task.task_id, Status.WAITING_FOR_REVIEW, 1)
    await runner.decide(task.task_id, "rejected", HOSTILE, HOSTILE, by=OPERATOR)
    await reach(runner, task.task_id, Status.WAITING_FOR_REVIEW, 2)
    page = await page_of(client, task.task_id)
    assert "<img" not in page and "<script>alert" not in page
    review = region(page, "review")
    inserted = re.findall(r"<ins>(.*?)</ins>", review, re.S)
    assert any("&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in text for text in inserted)
    assert f"after {HOSTILE}’s comment: “{HOSTILE}”" in readable(review)


async def test_earlier_outputs_of_a_migrated_task_are_said_to_be_unknown(
    tmp_path: Path
) -> None:
    db = tmp_path / "old.db"
    old_database(db)  # from before attempts were kept
    app = create_app(Config(db=str(db), process_delay=0, auth="none"), processor=drafts)
    async with app.test_app():
        page = await page_of(app.test_client(), "old")
    first, second, third = attempts_of(region(page, "history"))
    for earlier in (first, second):
        assert "unknown: it was made before hitl kept every attempt" in readable(earlier)
    assert "Attempt 3, after ann’s comment: “still no”" in readable(third)
    review = region(page, "review")
    assert "third output" in review and "<ins>" not in review and "<del>" not in review
    assert "nothing to compare: the output of attempt 2 is unknown" in readable(review)


async def test_a_rejection_from_the_form_needs_a_comment_the_api_does_not(
    client: Client, runner: Runner
) -> None:
    task = await runner.submit("write to the customer", by=OPERATOR)
    await reach(runner, task.task_id, Status.WAITING_FOR_REVIEW, 1)
    review = region(await page_of(client, task.task_id), "review")
    assert re.search(r"<textarea[^>]* required", review)
    assert re.search(r'<button[^>]* value="approved"[^>]* formnovalidate', review)
    for comment in ("", "  \r\n "):
        response = await post_form(client, f"/tasks/{task.task_id}/decision", {
            "feedback": "rejected", "attempt": "1", "comment": comment})
        assert response.status_code == 400
        assert "Comment: say what the next attempt should change" in await response.get_data(
            as_text=True)
    assert (await runner.get_task(task.task_id, by=OPERATOR)).reviews == []
    response = await client.post(f"/feedback/{task.task_id}", json={"feedback": "rejected"})
    assert response.status_code == 200  # the reference page rejects without a comment


@pytest.mark.parametrize("htmx", [False, True])
async def test_the_cancel_button_stops_an_unfinished_task(
    client: Client, runner: Runner, htmx: bool
) -> None:
    task = await runner.submit("write to the customer", by=OPERATOR)
    await reach(runner, task.task_id, Status.WAITING_FOR_REVIEW, 1)
    review = region(await page_of(client, task.task_id), "review")
    action = f"/tasks/{task.task_id}/cancel"
    assert f'<form class="cancel-form" method="post" action="{action}"' in review
    headers = {"HX-Request": "true"} if htmx else {}
    response = await client.post(action, headers=headers)
    body = await response.get_data(as_text=True)
    if htmx:
        assert response.status_code == 200 and "The task was cancelled." in body
    else:
        assert response.status_code == 303
        assert response.headers["Location"] == f"/tasks/{task.task_id}"
    assert (await runner.get_task(task.task_id, by=OPERATOR)).status is Status.CANCELLED
    assert "cancel-form" not in await page_of(client, task.task_id)
    response = await client.post(action, headers=headers)
    assert response.status_code == 409
    assert "The task was not cancelled" in await response.get_data(as_text=True)


async def test_next_opens_the_task_waiting_longest(client: Client, runner: Runner) -> None:
    response = await client.get("/next")
    assert response.status_code == 303
    assert response.headers["Location"] == "/dashboard?status=waiting_for_review"
    first, second = [await runner.submit(f"task {n}", by=OPERATOR) for n in (1, 2)]
    await reach(runner, first.task_id, Status.WAITING_FOR_REVIEW, 1)
    await reach(runner, second.task_id, Status.WAITING_FOR_REVIEW, 1)
    assert (await client.get("/next")).headers["Location"] == f"/tasks/{first.task_id}"
    # waits anew, after the second
    await runner.decide(first.task_id, "rejected", "again", by=OPERATOR)
    await reach(runner, first.task_id, Status.WAITING_FOR_REVIEW, 2)
    assert (await client.get("/next")).headers["Location"] == f"/tasks/{second.task_id}"
    response = await client.get(f"/next?after={second.task_id}")  # from the second's page
    assert response.headers["Location"] == f"/tasks/{first.task_id}"
    assert (await client.get("/next?after=" + "f" * 65)).status_code == 400


async def test_times_are_utc_time_elements_with_a_utc_tooltip(
    client: Client, runner: Runner
) -> None:
    task = await runner.submit("write to the customer", by=OPERATOR)
    await reach(runner, task.task_id, Status.WAITING_FOR_REVIEW, 1)
    await runner.decide(task.task_id, "rejected", "use her name", "ann", by=OPERATOR)
    await reach(runner, task.task_id, Status.WAITING_FOR_REVIEW, 2)
    page = await page_of(client, task.task_id)
    times = re.findall(r"<time [^>]*>[^<]*</time>", page)
    assert len(times) >= 4  # submitted, updated, attempts, the decision
    for element in times:
        match = re.fullmatch(r'<time datetime="(\d{4}-\d\d-\d\dT(\d\d:\d\d:\d\d)\.\d{3}\+00:00)"'
                             r' title="(\d{4}-\d\d-\d\d) (\d\d:\d\d:\d\d) UTC" data-local>'
                             r"(\d\d:\d\d:\d\d) UTC</time>", element)
        assert match, element
        assert match[2] == match[4] == match[5] and match[1].startswith(match[3])


async def test_the_page_says_which_keys_do_what(client: Client, runner: Runner) -> None:
    task = await runner.submit("write to the customer", by=OPERATOR)
    await reach(runner, task.task_id, Status.WAITING_FOR_REVIEW, 1)
    page = await page_of(client, task.task_id)
    keys = re.search(r'<p class="keys[^"]*">.*?</p>', page, re.S)
    assert keys, "no help line"
    assert "a approve · r comment to reject · n next task waiting" in readable(keys[0])
    assert f'href="/next?after={task.task_id}"' in page


async def test_the_stream_updates_the_attempts_region_live(
    live_server: LiveServer, actions: ReviewActions
) -> None:
    runner: Runner = live_server.app.extensions["runner"]
    task_id = await actions.submit("write to the customer")
    await reach(runner, task_id, Status.WAITING_FOR_REVIEW, 1)
    reader = asyncio.create_task(read_named(actions.http, f"/tasks/{task_id}/stream"))
    await asyncio.sleep(0.2)
    assert (await actions.reject(task_id, "use her name", reviewer="ann")).status_code == 200
    await reach(runner, task_id, Status.WAITING_FOR_REVIEW, 2)
    assert (await actions.approve(task_id)).status_code == 200
    events = await asyncio.wait_for(reader, BOUND)
    histories = [event.html for event in events if event.event == "history"]
    assert len(attempts_of(histories[0])) == 1
    last = attempts_of(histories[-1])
    assert len(last) == 2 and "<del>customer, </del><ins>Ann,</ins> " in last[1]
    reviews = [event.html for event in events if event.event == "review"]
    assert any("<ins>Ann,</ins> " in review for review in reviews)
