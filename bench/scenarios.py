"""The load scenarios. Each runs against one started ``Server`` and returns flat metrics.

All latencies are measured in the client process with ``time.perf_counter()``;
client and server share the machine's cores, so client time is part of every
figure (see bench/README.md).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .client import Event, Watcher, request_json, signed_in
from .servers import Server

Metrics = dict[str, float]

CONNECT_CONCURRENCY = 500  # connections being set up at once: stays below the 2048 backlog
TERMINAL = frozenset({"completed", "failed", "cancelled"})


@dataclass(frozen=True)
class Metric:
    label: str
    better: str  # "lower" or "higher"; "" when not a performance figure


METRICS: dict[str, Metric] = {
    "connect_all_s": Metric("connect all + replay (s)", "lower"),
    "p50_ms": Metric("latency p50 (ms)", "lower"),
    "p99_ms": Metric("latency p99 (ms)", "lower"),
    "max_ms": Metric("latency max (ms)", "lower"),
    "complete": Metric("watchers with every message", "higher"),
    "rss_per_watcher_kib": Metric("RSS per idle watcher (KiB)", "lower"),
    "tasks_per_s": Metric("completed tasks/s", "higher"),
    "delivered_s": Metric("all completions delivered (s)", "lower"),
    "downtime_s": Metric("SIGTERM to healthy (s)", "lower"),
    "catch_up_s": Metric("all caught up (s)", "lower"),
    "reconnects": Metric("client reconnects", "lower"),
    "errors": Metric("failed requests/streams", "lower"),
    "events_per_s": Metric("webhook events delivered/s", "higher"),
    "votes_per_s": Metric("votes taken/s", "higher"),
    "jobs_per_s": Metric("jobs/s", "higher"),
    "claim_wait_p50_ms": Metric("submit to claim p50 (ms)", "lower"),
    "claim_wait_p99_ms": Metric("submit to claim p99 (ms)", "lower"),
    "claim_start_p50_ms": Metric("claim to start p50 (ms)", "lower"),
    "claim_start_p99_ms": Metric("claim to start p99 (ms)", "lower"),
}


class Countdown:
    """Set when ``hit`` has been called ``n`` times; remembers when."""

    def __init__(self, n: int) -> None:
        self.left, self.event, self.at = n, asyncio.Event(), 0.0
        if n <= 0:
            self._fire()

    def _fire(self) -> None:
        self.at = time.perf_counter()
        self.event.set()

    def hit(self) -> None:
        self.left -= 1
        if self.left == 0:
            self._fire()

    async def wait(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self.event.wait()
        except TimeoutError:
            return False
        return True


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def latency_metrics(seconds: list[float]) -> Metrics:
    return {
        "p50_ms": percentile(seconds, 50) * 1e3,
        "p99_ms": percentile(seconds, 99) * 1e3,
        "max_ms": max(seconds, default=float("nan")) * 1e3,
    }


def task_stream_complete(events: list[Event]) -> bool:
    """Ids contiguous from 1, no duplicates, ending with ``completed``."""
    messages = [e for e in events if e.status != "stream_closed"]
    ids = [e.id for e in messages]
    return (
        bool(messages)
        and ids == list(range(1, len(ids) + 1))
        and ids[-1] is not None
        and (messages[-1].status == "completed")
    )


def first_time(events: Iterable[Event], status: str) -> float | None:
    return next((e.t for e in events if e.status == status), None)


async def wait_closed(watchers: list[Watcher], timeout: float) -> int:
    """Wait (bounded) for the servers to end the streams; returns how many are still open."""
    pending = [w.proto.done for w in watchers if w.proto is not None and not w.proto.done.done()]
    if pending:
        await asyncio.wait(pending, timeout=timeout)
    return sum(w.connected for w in watchers)


def bad_streams(watchers: Iterable[Watcher]) -> int:
    """Streams that failed, or did not end with ``stream_closed`` and a closed connection."""
    return sum(bool(w.errors) or w.connected or not w.stream_closed for w in watchers)


async def submit(port: int, data: str) -> str:
    # Signed in, the bench approves what it submitted itself, which hitl allows only so.
    extra = {"allow_self_review": True} if signed_in() else {}
    status, body = await request_json(port, "POST", "/submit", {"data": data, **extra})
    if status != 202 or not isinstance(body, dict):
        raise RuntimeError(f"POST /submit answered {status}: {body!r}")
    return str(body["task_id"])


async def approve(port: int, task_id: str) -> int:
    body = {"feedback": "approved", "comment": "bench", "reviewer": "bench"}
    status, _ = await request_json(port, "POST", f"/feedback/{task_id}", body)
    return status


async def open_all(
    watchers: list[Watcher],
    concurrency: int | None,
    last_ids: list[str | None] | None = None,
    retries: int = 3,
) -> int:
    """Open every watcher, ``concurrency`` set-ups at a time (None: all at once).

    A failed open is retried after a pause, as EventSource would; returns the
    number of failed attempts.
    """
    gate = asyncio.Semaphore(concurrency) if concurrency else None
    # A task's stream starts at its current state unless asked for the whole log (id 0),
    # which these scenarios count message by message.
    ids = last_ids or [("0" if w.path.startswith("/stream/") else None) for w in watchers]

    async def one(watcher: Watcher, last_id: str | None) -> int:
        for attempt in range(retries + 1):
            if await watcher.open(last_id, gate):
                return attempt
            await asyncio.sleep(0.5)
        return retries + 1

    return sum(await asyncio.gather(*(one(w, i) for w, i in zip(watchers, ids, strict=True))))


async def _watch_one_task(
    server: Server, n: int, concurrency: int, timeout: float
) -> tuple[str, list[Watcher], Countdown, Countdown, Metrics]:
    """Submit a task and connect ``n`` watchers to it; return once all saw the review request."""
    task_id = await submit(server.port, "fan-out")
    ready, done = Countdown(n), Countdown(n)

    def on_event(w: Watcher, e: Event) -> None:
        if e.status == "waiting_for_review" and w.ctx is None:
            w.ctx = "ready"
            ready.hit()
        elif e.status == "completed" and w.ctx == "ready":
            w.ctx = "done"
            done.hit()

    watchers = [Watcher(server.port, f"/stream/{task_id}", on_event) for _ in range(n)]
    t0 = time.perf_counter()
    errors = await open_all(watchers, concurrency)
    if not await ready.wait(timeout):
        raise RuntimeError(f"only {n - ready.left}/{n} watchers saw waiting_for_review")
    return task_id, watchers, ready, done, {"connect_all_s": ready.at - t0, "errors": errors}


async def fanout(server: Server, n: int, concurrency: int = CONNECT_CONCURRENCY) -> Metrics:
    """One task, ``n`` watchers: approval-to-completed latency, completeness, RSS per watcher."""
    await asyncio.sleep(0.3)
    rss_before = server.rss()
    task_id, watchers, _ready, done, metrics = await _watch_one_task(
        server, n, concurrency, timeout=60 + n / 50
    )
    try:
        await asyncio.sleep(1.0)  # idle: let the server settle before reading its RSS
        metrics["rss_per_watcher_kib"] = (server.rss() - rss_before) / n / 1024
        t_approve = time.perf_counter()
        status = await approve(server.port, task_id)
        await done.wait(30 + n / 200)
        await wait_closed(watchers, timeout=15)
        times = [first_time(w.events, "completed") for w in watchers]
        metrics |= latency_metrics([t - t_approve for t in times if t is not None])
        metrics["complete"] = sum(task_stream_complete(w.events) for w in watchers) / n
        metrics["errors"] += (status != 200) + bad_streams(watchers)
        return metrics
    finally:
        for w in watchers:
            w.close()


async def throughput(server: Server, tasks: int, bursts: int = 3) -> Metrics:
    """``bursts`` bursts of ``tasks`` submitted at once, one after another on the same server.

    A burst at T=200 lasts a few tenths of a second, so one burst on a fresh server mostly
    measures start-up effects and noise: each figure is the median over the bursts (the
    share of complete streams is the lowest, errors are summed).
    """
    runs = [await throughput_burst(server, tasks) for _ in range(bursts)]
    merged = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    merged["complete"] = min(run["complete"] for run in runs)
    merged["errors"] = sum(run["errors"] for run in runs)
    return merged


async def throughput_burst(server: Server, tasks: int) -> Metrics:
    """``tasks`` submitted at once, each with a watcher that approves when asked."""
    port, background = server.port, set[asyncio.Task[int]]()

    def on_event(w: Watcher, e: Event) -> None:
        if e.status == "waiting_for_review" and w.ctx is None and e.task_id:
            w.ctx = "approving"
            job = asyncio.ensure_future(approve(port, e.task_id))
            background.add(job)

    async def one(i: int) -> tuple[float, Watcher]:
        t_submit = time.perf_counter()
        task_id = await submit(port, f"task {i}")
        watcher = Watcher(port, f"/stream/{task_id}", on_event)
        await open_all([watcher], None)
        await wait_closed([watcher], timeout=60)
        return t_submit, watcher

    t0 = time.perf_counter()
    runs = await asyncio.gather(*(one(i) for i in range(tasks)))
    statuses = await asyncio.gather(*background)
    for _, w in runs:
        w.close()
    finished = [(t, end) for t, w in runs if (end := first_time(w.events, "completed"))]
    latencies = [end - t for t, end in finished]
    return {
        "tasks_per_s": len(finished) / (max(e for _, e in finished) - t0) if finished else 0.0,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "complete": sum(task_stream_complete(w.events) for _, w in runs) / tasks,
        "errors": sum(s != 200 for s in statuses) + bad_streams(w for _, w in runs),
    }


async def dashboard(
    server: Server, watchers: int, tasks: int, concurrency: int = CONNECT_CONCURRENCY
) -> Metrics:
    """``watchers`` on the global stream while ``tasks`` run; one more stream approves them.

    Latency is from sending a task's approval to a dashboard receiving its
    ``completed``. A dashboard whose stream ends reconnects with Last-Event-ID,
    as EventSource does; global ids must stay contiguous across reconnects.
    """
    port = server.port
    approved_at: dict[str, float] = {}
    probes: set[str] = set()
    background: set[asyncio.Task[int]] = set()
    armed = False
    ready, delivered = Countdown(watchers + 1), Countdown(watchers * tasks)

    def on_driver(w: Watcher, e: Event) -> None:
        if not w.ctx["ready"]:
            w.ctx["ready"] = True
            ready.hit()
        tid = e.task_id
        if armed and e.status == "waiting_for_review" and tid and tid not in approved_at:
            if tid not in probes:
                approved_at[tid] = time.perf_counter()
                background.add(asyncio.ensure_future(approve(port, tid)))

    def on_dash(w: Watcher, e: Event) -> None:
        seen: dict[str, Any] = w.ctx
        if not seen["ready"]:
            seen["ready"] = True
            ready.hit()
        if e.id is not None:
            if seen["last"] is not None and e.id != seen["last"] + 1:
                seen["gaps"] += 1
            seen["last"] = e.id
        if e.status == "completed" and e.task_id not in probes and e.task_id not in seen["done"]:
            seen["done"][e.task_id] = e.t
            delivered.hit()

    dash = [Watcher(port, "/stream", on_dash, record=False) for _ in range(watchers)]
    driver = Watcher(port, "/stream", on_driver, record=False)
    everyone = [*dash, driver]
    for w in everyone:
        w.ctx = {"ready": False, "last": None, "gaps": 0, "done": {}}
    errors = await open_all(everyone, concurrency)
    reconnects = 0
    stop = asyncio.Event()

    async def keep_connected() -> None:
        """Reconnect any stream the server ended, with its Last-Event-ID (bounded)."""
        nonlocal reconnects, errors
        while not stop.is_set() and reconnects < 20 * len(everyone):
            lost = [w for w in everyone if not w.connected]
            if lost:
                reconnects += len(lost)
                errors += await open_all(lost, concurrency, [w.last_event_id for w in lost])
            await asyncio.sleep(0.05)

    keeper = asyncio.ensure_future(keep_connected())
    try:
        for i in range(20):  # live-only stream: wait until every watcher is surely subscribed
            probes.add(await submit(port, f"probe {i}"))
            if await ready.wait(2.0):
                break
        else:
            raise RuntimeError(f"{ready.left} dashboard streams never got a message")
        armed = True
        t0 = time.perf_counter()
        ids = await asyncio.gather(*(submit(port, f"task {i}") for i in range(tasks)))
        await delivered.wait(60 + watchers * tasks / 5000)
        statuses = await asyncio.gather(*background)
    finally:
        stop.set()
        await keeper
        for w in everyone:
            w.close()
    latencies = [
        t - approved_at[tid] for w in dash for tid, t in w.ctx["done"].items() if tid in approved_at
    ]
    wanted = set(ids)
    complete = sum(wanted <= w.ctx["done"].keys() and not w.ctx["gaps"] for w in dash)
    return {
        **latency_metrics(latencies),
        "delivered_s": (delivered.at or float("nan")) - t0,
        "complete": complete / watchers,
        "reconnects": reconnects,
        "errors": errors + sum(s != 200 for s in statuses),
    }


async def storm(
    server: Server, n: int, restart: bool, concurrency: int = CONNECT_CONCURRENCY
) -> Metrics:
    """``n`` watchers wait on a task, lose their streams, and all reconnect at once.

    ``restart``: the server is stopped with SIGTERM and started again on the
    same port and database. Otherwise (the only option for the in-memory
    baselines) the client drops every stream while the server stays up. Either
    way the task is approved while nobody watches, so catching up means
    receiving exactly the missed ``processing_feedback`` and ``completed``.
    """
    task_id, watchers, _ready, done, metrics = await _watch_one_task(
        server, n, concurrency, timeout=60 + n / 50
    )
    try:
        if restart:
            t_stop = time.perf_counter()
            await server.stop()
            await wait_closed(watchers, timeout=10)
            await server.start()
            metrics["downtime_s"] = time.perf_counter() - t_stop
        for w in watchers:
            w.close()
            w.errors.clear()  # judge only what happens from here on
            w.stream_closed = False
        await asyncio.sleep(0.5)  # the server notices the dropped streams
        status = await approve(server.port, task_id)
        if status != 200:
            raise RuntimeError(f"approval after the {'restart' if restart else 'drop'}: {status}")
        t0 = time.perf_counter()
        metrics["errors"] += await open_all(watchers, None, [w.last_event_id for w in watchers])
        await done.wait(60 + n / 100)
        await wait_closed(watchers, timeout=15)
        times = [first_time(reversed(w.events), "completed") for w in watchers]
        caught_up = [t - t0 for t in times if t is not None]
        metrics |= latency_metrics(caught_up)
        metrics["catch_up_s"] = max(caught_up) if len(caught_up) == n else float("nan")
        metrics["complete"] = sum(task_stream_complete(w.events) for w in watchers) / n
        metrics["errors"] += bad_streams(watchers)
        return metrics
    finally:
        for w in watchers:
            w.close()
