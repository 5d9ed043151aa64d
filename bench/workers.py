"""External workers: T tasks submitted at once, their first attempts made by K ``hitl worker``
processes of C slots each (``hitl serve --processor external``), beside the same processor
run in-process by ``hitl serve`` itself: the baseline.

The processor, :func:`stamp`, does nothing but return the wall-clock time it started, so
the figures are the cost of the work API, not of work. Measured per burst: jobs per second
(the first submit to the last ``waiting_for_review``), and per job the time from its submit
to its claim (the job's ``claimed_at`` in the service's database; in-process, the
attempt's ``started_at``, when the runner takes it up) and from the claim to the processor
starting (in the worker, or in the service's thread). One clock serves every process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import statistics
import subprocess
import time
from datetime import datetime

from hitl.processors import Job

from .client import Event, Watcher, request_json
from .scenarios import Metrics, open_all, percentile
from .servers import REPO, Server, ServerSpec, _hitl_base, _hitl_command

ENV = {"HITL_PROCESS_DELAY": "0", "HITL_AUTH": "none", "PYTHONPATH": str(REPO)}
IN_PROCESS = ServerSpec("hitl", durable=True, command=_hitl_command,
                        env={**ENV, "HITL_PROCESSOR": "bench.workers:stamp"},
                        about="hitl serve running bench.workers:stamp in-process")
EXTERNAL = ServerSpec("hitl-external", durable=True, command=_hitl_command,
                      env={**ENV, "HITL_PROCESSOR": "external"},
                      about="hitl serve --processor external, hitl worker processes")


def stamp(job: Job) -> str:
    """The processor: when it started (seconds since the epoch)."""
    return f"{time.time():.6f}"


class WorkerProcesses:
    """``processes`` workers of ``concurrency`` slots each, logging to the work directory."""

    def __init__(self, server: Server, processes: int, concurrency: int) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs = [server.workdir / f"worker-{n}.log" for n in range(processes)]
        for n, path in enumerate(self.logs):
            command = [*_hitl_base(), "worker", "--url", f"http://127.0.0.1:{server.port}",
                       "--processor", "bench.workers:stamp", "--concurrency", str(concurrency),
                       "--name", f"bench-{n}", "--log-level", "warning"]
            with path.open("ab") as log:
                self.procs.append(subprocess.Popen(
                    command, cwd=REPO, env={**os.environ, **ENV}, stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)

    def failed(self) -> str | None:
        """The log of a worker that has exited, if one has."""
        for proc, path in zip(self.procs, self.logs, strict=True):
            if proc.poll() is not None:
                return f"a worker exited with {proc.returncode}: {path.read_text()[-2000:]}"
        return None


async def workers(server: Server, tasks: int, processes: int, concurrency: int,
                  bursts: int = 3) -> Metrics:
    """``bursts`` bursts of ``tasks`` (medians), through ``processes`` workers (0: in-process)."""
    pool = WorkerProcesses(server, processes, concurrency) if processes else None
    try:
        await asyncio.sleep(1.0 if pool else 0)  # the workers start and send their claims
        runs = []
        for _ in range(bursts):
            runs.append(await burst(server, tasks))
            if pool and (failure := pool.failed()):
                raise RuntimeError(failure)
    finally:
        if pool:
            await pool.stop()
    merged = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    merged["errors"] = sum(run["errors"] for run in runs)
    return merged


async def burst(server: Server, tasks: int) -> Metrics:
    """``tasks`` submitted at once, each watched until its first output waits for review."""
    port, done = server.port, asyncio.Event()
    reviewed: dict[str, float] = {}
    submitted: dict[str, float] = {}

    def on_event(w: Watcher, e: Event) -> None:
        if e.status == "waiting_for_review" and e.task_id and e.task_id not in reviewed:
            reviewed[e.task_id] = e.t
            if len(reviewed) == tasks:
                done.set()

    async def one(i: int) -> Watcher:
        wall = time.time()
        status, body = await request_json(port, "POST", "/submit", {"data": f"job {i}"})
        if status != 202:
            raise RuntimeError(f"POST /submit answered {status}: {body!r}")
        submitted[body["task_id"]] = wall
        watcher = Watcher(port, f"/stream/{body['task_id']}", on_event, record=False)
        await open_all([watcher], None)
        return watcher

    t0 = time.perf_counter()
    watchers = await asyncio.gather(*(one(i) for i in range(tasks)))
    try:
        await asyncio.wait_for(done.wait(), 60)
    except TimeoutError:
        raise RuntimeError(f"{tasks - len(reviewed)} of {tasks} jobs not done in 60 s") from None
    finally:
        for w in watchers:
            w.close()
    took = max(reviewed.values()) - t0
    claims = claimed_at(server)
    waits, starts, errors = [], [], 0
    for task_id, at in submitted.items():
        status, task = await request_json(port, "GET", f"/api/tasks/{task_id}")
        attempt = task["attempts"][0] if status == 200 and task.get("attempts") else {}
        if not attempt.get("started_at") or not attempt.get("output"):
            errors += 1
            continue
        claimed = claims.get(task_id) or datetime.fromisoformat(attempt["started_at"]).timestamp()
        waits.append(claimed - at)
        starts.append(float(attempt["output"]) - claimed)
    return {
        "jobs_per_s": tasks / took,
        "claim_wait_p50_ms": percentile(waits, 50) * 1e3,
        "claim_wait_p99_ms": percentile(waits, 99) * 1e3,
        "claim_start_p50_ms": percentile(starts, 50) * 1e3,
        "claim_start_p99_ms": percentile(starts, 99) * 1e3,
        "errors": float(errors),
    }


def claimed_at(server: Server) -> dict[str, float]:
    """When each first attempt's job was claimed, read from the service's own database
    (``jobs.claimed_at``, a float): the task's JSON does not say. In-process: none."""
    with contextlib.closing(sqlite3.connect(f"file:{server.db}?mode=ro", uri=True)) as db:
        try:
            rows = db.execute("SELECT task_id, claimed_at FROM jobs WHERE attempt = 1 "
                              "AND claimed_at IS NOT NULL").fetchall()
        except sqlite3.OperationalError:  # no jobs table
            return {}
    return {str(task_id): float(at) for task_id, at in rows}
