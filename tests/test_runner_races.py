"""Races around a task's flow: concurrent cancels, a client leaving mid-submit, a stopped
processor still reporting, and a decision caught by shutdown. Each is answered exactly."""

from __future__ import annotations

import asyncio
import threading

import pytest
from quart import Quart

from hitl import Config, create_app
from hitl.errors import Conflict, Unavailable
from hitl.models import Status
from hitl.processors import Job, Processor
from hitl.runner import Runner

from .conftest import OPERATOR

ON_POSTGRESQL = True  # and on SQLite (tests/conftest.py)

BOUND = 10
stop_reporting = threading.Event()


def chatty(job: Job) -> str:
    """Reports progress from its thread until told to stop (even after its flow stopped)."""
    if job.task_input == "chatty":
        while not stop_reporting.wait(0.005):
            job.report(0.5, "still here")
    return f"{job.task_input} #{job.attempt}"


@pytest.fixture
def processor() -> Processor:
    stop_reporting.clear()
    return chatty


@pytest.fixture
def runner(app: Quart) -> Runner:
    runner: Runner = app.extensions["runner"]
    return runner


async def reach(runner: Runner, task_id: str, status: Status) -> None:
    async def poll() -> None:
        while (await runner.get_task(task_id, by=OPERATOR)).status is not status:
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(poll(), BOUND)
    except TimeoutError:
        task = await runner.get_task(task_id, by=OPERATOR)
        raise AssertionError(f"{task_id} never reached {status}: it is {task.status}") from None


async def test_of_two_concurrent_cancels_exactly_one_wins(runner: Runner) -> None:
    task = await runner.submit("x", by=OPERATOR)
    await reach(runner, task.task_id, Status.WAITING_FOR_REVIEW)
    results = await asyncio.gather(runner.cancel(task.task_id, by=OPERATOR),
                                   runner.cancel(task.task_id, by=OPERATOR),
                                   return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) == 1, results
    assert sum(isinstance(r, Conflict) for r in results) == 1, results
    assert (await runner.get_task(task.task_id, by=OPERATOR)).status is Status.CANCELLED


async def test_a_submit_whose_client_leaves_still_creates_a_running_task(
        runner: Runner) -> None:
    submit = asyncio.ensure_future(runner.submit("x", by=OPERATOR))
    await asyncio.sleep(0)  # the submit has started: its task is on its way to the store
    submit.cancel()
    with pytest.raises(asyncio.CancelledError):
        await submit
    async def one_task_flowing() -> str:
        while True:
            tasks, _ = await runner.list_tasks(None, 10, 0, by=OPERATOR)
            if tasks and tasks[0].status is Status.WAITING_FOR_REVIEW:
                return tasks[0].task_id
            await asyncio.sleep(0.01)

    task_id = await asyncio.wait_for(one_task_flowing(), BOUND)
    assert task_id in runner.trackers  # a flow is behind it: it can be decided
    await runner.decide(task_id, "approved", by=OPERATOR)
    await reach(runner, task_id, Status.COMPLETED)


async def test_reports_from_a_processor_abandoned_at_shutdown_are_ignored(
        runner: Runner) -> None:
    task = await runner.submit("chatty", by=OPERATOR)
    await reach(runner, task.task_id, Status.RUNNING)
    await asyncio.sleep(0.1)  # a few reports stored
    flow = runner.trackers[task.task_id].flow
    assert flow is not None
    runner.accepting = False  # shutting down: the flow stops, the task stays running
    flow.cancel()
    await asyncio.wait_for(asyncio.wait([flow]), BOUND)
    await asyncio.sleep(0.05)
    last = (await runner.get_task(task.task_id, by=OPERATOR)).last_seq
    await asyncio.sleep(0.3)  # its thread goes on reporting all this time
    assert (await runner.get_task(task.task_id, by=OPERATOR)).last_seq == last
    assert (await runner.get_task(task.task_id, by=OPERATOR)).status is Status.RUNNING
    stop_reporting.set()


