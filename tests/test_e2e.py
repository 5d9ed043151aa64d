"""End to end: a real hypercorn server on a free loopback port, SSE read with httpx."""

from __future__ import annotations

import asyncio

from .conftest import LiveServer, ReviewActions, assert_contiguous, until


async def test_three_watchers_each_get_every_message_of_a_reject_then_approve_run(
    actions: ReviewActions,
) -> None:
    task_id = await actions.submit("summarise the report")
    watchers = [actions.watch(task_id, last_id=0) for _ in range(3)]  # the whole log
    await asyncio.gather(*(w.wait_for("waiting_for_review") for w in watchers))
    rejected = await actions.reject(task_id, comment="shorter, please", reviewer="ann")
    assert rejected.status_code == 200
    for watcher in watchers:
        await watcher.wait_for("processing_feedback")
    second = await watchers[0].wait_for("waiting_for_review", attempt=2)
    assert "shorter, please" in second.data["output_to_review"]
    assert (await actions.approve(task_id, attempt=2)).status_code == 200
    for watcher in watchers:
        await watcher.ended()
    expected = watchers[0].events
    assert [e.data["status"] for e in expected][-3:] == ["processing_feedback", "completed",
                                                          "stream_closed"]
    assert_contiguous([e.id for e in expected if e.id is not None], start=1)
    for watcher in watchers[1:]:
        assert watcher.events == expected
    assert watchers[0].retry == 3000


async def test_subscriber_count_returns_to_zero_after_clients_go_away(
    live_server: LiveServer, actions: ReviewActions
) -> None:
    task_id = await actions.submit()
    watchers = [actions.watch(task_id) for _ in range(5)] + [actions.watch()]
    await asyncio.gather(*(w.wait_for("waiting_for_review") for w in watchers[:5]))
    broker = live_server.app.extensions["broker"]
    assert broker.subscriber_count() == 6
    for watcher in watchers:
        assert watcher.task is not None
        watcher.task.cancel()
    await until(lambda: broker.subscriber_count() == 0, "every subscriber to be removed", 2)


async def test_late_joiner_gets_the_current_state_at_once(actions: ReviewActions) -> None:
    task_id = await actions.submit()
    first = actions.watch(task_id, last_id=0)
    await first.wait_for("waiting_for_review")
    late = actions.watch(task_id)  # no Last-Event-ID: the state it is in, then live
    event = await late.wait_for("waiting_for_review", timeout=2)
    assert event.data["attempt"] == 1 and event.data["output_to_review"]
    assert late.events == [first.events[-1]]  # one message: the latest, with its id
    assert "replay" not in event.data


async def test_reconnect_with_last_event_id_gets_exactly_what_was_missed(
    actions: ReviewActions,
) -> None:
    task_id = await actions.submit()
    first = actions.watch(task_id)
    await first.wait_for("waiting_for_review")
    assert first.task is not None
    first.task.cancel()  # the browser goes away
    seen = first.ids()[-1]
    await actions.reject(task_id, comment="again")
    await actions.watch(task_id, last_id=0).wait_for("processing_feedback")
    back = actions.watch(task_id, last_id=seen)
    await back.wait_for("processing_feedback")
    assert_contiguous(back.ids(), start=seen + 1)
    assert back.events[0].data["comment"] == "again"


async def test_twenty_concurrent_approvals_give_exactly_one_200(actions: ReviewActions) -> None:
    task_id = await actions.submit()
    watcher = actions.watch(task_id)
    await watcher.wait_for("waiting_for_review")
    responses = await asyncio.gather(
        *(actions.approve(task_id, reviewer=f"r{n}") for n in range(20)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] + [409] * 19
    await watcher.ended()
    assert watcher.statuses().count("processing_feedback") == 1


async def test_dashboard_stream_carries_every_task_with_its_id(actions: ReviewActions) -> None:
    dashboard = actions.watch()
    await asyncio.sleep(0.05)
    ids = [await actions.submit(f"task {n}") for n in range(3)]
    for task_id in ids:
        await actions.watch(task_id).wait_for("waiting_for_review")

    def waiting() -> set[str]:
        return {e.data["task_id"] for e in dashboard.events
                if e.data["status"] == "waiting_for_review"}

    await until(lambda: waiting() == set(ids), "the dashboard to show every task waiting", 5)
    assert_contiguous(dashboard.ids())
