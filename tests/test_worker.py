"""``hitl.worker`` against a real server (``--processor external``) on a loopback port: the
processor's view of a job, progress, failures, lost jobs, stopping, the service going away."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from hitl import Config
from hitl.job_runner import JobRunner
from hitl.models import Review
from hitl.processors import Job, Processor
from hitl.worker import Settings, Worker
from tests.conftest import (
    LiveServer,
    ReviewActions,
    start_server,
    stop_server,
    until,
    within,
)
from tests.serverproc import ROOT, run_cli


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(db=str(tmp_path / "hitl.db"), process_delay=0, retry_wait=0, auth="none",
                  processor="external", retries=1)


@asynccontextmanager
async def working(server: LiveServer | str, processor: Processor, **settings: Any
                  ) -> AsyncIterator[Worker]:
    """A worker running ``processor`` against ``server`` until the block ends (then stopped)."""
    url = server if isinstance(server, str) else server.url
    worker = Worker(processor, Settings(url=url, token=None, name=settings.pop("name", "w1"),
                                        **settings))
    running = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop("test over")
        assert await within(running, 15, "the worker to stop") == 0


async def read(actions: ReviewActions, task_id: str) -> dict[str, Any]:
    response = await actions.http.get(f"/api/tasks/{task_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_the_processor_gets_the_reviews_as_review_objects(
        live_server: LiveServer, actions: ReviewActions) -> None:
    seen: list[Job] = []

    def processor(job: Job) -> str:
        seen.append(job)
        return f"{job.task_input} #{job.attempt}"

    async with working(live_server, processor):
        task_id = await actions.submit("draft")
        watcher = actions.watch(task_id, last_id=0)
        first = await watcher.wait_for("waiting_for_review", attempt=1)
        assert first.data["output_to_review"] == "draft #1"
        assert (await actions.reject(task_id, "too terse", attempt=1,
                                     reviewer="ann")).status_code == 200
        second = await watcher.wait_for("waiting_for_review", attempt=2)
        assert second.data["output_to_review"] == "draft #2"
    assert [(job.task_id, job.task_input, job.attempt) for job in seen] == [
        (task_id, "draft", 1), (task_id, "draft", 2)]
    assert seen[0].reviews == ()
    (review,) = seen[1].reviews
    assert isinstance(review, Review)
    assert (review.decision, review.attempt, review.comment, review.reviewer) == (
        "rejected", 1, "too terse", "ann")
    assert abs(review.created_at - time.time()) < 60
    assert seen[1].last_comment == "too terse"


async def test_reports_are_coalesced_and_the_latest_wins(
        live_server: LiveServer, actions: ReviewActions) -> None:
    def processor(job: Job) -> str:
        step, end = 0, time.monotonic() + 0.5  # reports for 0.5 s: 2 or 3 requests' worth
        while time.monotonic() < end:
            step += 1
            job.report(step / 1000, f"step {step}")
            time.sleep(0.005)
        job.report(1.0, "the last")
        time.sleep(1.0)  # longer than the worker waits between two progress requests
        return "done"

    async with working(live_server, processor) as worker:
        task_id = await actions.submit()
        watcher = actions.watch(task_id, last_id=0)
        await watcher.wait_for("waiting_for_review", timeout=15)
    assert 2 <= worker.sent["progress"] <= 4, worker.sent  # ~100 reports, at most 4 a second
    reported = [(e.data["progress"], e.data["partial_output"]) for e in watcher.events
                if e.data.get("status") == "running" and e.data.get("partial_output")]
    assert 2 <= len(reported) <= 4, reported
    assert reported[-1] == (1.0, "the last")


async def test_a_processor_error_is_a_fail_carrying_it(
        live_server: LiveServer, actions: ReviewActions) -> None:
    def processor(job: Job) -> str:
        raise ValueError(f"cannot read {job.task_input!r}")

    async with working(live_server, processor):
        task_id = await actions.submit("gibberish")
        watcher = actions.watch(task_id, last_id=0)
        failed = await watcher.wait_for("failed", timeout=15)
    assert "ValueError: cannot read 'gibberish'" in str(failed.data), failed.data
    task = await read(actions, task_id)
    assert task["status"] == "failed"


async def test_an_error_longer_than_the_service_takes_still_fails_the_task(
        live_server: LiveServer, actions: ReviewActions) -> None:
    def processor(job: Job) -> str:
        raise RuntimeError("x" * 50_000)

    async with working(live_server, processor):
        task_id = await actions.submit()
        watcher = actions.watch(task_id, last_id=0)
        await watcher.wait_for("failed", timeout=15)
    (attempt,) = (await read(actions, task_id))["attempts"]
    assert attempt["error"].count("x") == 20_000 - len("RuntimeError: ")


async def test_an_output_the_service_refuses_fails_the_attempt(
        live_server: LiveServer, actions: ReviewActions) -> None:
    async with working(live_server, lambda job: "y" * 300_000):
        task_id = await actions.submit()
        watcher = actions.watch(task_id, last_id=0)
        failed = await watcher.wait_for("failed", timeout=15)
    assert "the output was refused" in str(failed.data), failed.data


async def test_a_lost_job_is_dropped_and_its_async_processor_cancelled(
        live_server: LiveServer, actions: ReviewActions) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def processor(job: Job) -> str:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    async with working(live_server, processor, lease=1.0):
        task_id = await actions.submit()
        await within(started.wait(), 10, "the processor to start")
        assert (await actions.http.post(f"/api/tasks/{task_id}/cancel")).status_code == 200
        await within(cancelled.wait(), 10, "the worker to drop the job at its next heartbeat")
    assert (await read(actions, task_id))["status"] == "cancelled"


async def test_a_job_outlives_its_lease_while_heartbeats_renew_it(
        live_server: LiveServer, actions: ReviewActions) -> None:
    def processor(job: Job) -> str:
        time.sleep(3.5)  # over three 1 s leases
        return "slow but kept"

    stolen: list[str] = []
    async with working(live_server, processor, lease=1.0), \
            working(live_server, lambda job: stolen.append(job.task_input) or "stolen",
                    name="w2"):
        task_id = await actions.submit()
        watcher = actions.watch(task_id, last_id=0)
        done = await watcher.wait_for("waiting_for_review", timeout=15)
    assert stolen == [], "the second worker took a job whose lease was being renewed"
    assert done.data["output_to_review"] == "slow but kept"


async def test_without_lease_it_renews_by_the_services_lease(tmp_path: Path) -> None:
    config = Config(db=str(tmp_path / "hitl.db"), process_delay=0, auth="none",
                    processor="external", lease=1)
    server = await start_server(config)
    stolen: list[str] = []
    try:
        async with server.http() as http, working(server, lambda job: time.sleep(3.5) or "kept"), \
                working(server, lambda job: stolen.append(job.task_input) or "stolen", name="w2"):
            actions = ReviewActions(http)
            task_id = await actions.submit()
            watcher = actions.watch(task_id, last_id=0)
            done = await watcher.wait_for("waiting_for_review", timeout=15)
    finally:
        await stop_server(server)
    assert stolen == [] and done.data["output_to_review"] == "kept"


async def test_stop_lets_running_jobs_finish_within_the_grace(
        live_server: LiveServer, actions: ReviewActions) -> None:
    started = threading.Event()

    def processor(job: Job) -> str:
        started.set()
        time.sleep(0.5)
        return "finished after the signal"

    worker = Worker(processor, Settings(url=live_server.url, token=None, name="w1", grace=10))
    running = asyncio.create_task(worker.run())
    task_id = await actions.submit()
    watcher = actions.watch(task_id, last_id=0)
    await within(asyncio.to_thread(started.wait, 10), 11, "the processor to start")
    worker.stop()
    assert await within(running, 15, "the worker to stop") == 0
    assert worker.sent["complete"] == 1
    done = await watcher.wait_for("waiting_for_review")
    assert done.data["output_to_review"] == "finished after the signal"


async def test_stop_gives_an_unfinished_job_back_to_another_worker(
        live_server: LiveServer, actions: ReviewActions) -> None:
    release = threading.Event()

    def stuck(job: Job) -> str:
        release.wait(30)
        return "too late"

    worker = Worker(stuck, Settings(url=live_server.url, token=None, name="w1", grace=0.2,
                                    lease=30))
    running = asyncio.create_task(worker.run())
    task_id = await actions.submit()
    watcher = actions.watch(task_id, last_id=0)
    await watcher.wait_for("running")
    await until(lambda: bool(worker.jobs), "the worker to hold the job")
    worker.stop()
    assert await within(running, 10, "the worker to stop") == 0
    t0 = time.monotonic()
    async with working(live_server, lambda job: "taken over", name="w2"):
        done = await watcher.wait_for("waiting_for_review", timeout=10)
    release.set()
    assert done.data["output_to_review"] == "taken over"
    assert time.monotonic() - t0 < 5, "given back, it waited anyway for its 30 s lease"


async def test_the_service_away_and_back_is_one_line_each(
        config: Config, caplog: pytest.LogCaptureFixture) -> None:
    server = await start_server(config)
    port = int(server.url.rsplit(":", 1)[1])
    caplog.set_level(logging.INFO, logger="hitl.worker")
    worker = Worker(lambda job: f"done {job.task_input}",
                    Settings(url=server.url, token=None, name="w1"))
    running = asyncio.create_task(worker.run())
    await until(lambda: bool(worker.claims), "the worker to claim")
    await stop_server(server)
    await asyncio.sleep(2.0)  # several retries
    server = await start_server(config, port=port)
    try:
        async with server.http() as http:
            actions = ReviewActions(http)
            task_id = await actions.submit("after the restart")
            watcher = actions.watch(task_id, last_id=0)
            done = await watcher.wait_for("waiting_for_review", timeout=20)
            assert done.data["output_to_review"] == "done after the restart"
    finally:
        worker.stop("test over")
        assert await within(running, 15, "the worker to stop") == 0
        await stop_server(server)
    lines = [r.getMessage() for r in caplog.records if r.name == "hitl.worker"]
    assert sum("is away" in line for line in lines) == 1, lines
    assert sum("is back" in line for line in lines) == 1, lines


async def test_a_token_the_service_refuses_stops_the_worker_with_status_2(
        tmp_path: Path) -> None:
    config = Config(db=str(tmp_path / "hitl.db"), process_delay=0, auth="accounts",
                    processor="external")
    server = await start_server(config)
    try:
        worker = Worker(lambda job: "x", Settings(url=server.url, token="not-a-token",
                                                  name="w1"))
        assert await within(worker.run(), 10, "the refused worker to stop") == 2
        assert worker.fatal and "401" in worker.fatal
    finally:
        await stop_server(server)


@pytest.mark.parametrize(("args", "says"), [
    (["--processor", "no.such.module:fn"], "cannot load processor 'no.such.module:fn'"),
    (["--processor", "tests.procs:echo", "--lease", "0.5"], "--lease must be between 1 and"),
    (["--processor", "tests.procs:echo", "--url", "127.0.0.1:8000"], "must start with http"),
    (["--processor", "tests.procs:echo", "--concurrency", "0"], "must be a positive number"),
])
def test_a_bad_setting_stops_the_worker_with_one_line(args: list[str], says: str) -> None:
    done = run_cli("worker", *args)
    assert done.returncode == 2, done
    assert says in done.stderr and "Traceback" not in done.stderr, done.stderr


async def test_a_second_stop_gives_back_without_waiting_out_the_grace(
        live_server: LiveServer, actions: ReviewActions) -> None:
    release = threading.Event()

    def stuck(job: Job) -> str:
        release.wait(30)
        return "too late"

    worker = Worker(stuck, Settings(url=live_server.url, token=None, name="w1", grace=60))
    running = asyncio.create_task(worker.run())
    try:
        await actions.submit()
        await until(lambda: bool(worker.jobs), "the worker to hold the job")
        worker.stop()
        await asyncio.sleep(0.3)
        assert not running.done(), "it did not wait for its job"
        worker.stop()
        assert await within(running, 5, "the worker to give back and stop") == 0
        assert worker.sent["release"] == 1 and worker.sent["complete"] == 0
    finally:
        release.set()


async def test_a_dropped_jobs_thread_does_not_hold_up_the_next_job(
        live_server: LiveServer, actions: ReviewActions, caplog: pytest.LogCaptureFixture
        ) -> None:
    started, release = threading.Event(), threading.Event()

    def processor(job: Job) -> str:
        if job.task_input == "slow":
            started.set()
            release.wait(8)  # a thread cannot be stopped: it runs on after its job is dropped
            return "slow"
        time.sleep(0.1)
        return "quick"

    caplog.set_level(logging.INFO, logger="hitl.worker")
    try:
        async with working(live_server, processor, lease=2.0, concurrency=1) as worker:
            slow = await actions.submit("slow")
            await within(asyncio.to_thread(started.wait, 10), 11, "the slow job to start")
            assert (await actions.http.post(f"/api/tasks/{slow}/cancel")).status_code == 200
            await until(lambda: not worker.jobs, "the worker to drop the slow job")
            heartbeats, t0 = worker.sent["heartbeat"], time.monotonic()
            quick = await actions.submit("quick")
            watcher = actions.watch(quick, last_id=0)
            done = await watcher.wait_for("waiting_for_review", timeout=15)
            took = time.monotonic() - t0
            assert worker.runner.abandoned == 1 and not release.is_set()
    finally:
        release.set()
    assert done.data["output_to_review"] == "quick"
    assert took < 3, f"the next job waited {took:.1f} s behind the abandoned thread"
    assert worker.sent["heartbeat"] == heartbeats, "a lease kept on a job not running"
    assert any("abandoned" in r.getMessage() for r in caplog.records), caplog.text


async def test_claims_wait_while_too_many_abandoned_threads_run() -> None:
    release = threading.Event()
    runner = JobRunner(lambda job: release.wait(10) and "late", limit=1)
    job = Job("x", 1, (), lambda fraction, partial_output="": None, task_id="t")
    running = asyncio.ensure_future(runner.run(job))
    await until(lambda: runner.busy == 1, "the thread to start")
    running.cancel()
    await until(lambda: runner.abandoned == 1, "the thread to be abandoned")
    room = asyncio.ensure_future(runner.room())
    await asyncio.sleep(0.2)
    assert not room.done(), "room while the limit of abandoned threads runs"
    release.set()
    await within(room, 10, "room once the abandoned thread ends")
    assert (runner.abandoned, runner.busy) == (0, 0)


def test_the_worker_loads_nothing_of_the_server() -> None:
    """A worker host needs httpx and the processor, not Quart, pydantic or the store."""
    probe = ("import sys, hitl.worker; "
             "print(sorted(m for m in ('quart', 'hypercorn', 'aiosqlite', 'pocketflow', "
             "'pydantic', 'hitl.app', 'hitl.store', 'hitl.schemas') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                            text=True, timeout=15, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert (result.returncode, result.stdout.strip()) == (0, "[]"), result.stderr
