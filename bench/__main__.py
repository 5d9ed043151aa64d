"""``python -m bench``: run scenarios against hitl and the baselines, print one markdown table.

Every run gets a fresh server process (fresh temp dir and database). Servers
are alternated within each round and their order rotates from round to round,
so drift on the machine spreads over all of them; the table shows medians.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import quorum, scaleout, scenarios, webhooks, workers
from .client import raise_nofile
from .scenarios import METRICS, Metrics
from .servers import REPO, SPECS, Server, ServerSpec, hitl_available

BASELINES = ("asgi", "fastapi")


@dataclass(frozen=True)
class Job:
    name: str
    run: Callable[[Server], Awaitable[Metrics]]
    show: tuple[str, ...]
    durable_only: bool = False  # needs a server that keeps its state over a restart
    hitl_only: bool = False  # a feature the baselines do not have
    spec: ServerSpec | None = None  # runs on this server alone, whatever --servers says


def fanout_job(n: int) -> Job:
    show = ("connect_all_s", "p50_ms", "p99_ms", "max_ms", "complete", "rss_per_watcher_kib")
    return Job(f"fan-out N={n}: approval -> completed", lambda s: scenarios.fanout(s, n), show)


def throughput_job(tasks: int) -> Job:
    show = ("tasks_per_s", "p50_ms", "p99_ms", "complete", "errors")
    name = f"throughput T={tasks}: submit -> completed"
    return Job(name, lambda s: scenarios.throughput(s, tasks), show)


def dashboard_job(watchers: int, tasks: int) -> Job:
    show = ("p50_ms", "p99_ms", "delivered_s", "complete", "reconnects")
    name = f"dashboard W={watchers} T={tasks}: approval -> completed"
    return Job(name, lambda s: scenarios.dashboard(s, watchers, tasks), show)


def storm_job(n: int, restart: bool) -> Job:
    show = ("catch_up_s", "p50_ms", "p99_ms", "complete", "errors")
    if restart:
        name = f"restart storm N={n}: SIGTERM, restart, reconnect"
        return Job(name, lambda s: scenarios.storm(s, n, True), ("downtime_s", *show), True)
    name = f"reconnect storm N={n}: drop, reconnect (live server)"
    return Job(name, lambda s: scenarios.storm(s, n, False), show)


def webhooks_job(tasks: int, endpoints: int) -> Job:
    show = ("events_per_s", "p50_ms", "p99_ms", "complete", "errors")
    name = f"webhooks T={tasks} E={endpoints}: approval -> task.completed delivered"
    return Job(name, lambda s: webhooks.webhooks(s, tasks, endpoints), show, hitl_only=True)


def quorum_job(tasks: int, reviewers: int) -> Job:
    show = ("tasks_per_s", "votes_per_s", "p50_ms", "p99_ms", "complete", "errors")
    name = f"quorum {reviewers} T={tasks}: {reviewers} votes at once -> completed"
    return Job(name, lambda s: quorum.quorum(s, tasks, reviewers), show, hitl_only=True)


WORKERS_SHOW = ("jobs_per_s", "claim_wait_p50_ms", "claim_wait_p99_ms", "claim_start_p50_ms",
                "claim_start_p99_ms", "errors")


def workers_jobs(tasks: int, concurrency: int, processes: list[int]) -> list[Job]:
    """The in-process baseline, then each number of ``hitl worker`` processes."""
    def job(processes: int) -> Job:
        name = (f"{processes} worker process{'es' if processes > 1 else ''} x {concurrency}"
                if processes else "in-process (the baseline)")
        return Job(f"workers T={tasks}: {name}",
                   lambda s: workers.workers(s, tasks, processes, concurrency), WORKERS_SHOW,
                   spec=workers.EXTERNAL if processes else workers.IN_PROCESS)
    return [job(0), *(job(n) for n in processes)]


def workers_table(jobs: list[Job], med: dict[str, dict[str, dict[str, float]]]) -> str:
    """A row per configuration, jobs/s also as a ratio to the first (in-process) row."""
    heads = ["scenario", *(METRICS[key].label for key in WORKERS_SHOW), "jobs/s vs in-process"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    rows = [(job.name, med.get(job.name, {}).get(job.spec.name if job.spec else "", {}))
            for job in jobs]
    base = rows[0][1].get("jobs_per_s", math.nan) if rows else math.nan
    for name, metrics in rows:
        ratio = metrics.get("jobs_per_s", math.nan) / base if base else math.nan
        cells = [fmt(metrics.get(key)) for key in WORKERS_SHOW]
        lines.append("| " + " | ".join([name, *cells, fmt(ratio)]) + " |")
    return "\n".join(lines)


def compare_jobs(quick: bool) -> list[Job]:
    """The scenarios of ``compare``, sized so that 3 rounds of 3 servers take about 10 minutes.

    The fan-outs dominate (every connection costs a server about 1 ms of CPU), so
    the dashboard and the storms run smaller here than their own subcommands' defaults.
    """
    if quick:
        return [
            *(fanout_job(n) for n in (100, 1_000)),
            throughput_job(50),
            dashboard_job(200, 50),
            storm_job(1_000, False),
            storm_job(1_000, True),
            webhooks_job(50, 2),
            quorum_job(50, 1),
            quorum_job(50, 3),
        ]
    return [
        *(fanout_job(n) for n in (100, 1_000, 5_000, 10_000)),
        *(throughput_job(t) for t in (50, 200)),
        dashboard_job(1_000, 50),
        storm_job(2_000, False),
        storm_job(2_000, True),
        webhooks_job(200, 2),
        quorum_job(200, 1),
        quorum_job(200, 3),
    ]


async def run_once(spec: ServerSpec, job: Job) -> Metrics:
    """Fresh server in a fresh temp dir, one scenario, server stopped whatever happens."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{spec.name}-") as tmp:
        server = Server(spec, Path(tmp))
        await server.start()
        gc.collect()
        gc.disable()  # the client's own collector pauses would show up as latency
        try:
            return await job.run(server)
        except Exception as exc:  # report the failure in the table, keep benchmarking
            print(f"    FAILED: {exc}\n{server.log_tail(10)}", file=sys.stderr)
            return {"failed": 1.0}
        finally:
            gc.enable()
            took, graceful = await server.stop()
            if not graceful:
                print(
                    f"    warning: {spec.name} still running {took:.0f}s after SIGTERM: killed",
                    file=sys.stderr,
                )
            gc.collect()


