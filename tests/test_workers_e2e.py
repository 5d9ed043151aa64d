"""Real processes: ``hitl serve --processor external`` and two ``hitl worker`` processes
running ``tests.procs:counted``, which writes a line per execution to a shared file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serverproc import ROOT, ServerProcess

pytestmark = pytest.mark.slow

LEASE = 2  # seconds: how long a dead worker's job waits before another takes it


@dataclass
class WorkerProcess:
    """One ``hitl worker`` process; its output goes to a log file next to the database."""

    url: str
    log: Path
    env: dict[str, str]
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        command = [sys.executable, "-m", "hitl", "worker", "--url", self.url,
                   "--processor", "tests.procs:counted", "--lease", str(LEASE), *self.extra]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(command, cwd=ROOT, stdout=log,
                                         stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONPATH": str(ROOT), **self.env})
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@dataclass
class Rig:
    """The service, its workers, and the file where every execution leaves a line."""

    tmp: Path
    server: ServerProcess
    workers: list[WorkerProcess] = field(default_factory=list)

    @property
    def count_file(self) -> Path:
        return self.tmp / "executions.log"

    @property
    def gate(self) -> Path:
        return self.tmp / "gate"

    def worker(self, name: str, *extra: str) -> WorkerProcess:
        env = {"HITL_TEST_COUNT": str(self.count_file), "HITL_TEST_GATE": str(self.gate)}
        worker = WorkerProcess(self.server.url, self.tmp / f"{name}.log", env,
                               ["--name", name, *extra])
        self.workers.append(worker.start())
        return worker

    def lines(self, what: str) -> list[tuple[str, int, int]]:
        """(input, attempt, pid) of every 'start' or 'done' line so far."""
        if not self.count_file.exists():
            return []
        rows = [line.split("\t") for line in self.count_file.read_text().splitlines()]
        return [(row[1], int(row[2]), int(row[3])) for row in rows if row[0] == what]

    def submit(self, http: httpx.Client, data: str) -> str:
        response = http.post("/submit", json={"data": data})
        assert response.status_code == 202, response.text
        return str(response.json()["task_id"])

    def logs(self) -> str:
        return "\n".join(f"--- {w.log.name}\n{w.output()[-2000:]}" for w in self.workers) \
            + f"\n--- server\n{self.server.log()[-3000:]}"


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    server = ServerProcess(tmp_path / "hitl.db", extra=["--processor", "external"],
                           env={"HITL_LEASE": str(LEASE), "HITL_RETRIES": "2"}).start()
    rig = Rig(tmp_path, server)
    try:
        yield rig
    finally:
        for worker in rig.workers:
            worker.stop()
        server.stop()


def eventually(check: Callable[[], Any], what: str, rig: Rig, timeout: float = 20) -> Any:
    """Poll ``check`` until it returns something true; fail with the processes' logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{rig.logs()}")


def statuses(http: httpx.Client, ids: list[str]) -> dict[str, dict[str, Any]]:
    tasks: dict[str, dict[str, Any]] = {}
    for status in ("waiting_for_review", "completed", "failed"):
        response = http.get("/api/tasks", params={"status": status, "limit": 200})
        tasks.update({t["task_id"]: t for t in response.json()["tasks"] if t["task_id"] in ids})
    return tasks


def all_at(http: httpx.Client, ids: list[str], status: str, attempt: int) -> bool:
    tasks = statuses(http, ids)
    return len(tasks) == len(ids) and all(
        t["status"] == status and t["attempt"] == attempt for t in tasks.values())


