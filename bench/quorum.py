"""Quorum voting: T tasks, each approved by R distinct reviewers voting at once as soon as
it waits for review (``quorum`` R); quorum 1 with one approval, run beside it, is the
same work with one vote, so the two rows show what the extra votes cost.

Measured: completed tasks and votes per second, the latency from a task's votes being
sent to its ``completed`` message, whether every vote was taken (200) exactly once, and
whether every stream saw its task through. hitl only: the baselines have no quorum.
"""

from __future__ import annotations

import asyncio
import time

from .client import Event, Watcher, request_json
from .scenarios import Metrics, bad_streams, first_time, open_all, percentile, wait_closed
from .servers import Server


async def quorum(server: Server, tasks: int, reviewers: int) -> Metrics:
    port = server.port
    votes: list[asyncio.Task[int]] = []
    sent: dict[str, float] = {}

    async def vote(task_id: str, reviewer: int) -> int:
        body = {"feedback": "approved", "reviewer": f"reviewer-{reviewer}", "attempt": 1}
        status, _ = await request_json(port, "POST", f"/feedback/{task_id}", body)
        return status

    def on_event(w: Watcher, e: Event) -> None:
        if e.status == "waiting_for_review" and w.ctx is None and e.task_id:
            w.ctx = "voting"  # the first time it waits: every reviewer votes at once
            sent[e.task_id] = time.perf_counter()
            votes.extend(asyncio.ensure_future(vote(e.task_id, r)) for r in range(reviewers))

    async def one(i: int) -> Watcher:
        status, body = await request_json(port, "POST", "/submit",
                                          {"data": f"task {i}", "quorum": reviewers})
        if status != 202:
            raise RuntimeError(f"POST /submit answered {status}: {body!r}")
        watcher = Watcher(port, f"/stream/{body['task_id']}", on_event)
        await open_all([watcher], None)
        await wait_closed([watcher], timeout=60)
        return watcher

    t0 = time.perf_counter()
    watchers = await asyncio.gather(*(one(i) for i in range(tasks)))
    statuses = await asyncio.gather(*votes)
    for w in watchers:
        w.close()
    ends = {task_id: end for w in watchers if (end := first_time(w.events, "completed"))
            and (task_id := w.path.rsplit("/", 1)[1]) in sent}
    latencies = [end - sent[task_id] for task_id, end in ends.items()]
    took = (max(ends.values()) - t0) if ends else float("inf")
    return {
        "tasks_per_s": len(ends) / took,
        "votes_per_s": len(statuses) / took,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "complete": len(ends) / tasks,
        "errors": sum(s != 200 for s in statuses) + (len(statuses) != tasks * reviewers)
                  + bad_streams(watchers),
    }
