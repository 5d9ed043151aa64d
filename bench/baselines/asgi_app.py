"""hitl's HTTP/SSE API as a bare ASGI app on hypercorn: "the limit of our stack".

Fan-out is per subscriber: every stream owns a bounded ``asyncio.Queue``. Each
message is serialised once into SSE frame bytes, appended to its channel's
history (for replay and ``Last-Event-ID``) and put on every subscriber's queue;
a stream sends whatever is queued for it as one write. A subscriber whose queue
is full is dropped; its client reconnects with ``Last-Event-ID`` and loses
nothing. State is in memory only: nothing survives a restart. Served by
hypercorn as hitl is: h11, one worker, backlog 2048.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import uuid
from typing import Any

Scope = dict[str, Any]
Receive = Any  # the ASGI callables; kept loose to stay framework-free
Send = Any

QUEUE_SIZE = 1024
HEARTBEAT_S = 15.0
GLOBAL_HISTORY = 100_000
TERMINAL = frozenset({"completed", "failed", "cancelled"})
CLOSED_FRAME = b'data: {"status": "stream_closed"}\n\n'
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


class Sub:
    """One connected stream: a bounded queue of frames (None = end of stream)."""

    __slots__ = ("queue", "dropped")

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_SIZE)
        self.dropped = False

    def put(self, frame: bytes | None) -> bool:
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            self.dropped = True
        return not self.dropped


class Channel:
    """An ordered message log (ids 1, 2, ...) with live subscribers."""

    def __init__(self, maxlen: int | None = None) -> None:
        self.history: collections.deque[bytes] = collections.deque(maxlen=maxlen)
        self.last_id = 0
        self.subs: set[Sub] = set()
        self.closed = False

    def publish(self, body: str) -> None:
        self.last_id += 1
        frame = f"id: {self.last_id}\ndata: {body}\n\n".encode()
        self.history.append(frame)
        self.subs = {sub for sub in self.subs if sub.put(frame)}

    def since(self, last_id: int) -> list[bytes]:
        first = self.last_id - len(self.history) + 1  # id of history[0]
        return list(self.history)[max(0, last_id + 1 - first) :]

    def close(self) -> None:
        self.closed = True
        for sub in self.subs:
            sub.put(None)
        self.subs.clear()


class Task:
    def __init__(self, task_id: str, data: str) -> None:
        self.id, self.data, self.status, self.attempt = task_id, data, "pending", 0
        self.channel = Channel()


class App:
    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.tasks: dict[str, Task] = {}
        self.all = Channel(GLOBAL_HISTORY)
        self.live: set[Sub] = set()
        self.background: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Any) -> None:
        job = asyncio.ensure_future(coro)
        self.background.add(job)
        job.add_done_callback(self.background.discard)

    def emit(self, task: Task, status: str, **fields: Any) -> None:
        task.status = status
        body = json.dumps({"task_id": task.id, "status": status, **fields})
        task.channel.publish(body)
        self.all.publish(body)
        if status in TERMINAL:
            task.channel.close()

    async def process(self, task: Task) -> None:
        task.attempt += 1
        self.emit(task, "running", progress=0.0, step="processing", attempt=task.attempt)
        await asyncio.sleep(self.delay)
        out = f"Processed: {task.data}"
        self.emit(task, "waiting_for_review", output_to_review=out, attempt=task.attempt)

    async def finish(self, task: Task, approved: bool) -> None:
        await asyncio.sleep(self.delay)
        if approved:
            self.emit(task, "completed", final_result=f"Finalized: {task.data}")
        else:
            await self.process(task)

    async def heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            for sub in self.live:
                sub.put(b": ping\n\n")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] == "lifespan.startup":
                self.spawn(self.heartbeat())
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        method, parts = scope["method"], scope["path"].strip("/").split("/")
        if method == "GET" and parts[0] == "stream" and len(parts) <= 2:
            await self.stream(scope, receive, send, parts[1] if len(parts) == 2 else None)
        elif method == "POST" and parts == ["submit"]:
            await self.submit(await read_json(receive), send)
        elif method == "POST" and len(parts) == 2 and parts[0] == "feedback":
            await self.feedback(await read_json(receive), send, parts[1])
        elif method == "GET" and parts == ["healthz"]:
            await respond(send, 200, {"status": "ok"})
        else:
            await respond(send, 404, {"detail": "not found"})

    async def submit(self, body: Any, send: Send) -> None:
        if not isinstance(body, dict) or not isinstance(body.get("data"), str):
            return await respond(send, 400, {"detail": "data must be a string"})
        task = Task(uuid.uuid4().hex, body["data"])
        self.tasks[task.id] = task
        self.emit(task, "pending")
        self.spawn(self.process(task))
        await respond(send, 202, {"message": "Task submitted", "task_id": task.id})

    async def feedback(self, body: Any, send: Send, task_id: str) -> None:
        task = self.tasks.get(task_id)
        if task is None:
            return await respond(send, 404, {"detail": "unknown task"})
        verdict = body.get("feedback") if isinstance(body, dict) else None
        if verdict not in ("approved", "rejected"):
            return await respond(send, 400, {"detail": "feedback must be approved|rejected"})
        if task.status != "waiting_for_review":
            return await respond(send, 409, {"detail": f"task is {task.status}"})
        self.emit(task, "processing_feedback", feedback_value=verdict)
        self.spawn(self.finish(task, verdict == "approved"))
        await respond(send, 200, {"message": "Feedback received", "task_id": task.id})

    async def stream(self, scope: Scope, receive: Receive, send: Send, task_id: str | None) -> None:
        task = self.tasks.get(task_id) if task_id else None
        if task_id and task is None:
            return await respond(send, 404, {"detail": "unknown task"})
        channel = task.channel if task else self.all
        raw = dict(scope["headers"]).get(b"last-event-id", b"")
        last = int(raw) if raw.strip().isdigit() else None
        # Snapshot and subscribe with no await in between: no message is lost or doubled.
        backlog = channel.since(last if last is not None else (0 if task else channel.last_id))
        sub, closed = Sub(), channel.closed
        if not closed:
            channel.subs.add(sub)
            self.live.add(sub)
        watcher = asyncio.ensure_future(until_disconnect(receive, sub))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            frames: list[bytes | None] = [*backlog, None] if closed else list(backlog)
            while None not in frames:  # one write per wake-up: whatever is queued, joined
                if frames:
                    await send(
                        {"type": "http.response.body", "body": join(frames), "more_body": True}
                    )
                if sub.dropped and sub.queue.empty():
                    frames = [None]
                    break
                frames = [await sub.queue.get()]
                while not sub.queue.empty():
                    frames.append(sub.queue.get_nowait())
            tail = CLOSED_FRAME if channel.closed and not sub.dropped else b""
            await send({"type": "http.response.body", "body": join(frames) + tail})
        finally:
            watcher.cancel()
            channel.subs.discard(sub)
            self.live.discard(sub)


def join(frames: list[bytes | None]) -> bytes:
    """The frames before the end-of-stream marker (None), as one body chunk."""
    end = frames.index(None) if None in frames else len(frames)
    return b"".join(f for f in frames[:end] if f is not None)


async def until_disconnect(receive: Receive, sub: Sub) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    sub.put(None)  # wakes the stream loop; if the queue is full, `dropped` ends it


async def read_json(receive: Receive) -> Any:
    body, more = b"", True
    while more:
        msg = await receive()
        body, more = body + msg.get("body", b""), msg.get("more_body", False)
    try:
        return json.loads(body or b"null")
    except ValueError:
        return None


async def respond(send: Send, status: int, obj: Any) -> None:
    body = json.dumps(obj).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    config = Config()
    config.bind = [f"{args.host}:{args.port}"]
    config.backlog = 2048  # as hitl: the rest mirrors hitl/server.py's hypercorn settings
    config.workers = 1
    config.accesslog = None
    config.graceful_timeout = 5.0
    config.keep_alive_timeout = 75
    config.read_timeout = None
    asyncio.run(serve(App(), config))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
