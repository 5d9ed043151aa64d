"""External workers (``--processor external``) over real HTTP on a live hypercorn: claims
(long polls, leases, races), reports (heartbeat, progress, complete, fail) and the 409s
that tell a worker to drop a job; a restart in a real process keeps a claimed job."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from hitl import Config
from hitl.accounts import Role
from hitl.progress import PROGRESS_INTERVAL
from hitl.work import WorkQueue

from .conftest import LiveServer, ReviewActions, add_people, until, within
from .serverproc import ServerProcess


@pytest.fixture
def config(config: Config) -> Config:
    return config.with_changes(processor="external", retries=3, retry_wait=0)


@dataclass
class Worker:
    """A worker's calls, as a test takes them (each answer checked by the test)."""

    http: httpx.AsyncClient
    name: str = "w1"
    headers: dict[str, str] = field(default_factory=dict)

    async def claim(self, wait: float = 0, **extra: Any) -> httpx.Response:
        return await self.http.post("/api/work/claim", headers=self.headers,
                                    json={"worker": self.name, "wait": wait, **extra})

    async def job(self, wait: float = 10, **extra: Any) -> dict[str, Any]:
        """A job, claimed (failing if none comes within ``wait``)."""
        response = await self.claim(wait, **extra)
        assert response.status_code == 200, (response.status_code, response.text)
        job: dict[str, Any] = response.json()
        return job

    async def report(self, what: str, job: dict[str, Any], **body: Any) -> httpx.Response:
        return await self.http.post(f"/api/work/{job['task_id']}/{what}", headers=self.headers,
                                    json={"attempt": job["attempt"],
                                          "lease_id": job["lease_id"], **body})


