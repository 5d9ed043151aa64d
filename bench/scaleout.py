"""Scale-out: hitl on PostgreSQL + Redis with 1, 2 and 3 ``hitl serve`` processes, beside one
process on SQLite (the reference), in the same invocation.

Each configuration gets fresh processes on ports of their own, a throwaway PostgreSQL
database (made from the admin URL, dropped after) and a Redis key prefix of its own. The
client spreads its connections over the processes itself, as a load balancer would:

- **fan-out**: W watchers (10,000 by default), round-robin over the processes, on one
  task's stream (``--stream task``: the whole log from id 0) or the all-tasks stream
  (``--stream global``: live, while a run of tasks goes through). Every watcher must get
  every message, ids contiguous; latency is from sending the approval (to another process
  than the flow's, where there is one) to each watcher receiving ``completed``.
- **throughput**: T tasks (200) at once, each submitted to process i mod N, watched there,
  and approved through the next process (a decision that crosses processes); tasks/s from
  the first submit to the last ``completed``, median of 3 bursts.
- **take-over**: a task waits for review; the process owning its flow (``tasks.owner``)
  is SIGKILLed; a decision is sent to another process until one is taken, and the time is
  measured to the task's ``completed`` there. Needs 2 processes or more; the default flow
  lease should make it well under 15 s.

Not a test: a failed part is reported in the table (n/a, and the reason on stderr), and
the next one runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .client import Event, Watcher, raise_nofile, request_json
from .scenarios import (
    CONNECT_CONCURRENCY,
    Countdown,
    Metrics,
    approve,
    bad_streams,
    first_time,
    latency_metrics,
    open_all,
    percentile,
    submit,
    task_stream_complete,
    wait_closed,
)
from .servers import Server, ServerSpec, _hitl_base

POSTGRES = (os.environ.get("HITL_BENCH_POSTGRES") or os.environ.get("HITL_TEST_POSTGRES")
            or "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = (os.environ.get("HITL_BENCH_REDIS") or os.environ.get("HITL_TEST_REDIS")
         or "redis://127.0.0.1:6379/0")
ENV = {"HITL_PROCESS_DELAY": "0", "HITL_AUTH": "none", "HITL_LOG_LEVEL": "warning"}
TAKE_OVER_LIMIT = 60.0  # seconds: a take-over slower than this is reported as failed


@dataclass
class Configuration:
    """One row of the table: ``processes`` × ``engine`` (``sqlite`` or ``postgresql``)."""

    engine: str
    processes: int
    servers: list[Server] = field(default_factory=list)
    db: str = ""

    @property
    def name(self) -> str:
        return f"{'SQLite' if self.engine == 'sqlite' else 'PostgreSQL+Redis'} x{self.processes}"

    @property
    def ports(self) -> list[int]:
        return [server.port for server in self.servers]


def spec(db: str, broker: str) -> ServerSpec:
    def command(port: int, _db: Path) -> list[str]:
        return [*_hitl_base(), "serve", "--host", "127.0.0.1", "--port", str(port),
                "--db", db, "--broker", broker]
    return ServerSpec("hitl", durable=True, command=command, env=ENV)


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))


async def services() -> str | None:
    """Why PostgreSQL + Redis cannot be used here, or None when both answer."""
    try:
        import asyncpg
        import redis.asyncio as redis
    except ImportError as exc:
        return f"{exc.name} is not installed (pip install asyncpg redis)"
    try:
        conn = await asyncio.wait_for(asyncpg.connect(POSTGRES), 5)
        await conn.close()
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"no PostgreSQL at {POSTGRES}: {exc}"
    client = redis.Redis.from_url(REDIS, socket_connect_timeout=2)
    try:
        await asyncio.wait_for(client.ping(), 5)
    except (OSError, redis.RedisError, TimeoutError) as exc:
        return f"no Redis at {REDIS}: {exc}"
    finally:
        await client.aclose()
    return None


@contextlib.asynccontextmanager
async def running(config: Configuration) -> AsyncIterator[Configuration]:
    """The configuration's processes, started together, on a database and prefix of its own;
    stopped, and the database dropped, whatever happens."""
    import_pg = config.engine == "postgresql"
    prefix = f"bench-{uuid.uuid4().hex[:10]}"
    name = f"hitl_bench_{uuid.uuid4().hex[:10]}"
    with tempfile.TemporaryDirectory(prefix="bench-scaleout-") as tmp:
        if import_pg:
            import asyncpg

            admin = await asyncpg.connect(POSTGRES)
            try:
                await admin.execute(f'CREATE DATABASE "{name}"')
            finally:
                await admin.close()
            config.db = with_database(POSTGRES, name)
            server_spec = spec(config.db, f"{REDIS}?prefix={prefix}")
        else:
            config.db = str(Path(tmp) / "hitl.db")
            server_spec = spec(config.db, "memory")
        config.servers = []
        for n in range(config.processes):
            workdir = Path(tmp) / f"p{n}"
            workdir.mkdir()
            config.servers.append(Server(server_spec, workdir))
        try:
            await asyncio.gather(*(server.start() for server in config.servers))
            yield config
        finally:
            for server in config.servers:
                took, graceful = await server.stop()
                if not graceful:
                    print(f"    warning: a process still ran {took:.0f}s after SIGTERM: killed",
                          file=sys.stderr)
            if import_pg:
                await drop(name, prefix)


async def drop(name: str, prefix: str) -> None:
    import asyncpg
    import redis.asyncio as redis

    admin = await asyncpg.connect(POSTGRES)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
    client = redis.Redis.from_url(REDIS)
    try:
        keys = [key async for key in client.scan_iter(f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


# -- fan-out -------------------------------------------------------------------------


async def fanout_task(config: Configuration, watchers: int) -> Metrics:
    """One task's stream, ``watchers`` of it over every process; the approval to another."""
    ports = config.ports
    task_id = await submit(ports[0], "fan-out")
    ready, done = Countdown(watchers), Countdown(watchers)

    def on_event(w: Watcher, e: Event) -> None:
        if e.status == "waiting_for_review" and w.ctx is None:
            w.ctx = "ready"
            ready.hit()
        elif e.status == "completed" and w.ctx == "ready":
            w.ctx = "done"
            done.hit()

    crowd = [Watcher(ports[i % len(ports)], f"/stream/{task_id}", on_event)
             for i in range(watchers)]
    t0 = time.perf_counter()
    errors = await open_all(crowd, CONNECT_CONCURRENCY)
    try:
        if not await ready.wait(60 + watchers / 50):
            raise RuntimeError(f"only {watchers - ready.left}/{watchers} watchers saw "
                               "waiting_for_review")
        metrics: Metrics = {"connect_all_s": ready.at - t0}
        await asyncio.sleep(1.0)
        t_approve = time.perf_counter()
        status = await approve(ports[-1], task_id)  # the last process: not the flow's
        await done.wait(30 + watchers / 200)
        await wait_closed(crowd, timeout=15)
        times = [first_time(w.events, "completed") for w in crowd]
        metrics |= latency_metrics([t - t_approve for t in times if t is not None])
        metrics["complete"] = sum(task_stream_complete(w.events) for w in crowd) / watchers
        metrics["errors"] = errors + (status != 200) + bad_streams(crowd)
        return metrics
    finally:
        for w in crowd:
            w.close()


