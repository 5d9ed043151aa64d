"""Clients that connect to a stream and never read: bounded memory, no delay for others.

Each stalled client is a raw socket that sends its request and never reads (with a small
receive buffer, as a client on a slow link would have), against a real server.
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import psutil
import pytest

from hitl import Config
from hitl.processors import Job, Processor

from .conftest import LiveServer, ReviewActions

LARGE = "y" * 200_000


async def workload(job: Job) -> str:
    """'large': a 200,000-character output; 'ticks N': N progress reports, 10 ms apart,
    each carrying the time it was sent (and 2 KB, as real progress would)."""
    if job.task_input.startswith("ticks"):
        for step in range(int(job.task_input.split()[1])):
            job.report(step / 1000, f"{time.perf_counter()!r} {'.' * 2000}")
            await asyncio.sleep(0.01)
        return "done"
    return LARGE


@pytest.fixture
def processor() -> Processor:
    return workload


@pytest.fixture
def config(config: Config, request: pytest.FixtureRequest) -> Config:
    if "delay" in request.node.name:  # no WAL checkpoints (a few ms every ~150 commits,
        return config.with_changes(heartbeat=0, db=":memory:")  # stalled or not) in the p99
    return config.with_changes(heartbeat=0)


@contextmanager
def stalled_clients(server: LiveServer, path: str, count: int) -> Iterator[list[socket.socket]]:
    host, port = server.url.removeprefix("http://").split(":")
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((host, int(port)))
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            sockets.append(sock)
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def rss_mib() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


async def until(condition: Callable[[], bool], timeout: float = 20) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


async def run_large_tasks(actions: ReviewActions, count: int) -> None:
    for _ in range(count):
        task_id = await actions.submit("large")
        for _ in range(500):
            task = (await actions.http.get(f"/api/tasks/{task_id}")).json()
            if task["status"] == "waiting_for_review":
                break
            await asyncio.sleep(0.01)
        assert (await actions.approve(task_id)).status_code == 200


async def test_stalled_watchers_of_large_tasks_hold_little_and_give_it_back(
    live_server: LiveServer, actions: ReviewActions
) -> None:
    broker = live_server.app.extensions["broker"]
    await run_large_tasks(actions, 30)  # the same work with nobody stalled: the baseline
    await asyncio.sleep(0.5)
    baseline = rss_mib()
    with stalled_clients(live_server, "/stream", 100):
        await until(lambda: broker.subscriber_count() == 100)
        await run_large_tasks(actions, 30)  # 12 MB of messages to each stalled client
        await until(lambda: broker.subscriber_count() == 0)  # dropped, though connected
        await asyncio.sleep(0.5)
        held = rss_mib()
    await asyncio.sleep(2)  # their requests end once the connections close
    after = rss_mib()
    print(f"RSS: baseline {baseline:.0f} MiB, with 100 stalled {held:.0f}, after {after:.0f}")
    assert broker.dropped_total == 100
    assert held - baseline < 150  # was 2.5 GB at the worst
    assert after - baseline < 60


async def reader_latencies(http: httpx.AsyncClient, ticks: int) -> list[float]:
    """Seconds from each progress report to its arrival on a ``/stream`` reader."""
    latencies: list[float] = []
    async with http.stream("GET", "/stream") as response:
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                arrived = time.perf_counter()
                data = json.loads(line[5:])
                if data.get("partial_output"):
                    latencies.append(arrived - float(data["partial_output"].split()[0]))
                if data["status"] == "waiting_for_review":
                    return latencies[len(latencies) - ticks:]
    return latencies


async def p99_of_readers(server: LiveServer, actions: ReviewActions, ticks: int,
                         skip: int = 0) -> float:
    """Three readers on ``/stream`` while a task reports ``skip + ticks`` times: the p99
    over the last ``ticks`` reports, in ms."""
    broker = server.app.extensions["broker"]
    clients = [server.http() for _ in range(3)]
    watching = broker.subscriber_count()
    readers = [asyncio.create_task(reader_latencies(http, ticks)) for http in clients]
    await until(lambda: broker.subscriber_count() == watching + 3)
    await actions.submit(f"ticks {skip + ticks}")
    results = await asyncio.wait_for(asyncio.gather(*readers), 60)
    for http in clients:
        await http.aclose()
    latencies = sorted(latency for result in results for latency in result)
    return latencies[int(len(latencies) * 0.99)] * 1000


async def test_stalled_watchers_do_not_delay_the_readers(
    live_server: LiveServer, actions: ReviewActions
) -> None:
    broker = live_server.app.extensions["broker"]
    alone = await p99_of_readers(live_server, actions, 300)
    with stalled_clients(live_server, "/stream", 250):
        await until(lambda: broker.subscriber_count() == 250)
        # A stalled client is served like a reader until its buffers are full (by design
        # some 200 KB): the first 100 reports (200 KB) are that; then it must cost nothing.
        stalled = await p99_of_readers(live_server, actions, 300, skip=150)
    print(f"readers' p99: {alone:.1f} ms alone, {stalled:.1f} ms with 250 stalled clients")
    assert stalled < alone * 1.5 + 4  # before: 8.1 ms against 1.6 alone
