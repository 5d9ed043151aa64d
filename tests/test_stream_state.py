"""A task's stream starts from the state the task is in; id 0 asks for the whole log; an
id that cannot be replayed gets the current state marked as a reset, never a gap."""

from __future__ import annotations

import httpx

from .conftest import ReviewActions, Watcher, assert_contiguous, read_sse


async def test_a_stream_starts_with_the_current_state_and_its_latest_id(
        actions: ReviewActions) -> None:
    task_id = await actions.submit()
    full = actions.watch(task_id, last_id=0)
    waiting = await full.wait_for("waiting_for_review")
    now = actions.watch(task_id)
    first = await now.wait_for("waiting_for_review")
    assert now.events[0] == first
    assert (first.id, first.data) == (waiting.id, waiting.data)  # output_to_review, attempt
    await actions.reject(task_id, comment="shorter")
    second = await now.wait_for("waiting_for_review", attempt=2)
    assert_contiguous(now.ids(), start=first.id)  # then every live message after it
    assert second.data["output_to_review"]
    back = actions.watch(task_id, last_id=first.id)  # a reconnect: exactly what came after
    await back.wait_for("waiting_for_review", attempt=2)
    assert back.ids() == now.ids()[1:len(back.ids()) + 1]


async def test_a_finished_task_gives_its_end_then_closes(actions: ReviewActions) -> None:
    task_id = await actions.submit()
    await actions.watch(task_id, last_id=0).wait_for("waiting_for_review")
    assert (await actions.approve(task_id)).status_code == 200
    await actions.watch(task_id, last_id=0).wait_for("stream_closed")
    late = actions.watch(task_id)
    await late.ended()
    assert late.statuses() == ["completed", "stream_closed"]
    assert late.events[0].data["final_result"]


async def test_id_zero_replays_the_whole_log_by_header_or_query(
        actions: ReviewActions) -> None:
    task_id = await actions.submit()
    by_header = actions.watch(task_id, last_id=0)
    await by_header.wait_for("waiting_for_review")
    by_query = Watcher()
    await read_sse_until(actions.http, f"/stream/{task_id}?last_event_id=0", by_query)
    for watcher in (by_header, by_query):
        assert watcher.statuses()[0] == "pending"
        assert_contiguous(watcher.ids(), start=1)


async def read_sse_until(http: httpx.AsyncClient, path: str, watcher: Watcher) -> None:
    import asyncio

    watcher.task = asyncio.create_task(read_sse(http, path, watcher))
    await watcher.wait_for("waiting_for_review")


async def test_an_id_that_cannot_be_replayed_gets_the_state_marked_reset(
        actions: ReviewActions) -> None:
    task_id = await actions.submit()
    waiting = await actions.watch(task_id, last_id=0).wait_for("waiting_for_review")
    ahead = actions.watch(task_id, last_id=999)
    reset = await ahead.wait_for("waiting_for_review")
    assert ahead.events[0] == reset
    assert reset.id == waiting.id and reset.data["replay"] == "reset"
    assert reset.data["output_to_review"] == waiting.data["output_to_review"]