def test_fifty_tasks_each_attempt_processed_exactly_once(rig: Rig) -> None:
    a, b = rig.worker("a", "--concurrency", "3"), rig.worker("b", "--concurrency", "3")
    with httpx.Client(base_url=rig.server.url, timeout=10) as http:
        ids = [rig.submit(http, f"task {n}") for n in range(50)]
        eventually(lambda: all_at(http, ids, "waiting_for_review", 1), "50 first attempts", rig)
        for task_id in ids[:10]:  # ten go round again: their second attempts count too
            response = http.post(f"/feedback/{task_id}", json={
                "feedback": "rejected", "comment": "again", "attempt": 1})
            assert response.status_code == 200, response.text
        eventually(lambda: all_at(http, ids[:10], "waiting_for_review", 2), "ten second attempts",
                   rig)
    starts = Counter((data, attempt) for data, attempt, _ in rig.lines("start"))
    expected = {(f"task {n}", 1) for n in range(50)} | {(f"task {n}", 2) for n in range(10)}
    assert set(starts) == expected
    assert [key for key, times in starts.items() if times != 1] == [], rig.logs()
    pids = Counter(pid for _, _, pid in rig.lines("done"))
    assert set(pids) == {a.pid, b.pid}, f"not both workers took part: {pids}"


def test_a_killed_workers_job_goes_to_the_other_after_the_lease(rig: Rig) -> None:
    workers = [rig.worker("a"), rig.worker("b")]
    with httpx.Client(base_url=rig.server.url, timeout=10) as http:
        task_id = rig.submit(http, "hold me")
        (_, _, holder), = eventually(lambda: rig.lines("start"), "a worker to start it", rig)
        victim = next(w for w in workers if w.pid == holder)
        other = next(w for w in workers if w.pid != holder)
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        rig.gate.touch()
        eventually(lambda: all_at(http, [task_id], "waiting_for_review", 1), "the other worker",
                   rig, timeout=LEASE + 10)
        took = time.monotonic() - killed_at
        task = http.get(f"/api/tasks/{task_id}").json()
    assert task["processed_output"] == f"hold me (attempt 1) by {other.pid}"
    assert [pid for _, _, pid in rig.lines("start")] == [victim.pid, other.pid]
    assert [pid for _, _, pid in rig.lines("done")] == [other.pid]
    assert took < LEASE + 5, f"{took:.1f} s to take over a {LEASE} s lease"


def test_workers_reconnect_after_the_service_restarts(rig: Rig) -> None:
    rig.worker("a", "--concurrency", "2")
    rig.worker("b", "--concurrency", "2")
    with httpx.Client(base_url=rig.server.url, timeout=10) as http:
        ids = [rig.submit(http, f"slow {n}") for n in range(12)]
        eventually(lambda: len(rig.lines("done")) >= 2, "some work done", rig)
        rig.server.signal(signal.SIGTERM)
        assert rig.server.wait(15) == 0, rig.logs()
        rig.server.start()  # the same port and database
        eventually(lambda: all_at(http, ids, "waiting_for_review", 1),
                   "every task after the restart", rig, timeout=30)
    done = {data for data, _, _ in rig.lines("done")}
    assert done == {f"slow {n}" for n in range(12)}
    for worker in rig.workers:
        assert worker.proc is not None and worker.proc.poll() is None, rig.logs()
        assert worker.output().count(" is away ") == 1, worker.output()
        assert worker.output().count(" is back ") == 1, worker.output()


def test_sigterm_gives_a_job_in_hand_back_and_exits_0(rig: Rig) -> None:
    a = rig.worker("a", "--grace", "0.5", "--lease", "30")  # given back, not left to lapse
    with httpx.Client(base_url=rig.server.url, timeout=10) as http:
        task_id = rig.submit(http, "hold on")
        eventually(lambda: rig.lines("start"), "worker a to start it", rig)
        b = rig.worker("b")
        a.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        assert a.proc.wait(10) == 0, a.output()  # type: ignore[union-attr]
        given_back = time.monotonic()
        rig.gate.touch()
        eventually(lambda: all_at(http, [task_id], "waiting_for_review", 1), "worker b", rig)
        took = time.monotonic() - given_back
        task = http.get(f"/api/tasks/{task_id}").json()
    assert task["processed_output"] == f"hold on (attempt 1) by {b.pid}"
    assert "given back" in a.output(), a.output()
    assert took < 5, f"{took:.1f} s: it waited for the lease\n{rig.logs()}"