async def fanout_global(config: Configuration, watchers: int, tasks: int = 10) -> Metrics:
    """``watchers`` on the all-tasks stream over every process while ``tasks`` go through,
    each approved by a driver when it asks for review (through the next process)."""
    ports = config.ports
    approved_at: dict[str, float] = {}
    background: set[asyncio.Task[int]] = set()
    probes: set[str] = set()
    armed = False
    ready = Countdown(watchers)
    delivered = Countdown(watchers * tasks)
    submitted_on: dict[str, int] = {}

    waiting: set[str] = set()  # asking for review, maybe before its submit has answered

    def decide(tid: str) -> None:
        if tid in submitted_on and tid in waiting and tid not in approved_at:
            approved_at[tid] = time.perf_counter()
            port = ports[(submitted_on[tid] + 1) % len(ports)]
            background.add(asyncio.ensure_future(approve(port, tid)))

    def on_driver(_w: Watcher, e: Event) -> None:
        if armed and e.status == "waiting_for_review" and e.task_id:
            waiting.add(e.task_id)
            decide(e.task_id)

    def on_watch(w: Watcher, e: Event) -> None:
        seen: dict[str, Any] = w.ctx
        if not seen["ready"]:
            seen["ready"] = True
            ready.hit()
        if e.id is not None:
            if seen["last"] is not None and e.id != seen["last"] + 1:
                seen["gaps"] += 1
            seen["last"] = e.id
        if e.status == "completed" and e.task_id in submitted_on and \
                e.task_id not in seen["done"]:
            seen["done"][e.task_id] = e.t
            delivered.hit()

    crowd = [Watcher(ports[i % len(ports)], "/stream", on_watch, record=False)
             for i in range(watchers)]
    for w in crowd:
        w.ctx = {"ready": False, "last": None, "gaps": 0, "done": {}}
    driver = Watcher(ports[0], "/stream", on_driver, record=False)
    t0 = time.perf_counter()
    errors = await open_all([*crowd, driver], CONNECT_CONCURRENCY)
    try:
        for i in range(20):  # a live stream: wait until every watcher surely listens
            probes.add(await submit(ports[i % len(ports)], f"probe {i}"))
            if await ready.wait(2.0):
                break
        else:
            raise RuntimeError(f"{ready.left} watchers never got a message")
        metrics: Metrics = {"connect_all_s": ready.at - t0}
        await asyncio.sleep(1.0)  # the probes' own messages go by
        armed = True
        for i in range(tasks):
            tid = await submit(ports[i % len(ports)], f"task {i}")
            submitted_on[tid] = i % len(ports)
            decide(tid)  # its review request may have come before the submit's answer
        await delivered.wait(60 + watchers * tasks / 5000)
        statuses = await asyncio.gather(*background)
    finally:
        for w in [*crowd, driver]:
            w.close()
    latencies = [t - approved_at[tid] for w in crowd for tid, t in w.ctx["done"].items()
                 if tid in approved_at]
    wanted = set(submitted_on)
    complete = sum(wanted <= w.ctx["done"].keys() and not w.ctx["gaps"] for w in crowd)
    if complete < watchers:  # what went wrong, for the log
        print(f"    global stream: {sum(bool(w.ctx['gaps']) for w in crowd)} watchers saw an id "
              f"gap, {sum(not wanted <= w.ctx['done'].keys() for w in crowd)} missed a "
              f"completion, {sum(bool(w.errors) for w in crowd)} had errors, "
              f"{sum(w.stream_closed for w in crowd)} were closed by the server",
              file=sys.stderr)
    return {**metrics, **latency_metrics(latencies), "complete": complete / watchers,
            "errors": errors + sum(s != 200 for s in statuses)}


