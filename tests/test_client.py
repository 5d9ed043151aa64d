"""hitl.client against a real ``hitl serve`` process: every call, by both clients, each
error from a real answer, and a watch that outlives the server it started on."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from hitl.accounts import Role
from hitl.client import (
    Client,
    Conflict,
    Event,
    Forbidden,
    Invalid,
    NotFound,
    Task,
    Unauthorized,
    Unavailable,
)

from .clients import KINDS, Both, client_of, start_people_server
from .conftest import within
from .serverproc import ROOT, ServerProcess, free_port
from .test_docs import README
from .test_storage_faults import can_chattr, read_only

BOUND = 15  # seconds any one wait below may take
HEARTBEAT = "0.2"  # seconds: streams are never silent for long, as with a real proxy in front
MAX_BODY = 100_000  # bytes: a body over it is sent whole before the 413 (loopback buffers)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path_factory.mktemp("client") / "hitl.db",
                           extra=["--heartbeat", HEARTBEAT, "--max-body", str(MAX_BODY)]
                           ).start()
    yield server
    server.stop()


@pytest.fixture(params=KINDS)
async def hitl(request: pytest.FixtureRequest, server: ServerProcess) -> AsyncIterator[Both]:
    async with client_of(request.param, server.url) as both:
        yield both


async def waiting(hitl: Both, data: str = "draft a reply", **options: object) -> Task:
    """A new task, once its first attempt waits for review."""
    task: Task = await hitl.submit(data, **options)
    return await reach(hitl, task.task_id, "waiting_for_review")


async def reach(hitl: Both, task_id: str, status: str, attempt: int = 1) -> Task:
    async def reached() -> Task:
        while True:
            task: Task = await hitl.get(task_id)
            if task.status == status and task.attempt == attempt:
                return task
            await asyncio.sleep(0.02)

    return await within(reached(), BOUND, f"task {task_id} to be {status}/{attempt}")


async def test_submit_returns_the_stored_task_with_its_options(hitl: Both) -> None:
    task = await hitl.submit("draft a reply", title="Reply to Ann", metadata={"ticket": 7},
                             quorum=1, max_attempts=3, allow_self_review=True)
    assert isinstance(task, Task) and len(task.task_id) == 32
    assert task.task_input == "draft a reply" and task.title == "Reply to Ann"
    assert task.metadata == {"ticket": 7} and task.raw["max_attempts"] == 3
    assert task.status in ("pending", "running", "waiting_for_review")
    assert task.created_at is not None and task.created_at.tzinfo is not None
    again = await hitl.get(task.task_id)
    assert again.task_id == task.task_id and again.title == "Reply to Ann"


async def test_an_idempotency_key_makes_one_task_of_two_submits(hitl: Both) -> None:
    key = f"order-{hitl.kind}-{time.monotonic_ns()}"
    first = await hitl.submit("charge the card", idempotency_key=key)
    second = await hitl.submit("charge the card", idempotency_key=key)
    assert first.task_id == second.task_id
    with pytest.raises(Conflict, match="Idempotency-Key"):
        await hitl.submit("something else", idempotency_key=key)


async def test_approve_then_wait_gives_the_completed_task(hitl: Both) -> None:
    task = await waiting(hitl, "summarise the report")
    assert task.processed_output == "Processed 'summarise the report' (attempt 1)"
    await hitl.approve(task.task_id, "good", attempt=1, reviewer="ann")
    done = await within(hitl.wait(task.task_id, timeout=BOUND), BOUND + 5, "wait")
    assert done.status == "completed" and done.completed and done.finished
    assert done.final_result == task.processed_output
    assert [(r.decision, r.comment, r.reviewer, r.attempt) for r in done.reviews] == [
        ("approved", "good", "ann", 1)]
    page = await hitl.list(status="completed", limit=200)
    assert task.task_id in [listed.task_id for listed in page] and page.total >= len(page)
    assert all(listed.status == "completed" for listed in page)


async def test_a_rejection_runs_the_next_attempt_with_its_comment(hitl: Both) -> None:
    task = await waiting(hitl, "write a haiku")
    await hitl.reject(task.task_id, "shorter")
    second = await reach(hitl, task.task_id, "waiting_for_review", attempt=2)
    assert second.processed_output == ("Processed 'write a haiku' (attempt 2), revised for "
                                       "the comment 'shorter'")
    with pytest.raises(Conflict, match="attempt 1 is no longer under review"):
        await hitl.approve(task.task_id, attempt=1)
    await hitl.approve(task.task_id, attempt=2)
    done = await hitl.wait(task.task_id, timeout=BOUND)
    assert (done.status, done.attempt) == ("completed", 2)
    assert [r.decision for r in done.reviews] == ["rejected", "approved"]


async def test_an_approval_with_an_edit_makes_the_edit_the_result(hitl: Both) -> None:
    task = await waiting(hitl)
    await hitl.approve(task.task_id, edited_output="Dear Ann, yes.")
    done = await hitl.wait(task.task_id, timeout=BOUND)
    assert done.final_result == "Dear Ann, yes."
    assert done.reviews[-1].edited_output == "Dear Ann, yes."


async def test_cancel_then_wait_gives_the_cancelled_task(hitl: Both) -> None:
    task = await waiting(hitl)
    cancelled = await hitl.cancel(task.task_id)
    assert cancelled.status == "cancelled"
    assert (await hitl.wait(task.task_id, timeout=BOUND)).status == "cancelled"
    with pytest.raises(Conflict) as raised:
        await hitl.cancel(task.task_id)
    assert raised.value.status == 409 and raised.value.message.endswith("is already cancelled")


async def test_watch_from_the_start_yields_each_id_once_and_ends_with_the_task(
        hitl: Both) -> None:
    task = await waiting(hitl)
    events: list[Event] = []
    watching = asyncio.ensure_future(hitl.collect(task.task_id, events, last_event_id=0))
    await within(until_status(events, "waiting_for_review"), BOUND, "the replay")
    await hitl.approve(task.task_id)
    await within(watching, BOUND, "the watch to end with its task")
    stored = await hitl.get(task.task_id)
    assert [event.id for event in events] == list(range(1, stored.raw["last_seq"] + 1))
    assert [event.status for event in events] == [
        "pending", "running", "waiting_for_review", "processing_feedback", "completed"]
    assert events[-1].terminal and events[-1].data["final_result"] == stored.final_result
    assert all(event.task_id == task.task_id for event in events)


async def test_watch_with_no_id_starts_from_the_tasks_state_now(hitl: Both) -> None:
    task = await waiting(hitl)
    await hitl.approve(task.task_id)
    done = await hitl.wait(task.task_id, timeout=BOUND)
    events = await within(hitl.collect(task.task_id, []), BOUND, "the watch")
    assert [(event.id, event.status) for event in events] == [(done.raw["last_seq"],
                                                              "completed")]


async def test_wait_past_its_timeout_raises_timeout_error_on_time(hitl: Both) -> None:
    task = await waiting(hitl)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=f"task {task.task_id} did not finish within 0.5 s"):
        await within(hitl.wait(task.task_id, timeout=0.5), BOUND, "wait to time out")
    took = time.monotonic() - started
    # The stream's heartbeats (every 0.2 s) must not keep a blocking wait going.
    assert 0.5 <= took < 3, took
    await hitl.cancel(task.task_id)


@pytest.mark.parametrize("timeout", [0, 0.001])
async def test_wait_on_a_finished_task_returns_it_at_once_however_small_the_timeout(
        hitl: Both, timeout: float) -> None:
    """Both clients alike: the task is read first, outside the timeout."""
    task = await hitl.submit("x", output="draft")
    await hitl.approve(task.task_id, reviewer="bob")
    await within(until_finished(hitl, task.task_id), BOUND, "the task to finish")
    done = await within(hitl.wait(task.task_id, timeout=timeout), BOUND, "wait")
    assert (done.status, done.final_result) == ("completed", "draft")
    running = await waiting(hitl)
    with pytest.raises(TimeoutError, match=f"task {running.task_id} did not finish within"):
        await within(hitl.wait(running.task_id, timeout=timeout), BOUND, "wait to time out")
    await hitl.cancel(running.task_id)


async def until_finished(hitl: Both, task_id: str) -> None:
    while not (await hitl.get(task_id)).finished:
        await asyncio.sleep(0.02)


async def test_next_review_hands_out_each_waiting_task_then_none(hitl: Both) -> None:
    mine = await waiting(hitl, "for the queue")
    seen: set[str] = set()
    for _ in range(100):  # what other tests left waiting, then ours: all of them, once each
        task = await hitl.next_review()
        if task is None:
            break
        assert task.status == "waiting_for_review" and task.task_id not in seen
        seen.add(task.task_id)
        await hitl.approve(task.task_id)
        await hitl.wait(task.task_id, timeout=BOUND)
    assert mine.task_id in seen
    assert await hitl.next_review() is None


async def test_errors_carry_the_servers_message_and_status(hitl: Both) -> None:
    with pytest.raises(NotFound, match="no task with id 'nope'") as missing:
        await hitl.get("nope")
    assert missing.value.status == 404 and missing.value.message == "no task with id 'nope'"
    with pytest.raises(NotFound):
        await hitl.approve("../../submit")  # an id is quoted whole: never another path
    with pytest.raises(Invalid, match="data: must not be empty") as empty:
        await hitl.submit("  ")
    assert empty.value.status == 400
    with pytest.raises(Invalid) as large:
        await hitl.submit("x" * (MAX_BODY + 1))
    assert large.value.status == 413
    with pytest.raises(Invalid, match="quorum: must be at least 1"):
        await hitl.submit("x", quorum=0)
    with pytest.raises(TypeError, match="unexpected options: colour"):
        await hitl.submit("x", colour="red")
    task = await waiting(hitl)
    await hitl.approve(task.task_id)
    await hitl.wait(task.task_id, timeout=BOUND)
    with pytest.raises(Conflict, match="not waiting for review|already"):
        await hitl.reject(task.task_id, "too late")
    with pytest.raises(NotFound):
        await hitl.collect("nope", [])


@pytest.mark.parametrize("kind", KINDS)
async def test_no_server_is_unavailable_and_a_watch_gives_up_in_time(kind: str) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with client_of(kind, url, give_up_after=1.0) as hitl:
        with pytest.raises(Unavailable, match=f"cannot reach hitl at {url}") as raised:
            await hitl.get("abc")
        assert raised.value.status is None
        started = time.monotonic()
        with pytest.raises(Unavailable, match="gave up watching task abc after 1 s"):
            await within(hitl.collect("abc", []), BOUND, "the watch to give up")
        assert time.monotonic() - started < 5
        with pytest.raises(Unavailable, match=f"cannot reach hitl at {url}"):
            await hitl.wait("abc")  # read first: at once


@pytest.mark.parametrize("kind", KINDS)
async def test_a_change_that_cannot_be_stored_is_unavailable(
        kind: str, tmp_path: Path) -> None:
    if not can_chattr(tmp_path):
        pytest.skip("chattr +i is not available here")
    server = ServerProcess(tmp_path / "hitl.db").start()
    try:
        async with client_of(kind, server.url) as hitl:
            await hitl.submit("first")  # the database's files exist
            with read_only(server.db), pytest.raises(Unavailable) as raised:
                await hitl.submit("second")
            assert raised.value.status == 503
            assert raised.value.message.startswith("storage unavailable: ")
    finally:
        server.stop()


def test_a_field_a_newer_server_adds_is_kept_not_refused() -> None:
    task = Task.from_json({"task_id": "t1", "status": "escalated_somewhere", "shiny": [1, 2],
                           "created_at": "2026-12-01T10:00:00.000+00:00"})
    assert task.raw["shiny"] == [1, 2] and task.status == "escalated_somewhere"
    assert not task.finished and task.created_at is not None and task.reviews == ()


# Sign-in on: who may do what is the server's, and the client says what it answered.
PEOPLE = {"ada": (Role.ADMIN, ()), "rita": (Role.REVIEWER, ()), "sam": (Role.SUBMITTER, ()),
          "vic": (Role.VIEWER, ())}


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess,
                                                                        dict[str, str]]]:
    db = tmp_path_factory.mktemp("people") / "hitl.db"
    server, tokens = start_people_server(db, PEOPLE, "--heartbeat", HEARTBEAT)
    yield server, tokens
    server.stop()


@pytest.mark.parametrize("kind", KINDS)
async def test_tokens_decide_who_may_and_refusals_are_typed(
        kind: str, people: tuple[ServerProcess, dict[str, str]]) -> None:
    server, tokens = people
    async with client_of(kind, server.url, tokens["sam"]) as sam, \
            client_of(kind, server.url, tokens["rita"]) as rita, \
            client_of(kind, server.url, tokens["vic"]) as vic, \
            client_of(kind, server.url) as nobody, \
            client_of(kind, server.url, "hitl_not-a-token") as forger:
        task = await sam.submit("draft", reviewers=["rita"])
        assert task.submitted_by == "sam" and task.reviewers == ("rita",)
        for stranger in (nobody, forger):
            with pytest.raises(Unauthorized) as raised:
                await stranger.get(task.task_id)
            assert raised.value.status == 401
        await reach(sam, task.task_id, "waiting_for_review")
        with pytest.raises(Forbidden, match="viewers decide nothing") as refused:
            await vic.approve(task.task_id)
        assert refused.value.status == 403
        with pytest.raises(Forbidden, match="submitters decide nothing"):
            await sam.approve(task.task_id)
        reserved = await rita.next_review()
        assert reserved is not None and reserved.task_id == task.task_id
        assert [held["reviewer"] for held in reserved.raw["reservations"]] == ["rita"]
        await rita.approve(task.task_id, "fine")
        done = await sam.wait(task.task_id, timeout=BOUND)
        assert done.status == "completed" and done.reviews[0].reviewer == "rita"
        assert done.reviews[0].raw["auth_method"] == "token"
        assert await rita.next_review() is None


async def until_status(events: list[Event], status: str) -> None:
    while not any(event.status == status for event in events):
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(("kind", "how"), [("Client", signal.SIGKILL),
                                           ("AsyncClient", signal.SIGTERM)])
async def test_a_watch_goes_on_across_a_server_restart_with_no_repeat_and_no_gap(
        kind: str, how: signal.Signals, tmp_path: Path) -> None:
    """The server stopped mid-stream and started again on the same port and database:
    the watch reconnects by itself, and the task's whole history arrives once, in order."""
    server = ServerProcess(tmp_path / "hitl.db", extra=["--heartbeat", HEARTBEAT]).start()
    try:
        async with client_of(kind, server.url, give_up_after=30) as hitl, \
                client_of("AsyncClient", server.url) as reviewer:
            task = await waiting(hitl, "across a restart")
            events: list[Event] = []
            watching = asyncio.ensure_future(hitl.collect(task.task_id, events,
                                                          last_event_id=0))
            await within(until_status(events, "waiting_for_review"), BOUND, "the replay")
            server.signal(how)
            server.wait(10)
            server.start()  # the same port and database
            await reviewer.reject(task.task_id, "again")  # while the watch may be away
            await reach(reviewer, task.task_id, "waiting_for_review", attempt=2)
            await reviewer.approve(task.task_id, attempt=2)
            await within(watching, BOUND + 30, "the watch to end with its task")
            stored = await reviewer.get(task.task_id)
    finally:
        server.stop()
    assert [event.id for event in events] == list(range(1, stored.raw["last_seq"] + 1))
    assert [event.status for event in events][-4:] == [
        "running", "waiting_for_review", "processing_feedback", "completed"]
    assert events[-1].data["final_result"] == stored.final_result


