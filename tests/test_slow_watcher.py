"""One slow watcher never slows the others: it is dropped, and the rest get everything."""

from __future__ import annotations

import asyncio
import time

import pytest

from hitl import Config
from hitl.processors import Job, Processor

from .conftest import LiveServer, ReviewActions

BIG = "x" * 20_000


async def chatty(job: Job) -> str:
    """Publishes 300 large progress messages (6 MB), more than socket buffers hold."""
    for step in range(300):
        job.report(step / 300, BIG)
        await asyncio.sleep(0.002)  # a steady stream a reader can keep up with
    return "done"


@pytest.fixture
def processor() -> Processor:
    return chatty


@pytest.fixture
def config(config: Config) -> Config:
    return config.with_changes(queue_size=32)


async def test_a_watcher_that_stops_reading_is_dropped_and_others_get_everything(
    live_server: LiveServer, actions: ReviewActions
) -> None:
    host, port = live_server.url.removeprefix("http://").split(":")
    broker = live_server.app.extensions["broker"]
    # Submit through the API, but a raw socket that never reads watches it from the start.
    task_id = await actions.submit()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET /stream/{task_id} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    await writer.drain()
    fast = actions.watch(task_id)
    started = time.monotonic()
    await fast.wait_for("waiting_for_review", timeout=30)
    elapsed = time.monotonic() - started
    progress = [e for e in fast.events if e.data["status"] == "running"]
    assert len(progress) == 301 and fast.ids() == list(range(1, len(fast.ids()) + 1))
    assert broker.dropped_total >= 1
    assert elapsed < 15
    writer.close()
    for _ in range(200):
        if broker.subscriber_count(task_id) == 1:
            break
        await asyncio.sleep(0.01)
    assert broker.subscriber_count(task_id) == 1  # only the fast one is left
