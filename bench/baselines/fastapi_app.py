"""hitl's HTTP/SSE API on FastAPI + sse-starlette under uvicorn, as a typical user writes it.

Each stream is an async generator with its own ``asyncio.Queue`` (unbounded, as
in most examples); published messages are kept per task (and globally) for
replay and ``Last-Event-ID``. uvicorn runs with h11 on the stdlib asyncio loop
and backlog 2048, to match how hitl is served. State is in memory only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Header, HTTPException
from pydantic import BaseModel
from sse_starlette.sse import EventSourceResponse

app = FastAPI(title="hitl baseline (FastAPI + sse-starlette)")


class SubmitRequest(BaseModel):
    data: str


class FeedbackRequest(BaseModel):
    feedback: Literal["approved", "rejected"]
    comment: str = ""
    reviewer: str = ""


@dataclass
class Channel:
    history: list[tuple[int, str]] = field(default_factory=list)
    subscribers: set[asyncio.Queue[tuple[int, str] | None]] = field(default_factory=set)
    closed: bool = False

    def publish(self, message: str) -> None:
        item = (len(self.history) + 1, message)
        self.history.append(item)
        for queue in self.subscribers:
            queue.put_nowait(item)


@dataclass
class Task:
    id: str
    data: str
    status: str = "pending"
    attempt: int = 0
    channel: Channel = field(default_factory=Channel)


tasks: dict[str, Task] = {}
everything = Channel()
background: set[asyncio.Task[None]] = set()
DELAY = 0.0


def emit(task: Task, status: str, **fields: Any) -> None:
    task.status = status
    message = json.dumps({"task_id": task.id, "status": status, **fields})
    task.channel.publish(message)
    everything.publish(message)
    if status in ("completed", "failed", "cancelled"):
        task.channel.closed = True
        for queue in task.channel.subscribers:
            queue.put_nowait(None)


def spawn(coro: Any) -> None:
    job = asyncio.create_task(coro)
    background.add(job)
    job.add_done_callback(background.discard)


async def process(task: Task) -> None:
    task.attempt += 1
    emit(task, "running", progress=0.0, step="processing", attempt=task.attempt)
    await asyncio.sleep(DELAY)
    emit(
        task, "waiting_for_review", output_to_review=f"Processed: {task.data}", attempt=task.attempt
    )


async def finish(task: Task, approved: bool) -> None:
    await asyncio.sleep(DELAY)
    if approved:
        emit(task, "completed", final_result=f"Finalized: {task.data}")
    else:
        await process(task)


async def events(channel: Channel, after: int) -> AsyncIterator[dict[str, Any]]:
    queue: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()
    backlog = channel.history[after:]
    if not channel.closed:
        channel.subscribers.add(queue)
    try:
        for event_id, message in backlog:
            yield {"id": str(event_id), "data": message}
        while not channel.closed or not queue.empty():
            item = await queue.get()
            if item is None:
                break
            yield {"id": str(item[0]), "data": item[1]}
        yield {"data": json.dumps({"status": "stream_closed"})}
    finally:
        channel.subscribers.discard(queue)


@app.post("/submit", status_code=202)
async def submit(request: SubmitRequest) -> dict[str, str]:
    task = Task(id=uuid.uuid4().hex, data=request.data)
    tasks[task.id] = task
    emit(task, "pending")
    spawn(process(task))
    return {"message": "Task submitted", "task_id": task.id}


@app.post("/feedback/{task_id}")
async def feedback(task_id: str, request: FeedbackRequest) -> dict[str, str]:
    task = tasks.get(task_id)
    if task is None:
        raise HTTPException(404, "unknown task")
    if task.status != "waiting_for_review":
        raise HTTPException(409, f"task is {task.status}")
    emit(task, "processing_feedback", feedback_value=request.feedback)
    spawn(finish(task, request.feedback == "approved"))
    return {"message": "Feedback received", "task_id": task_id}


@app.get("/stream/{task_id}")
async def stream_task(
    task_id: str, last_event_id: int | None = Header(None)
) -> EventSourceResponse:
    task = tasks.get(task_id)
    if task is None:
        raise HTTPException(404, "unknown task")
    return EventSourceResponse(events(task.channel, last_event_id or 0))


@app.get("/stream")
async def stream_all(last_event_id: int | None = Header(None)) -> EventSourceResponse:
    after = len(everything.history) if last_event_id is None else last_event_id
    return EventSourceResponse(events(everything, after))


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        backlog=2048,
        http="h11",
        loop="asyncio",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