async def test_a_review_only_task_waits_for_review_of_the_draft_given(hitl: Both) -> None:
    task = await hitl.submit("ticket 7", output="Dear Ann, here is my draft.")
    assert (task.status, task.attempt, task.processed_output) == (
        "waiting_for_review", 1, "Dear Ann, here is my draft.")
    assert task.raw["attempts"][0]["tries"] == 0  # no processor ran
    await hitl.reject(task.task_id, "warmer")
    second = await reach(hitl, task.task_id, "waiting_for_review", attempt=2)
    assert second.processed_output == ("Processed 'ticket 7' (attempt 2), revised for the "
                                       "comment 'warmer'")
    await hitl.approve(task.task_id)
    done = await hitl.wait(task.task_id, timeout=BOUND)
    assert done.final_result == second.processed_output
    history = await within(hitl.collect(task.task_id, [], last_event_id=0), BOUND, "history")
    assert [event.status for event in history] == [
        "waiting_for_review", "processing_feedback", "running", "waiting_for_review",
        "processing_feedback", "completed"]
    assert history[0].id == 1 and history[0].data["output_to_review"] == task.processed_output


def readme_section() -> str:
    return README.split("## Python client and command line\n", 1)[1].split("\n## ", 1)[0]


def test_the_readmes_pipeline_runs_and_prints_what_the_reviewer_approved(
        server: ServerProcess, tmp_path: Path) -> None:
    """The README's example, verbatim, against a live server, with a reviewer who edits."""
    code = re.findall(r"```python\n(.+?)```", readme_section(), re.S)[0]
    script = tmp_path / "pipeline.py"
    script.write_text(code)
    pipeline = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": str(ROOT),
                                     "HITL_URL": server.url})
    try:
        with Client(server.url) as reviewer:
            task = reviewer_finds(reviewer, "Reply to order 1042")
            assert task.processed_output == ("Dear customer, we are sorry that order 1042 "
                                             "arrived broken: a replacement is on its way.")
            assert task.metadata == {"order": 1042}
            reviewer.approve(task.task_id, edited_output="Dear customer, a new one is coming.")
        out, err = pipeline.communicate(timeout=BOUND)
    finally:
        pipeline.kill()
    assert pipeline.returncode == 0, err
    assert out == "Dear customer, a new one is coming.\n"
    assert f"waiting for review: {server.url}/tasks/{task.task_id}" in err


def reviewer_finds(reviewer: Client, title: str) -> Task:
    """The waiting task with this title, once it is there."""
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        for task in reviewer.list(status="waiting_for_review", limit=200):
            if task.title == title:
                return reviewer.get(task.task_id)
        time.sleep(0.05)
    raise AssertionError(f"no task {title!r} came up for review")


def test_the_client_loads_nothing_of_the_server() -> None:
    """As the README says: a program that only talks to hitl needs httpx, not Quart."""
    probe = ("import sys, hitl.client; "
             "print(sorted(m for m in ('quart', 'hypercorn', 'aiosqlite', 'pocketflow', "
             "'hitl.app', 'hitl.store') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                            text=True, timeout=BOUND, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert (result.returncode, result.stdout.strip()) == (0, "[]"), result.stderr
