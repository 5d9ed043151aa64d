"""Memory stays bounded: resident memory of a real server before and after N finished tasks.

    python -m bench.memory [--tasks 5000] [--concurrency 50]

Starts ``hitl serve`` on a temporary database (delay 0), warms it up, runs N tasks to
completion (a dashboard stream approves each as it comes up for review), then prints the
server's RSS before, after, and the growth per task. Not a test: a figure for the notes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def run_tasks(url: str, count: int, concurrency: int) -> float:
    """Submit ``count`` tasks, ``concurrency`` at a time; approve each; return seconds."""
    done = asyncio.Event()
    finished = 0
    slots = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(
        base_url=url, timeout=30, limits=httpx.Limits(max_connections=concurrency + 5)
    ) as http:

        async def approve_as_they_come() -> None:
            nonlocal finished
            async with http.stream("GET", "/stream") as stream:
                async for line in stream.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    message = json.loads(line[5:])
                    if message["status"] == "waiting_for_review":
                        await http.post(
                            f"/feedback/{message['task_id']}", json={"feedback": "approved"}
                        )
                    elif message["status"] == "completed":
                        finished += 1
                        slots.release()
                        if finished == count:
                            done.set()
                            return

        watcher = asyncio.create_task(approve_as_they_come())
        await asyncio.sleep(0.2)
        started = time.perf_counter()
        for n in range(count):
            await slots.acquire()
            (await http.post("/submit", json={"data": f"task {n}"})).raise_for_status()
        await asyncio.wait_for(done.wait(), 600)
        watcher.cancel()
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "HITL_PROCESS_DELAY": "0", "HITL_LOG_LEVEL": "warning",
               "HITL_AUTH": "none"}  # the baselines sign no one in
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hitl",
                "serve",
                "--port",
                str(args.port),
                "--db",
                f"{tmp}/bench.db",
            ],
            env=env,
            cwd=ROOT,
        )
        url = f"http://127.0.0.1:{args.port}"
        try:
            for _ in range(100):
                try:
                    httpx.get(url + "/healthz")
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            asyncio.run(run_tasks(url, 200, args.concurrency))  # warm-up: imports, caches
            before = rss_kib(server.pid)
            seconds = asyncio.run(run_tasks(url, args.tasks, args.concurrency))
            time.sleep(1)
            after = rss_kib(server.pid)
            health = httpx.get(url + "/healthz").json()
        finally:
            server.terminate()
            server.wait(30)
    print(
        f"tasks: {args.tasks} in {seconds:.1f} s ({args.tasks / seconds:.0f} tasks/s, "
        f"concurrency {args.concurrency})"
    )
    print(f"server RSS after warm-up: {before / 1024:.1f} MiB")
    print(
        f"server RSS after {args.tasks} tasks: {after / 1024:.1f} MiB "
        f"(growth {(after - before) / 1024:.1f} MiB, {(after - before) * 1024 / args.tasks:.0f}"
        f" bytes per task)"
    )
    print(f"live tasks: {health['live_tasks']}, subscribers: {health['subscribers']}")


if __name__ == "__main__":
    main()
