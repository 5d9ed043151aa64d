"""Review-only tasks: ``POST /submit`` with an ``output`` starts at ``waiting_for_review``
with that text as attempt 1; a rejection's next attempt is the processor's, with the
comment. Over real HTTP on a live hypercorn, with the built-in processor."""

from __future__ import annotations

import pytest

from .conftest import LiveServer, ReviewActions, within

ON_POSTGRESQL = True  # and on SQLite (tests/conftest.py)

DRAFT = "Dear customer, thank you for writing."


async def submit(actions: ReviewActions, **body: object) -> str:
    response = await actions.http.post("/submit", json={"data": "reply to the customer",
                                                        "output": DRAFT, **body})
    assert response.status_code == 202, response.text
    return str(response.json()["task_id"])


async def test_a_review_only_task_waits_for_review_at_once_with_its_output(
        actions: ReviewActions) -> None:
    task_id = await submit(actions)
    task = (await actions.http.get(f"/api/tasks/{task_id}")).json()  # no wait: as stored
    assert (task["status"], task["attempt"], task["processed_output"]) == (
        "waiting_for_review", 1, DRAFT)
    [attempt] = task["attempts"]
    assert (attempt["output"], attempt["tries"], attempt["error"]) == (DRAFT, 0, None)
    assert attempt["started_at"] == attempt["finished_at"] is not None
    watcher = actions.watch(task_id, last_id=0)
    first = await watcher.wait_for("waiting_for_review")
    assert first.id == 1 and first.data == {"task_id": task_id, "status": "waiting_for_review",
                                            "output_to_review": DRAFT, "attempt": 1}
    response = await actions.approve(task_id, attempt=1)
    assert response.status_code == 200, response.text
    done = await watcher.wait_for("completed")
    assert done.data["final_result"] == DRAFT
    await watcher.ended()
    assert watcher.statuses() == ["waiting_for_review", "processing_feedback", "completed",
                                  "stream_closed"]  # never pending, never running


async def test_a_rejection_sends_a_review_only_task_to_its_processor_with_the_comment(
        actions: ReviewActions) -> None:
    task_id = await submit(actions)
    watcher = actions.watch(task_id, last_id=0)
    response = await actions.reject(task_id, "shorter, please", attempt=1)
    assert response.status_code == 200, response.text
    second = await watcher.wait_for("waiting_for_review", attempt=2)
    assert second.data["output_to_review"] == ("Processed 'reply to the customer' (attempt 2), "
                                               "revised for the comment 'shorter, please'")
    assert "running" in watcher.statuses()
    task = (await actions.http.get(f"/api/tasks/{task_id}")).json()
    assert [attempt["output"] for attempt in task["attempts"]] == [
        DRAFT, second.data["output_to_review"]]


async def test_a_review_only_task_with_a_timeout_says_its_deadline(
        actions: ReviewActions) -> None:
    task_id = await submit(actions, review_timeout=60)
    watcher = actions.watch(task_id, last_id=0)
    first = await watcher.wait_for("waiting_for_review")
    task = (await actions.http.get(f"/api/tasks/{task_id}")).json()
    assert first.data["review_deadline"] == task["review_deadline"] is not None


async def test_a_review_only_task_with_a_quorum_shows_its_tally(actions: ReviewActions) -> None:
    task_id = await submit(actions, quorum=2)
    watcher = actions.watch(task_id, last_id=0)
    first = await watcher.wait_for("waiting_for_review")
    assert (first.data["approvals"], first.data["quorum"], first.data["votes"]) == (0, 2, [])


async def test_the_idempotency_key_stands_for_the_output_too(actions: ReviewActions) -> None:
    headers = {"Idempotency-Key": "draft-1"}
    body = {"data": "reply", "output": DRAFT}
    first = await actions.http.post("/submit", json=body, headers=headers)
    again = await actions.http.post("/submit", json=body, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["task_id"] == again.json()["task_id"]
    other = await actions.http.post("/submit", json={**body, "output": "another draft"},
                                    headers=headers)
    assert other.status_code == 409, other.text
    unreviewed = await actions.http.post("/submit", json={"data": "reply"}, headers=headers)
    assert unreviewed.status_code == 409, unreviewed.text


@pytest.mark.parametrize(("output", "error"), [
    ("  ", "output: must not be empty"),
    (17, "output: must be a string"),
    ("x" * 200_001, "output: must be at most 200000 characters"),
])
async def test_a_bad_output_is_a_400_that_names_it(actions: ReviewActions, output: object,
                                                   error: str) -> None:
    response = await actions.http.post("/submit", json={"data": "reply", "output": output})
    assert (response.status_code, response.json()["error"]) == (400, error)


async def test_a_waiting_review_only_task_resumes_after_a_restart(
        live_server: LiveServer) -> None:
    from .conftest import start_server, stop_server

    async with live_server.http() as http:
        task_id = await submit(ReviewActions(http))
    await stop_server(live_server)
    again = await start_server(live_server.app.config["HITL"])
    try:
        async with again.http() as http:
            actions = ReviewActions(http)
            response = await within(actions.approve(task_id, attempt=1), 10, "the approval")
            assert response.status_code == 200, response.text
            watcher = actions.watch(task_id, last_id=0)
            done = await watcher.wait_for("completed")
            assert done.data["final_result"] == DRAFT
    finally:
        await stop_server(again)