@pytest.fixture
async def http(live_server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with live_server.http() as http:
        yield http


@pytest.fixture
def worker(http: httpx.AsyncClient) -> Worker:
    return Worker(http)


@pytest.fixture
def actions(http: httpx.AsyncClient) -> ReviewActions:
    return ReviewActions(http)


def work(server: LiveServer) -> WorkQueue:
    queue: WorkQueue = server.app.extensions["work"]
    return queue


async def task(http: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    response = await http.get(f"/api/tasks/{task_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def reach(http: httpx.AsyncClient, task_id: str, status: str, attempt: int = 1
                ) -> dict[str, Any]:
    async def reached() -> dict[str, Any]:
        while (body := await task(http, task_id))["status"] != status or (
                body["attempt"] != attempt):
            await asyncio.sleep(0.01)
        return body

    return await within(reached(), 10, f"task {task_id} to be {status}/{attempt}")


def seconds_until(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp() - time.time()


async def test_a_worker_claims_reports_and_completes_then_a_human_approves(
        worker: Worker, actions: ReviewActions) -> None:
    task_id = await actions.submit("summarise this")
    watcher = actions.watch(task_id, last_id=0)
    job = await worker.job(lease=20)
    assert job["task_id"] == task_id and job["attempt"] == 1 and job["reviews"] == []
    assert job["task_input"] == "summarise this" and job["lease_id"]
    assert 18 < seconds_until(job["lease_expires"]) <= 20
    beat = await worker.report("heartbeat", job, lease=100)
    assert beat.status_code == 200, beat.text
    assert 98 < seconds_until(beat.json()["lease_expires"]) <= 100
    progress = await worker.report("progress", job, progress=0.5, partial_output="half")
    assert progress.status_code == 200, progress.text
    running = await watcher.wait_for("running", progress=0.5)
    assert running.data == {"task_id": task_id, "status": "running", "attempt": 1,
                            "progress": 0.5, "partial_output": "half"}
    done = await worker.report("complete", job, output="the summary")
    assert done.status_code == 200, done.text
    waiting = await watcher.wait_for("waiting_for_review")
    assert waiting.data["output_to_review"] == "the summary"
    assert (await actions.approve(task_id, attempt=1)).status_code == 200
    assert (await watcher.wait_for("completed")).data["final_result"] == "the summary"
    [attempt] = (await task(actions.http, task_id))["attempts"]
    assert (attempt["output"], attempt["tries"]) == ("the summary", 1)


async def test_the_job_carries_title_metadata_and_every_review_with_its_comment(
        worker: Worker, http: httpx.AsyncClient, actions: ReviewActions) -> None:
    response = await http.post("/submit", json={"data": "d", "title": "T",
                                                "metadata": {"lang": "en"}})
    task_id = response.json()["task_id"]
    first = await worker.job()
    assert (first["title"], first["metadata"], first["previous_output"]) == (
        "T", {"lang": "en"}, None)
    assert (await worker.report("complete", first, output="one")).status_code == 200
    await reach(http, task_id, "waiting_for_review")
    assert (await actions.reject(task_id, "too long", attempt=1)).status_code == 200
    second = await worker.job()
    assert second["attempt"] == 2
    [review] = second["reviews"]
    assert (review["decision"], review["attempt"], review["comment"]) == (
        "rejected", 1, "too long")
    assert review["created_at"] and "display_name" in review and "edited_output" in review
    assert second["previous_output"] == "one"  # what "too long" is about


async def test_a_review_only_task_s_next_job_carries_the_rejected_draft(
        worker: Worker, http: httpx.AsyncClient, actions: ReviewActions) -> None:
    response = await http.post("/submit", json={"data": "reply", "output": "Dear Sir"})
    task_id = response.json()["task_id"]
    assert (await actions.reject(task_id, "less formal")).status_code == 200
    job = await worker.job()
    assert (job["attempt"], job["previous_output"]) == (2, "Dear Sir")


async def test_a_claim_waits_for_a_job_then_answers_204(worker: Worker,
                                                        live_server: LiveServer) -> None:
    started = time.monotonic()
    response = await within(worker.claim(wait=0.5), 5, "the claim")
    waited = time.monotonic() - started
    assert response.status_code == 204 and response.content == b""
    assert 0.5 <= waited < 4, waited
    assert work(live_server).waiting == 0


async def test_a_waiting_claim_takes_a_job_queued_meanwhile_at_once(
        worker: Worker, actions: ReviewActions) -> None:
    started = time.monotonic()
    claim = asyncio.create_task(worker.claim(wait=20))
    await asyncio.sleep(0.3)
    assert not claim.done()
    task_id = await actions.submit()
    response = await within(claim, 5, "the waiting claim")
    waited = time.monotonic() - started
    assert response.status_code == 200 and response.json()["task_id"] == task_id
    assert 0.3 <= waited < 5, waited


async def test_twenty_claimers_at_once_take_each_of_five_jobs_once(
        live_server: LiveServer, http: httpx.AsyncClient, actions: ReviewActions) -> None:
    workers = [Worker(http, f"w{number}") for number in range(20)]
    claims = [asyncio.create_task(each.claim(wait=1.5)) for each in workers]
    await asyncio.sleep(0.1)
    ids = set(await asyncio.gather(*(actions.submit(f"job {n}") for n in range(5))))
    answers = await within(asyncio.gather(*claims), 10, "twenty claims")
    taken = [answer.json() for answer in answers if answer.status_code == 200]
    assert sorted(answer.status_code for answer in answers) == [200] * 5 + [204] * 15
    assert {job["task_id"] for job in taken} == ids and len(taken) == 5
    assert len({job["lease_id"] for job in taken}) == 5


async def test_one_job_wakes_one_of_many_waiting_claims_not_all(
        live_server: LiveServer, http: httpx.AsyncClient, actions: ReviewActions) -> None:
    """A job queued costs one claim statement, however many claims wait (no herd)."""
    queue = work(live_server)
    claims = [asyncio.create_task(Worker(http, f"w{n}").claim(wait=3)) for n in range(12)]
    await until(lambda: queue.asleep == 12, "twelve claims asleep")
    looks = queue.looks
    task_id = await actions.submit()
    done, _ = await within(asyncio.wait(claims, return_when=asyncio.FIRST_COMPLETED), 5,
                           "a claim to take the job")
    assert [claim.result().json()["task_id"] for claim in done] == [task_id]
    await asyncio.sleep(0.3)  # a herd would be running its claim statements now
    assert queue.looks - looks <= 2, queue.looks - looks
    assert queue.asleep == 11
    answers = await within(asyncio.gather(*claims), 10, "the other claims to end")
    assert sorted(answer.status_code for answer in answers) == [200] + [204] * 11


async def test_as_many_jobs_as_waiting_claims_give_every_claim_a_job(
        live_server: LiveServer, http: httpx.AsyncClient, actions: ReviewActions) -> None:
    queue = work(live_server)
    claims = [asyncio.create_task(Worker(http, f"w{n}").claim(wait=10)) for n in range(8)]
    await until(lambda: queue.asleep == 8, "eight claims asleep")
    looks = queue.looks
    ids = set(await asyncio.gather(*(actions.submit(f"job {n}") for n in range(8))))
    answers = await within(asyncio.gather(*claims), 8, "every claim to get a job")
    assert [answer.status_code for answer in answers] == [200] * 8
    assert {answer.json()["task_id"] for answer in answers} == ids
    assert queue.looks - looks <= 2 * 8, queue.looks - looks


async def test_a_claim_woken_as_its_client_leaves_passes_the_wake_on(
        live_server: LiveServer, actions: ReviewActions, worker: Worker,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from .conftest import OPERATOR

    queue = work(live_server)
    first = asyncio.create_task(queue.claim("first", wait=20, by=OPERATOR))
    await until(lambda: queue.asleep == 1, "the first claim asleep")
    second = asyncio.create_task(worker.claim(wait=20))
    await until(lambda: queue.asleep == 2, "the second claim asleep behind it")
    original, left = queue._wake, []

    def wake_then_leave(count: int = 1) -> None:
        original(count)
        if not left:  # the first is woken; before it looks, its client goes away
            left.append(True)
            first.cancel()

    monkeypatch.setattr(queue, "_wake", wake_then_leave)
    task_id = await actions.submit()
    with pytest.raises(asyncio.CancelledError):
        await within(first, 5, "the first claim to end")
    response = await within(second, 5, "the second claim, given the wake")
    assert response.status_code == 200 and response.json()["task_id"] == task_id
    assert queue.asleep == 0


async def test_a_claim_that_takes_an_expired_lease_over_is_counted(
        worker: Worker, http: httpx.AsyncClient, actions: ReviewActions) -> None:
    from .test_metrics import scrape, value

    def taken_over(samples: dict[Any, float]) -> float:
        return value(samples, "hitl_leases_taken_over_total", kind="job")

    before = taken_over(await scrape(http))
    await actions.submit()
    await worker.job(lease=1)
    await within(Worker(http, "w2").job(wait=10), 10, "the take-over")
    assert taken_over(await scrape(http)) - before == 1
    await actions.submit()  # a queued job claimed: not a take-over
    await Worker(http, "w3").job(wait=5)
    assert taken_over(await scrape(http)) - before == 1


async def test_an_expired_lease_puts_the_job_back_for_another_worker(
        worker: Worker, http: httpx.AsyncClient, actions: ReviewActions) -> None:
    task_id = await actions.submit()
    lost = await worker.job(lease=1)
    other = Worker(http, "w2")
    started = time.monotonic()
    taken = await within(other.job(wait=10), 10, "the take-over")
    assert 0.5 < time.monotonic() - started < 5  # woken by the expiry, not by polling
    assert (taken["task_id"], taken["attempt"]) == (task_id, 1)
    assert taken["lease_id"] != lost["lease_id"]
    late = await worker.report("complete", lost, output="too late")
    assert late.status_code == 409
    assert "taken over by another worker (w2)" in late.json()["error"]
    assert (await other.report("complete", taken, output="in time")).status_code == 200
    assert (await reach(http, task_id, "waiting_for_review"))["processed_output"] == "in time"


async def test_a_job_whose_workers_all_vanish_fails_after_its_tries(
        worker: Worker, http: httpx.AsyncClient, actions: ReviewActions) -> None:
    """A take-over is the job's next try: a job that kills its workers (retries=3 here)
    fails the task instead of going round for ever."""
    task_id = await actions.submit("poison")
    for number in (1, 2, 3):  # three workers take it in turn, and vanish
        job = await worker.job(wait=5, lease=1)
        assert (job["task_id"], job["attempt"]) == (task_id, 1), number
    assert (await worker.claim(wait=3)).status_code == 204  # its third lease ends meanwhile
    body = await reach(http, task_id, "failed")
    assert "stopped reporting (the lease expired) on each of 3 tries" in body["error"]
    assert body["attempts"][-1]["tries"] == 3


async def test_an_expired_lease_not_yet_taken_refuses_reports(
        worker: Worker, actions: ReviewActions) -> None:
    await actions.submit()
    job = await worker.job(lease=1)
    await asyncio.sleep(1.1)
    response = await worker.report("heartbeat", job)
    assert response.status_code == 409 and "expired" in response.json()["error"]


async def test_a_stale_attempt_is_a_409(worker: Worker, http: httpx.AsyncClient,
                                        actions: ReviewActions) -> None:
    task_id = await actions.submit()
    first = await worker.job()
    assert (await worker.report("complete", first, output="one")).status_code == 200
    again = await worker.report("complete", first, output="one again")
    assert again.status_code == 409, again.text
    await reach(http, task_id, "waiting_for_review")
    assert (await actions.reject(task_id, "no", attempt=1)).status_code == 200
    await worker.job()  # attempt 2
    stale = await worker.report("complete", first, output="late")
    assert stale.status_code == 409
    assert stale.json()["error"] == (f"attempt 1 of task {task_id} is stale (the task is on "
                                     "attempt 2): drop this job")


async def test_a_wrong_lease_id_is_a_409_and_changes_nothing(
        worker: Worker, http: httpx.AsyncClient, actions: ReviewActions) -> None:
    task_id = await actions.submit()
    job = await worker.job()
    for what, body in (("heartbeat", {}), ("progress", {"progress": 0.1}),
                       ("complete", {"output": "x"}), ("fail", {"error": "x"}),
                       ("release", {})):
        response = await worker.report(what, {**job, "lease_id": "not-the-lease"}, **body)
        assert response.status_code == 409, (what, response.text)
        assert "taken over" in response.json()["error"]
    assert (await task(http, task_id))["status"] == "running"
    assert (await worker.report("complete", job, output="mine")).status_code == 200


async def test_a_failing_worker_is_retried_then_the_task_fails_with_its_error(
        worker: Worker, http: httpx.AsyncClient, actions: ReviewActions) -> None:
    task_id = await actions.submit()
    answers = []
    for _ in range(3):  # --retries 3
        job = await worker.job()
        assert (job["task_id"], job["attempt"]) == (task_id, 1)
        response = await worker.report("fail", job, error="GPU out of memory")
        assert response.status_code == 200, response.text
        answers.append(response.json()["retrying"])
    assert answers == [True, True, False]
    failed = await reach(http, task_id, "failed")
    assert failed["error"] == ("processing failed after 3 tries: WorkerError: "
                               "GPU out of memory")
    [attempt] = failed["attempts"]
    assert (attempt["tries"], attempt["error"]) == (3, failed["error"])
    assert (await worker.claim()).status_code == 204


async def test_a_given_back_job_goes_to_the_next_claim_as_the_same_try(
        worker: Worker, http: httpx.AsyncClient, actions: ReviewActions) -> None:
    task_id = await actions.submit()
    job = await worker.job()
    waiting = asyncio.create_task(Worker(http, "w2").job(wait=10))
    await asyncio.sleep(0.2)
    assert (await worker.report("release", job)).status_code == 200
    taken = await within(waiting, 5, "the job given back")
    assert taken["task_id"] == task_id
    assert (await worker.report("heartbeat", job)).status_code == 409


async def test_a_cancelled_task_s_job_gets_409s(worker: Worker, http: httpx.AsyncClient,
                                                actions: ReviewActions,
                                                live_server: LiveServer) -> None:
    task_id = await actions.submit()
    job = await worker.job()
    assert (await http.post(f"/api/tasks/{task_id}/cancel")).status_code == 200
    for what, body in (("heartbeat", {}), ("progress", {"progress": 0.5}),
                       ("complete", {"output": "x"})):
        response = await worker.report(what, job, **body)
        assert response.status_code == 409, response.text
        assert response.json()["error"] == f"task {task_id} is cancelled: drop this job"
    assert await open_jobs(live_server) == []


async def open_jobs(server: LiveServer) -> list[tuple[str, int]]:
    """Jobs still queued or claimed: each is looked at by every claim, so a task's end
    must close its job (else claims slow down as ended tasks pile up)."""
    rows = await server.app.extensions["store"].reader.execute_fetchall(
        "SELECT task_id, attempt FROM jobs WHERE state IN ('queued', 'claimed')")
    return [(row[0], row[1]) for row in rows]


async def test_an_unknown_task_is_a_404(worker: Worker) -> None:
    job = {"task_id": "0" * 32, "attempt": 1, "lease_id": "x"}
    response = await worker.report("heartbeat", job)
    assert (response.status_code, response.json()) == (404, {"error": f"no task with id "
                                                                      f"{'0' * 32!r}"})


async def test_a_queued_job_of_a_cancelled_task_is_never_handed_out(
        worker: Worker, http: httpx.AsyncClient, actions: ReviewActions,
        live_server: LiveServer) -> None:
    task_id = await actions.submit()
    await reach(http, task_id, "running")
    assert (await http.post(f"/api/tasks/{task_id}/cancel")).status_code == 200
    assert (await worker.claim()).status_code == 204
    assert await open_jobs(live_server) == []


async def test_many_progress_reports_are_coalesced(
        worker: Worker, live_server: LiveServer, actions: ReviewActions) -> None:
    task_id = await actions.submit()
    job = await worker.job()
    started = time.monotonic()
    for number in range(1, 101):
        response = await worker.report("progress", job, progress=number / 100,
                                       partial_output=f"token {number}")
        assert response.status_code == 200
    elapsed = time.monotonic() - started
    watcher = actions.watch(task_id, last_id=0)
    last = await watcher.wait_for("running", progress=1.0, timeout=5)  # the latest, soon
    assert last.data["partial_output"] == "token 100"
    reports = [event for event in watcher.events
               if event.data.get("status") == "running" and event.data["progress"] > 0]
    # not a message per report: at most one per interval (0.25 s at first), and the last
    assert len(reports) <= elapsed / PROGRESS_INTERVAL[0] + 2, (len(reports), elapsed)
    assert len(reports) < 50, len(reports)


async def test_a_client_that_leaves_a_waiting_claim_leaks_nothing(
        live_server: LiveServer) -> None:
    async with live_server.http() as http:
        claim = asyncio.create_task(Worker(http).claim(wait=30))
        await until(lambda: work(live_server).waiting == 1, "the claim to wait")
        claim.cancel()
    await until(lambda: work(live_server).waiting == 0, "the claim to end with its client")


async def test_shutting_down_answers_waiting_claims(live_server: LiveServer) -> None:
    async with live_server.http() as http:
        claim = asyncio.create_task(Worker(http).claim(wait=30))
        await until(lambda: work(live_server).waiting == 1, "the claim to wait")
        live_server.stop.set()
        response = await within(claim, 5, "the claim to be answered")
        assert response.status_code == 204


@pytest.mark.parametrize(("body", "error"), [
    ({"worker": "", "wait": 0}, "worker: must be at least 1 characters"),
    ({"worker": "  "}, "worker: must not be empty"),
    ({"worker": "w\nx"}, "worker: must be one line, without control or formatting characters"),
    ({"worker": "w" * 101}, "worker: must be at most 100 characters"),
    ({"worker": "w", "wait": 61}, "wait: must be at most 60"),
    ({"worker": "w", "wait": -1}, "wait: must be at least 0"),
    ({"worker": "w", "lease": 0.5}, "lease: must be at least 1"),
    ({"worker": "w", "lease": 3601}, "lease: must be at most 3600"),
    # found by schemathesis: lax pydantic took false as 0 and "5" as 5
    ({"worker": "w", "wait": False}, "wait: must be a number"),
    ({"worker": "w", "wait": "5"}, "wait: must be a number"),
    ({"worker": "w", "lease": True}, "lease: must be a number"),
    ({}, "worker: is required"),
])
async def test_a_bad_claim_is_a_400_that_names_it(worker: Worker, body: dict[str, Any],
                                                  error: str) -> None:
    response = await worker.http.post("/api/work/claim", json=body)
    assert (response.status_code, response.json()["error"]) == (400, error)


@pytest.mark.parametrize(("what", "body", "error"), [
    ("heartbeat", {"attempt": 0, "lease_id": "x"}, "attempt: must be at least 1"),
    ("heartbeat", {"lease_id": "x"}, "attempt: is required"),
    ("heartbeat", {"attempt": True, "lease_id": "x"}, "attempt: must be a whole number"),
    ("progress", {"attempt": 1, "lease_id": "x", "progress": "1"}, "progress: must be a number"),
    ("heartbeat", {"attempt": 1, "lease_id": ""}, "lease_id: must be at least 1 characters"),
    ("progress", {"attempt": 1, "lease_id": "x", "progress": 1.5}, "progress: must be at most 1"),
    ("progress", {"attempt": 1, "lease_id": "x"}, "progress: is required"),
    ("complete", {"attempt": 1, "lease_id": "x"}, "output: is required"),
    ("complete", {"attempt": 1, "lease_id": "x", "output": ""}, "output: must not be empty"),
    ("complete", {"attempt": 1, "lease_id": "x", "output": " \n"}, "output: must not be empty"),
    ("fail", {"attempt": 1, "lease_id": "x", "error": 3}, "error: must be a string"),
])
async def test_a_bad_report_is_a_400_that_names_it(worker: Worker, what: str,
                                                   body: dict[str, Any], error: str) -> None:
    response = await worker.http.post(f"/api/work/{'0' * 32}/{what}", json=body)
    assert (response.status_code, response.json()["error"]) == (400, error)


async def test_a_blank_output_is_refused_and_the_job_stays_the_workers(
        worker: Worker, http: httpx.AsyncClient, actions: ReviewActions) -> None:
    task_id = await actions.submit("x")
    job = await worker.job()
    response = await worker.report("complete", job, output="   ")
    assert (response.status_code, response.json()["error"]) == (400, "output: must not be empty")
    assert (await worker.report("complete", job, output="a draft")).status_code == 200
    await reach(http, task_id, "waiting_for_review")


async def test_a_report_that_is_not_json_or_names_no_task_is_a_4xx(worker: Worker) -> None:
    response = await worker.http.post("/api/work/claim", content=b"worker=w")
    assert response.status_code == 415
    response = await worker.http.post(f"/api/work/{'x' * 65}/heartbeat",
                                      json={"attempt": 1, "lease_id": "x"})
    assert response.status_code == 400 and "too long" in response.json()["error"]
    response = await worker.http.post("/api/work/claim", content=b"{",
                                      headers={"Content-Type": "application/json"})
    assert response.status_code == 400


# --- who may: workers and admins claim; workers do nothing else -----------------------


PEOPLE = {"wes": (Role.WORKER, ()), "ada": (Role.ADMIN, ()), "rita": (Role.REVIEWER, ()),
          "sam": (Role.SUBMITTER, ()), "vic": (Role.VIEWER, ())}


@pytest.mark.parametrize("auth", ["accounts"])
async def test_workers_work_and_do_nothing_else(config: Config, auth: str) -> None:
    from .conftest import start_server, stop_server

    server = await start_server(config.with_changes(auth=auth))
    try:
        tokens = await add_people(server.app.extensions["identity"].accounts, PEOPLE)
        async with server.http() as http:
            def person(name: str) -> Worker:
                return Worker(http, name, {"Authorization": f"Bearer {tokens[name]}"})

            sam = person("sam")
            submitted = await http.post("/submit", json={"data": "x"}, headers=sam.headers)
            task_id = submitted.json()["task_id"]
            wes = person("wes")
            job = await wes.job()
            assert job["task_id"] == task_id
            for name in ("rita", "sam", "vic"):
                refused = await person(name).claim()
                assert refused.status_code == 403, name
                assert refused.json()["error"] == (f"only workers claim and report work "
                                                   f"({PEOPLE[name][0].value}s do not)")
                beat = await person(name).report("heartbeat", job)
                assert beat.status_code == 403, name
            assert (await person("ada").claim()).status_code == 204  # admins may too
            assert (await http.post("/api/work/claim", json={"worker": "w"})).status_code == 401
            for method, path in (("POST", "/submit"), ("GET", "/api/tasks"),
                                 ("GET", f"/api/tasks/{task_id}")):
                response = await http.request(method, path, headers=wes.headers,
                                              json={"data": "x"} if method == "POST" else None)
                assert response.status_code == 403, path
                assert response.json()["error"] == "workers only claim and complete work"
            done = await wes.report("complete", job, output="done")
            assert done.status_code == 200, done.text
            ada = {"Authorization": f"Bearer {tokens['ada']}"}

            async def reviewed() -> None:
                while (await http.get(f"/api/tasks/{task_id}", headers=ada)).json()[
                        "status"] != "waiting_for_review":
                    await asyncio.sleep(0.01)

            await within(reviewed(), 10, "the completed job to be up for review")
    finally:
        await stop_server(server)


async def test_another_user_s_lease_is_not_theirs(config: Config) -> None:
    from .conftest import start_server, stop_server

    server = await start_server(config.with_changes(auth="accounts"))
    try:
        tokens = await add_people(server.app.extensions["identity"].accounts,
                                  {**PEOPLE, "wyn": (Role.WORKER, ())})
        async with server.http() as http:
            sam = {"Authorization": f"Bearer {tokens['sam']}"}
            await http.post("/submit", json={"data": "x"}, headers=sam)
            wes = Worker(http, "wes", {"Authorization": f"Bearer {tokens['wes']}"})
            wyn = Worker(http, "wyn", {"Authorization": f"Bearer {tokens['wyn']}"})
            job = await wes.job()
            response = await wyn.report("complete", job, output="not mine")
            assert response.status_code == 409
            assert "is another user's, not yours" in response.json()["error"]
            assert "wes" not in response.json()["error"]  # whose it is stays unsaid
            assert (await wes.report("complete", job, output="mine")).status_code == 200
    finally:
        await stop_server(server)


# --- restarts: a real process on one database file ------------------------------------


def jobs(db: Path) -> list[tuple[str, int, str]]:
    with sqlite3.connect(db) as conn:
        return [tuple(row) for row in conn.execute(
            "SELECT task_id, attempt, state FROM jobs ORDER BY queued_at")]


async def test_across_a_restart_claimed_jobs_stay_claimed_done_ones_give_their_output(
        tmp_path: Path) -> None:
    """A real process stopped (SIGTERM) and started again on its database: a claimed job is
    still its worker's (heartbeat, complete), one completed just before the stop is put up
    for review without running again, and a queued one is still queued."""
    server = ServerProcess(tmp_path / "hitl.db", extra=["--processor", "external",
                                                        "--lease", "60"])
    try:
        server.start()
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            worker = Worker(http)
            claimed_id = (await http.post("/submit", json={"data": "first"})).json()["task_id"]
            job = await worker.job()
            assert job["task_id"] == claimed_id
            done_id = (await http.post("/submit", json={"data": "second"})).json()["task_id"]
            assert (await worker.job())["task_id"] == done_id
            queued_id = (await http.post("/submit", json={"data": "third"})).json()["task_id"]
            await reach(http, queued_id, "running")
        server.signal()
        assert server.wait(10) == 0
        assert jobs(server.db) == [(claimed_id, 1, "claimed"), (done_id, 1, "claimed"),
                                   (queued_id, 1, "queued")]
        with sqlite3.connect(server.db) as conn:  # its completion stored at the last moment
            conn.execute("UPDATE jobs SET state = 'done', output = 'stored output' "
                         "WHERE task_id = ?", (done_id,))
        server.start()
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            worker = Worker(http)
            body = await reach(http, done_id, "waiting_for_review")
            assert body["processed_output"] == "stored output"
            beat = await worker.report("heartbeat", job)
            assert beat.status_code == 200, beat.text
            done = await worker.report("complete", job, output="finished after the restart")
            assert done.status_code == 200, done.text
            body = await reach(http, claimed_id, "waiting_for_review")
            assert body["processed_output"] == "finished after the restart"
            assert (await worker.job())["task_id"] == queued_id
            assert (await worker.claim()).status_code == 204
    finally:
        server.stop()


def test_the_job_table_keeps_its_rules(tmp_path: Path) -> None:
    """A job is one row per task and attempt, in one of four states."""
    db = tmp_path / "rules.db"
    from hitl.store import MIGRATIONS

    with sqlite3.connect(db) as conn:
        for script in MIGRATIONS:
            conn.executescript(script)
        conn.execute("INSERT INTO tasks (task_id, task_input, status, attempt, last_seq, "
                     "created_at, updated_at) VALUES ('t', 'x', 'running', 1, 0, 0, 0)")
        conn.execute("INSERT INTO jobs (task_id, attempt, state, queued_at) "
                     "VALUES ('t', 1, 'queued', 0)")
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("INSERT INTO jobs (task_id, attempt, state, queued_at) "
                         "VALUES ('t', 1, 'queued', 0)")
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("UPDATE jobs SET state = 'lost'")
    assert json.dumps(jobs(db)) == json.dumps([["t", 1, "queued"]])


async def test_two_processes_sharing_the_database_never_hand_out_a_job_twice(
        tmp_path: Path) -> None:
    """The claim is the store's rule: two stores on one file (as two hitl processes would
    be), twenty claims at once over five jobs: each job to exactly one."""
    from hitl.store import Store

    from .conftest import OPERATOR

    db = tmp_path / "shared.db"
    stores = [Store(str(db)), Store(str(db))]
    for store in stores:
        await store.open()
    try:
        with sqlite3.connect(db) as conn:
            for number in range(5):
                conn.execute("INSERT INTO tasks (task_id, task_input, status, attempt, "
                             "last_seq, created_at, updated_at) VALUES (?, 'x', 'running', 1, "
                             "0, 0, 0)", (f"t{number}",))
                conn.execute("INSERT INTO jobs (task_id, attempt, state, queued_at) "
                             "VALUES (?, 1, 'queued', ?)", (f"t{number}", number))
        queues = [WorkQueue(Config(), store) for store in stores]
        claims = await within(asyncio.gather(*(
            queues[number % 2].claim(f"w{number}", by=OPERATOR) for number in range(20))),
            20, "twenty claims")
        taken = [job for job in claims if job is not None]
        assert sorted(job.task_id for job in taken) == [f"t{number}" for number in range(5)]
        assert jobs(db) == [(f"t{number}", 1, "claimed") for number in range(5)]
    finally:
        for store in stores:
            await store.close()


async def test_jobs_are_claimed_oldest_first(worker: Worker, http: httpx.AsyncClient,
                                             actions: ReviewActions) -> None:
    ids = []
    for number in range(3):
        ids.append(await actions.submit(f"job {number}"))
        await reach(http, ids[-1], "running")
    assert [(await worker.job())["task_id"] for _ in ids] == ids


async def test_the_openapi_document_names_the_work_endpoints(http: httpx.AsyncClient) -> None:
    paths = (await http.get("/openapi.json")).json()["paths"]
    assert {"/api/work/claim", "/api/work/{task_id}/heartbeat", "/api/work/{task_id}/progress",
            "/api/work/{task_id}/complete", "/api/work/{task_id}/fail",
            "/api/work/{task_id}/release"} <= set(paths)


async def test_a_rejected_review_only_task_s_next_attempt_is_a_job_with_the_comment(
        worker: Worker, http: httpx.AsyncClient, actions: ReviewActions) -> None:
    response = await http.post("/submit", json={"data": "reply", "output": "my draft"})
    task_id = response.json()["task_id"]
    assert (await worker.claim()).status_code == 204  # attempt 1 needs no worker
    assert (await actions.reject(task_id, "warmer, please", attempt=1)).status_code == 200
    job = await worker.job()
    assert (job["task_id"], job["attempt"]) == (task_id, 2)
    assert [review["comment"] for review in job["reviews"]] == ["warmer, please"]
    assert (await worker.report("complete", job, output="a warmer draft")).status_code == 200
    body = await reach(http, task_id, "waiting_for_review", attempt=2)
    assert [attempt["output"] for attempt in body["attempts"]] == ["my draft", "a warmer draft"]


async def test_a_claim_whose_client_leaves_before_its_answer_gives_the_job_back(
        live_server: LiveServer, actions: ReviewActions, worker: Worker,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Claimed, then cancelled (its client gone) while the job is read for the answer:
    the job is queued again at once, not held until its lease expires."""
    queue = work(live_server)
    task_id = await actions.submit()
    await reach(actions.http, task_id, "running")
    reading = asyncio.Event()
    original = queue._claimed

    async def stalled(*args: Any) -> Any:
        reading.set()
        await asyncio.sleep(30)
        return await original(*args)

    monkeypatch.setattr(queue, "_claimed", stalled)
    from .conftest import OPERATOR

    claim = asyncio.create_task(queue.claim("gone", lease=600, by=OPERATOR))
    await within(reading.wait(), 5, "the claim to be taken")
    claim.cancel()
    with pytest.raises(asyncio.CancelledError):
        await claim
    monkeypatch.undo()
    job = await within(worker.job(wait=0), 5, "the job given back")
    assert job["task_id"] == task_id


async def test_progress_is_passed_on_at_once_then_the_latest_per_growing_interval() -> None:
    from hitl.progress import Coalescer

    sent: list[tuple[float, str]] = []
    coalescer = Coalescer(lambda fraction, partial="": sent.append((fraction, partial)))
    coalescer(0.1, "a")  # the first: at once
    coalescer(0.2, "b")
    coalescer(0.3, "c")  # within the interval: held, the latest wins
    assert sent == [(0.1, "a")]
    await until(lambda: len(sent) == 2, "the held report", 2)
    assert sent[1] == (0.3, "c")
    assert coalescer.first is not None
    start = coalescer.first
    assert [coalescer.interval(start + age) for age in (0, 5, 100, 10_000)] == [
        0.25, 0.25, 2.5, 10.0]
    coalescer.last = time.monotonic()  # one was just passed on: the next is held
    coalescer(0.4, "d")
    assert coalescer.timer is not None
    coalescer.close()  # completed: what is held is dropped, nothing fires later
    await asyncio.sleep(0.3)
    assert sent == [(0.1, "a"), (0.3, "c")]


def test_external_is_a_processor_setting_not_a_module_to_import() -> None:
    from hitl import create_app
    from hitl.work import ExternalPool

    config = Config.load({}, {"HITL_PROCESSOR": "external", "HITL_AUTH": "none"})
    assert isinstance(create_app(config).extensions["runner"].pool, ExternalPool)
    assert create_app(Config(auth="none")).extensions["runner"].pool.is_async  # simulate
