"""Webhook delivery: T tasks whose events go to E local receivers; each task approved
as soon as its ``task.waiting_for_review`` reaches the first receiver.

Measured: events delivered per second over all receivers, and the latency from an
approval's request (the change) to its ``task.completed`` reaching each receiver.
hitl only: the baselines have no webhooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable

from .client import HOST, request_json
from .scenarios import Countdown, Metrics, approve, percentile, submit
from .servers import Server

OnEvent = Callable[[str, str, float], None]  # type, task id, perf_counter at arrival


class Receiver:
    """A minimal HTTP/1.1 receiver (keep-alive), answering 204 to every POST."""

    def __init__(self, on_event: OnEvent) -> None:
        self.on_event = on_event
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = json.loads(await reader.readexactly(length))
                self.on_event(body["type"], body["data"]["task_id"], time.perf_counter())
                writer.write(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()


async def webhooks(server: Server, tasks: int, endpoints: int = 2) -> Metrics:
    port = server.port
    approved_at: dict[str, float] = {}
    latencies: list[float] = []
    delivered: list[float] = []
    seen: list[dict[str, list[str]]] = [{} for _ in range(endpoints)]
    done = Countdown(tasks * endpoints)
    approvals: set[asyncio.Task[int]] = set()

    def on_event(index: int) -> OnEvent:
        def record(kind: str, task_id: str, at: float) -> None:
            delivered.append(at)
            seen[index].setdefault(task_id, []).append(kind)
            if kind == "task.waiting_for_review" and index == 0:
                approved_at[task_id] = time.perf_counter()
                approvals.add(asyncio.ensure_future(approve(port, task_id)))
            elif kind == "task.completed":
                latencies.append(at - approved_at.get(task_id, at))
                done.hit()
        return record

    receivers = [Receiver(on_event(i)) for i in range(endpoints)]
    try:
        for receiver in receivers:
            await receiver.start()
            status, body = await request_json(
                port, "POST", "/api/webhooks",
                {"url": f"http://{HOST}:{receiver.port}/hook"})
            if status != 201:
                raise RuntimeError(f"POST /api/webhooks answered {status}: {body!r}")
        t0 = time.perf_counter()
        await asyncio.gather(*(submit(port, f"task {i}") for i in range(tasks)))
        finished = await done.wait(120)
        statuses = await asyncio.gather(*approvals)
    finally:
        for receiver in receivers:
            receiver.close()
        with contextlib.suppress(Exception):
            await asyncio.sleep(0)
    wanted = ["task.waiting_for_review", "task.completed"]
    complete = sum(kinds == wanted for per in seen for kinds in per.values())
    return {
        "events_per_s": len(delivered) / (max(delivered) - t0) if delivered else 0.0,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "complete": complete / (tasks * endpoints) if finished or complete else 0.0,
        "errors": float(sum(status != 200 for status in statuses)),
    }
