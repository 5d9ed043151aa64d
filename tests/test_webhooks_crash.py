"""A real ``hitl serve`` killed (SIGKILL) in the middle of webhook deliveries, then started
again: it goes on where it left off, nothing lost, in order, the retried event with the
same ``webhook-id``. The endpoint is added with the CLI, as an operator would."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx
import pytest

from .conftest import until
from .receiver import Received, Receiver
from .serverproc import ServerProcess, run_cli

pytestmark = pytest.mark.slow

FAST = {"HITL_WEBHOOK_FIRST_RETRY": "0.05", "HITL_WEBHOOK_MAX_BACKOFF": "0.2",
        "HITL_WEBHOOK_POLL": "0.2"}
TASKS = 30


def number(request: Received) -> int:
    return int(request.id.rsplit("_", 1)[1])


async def test_a_killed_server_resumes_its_deliveries(tmp_path: Path) -> None:
    refusing = False

    async def answer(request: Received) -> int:
        await asyncio.sleep(0.02)  # deliveries take a while, so the kill lands among them
        return 503 if refusing else 200

    async with Receiver(answer) as receiver:
        db = tmp_path / "hitl.db"
        added = await asyncio.to_thread(run_cli, "webhooks", "add", receiver.url,
                                        "--db", str(db))
        assert added.returncode == 0, added.stderr
        secret = added.stdout.splitlines()[-1]
        server = ServerProcess(db, env=FAST)
        await asyncio.to_thread(server.start)
        try:
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
                tasks = [(await http.post("/submit", json={"data": f"task {n}"})).json()["task_id"]
                         for n in range(TASKS)]
            await until(lambda: len(receiver.taken) >= 5, "the first deliveries")
            refusing = True
            await until(lambda: len(receiver.requests) - len(receiver.taken) >= 2,
                        "two refused tries of one event")
            server.signal(signal.SIGKILL)
            await asyncio.to_thread(server.wait)
            refused = receiver.requests[-1]
            before = len(receiver.requests)
            refusing = False
            await asyncio.to_thread(server.start)
            await until(lambda: {body["data"]["task_id"] for body in bodies(receiver, secret)}
                        >= set(tasks), "every task's event after the restart", timeout=20)
        finally:
            server.stop()
    listing = await asyncio.to_thread(run_cli, "webhooks", "list", "--db", str(db))
    assert "task.waiting_for_review" in listing.stdout and " 200  delivered" in listing.stdout
    after = receiver.requests[before:]
    assert after[0].id == refused.id  # the event it was retrying, tried again first
    firsts: dict[str, int] = {}
    for request in receiver.taken:
        firsts.setdefault(request.id, number(request))
    assert list(firsts.values()) == sorted(firsts.values())  # in order, across the crash
    assert len(firsts) == TASKS  # each task's waiting_for_review, none lost
    assert len(receiver.taken) - TASKS <= 1  # at least once: at most the one cut short
    assert [body["type"] for body in bodies(receiver, secret)] == (
        ["task.waiting_for_review"] * len(receiver.taken))


def bodies(receiver: Receiver, secret: str) -> list[dict[str, object]]:
    return receiver.verified(secret)  # type: ignore[return-value]
