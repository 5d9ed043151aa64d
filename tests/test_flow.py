"""The workflow: reject loop, attempt limit, processor failures, blocking processors."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from quart import Quart

from hitl import Config
from hitl.errors import Conflict
from hitl.models import Status
from hitl.processors import Job, Processor
from hitl.runner import Runner

from .conftest import OPERATOR, until, within

calls: list[Job] = []
blocking = threading.Event()
release_blocker = threading.Event()


def recording(job: Job) -> str:
    """Synchronous processor: blocks its thread on 'block', fails on 'fail'."""
    calls.append(job)
    job.report(0.5, "half way")
    if job.task_input == "block":
        blocking.set()
        release_blocker.wait(5)
    if job.task_input.startswith("fail"):
        raise RuntimeError(f"boom on try {sum(c.task_input == job.task_input for c in calls)}")
    if job.task_input == "flaky" and sum(c.task_input == "flaky" for c in calls) < 2:
        raise RuntimeError("flaky once")
    if job.task_input == "not text":
        return 42  # type: ignore[return-value]
    comment = job.reviews[-1].comment if job.reviews else ""
    return f"{job.task_input} #{job.attempt} {comment}".strip()


@pytest.fixture
def processor() -> Processor:
    calls.clear()
    blocking.clear()
    release_blocker.clear()
    return recording


@pytest.fixture
def config(config: Config) -> Config:
    return config.with_changes(max_attempts=3, retries=2)


@pytest.fixture
def runner(app: Quart) -> Runner:
    runner: Runner = app.extensions["runner"]
    return runner


async def settle(runner: Runner, task_id: str, *statuses: Status) -> Any:
    for _ in range(1000):
        task = await runner.get_task(task_id, by=OPERATOR)
        if task.status in statuses:
            return task
        await asyncio.sleep(0.005)
    raise AssertionError(f"{task.status} not in {statuses}")


async def test_rejection_comment_reaches_the_next_attempt(runner: Runner) -> None:
    task = await runner.submit("essay", by=OPERATOR)
    await settle(runner, task.task_id, Status.WAITING_FOR_REVIEW)
    await runner.decide(task.task_id, "rejected", "cite sources", "ann", by=OPERATOR)
    task = await settle(runner, task.task_id, Status.WAITING_FOR_REVIEW)
    assert task.attempt == 2 and task.processed_output == "essay #2 cite sources"
    assert calls[-1].reviews[0].comment == "cite sources" and calls[-1].attempt == 2


async def test_task_fails_after_max_attempts_without_approval(runner: Runner) -> None:
    task = await runner.submit("never good", by=OPERATOR)
    for attempt in (1, 2, 3):
        await settle(runner, task.task_id, Status.WAITING_FOR_REVIEW)
        await runner.decide(task.task_id, "rejected", f"no {attempt}", attempt=attempt, by=OPERATOR)
    task = await settle(runner, task.task_id, Status.FAILED)
    assert task.error is not None and "3 attempts" in task.error
    assert len(task.reviews) == 3 and len(calls) == 3


async def test_processor_exception_is_retried_then_fails_the_task(runner: Runner) -> None:
    task = await runner.submit("fail hard", by=OPERATOR)
    task = await settle(runner, task.task_id, Status.FAILED)
    assert len(calls) == 2  # retries=2
    assert task.error == "processing failed after 2 tries: RuntimeError: boom on try 2"
    other = await runner.submit("fine", by=OPERATOR)  # the service goes on
    await settle(runner, other.task_id, Status.WAITING_FOR_REVIEW)


async def test_a_retry_that_succeeds_goes_to_review(runner: Runner) -> None:
    task = await runner.submit("flaky", by=OPERATOR)
    task = await settle(runner, task.task_id, Status.WAITING_FOR_REVIEW)
    assert task.processed_output == "flaky #1"


async def test_processor_returning_non_text_fails_clearly(runner: Runner) -> None:
    task = await runner.submit("not text", by=OPERATOR)
    task = await settle(runner, task.task_id, Status.FAILED)
    assert "returned int, not str" in task.error


async def loop_lags(seconds: float, tick: float = 0.01) -> list[float]:
    """How late each ``tick`` sleep wakes, sampled for ``seconds``: the event loop's lag."""
    lags: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        await asyncio.sleep(tick)
        lags.append(time.perf_counter() - started - tick)
    return lags


async def test_blocking_processor_does_not_stall_other_tasks(runner: Runner) -> None:
    sampling = asyncio.create_task(loop_lags(1.0))  # from before the block begins
    try:
        blocked = await runner.submit("block", by=OPERATOR)
        await until(blocking.is_set, "the processor to block its thread")
        started = time.perf_counter()
        fast = await runner.submit("fast", by=OPERATOR)
        await settle(runner, fast.task_id, Status.WAITING_FOR_REVIEW)
        assert time.perf_counter() - started < 1.0
        lags = await within(sampling, 5, "a second of lag samples")
        assert len(lags) > 20 and max(lags) < 0.1, (  # the event loop stayed free throughout
            f"the loop lagged up to {max(lags):.3f} s over {len(lags)} samples")
        blocked_now = await runner.get_task(blocked.task_id, by=OPERATOR)
        assert blocked_now.status is Status.RUNNING  # still blocked
    finally:
        release_blocker.set()
        sampling.cancel()
    await settle(runner, blocked.task_id, Status.WAITING_FOR_REVIEW)


async def test_progress_reported_from_the_worker_thread_is_published(app: Quart,
                                                                      runner: Runner) -> None:
    task = await runner.submit("essay", by=OPERATOR)
    await settle(runner, task.task_id, Status.WAITING_FOR_REVIEW)
    history = await app.extensions["broker"].history(task.task_id, 0)
    assert [m.status for m in history] == ["pending", "running", "running", "waiting_for_review"]
    assert '"progress":0.5' in history[2].data and "half way" in history[2].data


async def test_of_many_concurrent_decisions_exactly_one_wins(runner: Runner) -> None:
    task = await runner.submit("contested", by=OPERATOR)
    await settle(runner, task.task_id, Status.WAITING_FOR_REVIEW)
    results = await asyncio.gather(
        *(runner.decide(task.task_id, "approved", reviewer=f"r{n}", by=OPERATOR)
          for n in range(20)),
        return_exceptions=True,
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    losers = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, Conflict) for r in losers)
    winner = next(n for n, r in enumerate(results) if not isinstance(r, BaseException))
    assert f"attempt 1 of task {task.task_id} was already approved by r{winner}" in str(losers[0])
    task = await settle(runner, task.task_id, Status.COMPLETED)
    assert len(task.reviews) == 1


async def async_processor(job: Job) -> str:
    job.report(1.0)
    await asyncio.sleep(0)
    return f"async {job.task_input}"


async def test_async_processor_is_awaited(app: Quart, config: Config) -> None:
    runner = Runner(config, app.extensions["store"], app.extensions["journal"],
                    app.extensions["broker"], async_processor)
    runner.accepting = True
    task = await runner.submit("hello", by=OPERATOR)
    task = await settle(runner, task.task_id, Status.WAITING_FOR_REVIEW)
    assert task.processed_output == "async hello"
    await runner.close()
