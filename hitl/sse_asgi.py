"""The JSON SSE endpoints, ``GET /stream`` and ``GET /stream/<task_id>``, in plain ASGI.

A watcher is a long-lived request, and Quart's per-request machinery would cost about
12 KiB of memory per open stream and CPU per message (see :mod:`hitl.asgi`). Here a
stream costs a subscription, the coroutine sending it, and one task that notices the
client leaving (``python -m bench fanout``: memory per idle watcher).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast
from urllib.parse import parse_qs

from quart import Quart

from .broker import GLOBAL, Broker, Subscription
from .runner import Runner
from .schemas import checked_id
from .streams import HEADERS, RETRY, STREAM_CLOSED, parse_last_id, stream_all, stream_task

if TYPE_CHECKING:
    from .asgi import Receive, Scope, Send

RAW_HEADERS = [(name.lower().encode(), value.encode()) for name, value in HEADERS.items()] + [
    (b"x-content-type-options", b"nosniff")]  # an event stream is never rendered: no CSP
END = {"type": "http.response.body", "body": b"", "more_body": False}


@dataclass(frozen=True, slots=True)
class Stream:
    """What a stream request asks for, once checked."""

    topic: str
    last_id: int | None
    finished: bool  # a finished task with nothing left to replay


def is_stream_path(path: str) -> bool:
    return path == "/stream" or (path.startswith("/stream/") and path.count("/") == 2)


async def check_stream(app: Quart, path: str, scope: Scope) -> Stream:
    """Parse and check a stream request; raises HitlError for a bad one."""
    task_id = path.removeprefix("/stream").removeprefix("/")
    last_id = parse_last_id(last_event_id(scope))
    if not task_id:
        return Stream(GLOBAL, last_id, finished=False)
    runner = cast(Runner, app.extensions["runner"])
    status, last_seq = await runner.task_state(checked_id(task_id))
    return Stream(task_id, last_id, finished=status.terminal and (last_id or 0) >= last_seq)


async def serve_stream(app: Quart, stream: Stream, receive: Receive, send: Send) -> None:
    """Replay, then live messages, until the task finishes, the client leaves or we stop."""
    await send({"type": "http.response.start", "status": 200, "headers": RAW_HEADERS})
    if stream.finished:
        await send({"type": "http.response.body", "body": RETRY + STREAM_CLOSED})
        return
    broker = cast(Broker, app.extensions["broker"])
    async with broker.subscribe(stream.topic, stream.last_id) as subscription:
        client_gone = asyncio.ensure_future(until_disconnect(receive, subscription))
        try:
            if stream.topic == GLOBAL:
                ended = await stream_all(subscription, send)
            else:
                ended = await stream_task(subscription, send)
        finally:
            client_gone.cancel()
    if not ended:
        await send(END)


def last_event_id(scope: Scope) -> str | None:
    """The ``Last-Event-ID`` header, else a ``last_event_id`` query parameter."""
    for name, value in scope["headers"]:
        if name == b"last-event-id":
            return cast(bytes, value).decode("latin-1")
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return query["last_event_id"][0] if "last_event_id" in query else None


async def until_disconnect(receive: Receive, subscription: Subscription) -> None:
    """When the client goes away, end its subscription: the stream then stops at once."""
    while (await receive())["type"] != "http.disconnect":
        pass
    subscription.close()
