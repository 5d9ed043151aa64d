"""``GET /metrics``: the numbers move with the work, only admins and the metrics token read
them, and several processes add up through ``PROMETHEUS_MULTIPROC_DIR``."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hitl import Config
from hitl.accounts import Role
from hitl.broker import Broker
from hitl.metrics import REGISTRY
from hitl.models import Message, Status

from .conftest import (
    LiveServer,
    People,
    ReviewActions,
    add_people,
    reach,
    start_server,
    stop_server,
    until,
    within,
)
from .receiver import Received, Receiver
from .serverproc import ROOT, ServerProcess

TOKEN = "scrape-me-0123456789abcdef"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a text exposition (which must parse), by name and labels."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


async def scrape(http: httpx.AsyncClient, **headers: str) -> Samples:
    response = await http.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def decisions(samples: Samples) -> dict[str, float]:
    return {outcome: value(samples, "hitl_decisions_total", outcome=outcome)
            for outcome in ("approved", "rejected", "timed_out")}


def tasks_by_status(samples: Samples) -> dict[str, float]:
    return {status.value: value(samples, "hitl_tasks", status=status.value) for status in Status}


async def test_decisions_waits_writes_and_tasks_by_status_move_with_the_work(
    live_server: LiveServer, actions: ReviewActions
) -> None:
    runner = live_server.app.extensions["runner"]
    before = await scrape(actions.http)
    approved, rejected, waiting = [await actions.submit(f"task {n}") for n in range(3)]
    for task_id in (approved, rejected, waiting):
        await reach(runner, task_id, Status.WAITING_FOR_REVIEW)
    assert (await actions.approve(approved)).status_code == 200
    assert (await actions.reject(rejected, "shorter")).status_code == 200
    await reach(runner, rejected, Status.WAITING_FOR_REVIEW, attempt=2)
    assert (await actions.approve(rejected, attempt=2)).status_code == 200
    await reach(runner, rejected, Status.COMPLETED, attempt=2)
    after = await scrape(actions.http)

    moved = {outcome: after_count - decisions(before)[outcome]
             for outcome, after_count in decisions(after).items()}
    assert moved == {"approved": 2, "rejected": 1, "timed_out": 0}
    assert value(after, "hitl_review_wait_seconds_count") - value(
        before, "hitl_review_wait_seconds_count") == 3
    waited = value(after, "hitl_review_wait_seconds_sum") - value(
        before, "hitl_review_wait_seconds_sum")
    assert 0 < waited < 60
    assert value(after, "hitl_review_wait_seconds_bucket", le="+Inf") == value(
        after, "hitl_review_wait_seconds_count")
    # each of the 3 tasks: pending, running (x2), waiting, decided, completed: stored commits
    assert value(after, "hitl_store_write_seconds_count") - value(
        before, "hitl_store_write_seconds_count") >= 5
    stored = await live_server.app.extensions["store"].status_counts()
    assert tasks_by_status(after) == {status.value: stored.get(status.value, 0)
                                      for status in Status}
    assert tasks_by_status(after)["completed"] == 2
    assert tasks_by_status(after)["waiting_for_review"] == 1


async def test_a_review_timeout_counts_as_timed_out(live_server: LiveServer,
                                                    actions: ReviewActions) -> None:
    before = decisions(await scrape(actions.http))
    response = await actions.http.post("/submit", json={
        "data": "x", "review_timeout": 0.2, "on_timeout": "approve"})
    await reach(live_server.app.extensions["runner"], response.json()["task_id"],
                Status.COMPLETED)
    after = decisions(await scrape(actions.http))
    assert after["timed_out"] - before["timed_out"] == 1
    assert (after["approved"], after["rejected"]) == (before["approved"], before["rejected"])


async def test_open_streams_count_the_watchers_while_they_watch(
    live_server: LiveServer, actions: ReviewActions
) -> None:
    task_id = await actions.submit()
    before = value(await scrape(actions.http), "hitl_open_streams")
    watchers = [actions.watch(task_id), actions.watch(task_id), actions.watch()]
    broker = live_server.app.extensions["broker"]
    await until(lambda: broker.subscriber_count() >= 3, "three watchers")
    assert value(await scrape(actions.http), "hitl_open_streams") == before + 3
    for watcher in watchers:
        assert watcher.task is not None
        watcher.task.cancel()
        await asyncio.gather(watcher.task, return_exceptions=True)
    await until(lambda: broker.subscriber_count() == 0, "the watchers to leave")
    assert value(await scrape(actions.http), "hitl_open_streams") == before


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_a_watcher_dropped_for_lagging_is_counted() -> None:
    broker = Broker(queue_size=2, heartbeat=0)
    await broker.start()
    before = sample("hitl_watchers_dropped_total")
    async with broker.subscribe("t", last_id=0) as sub:
        for seq in range(1, 5):  # never read: the third is one too many
            broker.publish("t", Message(seq, "t", "running", "{}", b"data: {}\n\n"))
        assert sub.dropped
    await broker.close()
    assert sample("hitl_watchers_dropped_total") - before == 1
    assert broker.dropped_total == 1


async def test_webhook_deliveries_and_failures_are_counted(config: Config) -> None:
    config = config.with_changes(webhook_first_retry=0.05, webhook_max_backoff=0.1,
                                 webhook_poll=0.2)
    answers = iter([503, 503])

    async def down_twice(_: Received) -> int:
        return next(answers, 204)

    server = await start_server(config)
    try:
        async with Receiver(down_twice) as receiver, server.http() as http:
            before = await scrape(http)
            dispatcher = server.app.extensions["webhooks"]
            await dispatcher.webhooks.add(receiver.url, ("task.waiting_for_review",))
            await dispatcher.sync()
            assert (await http.post("/submit", json={"data": "x"})).status_code == 202
            await until(lambda: len(receiver.taken) == 1, "the event, after two failures")
            after = await scrape(http)
    finally:
        await stop_server(server)
    assert value(after, "hitl_webhook_failures_total") - value(
        before, "hitl_webhook_failures_total") == 2
    assert value(after, "hitl_webhook_deliveries_total") - value(
        before, "hitl_webhook_deliveries_total") == 1
    assert value(after, "hitl_webhook_skipped_total") == value(before, "hitl_webhook_skipped_total")


async def test_leases_taken_over_are_there_from_the_start(actions: ReviewActions) -> None:
    samples = await scrape(actions.http)
    assert ("hitl_leases_taken_over_total", (("kind", "job"),)) in samples
    assert ("hitl_leases_taken_over_total", (("kind", "flow"),)) in samples


# --- who may read them ------------------------------------------------------------------


@pytest.fixture
def signed_in(config: Config) -> Config:
    return config.with_changes(auth="accounts", metrics_token=TOKEN)


@pytest.fixture
async def people(signed_in: Config) -> AsyncIterator[People]:
    server = await start_server(signed_in)
    try:
        async with server.http() as http:
            tokens = await add_people(server.app.extensions["identity"].accounts, {
                "ada": (Role.ADMIN, ()), "rita": (Role.REVIEWER, ()),
                "sam": (Role.SUBMITTER, ()), "vic": (Role.VIEWER, ()), "wes": (Role.WORKER, ())})
            yield People(server, http, tokens)
    finally:
        await stop_server(server)


async def test_admins_and_the_metrics_token_read_the_metrics_and_no_one_else(
    people: People
) -> None:
    http = people.http
    assert (await http.get("/metrics", headers=people.auth("ada"))).status_code == 200
    scraped = await scrape(http, Authorization=f"Bearer {TOKEN}")
    assert ("hitl_open_streams", ()) in scraped
    for person in ("rita", "sam", "vic", "wes"):
        response = await http.get("/metrics", headers=people.auth(person))
        assert response.status_code == 403, person
        assert response.json()["error"] in ("only admins and the metrics token read the metrics",
                                            "workers only claim and complete work"), person
    response = await http.get("/metrics")
    assert response.status_code == 401 and "sign in first" in response.json()["error"]
    response = await http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}x"})
    assert response.status_code == 401, "a token almost the metrics token is no token"


async def test_the_metrics_token_grants_nothing_else(people: People) -> None:
    task_id = await people.post_task("sam")
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    requests = [("GET", "/api/tasks"), ("GET", f"/api/tasks/{task_id}"),
                ("POST", "/submit"), ("POST", f"/feedback/{task_id}"),
                ("POST", f"/api/tasks/{task_id}/cancel"), ("POST", "/api/queue/next"),
                ("GET", "/api/webhooks"), ("GET", "/dashboard"), ("GET", f"/tasks/{task_id}"),
                ("GET", "/"), ("GET", "/next"), ("GET", "/openapi.json"), ("GET", "/healthz")]
    for method, path in requests:
        response = await people.http.request(method, path, headers=bearer,
                                             json={"data": "x", "feedback": "approved"}
                                             if method == "POST" else None)
        assert response.status_code == 403, (method, path, response.status_code)
        assert "the metrics token reads /metrics only" in response.text, path  # JSON or a page
    response = await people.http.get("/api/tasks", headers=bearer)
    assert response.json() == {"error": "the metrics token reads /metrics only"}
    for path in ("/stream", f"/stream/{task_id}"):
        async with people.http.stream("GET", path, headers=bearer) as response:
            assert response.status_code == 403, path
            assert "metrics" in (await response.aread()).decode()
    assert (await people.read_task(task_id))["status"] in ("pending", "running",
                                                          "waiting_for_review")


# --- several processes ------------------------------------------------------------------


def multiprocess_server(tmp_path: Path, name: str, directory: Path) -> ServerProcess:
    return ServerProcess(tmp_path / f"{name}.db",
                         env={"PROMETHEUS_MULTIPROC_DIR": str(directory)})


async def wait_status(http: httpx.AsyncClient, task_id: str, status: str) -> None:
    async def reached() -> None:
        while (await http.get(f"/api/tasks/{task_id}")).json()["status"] != status:
            await asyncio.sleep(0.02)

    await within(reached(), 10, f"task {task_id} to be {status}")


@pytest.mark.slow
async def test_processes_sharing_a_multiprocess_dir_add_up(tmp_path: Path) -> None:
    """Two servers (each its own database) write to one directory: a scrape of either sums
    both processes' counters and live gauges, and counts the tasks of its own store."""
    directory = tmp_path / "metrics"
    first = multiprocess_server(tmp_path, "first", directory).start()
    second = multiprocess_server(tmp_path, "second", directory).start()
    try:
        async with httpx.AsyncClient(base_url=first.url, timeout=10) as one, \
                httpx.AsyncClient(base_url=second.url, timeout=10) as two:
            task_id = (await one.post("/submit", json={"data": "x"})).json()["task_id"]
            await wait_status(one, task_id, "waiting_for_review")
            assert (await one.post(f"/feedback/{task_id}",
                                   json={"feedback": "approved"})).status_code == 200
            await wait_status(one, task_id, "completed")
            other = (await two.post("/submit", json={"data": "y"})).json()["task_id"]
            await wait_status(two, other, "waiting_for_review")
            async with one.stream("GET", "/stream") as watching:
                assert watching.status_code == 200

                async def summed() -> Samples:
                    while value(samples := await scrape(two), "hitl_open_streams") != 1:
                        await asyncio.sleep(0.02)
                    return samples

                samples = await within(summed(), 10, "the first's stream, in the second's sum")
            assert decisions(samples) == {"approved": 1, "rejected": 0, "timed_out": 0}
            assert value(samples, "hitl_review_wait_seconds_count") == 1
            assert value(samples, "hitl_store_write_seconds_count") >= 6  # both processes'
            assert tasks_by_status(samples)["waiting_for_review"] == 1  # the second's store
            assert tasks_by_status(samples)["completed"] == 0
            assert tasks_by_status(await scrape(one))["completed"] == 1
            assert ("process_cpu_seconds_total", ()) not in samples  # per process: not summed
        files = {path.name.split("_")[0] for path in directory.iterdir()}
        assert {"counter", "histogram", "gauge"} <= files

        first.signal(signal.SIGKILL)  # gone without a word: its open-streams file stays
        first.wait()
        first = multiprocess_server(tmp_path, "first", directory).start()  # a new pid
        async with httpx.AsyncClient(base_url=second.url, timeout=10) as two:
            samples = await scrape(two)
        assert value(samples, "hitl_open_streams") == 0  # the dead process's gauge forgotten
        assert decisions(samples)["approved"] == 1  # its counters kept
    finally:
        first.stop()
        second.stop()


def test_an_unusable_multiprocess_dir_stops_start_up_with_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "hitl", "serve", "--auth", "none", "--port", "0",
         "--db", str(tmp_path / "hitl.db")], cwd=ROOT, capture_output=True, text=True,
        timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT),
                         "PROMETHEUS_MULTIPROC_DIR": str(blocker / "metrics")})
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("hitl: error: PROMETHEUS_MULTIPROC_DIR=")
    assert "not a usable directory" in result.stderr and result.stderr.count("\n") == 1
