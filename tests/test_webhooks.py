"""Webhooks to a real HTTP receiver on loopback, verified with ``standardwebhooks``:
signed, in order per endpoint, retried with the same ``webhook-id`` until taken, skipped
after the retry window, never held up by another endpoint; what each event type is."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from hitl import Config
from hitl.delivery import Dispatcher
from hitl.models import Status
from hitl.store import Store
from hitl.webhooks import EVENTS, Endpoint, Webhooks, secret_key

from .conftest import LiveServer, ReviewActions, reach, until
from .receiver import Received, Receiver

ON_POSTGRESQL = True  # and on SQLite (tests/conftest.py)

PUBLIC = "https://hitl.example"


@pytest.fixture
def config(config: Config) -> Config:
    """Retries in tens of milliseconds, so that a test of many takes well under a second."""
    return config.with_changes(webhook_first_retry=0.05, webhook_max_backoff=0.2, webhook_poll=0.2,
                               public_url=PUBLIC)


def dispatcher(server: LiveServer) -> Dispatcher:
    return server.app.extensions["webhooks"]  # type: ignore[no-any-return]


async def register(server: LiveServer, url: str, *events: str) -> Endpoint:
    endpoint = await dispatcher(server).webhooks.add(url, events)
    await dispatcher(server).sync()
    return endpoint


async def taken(receiver: Receiver, count: int, timeout: float = 10) -> None:
    await until(lambda: len(receiver.taken) >= count,
                f"{count} deliveries (got {len(receiver.taken)}: "
                f"{[r.json()['type'] for r in receiver.taken]})", timeout)


def kinds(bodies: list[Any]) -> list[tuple[str, str]]:
    return [(body["type"], body["data"]["task_id"]) for body in bodies]


async def test_events_are_signed_and_carry_the_task(live_server: LiveServer,
                                                    actions: ReviewActions) -> None:
    async with Receiver() as receiver:
        endpoint = await register(live_server, receiver.url)
        async with live_server.http() as http:
            task_id = (await http.post("/submit", json={
                "data": "x", "title": "Reply to Ann", "metadata": {"ticket": 7}})).json()["task_id"]
        runner = live_server.app.extensions["runner"]
        await reach(runner, task_id, Status.WAITING_FOR_REVIEW)
        assert (await actions.reject(task_id, "shorter", attempt=1)).status_code == 200
        await reach(runner, task_id, Status.WAITING_FOR_REVIEW, attempt=2)
        assert (await actions.approve(task_id, attempt=2)).status_code == 200
        await taken(receiver, 3)
        bodies = receiver.verified(endpoint.secret)  # raises unless every signature holds
    assert kinds(bodies) == [("task.waiting_for_review", task_id),
                             ("task.waiting_for_review", task_id), ("task.completed", task_id)]
    assert [body["data"]["attempt"] for body in bodies] == [1, 2, 2]
    assert bodies[2]["data"] == {"task_id": task_id, "status": "completed", "attempt": 2,
                                 "title": "Reply to Ann", "metadata": {"ticket": 7},
                                 "url": f"{PUBLIC}/tasks/{task_id}"}
    assert all(body["timestamp"].endswith("+00:00") for body in bodies)
    ids = [request.id for request in receiver.taken]
    assert len(set(ids)) == 3 and all(i.startswith("msg_") for i in ids)
    assert receiver.taken[0].headers["content-type"] == "application/json"
    assert abs(int(receiver.taken[0].headers["webhook-timestamp"]) - time.time()) < 30


async def test_a_failing_receiver_gets_every_event_in_order_once_it_recovers(
    live_server: LiveServer, actions: ReviewActions
) -> None:
    async def down_for_a_while(request: Received) -> int:
        return 503 if len(receiver.requests) <= 6 else 200

    async with Receiver(down_for_a_while) as receiver:
        endpoint = await register(live_server, receiver.url)
        runner = live_server.app.extensions["runner"]
        tasks = [await actions.submit(f"task {n}") for n in range(3)]
        for task_id in tasks:
            await reach(runner, task_id, Status.WAITING_FOR_REVIEW)
        for task_id in tasks:
            assert (await actions.http.post(f"/api/tasks/{task_id}/cancel")).status_code == 200
        await taken(receiver, 6)
        bodies = receiver.verified(endpoint.secret)
        listing = await dispatcher(live_server).webhooks.listing()
    messages = [json.loads(r.body)["type"] for r in receiver.requests]
    assert messages[:7] == ["task.waiting_for_review"] * 7  # the first, tried 7 times
    assert {r.id for r in receiver.requests[:7]} == {receiver.taken[0].id}  # one webhook-id
    assert sorted(kinds(bodies)[:3]) == sorted(("task.waiting_for_review", t) for t in tasks)
    assert sorted(kinds(bodies)[3:]) == sorted(("task.cancelled", t) for t in tasks)
    numbers = [int(r.id.rsplit("_", 1)[1]) for r in receiver.taken]
    assert numbers == sorted(numbers) and len(set(numbers)) == 6  # in order, each once
    gaps = [b.at - a.at for a, b in zip(receiver.requests[:7], receiver.requests[1:7],
                                        strict=False)]
    assert gaps[3] > gaps[0]  # backing off (doubling from 0.05 s, capped at 0.2 s)
    [shown] = listing
    failed = [a for a in shown["attempts"] if a["outcome"] == "failed"]
    assert failed and failed[0]["status_code"] == 503 and failed[0]["error"] == "HTTP 503"
    assert failed[0]["next_retry"] is not None and shown["retrying"] is None


async def test_an_event_retried_too_long_is_skipped_and_recorded(
    live_server: LiveServer, actions: ReviewActions
) -> None:
    dispatcher(live_server).config = dispatcher(live_server).config.with_changes(
        webhook_retry_for=0.3)
    refused: set[str] = set()

    async def refuse_the_first(request: Received) -> int:
        if not refused:
            refused.add(request.id)
        return 500 if request.id in refused else 200

    async with Receiver(refuse_the_first) as receiver:
        await register(live_server, receiver.url)
        first = await actions.submit("first")
        await until(lambda: bool(refused), "the first event")
        second = await actions.submit("second")
        await taken(receiver, 1)
        listing = await dispatcher(live_server).webhooks.listing()
    assert receiver.taken[0].json()["data"]["task_id"] == second
    assert receiver.requests[0].json()["data"]["task_id"] == first
    skipped = [a for a in listing[0]["attempts"] if a["outcome"] == "skipped"]
    assert len(skipped) == 1 and skipped[0]["status_code"] == 500
    assert skipped[0]["try"] > 1


async def test_a_slow_endpoint_delays_neither_another_nor_the_service(
    live_server: LiveServer, actions: ReviewActions
) -> None:
    release = asyncio.Event()

    async def stuck(request: Received) -> int:
        await release.wait()
        return 200

    async with Receiver(stuck) as slow, Receiver() as fast:
        await register(live_server, slow.url)
        await register(live_server, fast.url)
        started = time.monotonic()
        tasks = [await actions.submit(f"task {n}") for n in range(3)]
        await taken(fast, 3, timeout=5)
        took = time.monotonic() - started
        assert len(slow.requests) == 1 and not slow.taken  # still waiting on its first
        health = await actions.http.get("/healthz")
        release.set()
        await taken(slow, 3)
    assert took < 3 and health.status_code == 200
    assert [r.json()["data"]["task_id"] for r in fast.taken] == tasks
    assert [r.json()["data"]["task_id"] for r in slow.taken] == tasks


async def test_a_delivery_that_takes_too_long_is_tried_again(
    live_server: LiveServer, actions: ReviewActions
) -> None:
    dispatcher(live_server).config = dispatcher(live_server).config.with_changes(
        webhook_timeout=0.2)

    async def slow_at_first(request: Received) -> int:
        if len(receiver.requests) == 1:
            await asyncio.sleep(1)
        return 200

    async with Receiver(slow_at_first) as receiver:
        await register(live_server, receiver.url)
        await actions.submit()
        await taken(receiver, 1)
        listing = await dispatcher(live_server).webhooks.listing()
    assert len({r.id for r in receiver.requests}) == 1
    errors = [a["error"] for a in listing[0]["attempts"]]
    assert "no answer within 0.2 s" in errors


async def test_an_endpoint_gets_only_its_events(live_server: LiveServer,
                                                actions: ReviewActions) -> None:
    async with Receiver() as done, Receiver() as everything:
        await register(live_server, done.url, "task.completed", "task.cancelled")
        await register(live_server, everything.url)
        task_id = await actions.submit()
        await reach(live_server.app.extensions["runner"], task_id, Status.WAITING_FOR_REVIEW)
        await actions.approve(task_id)
        await taken(everything, 2)
        await taken(done, 1)
        await asyncio.sleep(0.3)
    assert [r.json()["type"] for r in done.taken] == ["task.completed"]
    assert [r.json()["type"] for r in everything.taken] == ["task.waiting_for_review",
                                                            "task.completed"]


async def test_a_removed_endpoint_gets_nothing_more(live_server: LiveServer,
                                                    actions: ReviewActions) -> None:
    async with Receiver() as receiver:
        endpoint = await register(live_server, receiver.url)
        await actions.submit()
        await taken(receiver, 1)
        await dispatcher(live_server).webhooks.remove(endpoint.id)
        await dispatcher(live_server).sync()
        await actions.submit()
        await asyncio.sleep(0.5)
    assert len(receiver.requests) == 1


async def test_each_stored_message_maps_to_its_event(store: Store) -> None:
    """The outbox's mapping, in SQL: votes (another attempt's count) and a timeout, as
    the quorum and deadline features store them, included."""
    messages = [
        ("pending", {}), ("running", {"attempt": 1, "progress": 0.5}),
        ("waiting_for_review", {"attempt": 1, "output_to_review": "y" * 100_000}),
        ("waiting_for_review", {"attempt": 1, "votes": []}),
        ("waiting_for_review", {"attempt": 1, "votes": [{"reviewer": "ann"}]}),
        ("processing_feedback", {"attempt": 1, "reviewer": "ann"}),
        ("processing_feedback", {"attempt": 1, "reviewer": "timeout", "timed_out": True}),
        ("completed", {"attempt": 2}), ("failed", {}), ("cancelled", {}),
        # an escalation (the deadline passed: others review now), and a decision by a user
        # who happens to be called "timeout" (made before that name was kept for the system)
        ("waiting_for_review", {"attempt": 1, "escalated_to": ["lead"], "timed_out": True}),
        ("processing_feedback", {"attempt": 1, "reviewer": "timeout"}),
    ]
    async with store.transaction() as conn:  # as stored, by hand: either engine
        await conn.execute(
            """INSERT INTO tasks (task_id, task_input, status, attempt, last_seq, created_at,
                                  updated_at) VALUES ('t', 'x', 'completed', 2, 9, 1, 1)""")
        for seq, (status, data) in enumerate(messages, start=1):
            await conn.execute(
                "INSERT INTO messages (gid, task_id, seq, status, data) "
                "VALUES (?, 't', ?, ?, ?)",
                (seq, seq, status, json.dumps({"status": status, **data})))
    hooks = Webhooks(store)
    assert await hooks.horizon() == 12
    pending = await hooks.pending(0, 12, 100)
    assert [(p.gid, p.type, p.attempt) for p in pending] == [
        (3, "task.waiting_for_review", 1), (4, "task.waiting_for_review", 1),
        (5, "task.vote", 1), (6, None, 1), (7, "task.timed_out", 1), (8, "task.completed", 2),
        (9, "task.failed", 2), (10, "task.cancelled", 2), (11, "task.timed_out", 1),
        (12, None, 1)]
    assert {p.type for p in pending} - {None} == set(EVENTS)
    assert [p.gid for p in await hooks.pending(5, 8, 100)] == [6, 7, 8]


async def test_a_cursor_moves_only_from_where_it_was(store: Store) -> None:
    """Two workers (two processes) on one endpoint: only the first moves it on."""
    hooks = Webhooks(store)
    endpoint = await hooks.add("http://127.0.0.1:9/hook")
    assert await hooks.advance(endpoint, 5)
    assert not await hooks.advance(endpoint, 7)  # it saw the cursor at 0: it is at 5 now
    assert (await hooks.get(endpoint.id)).cursor == 5  # type: ignore[union-attr]


@pytest.mark.parametrize(("secret", "why"), [
    ("abc", "whsec_"), ("whsec_***", "base64"), ("whsec_" + "QUJD", "24 to 64 bytes")])
async def test_a_bad_secret_url_or_event_is_refused(store: Store, secret: str,
                                                    why: str) -> None:
    hooks = Webhooks(store)
    from hitl.errors import Invalid

    with pytest.raises(Invalid, match=why):
        await hooks.add("http://127.0.0.1/hook", secret=secret)
    for url in ("ftp://x/y", "http://", "not a url"):
        with pytest.raises(Invalid, match="url"):
            await hooks.add(url)
    with pytest.raises(Invalid, match="task.nope"):
        await hooks.add("http://127.0.0.1/hook", ["task.nope"])
    assert len(secret_key((await hooks.add("http://127.0.0.1/hook")).secret)) == 32


async def test_votes_and_timeouts_become_their_events(live_server: LiveServer,
                                                      actions: ReviewActions) -> None:
    """Real votes (quorum 2) and a real review timeout, not hand-made messages."""
    runner = live_server.app.extensions["runner"]
    async with Receiver() as receiver, live_server.http() as http:
        endpoint = await register(live_server, receiver.url)
        voted = (await http.post("/submit", json={"data": "x", "quorum": 2})).json()["task_id"]
        await reach(runner, voted, Status.WAITING_FOR_REVIEW)
        assert (await actions.approve(voted, reviewer="ann")).status_code == 200
        assert (await actions.approve(voted, reviewer="bob")).status_code == 200
        await reach(runner, voted, Status.COMPLETED)
        timed = (await http.post("/submit", json={"data": "y", "review_timeout": 0.2,
                                                  "on_timeout": "approve"})).json()["task_id"]
        await reach(runner, timed, Status.COMPLETED)
        await taken(receiver, 6)
        bodies = receiver.verified(endpoint.secret)
    assert kinds(bodies) == [("task.waiting_for_review", voted), ("task.vote", voted),
                             ("task.completed", voted), ("task.waiting_for_review", timed),
                             ("task.timed_out", timed), ("task.completed", timed)]