def run_rounds(jobs: list[Job], servers: list[str], rounds: int) -> list[dict[str, object]]:
    runs: list[dict[str, object]] = []
    for rnd in range(rounds):
        order = servers[rnd % len(servers) :] + servers[: rnd % len(servers)]
        for job in jobs:
            for name in [job.spec.name] if job.spec else order:
                spec = job.spec or SPECS[name]
                if job.spec is None and (job.durable_only and not spec.durable) or (job.hitl_only
                                                                and name != "hitl"):
                    continue
                t0 = time.perf_counter()
                metrics = asyncio.run(run_once(spec, job))
                took = time.perf_counter() - t0
                shown = ", ".join(f"{k}={fmt(metrics.get(k))}" for k in job.show if k in metrics)
                print(
                    f"[round {rnd + 1}] {name:8} {job.name} ({took:.1f}s) {shown}", file=sys.stderr
                )
                runs.append({"round": rnd + 1, "job": job.name, "server": name, "metrics": metrics})
    return runs


def medians(runs: list[dict[str, object]]) -> dict[str, dict[str, dict[str, float]]]:
    """job -> server -> metric -> median over rounds (failed runs count as NaN)."""
    acc: dict[str, dict[str, dict[str, list[float]]]] = {}
    for run in runs:
        metrics = run["metrics"]
        assert isinstance(metrics, dict)
        per = acc.setdefault(str(run["job"]), {}).setdefault(str(run["server"]), {})
        for key, value in metrics.items():
            per.setdefault(key, []).append(float(value))
    return {
        job: {
            server: {
                k: statistics.median(v) if not any(map(math.isnan, v)) else math.nan
                for k, v in values.items()
            }
            for server, values in per_server.items()
        }
        for job, per_server in acc.items()
    }