# -- throughput ----------------------------------------------------------------------


async def throughput(config: Configuration, tasks: int, bursts: int) -> Metrics:
    runs = [await burst(config, tasks) for _ in range(bursts)]
    merged = {key: sorted(run[key] for run in runs)[len(runs) // 2] for key in runs[0]}
    merged["complete"] = min(run["complete"] for run in runs)
    merged["errors"] = sum(run["errors"] for run in runs)
    return merged


async def burst(config: Configuration, tasks: int) -> Metrics:
    """``tasks`` at once: submitted and watched on process i mod N, approved on the next."""
    ports, background = config.ports, set[asyncio.Task[int]]()

    def on_event(w: Watcher, e: Event) -> None:
        if e.status == "waiting_for_review" and w.ctx is not None and e.task_id:
            port, w.ctx = w.ctx, None
            background.add(asyncio.ensure_future(approve(port, e.task_id)))

    async def one(i: int) -> tuple[float, Watcher]:
        home = i % len(ports)
        t_submit = time.perf_counter()
        task_id = await submit(ports[home], f"task {i}")
        watcher = Watcher(ports[home], f"/stream/{task_id}", on_event)
        watcher.ctx = ports[(home + 1) % len(ports)]
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
        "tput_p50_ms": percentile(latencies, 50) * 1e3,
        "tput_p99_ms": percentile(latencies, 99) * 1e3,
        "complete": sum(task_stream_complete(w.events) for _, w in runs) / tasks,
        "errors": sum(s != 200 for s in statuses) + bad_streams(w for _, w in runs),
    }


# -- take-over -----------------------------------------------------------------------


async def owner_pid(db: str, task_id: str) -> int | None:
    """The pid in ``tasks.owner`` (``host:pid:random``), or None when it cannot be read."""
    import asyncpg

    conn = await asyncpg.connect(db)
    try:
        owner = await conn.fetchval("SELECT owner FROM tasks WHERE task_id = $1", task_id)
    except asyncpg.PostgresError:
        return None
    finally:
        await conn.close()
    parts = str(owner or "").split(":")
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None


async def take_over(config: Configuration) -> Metrics:
    """SIGKILL the owner of a waiting task; time until a decision sent elsewhere is taken
    (``decided_s``) and the task completes (``takeover_s``)."""
    ports = config.ports
    task_id = await submit(ports[0], "take-over")
    deadline = time.monotonic() + 30
    while True:
        status, task = await request_json(ports[0], "GET", f"/api/tasks/{task_id}")
        if status == 200 and task.get("status") == "waiting_for_review":
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the task did not come up for review: {status} {task!r}")
        await asyncio.sleep(0.05)
    pid = await owner_pid(config.db, task_id)
    victim = next((s for s in config.servers if s.pid == pid), None)
    if victim is None:
        print(f"    note: tasks.owner names no process of ours (pid {pid}): killing the one "
              "that took the submit", file=sys.stderr)
        victim = config.servers[0]
    others = [s.port for s in config.servers if s is not victim]
    assert victim.proc is not None
    t_kill = time.perf_counter()
    victim.proc.kill()
    victim.proc.wait(10)
    decided_s = math.nan
    tries = 0
    while time.perf_counter() - t_kill < TAKE_OVER_LIMIT:
        port = others[tries % len(others)]
        tries += 1
        if math.isnan(decided_s):
            with contextlib.suppress(OSError, TimeoutError):
                if await approve(port, task_id) == 200:
                    decided_s = time.perf_counter() - t_kill
        with contextlib.suppress(OSError, TimeoutError):
            status, task = await request_json(port, "GET", f"/api/tasks/{task_id}")
            if status == 200 and task.get("status") == "completed":
                return {"decided_s": decided_s, "takeover_s": time.perf_counter() - t_kill}
        await asyncio.sleep(0.1)
    raise RuntimeError(f"not completed {TAKE_OVER_LIMIT:.0f}s after the SIGKILL "
                       f"(decision {'taken' if not math.isnan(decided_s) else 'never taken'})")


# -- the run and its table -------------------------------------------------------------


# (part, metric) -> column; each part's figures are kept apart (both count "complete").
COLUMNS = (
    ("fan-out", "connect_all_s", "connect all (s)"),
    ("fan-out", "p50_ms", "fan-out p50 (ms)"),
    ("fan-out", "p99_ms", "fan-out p99 (ms)"),
    ("fan-out", "complete", "watchers with every message"),
    ("fan-out", "errors", "fan-out errors"),
    ("throughput", "tasks_per_s", "tasks/s"),
    ("throughput", "tput_p99_ms", "submit to completed p99 (ms)"),
    ("throughput", "errors", "throughput errors"),
    ("take-over", "decided_s", "take-over: decision taken (s)"),
    ("take-over", "takeover_s", "take-over: completed (s)"),
)
RATIOS = (("fan-out", "p99_ms", "fan-out p99 vs SQLite x1"),
          ("throughput", "tasks_per_s", "tasks/s vs SQLite x1"))


async def measure(config: Configuration, args: argparse.Namespace) -> Metrics:
    """Each part on fresh processes (a take-over kills one; a fan-out leaves many streams
    behind), failures reported and skipped."""
    metrics: Metrics = {}
    parts: list[tuple[str, Any]] = [
        ("fan-out", lambda c: (fanout_task if args.stream == "task" else fanout_global)(
            c, args.watchers)),
        ("throughput", lambda c: throughput(c, args.tasks, args.bursts)),
    ]
    if config.processes > 1 and not args.no_takeover:
        parts.append(("take-over", take_over))
    for label, part in parts:
        t0 = time.perf_counter()
        try:
            async with running(config):
                got = await part(config)
        except Exception as exc:  # the table says n/a; the reason goes here
            print(f"  {config.name} {label}: FAILED: {exc}", file=sys.stderr)
            for server in config.servers:
                print(server.log_tail(5), file=sys.stderr)
            got = {}
        metrics |= {f"{label}:{key}": value for key, value in got.items()}
        shown = ", ".join(f"{k}={fmt(v)}" for k, v in got.items())
        print(f"  {config.name} {label} ({time.perf_counter() - t0:.1f}s): {shown}",
              file=sys.stderr)
    return metrics


def fmt(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if value == 0 or abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def table(rows: list[tuple[str, Metrics]]) -> str:
    heads = ["configuration", *(head for *_, head in COLUMNS), *(head for *_, head in RATIOS)]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    base = rows[0][1] if rows and rows[0][0].startswith("SQLite") else {}
    for name, metrics in rows:
        cells = [fmt(metrics.get(f"{part}:{key}")) for part, key, _ in COLUMNS]
        for part, key, _ in RATIOS:
            mine = metrics.get(f"{part}:{key}", math.nan)
            ref = base.get(f"{part}:{key}", math.nan)
            cells.append(fmt(mine / ref) if ref and not math.isnan(mine + ref) else "n/a")
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> list[tuple[str, Metrics]]:
    configs = [Configuration("sqlite", 1)]
    problem = await services()
    if problem:
        print(f"PostgreSQL + Redis not available ({problem}): SQLite x1 only", file=sys.stderr)
    else:
        configs += [Configuration("postgresql", n) for n in args.processes]
    rows = []
    for config in configs:
        print(f"{config.name}:", file=sys.stderr)
        rows.append((config.name, await measure(config, args)))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench scaleout",
        description="hitl on PostgreSQL + Redis with 1, 2, 3 processes beside SQLite x1: "
                    "fan-out, throughput, take-over after a SIGKILL")
    add_arguments(parser)
    return run_main(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--watchers", "-w", type=int, default=10_000,
                        help="SSE watchers of the fan-out, spread over the processes "
                             "(default 10000)")
    parser.add_argument("--stream", choices=("task", "global"), default="task",
                        help="fan-out on one task's stream (default) or the all-tasks stream")
    parser.add_argument("--tasks", "-t", type=int, default=200,
                        help="tasks at once in the throughput part (default 200)")
    parser.add_argument("--bursts", type=int, default=3, help="throughput bursts (median)")
    parser.add_argument("--processes", "-p", type=int, nargs="+", default=[1, 2, 3],
                        help="numbers of PostgreSQL + Redis processes (default 1 2 3)")
    parser.add_argument("--no-takeover", action="store_true", help="skip the take-over part")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 200 watchers, 20 tasks, 1 burst, 1 and 2 processes")
    parser.add_argument("--json", type=Path, help="also write the figures here")


def run_main(args: argparse.Namespace) -> int:
    if args.quick:
        args.watchers, args.tasks, args.bursts = 200, 20, 1
        args.processes = [n for n in args.processes if n <= 2] or [1]
    raise_nofile()
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    rows = asyncio.run(run(args))
    print(f"\nscale-out, {args.stream} stream, {args.watchers} watchers, T={args.tasks}; "
          f"{os.cpu_count()} cores shared by client, servers, PostgreSQL and Redis; "
          f"{time.perf_counter() - t0:.0f}s in all; {time.strftime('%Y-%m-%d')}, load "
          f"average {load:.1f} before\n")
    print(table(rows))
    if args.json:
        meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cores": os.cpu_count(),
                "loadavg_before": load, "loadavg_after": os.getloadavg()[0]}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "args": {
            k: str(v) for k, v in vars(args).items() if k != "func"}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