async def test_a_decision_caught_by_shutdown_is_answered(config: Config) -> None:
    app = create_app(config, processor=chatty)
    async with app.test_app():
        runner: Runner = app.extensions["runner"]
        task = await runner.submit("x", by=OPERATOR)
        await reach(runner, task.task_id, Status.WAITING_FOR_REVIEW)
        decision = asyncio.ensure_future(runner.decide(task.task_id, "approved", by=OPERATOR))
        await asyncio.sleep(0)  # claimed and Event.set(): the flow has not stored it yet
        flow = runner.trackers[task.task_id].flow
        assert flow is not None
        runner.accepting = False  # shutting down, as hitl.server does first
        flow.cancel()
        with pytest.raises(Unavailable, match="shutting down"):
            await asyncio.wait_for(decision, BOUND)
    app = create_app(config, processor=chatty)  # the task still waits after the restart
    async with app.test_app():
        runner = app.extensions["runner"]
        task = await runner.get_task(task.task_id, by=OPERATOR)
        assert task.status is Status.WAITING_FOR_REVIEW
        await runner.decide(task.task_id, "approved", by=OPERATOR)
        await reach(runner, task.task_id, Status.COMPLETED)


# --- requests racing the recovery of a task whose write failed (found in review) ---------

def strand(runner: Runner, task_id: str) -> None:
    """What the journal does when a write of the task fails (a read-only spell)."""
    runner.journal.refused.add(task_id)
    runner._strand(task_id)


async def recovered(runner: Runner) -> None:
    recovery = runner._recovery
    assert recovery is not None
    await asyncio.wait_for(recovery, BOUND)


@pytest.mark.parametrize("request_kind", ["cancel", "decide"])
async def test_a_request_just_as_recovery_resumes_a_task_is_answered_truly(
        runner: Runner, request_kind: str) -> None:
    task_id = (await runner.submit("x", by=OPERATOR)).task_id
    await reach(runner, task_id, Status.WAITING_FOR_REVIEW)
    requests: list[asyncio.Future[object]] = []
    launch = runner._launch

    def launch_with_a_request_queued(tracker: object, step: object) -> None:
        call = (runner.cancel(task_id, by=OPERATOR) if request_kind == "cancel"
                else runner.decide(task_id, "approved", by=OPERATOR))
        requests.append(asyncio.ensure_future(call))  # ready in the same loop iteration
        launch(tracker, step)  # type: ignore[arg-type]

    runner._launch = launch_with_a_request_queued  # type: ignore[method-assign]
    strand(runner, task_id)
    await recovered(runner)
    runner._launch = launch  # type: ignore[method-assign]
    try:
        await asyncio.wait_for(requests[0], BOUND)  # answered, never left hanging
    except Unavailable:  # 503: being reloaded; nothing was changed
        assert (await runner.get_task(task_id, by=OPERATOR)).status is Status.WAITING_FOR_REVIEW
        await runner.decide(task_id, "approved", by=OPERATOR)  # the task works on
        await reach(runner, task_id, Status.COMPLETED)
    else:  # 200 only for what is stored
        wanted = Status.CANCELLED if request_kind == "cancel" else Status.COMPLETED
        await reach(runner, task_id, wanted)


async def test_recovery_does_not_resume_a_task_that_finished_meanwhile(
        runner: Runner) -> None:
    task_id = (await runner.submit("x", by=OPERATOR)).task_id
    await reach(runner, task_id, Status.WAITING_FOR_REVIEW)
    runner._stranded.add(task_id)  # seen with no flow an instant ago (it has one again)
    runner._recover_soon()
    await runner.cancel(task_id, by=OPERATOR)  # stored cancelled, its tracker gone
    await recovered(runner)
    assert (await runner.get_task(task_id, by=OPERATOR)).status is Status.CANCELLED
    assert task_id not in runner.trackers, "a cancelled task was resumed"


async def test_recovery_does_not_drop_a_task_stranded_while_it_runs(runner: Runner) -> None:
    from hitl.errors import StorageUnavailable

    write = runner.store.write
    armed = [True]

    async def failing_write(batch: list[object]) -> object:  # the victim's RUNNING write
        if armed[0] and any(w.task["task_input"] == "victim"  # type: ignore[attr-defined]
                            and w.task["status"] == "running" for w in batch):  # type: ignore[attr-defined]
            armed[0] = False
            raise StorageUnavailable("injected: disk full")
        return await write(batch)  # type: ignore[arg-type]

    runner._stranded.add("ghost")  # a recovery is under way
    runner._recover_soon()
    runner.store.write = failing_write  # type: ignore[method-assign]
    task = await runner.submit("victim", by=OPERATOR)
    await runner.submit("other", by=OPERATOR)  # another task's write succeeds meanwhile
    await reach(runner, task.task_id, Status.WAITING_FOR_REVIEW)  # resumed, not dropped
    assert task.task_id in runner.trackers