def fmt(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if value == 0 or abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def table(jobs: list[Job], servers: list[str], med: dict[str, dict[str, dict[str, float]]]) -> str:
    """Medians as one markdown table, with hitl's ratio to each baseline that ran."""
    names = {"asgi": "asgi (a)", "fastapi": "fastapi (b)"}
    ratios = [b for b in BASELINES if "hitl" in servers and b in servers]
    heads = ["scenario", "metric", "better", *(names.get(s, s) for s in servers)]
    heads += [f"hitl/({'ab'[BASELINES.index(b)]})" for b in ratios]
    signed_in = "hitl" in servers and "hitl-token" in servers  # the cost of sign-in
    heads += ["token/hitl"] if signed_in else []
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for job in jobs:
        per = med.get(job.name, {})
        for i, key in enumerate(job.show):
            meta = METRICS[key]
            row = [job.name if i == 0 else "", meta.label, meta.better]
            row += [fmt(per.get(s, {}).get(key)) for s in servers]
            hitl = per.get("hitl", {}).get(key, math.nan)
            for base in ratios:
                other = per.get(base, {}).get(key, math.nan)
                ratio = hitl / other if other and not math.isnan(hitl + other) else math.nan
                row.append("n/a" if math.isnan(ratio) else f"{ratio:.2f}")
            if signed_in:
                token = per.get("hitl-token", {}).get(key, math.nan)
                ratio = token / hitl if hitl and not math.isnan(hitl + token) else math.nan
                row.append("n/a" if math.isnan(ratio) else f"{ratio:.2f}")
            lines.append("| " + " | ".join(row) + " |")
        failed = [s for s, m in per.items() if "failed" in m]
        if failed:
            note = f"FAILED in some round: {', '.join(failed)} (see the log above)"
            lines.append(f"| | {note} |" + " |" * (len(heads) - 2))
    return "\n".join(lines)


def git_describe() -> str:
    """The checked-out commit, marked ``-dirty`` when hitl/ has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "hitl"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--servers",
        default="hitl,asgi,fastapi",
        help="comma-separated subset of: " + ", ".join(SPECS),
    )
    common.add_argument("--rounds", type=int, help="rounds, order rotated (compare: 3, else 1)")
    common.add_argument("--json", type=Path, help="also write every run and the medians here")
    sub = parser.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser("compare", parents=[common], help="every scenario, side by side")
    cmp.add_argument("--quick", action="store_true", help="smaller sizes (about 3 minutes)")
    p = sub.add_parser("fanout", parents=[common], help="N watchers on one task")
    p.add_argument("-n", type=int, nargs="+", default=[100, 1_000, 5_000, 10_000])
    p = sub.add_parser("throughput", parents=[common], help="T tasks at once, auto-approved")
    p.add_argument("-t", "--tasks", type=int, nargs="+", default=[50, 200])
    p = sub.add_parser("dashboard", parents=[common], help="W global watchers while T tasks run")
    p.add_argument("-w", "--watchers", type=int, default=1_000)
    p.add_argument("-t", "--tasks", type=int, default=200)
    p = sub.add_parser("storm", parents=[common], help="N watchers reconnect at once")
    p.add_argument("-n", type=int, default=5_000)
    p = sub.add_parser("webhooks", parents=[common],
                       help="T tasks, their events to E local webhook receivers (hitl only)")
    p.add_argument("-t", "--tasks", type=int, default=200)
    p.add_argument("-e", "--endpoints", type=int, default=2)
    p = sub.add_parser("quorum", parents=[common],
                       help="T tasks, R reviewers voting on each at once, beside quorum 1 "
                            "(hitl only)")
    p.add_argument("-t", "--tasks", type=int, default=200)
    p.add_argument("-r", "--reviewers", type=int, default=3)
    p = sub.add_parser("workers", parents=[common],
                       help="T jobs through 1 and 2 'hitl worker' processes, beside the same "
                            "processor in-process (hitl only)")
    p.add_argument("-t", "--tasks", type=int, default=200)
    p.add_argument("-c", "--concurrency", type=int, default=4, help="slots per worker")
    p.add_argument("-p", "--processes", type=int, nargs="+", default=[1, 2],
                   help="numbers of worker processes, one run each (default 1 2)")
    p = sub.add_parser("scaleout", help="hitl on PostgreSQL + Redis with 1, 2, 3 processes "
                       "beside SQLite x1: fan-out, throughput, take-over after a SIGKILL")
    scaleout.add_arguments(p)
    args = parser.parse_args(argv)

    if args.command == "scaleout":  # its own configurations and table
        return scaleout.run_main(args)
    if args.command == "compare":
        jobs = compare_jobs(args.quick)
    elif args.command == "fanout":
        jobs = [fanout_job(n) for n in args.n]
    elif args.command == "throughput":
        jobs = [throughput_job(t) for t in args.tasks]
    elif args.command == "dashboard":
        jobs = [dashboard_job(args.watchers, args.tasks)]
    elif args.command == "webhooks":
        jobs = [webhooks_job(args.tasks, args.endpoints)]
    elif args.command == "quorum":
        jobs = [quorum_job(args.tasks, 1), quorum_job(args.tasks, args.reviewers)]
    elif args.command == "workers":
        jobs = workers_jobs(args.tasks, args.concurrency, args.processes)
    else:
        jobs = [storm_job(args.n, False), storm_job(args.n, True)]

    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = [s for s in servers if s not in SPECS]
    if unknown or not servers:
        parser.error(f"unknown server(s) {unknown}; choose from {', '.join(SPECS)}")
    if any(s.startswith("hitl") for s in servers) and not hitl_available():
        print("hitl serve is not available here: running the baselines only", file=sys.stderr)
        servers = [s for s in servers if not s.startswith("hitl")]
    rounds = args.rounds or (3 if args.command == "compare" else 1)
    load_before = os.getloadavg()
    if load_before[0] > 1.0:
        print(
            f"warning: load average {load_before[0]:.1f} before starting; other work on the "
            "machine will show in the figures",
            file=sys.stderr,
        )
    nofile = raise_nofile()
    t0 = time.perf_counter()
    runs = run_rounds(jobs, servers, max(1, rounds))
    med = medians(runs)
    print(
        f"\n{rounds} round(s), medians; {os.cpu_count()} cores shared by client and server; "
        f"{time.perf_counter() - t0:.0f}s in all; commit {git_describe()}, "
        f"{time.strftime('%Y-%m-%d')}, load average {load_before[0]:.1f} before\n"
    )
    print(workers_table(jobs, med) if args.command == "workers" else table(jobs, servers, med))
    if args.json:
        meta = {
            "command": args.command,
            "servers": servers,
            "rounds": rounds,
            "python": platform.python_version(),
            "cores": os.cpu_count(),
            "nofile": nofile,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "commit": git_describe(),
        }
        args.json.write_text(json.dumps({"meta": meta, "runs": runs, "medians": med}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
