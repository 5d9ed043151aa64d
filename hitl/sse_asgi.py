"""The JSON SSE endpoints, ``GET /stream`` and ``GET /stream/<task_id>``, in plain ASGI.

They sit in front of Quart because a watcher is a long-lived request and Quart's
per-request machinery (request and app contexts, a receiver task, the timeout wrapper)
cost about 12 KiB of memory per open stream and CPU per message. Here a stream costs a
subscription, the coroutine sending it, and one task that notices the client leaving
(``python -m bench fanout``: memory per idle watcher). Everything else goes on to Quart.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qs

from quart import Quart

from .broker import GLOBAL, Broker, Subscription
from .errors import HitlError
from .runner import Runner
from .schemas import checked_id
from .streams import HEADERS, RETRY, STREAM_CLOSED, parse_last_id, stream_all, stream_task

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]

RAW_HEADERS = [(name.lower().encode(), value.encode()) for name, value in HEADERS.items()] + [
    (b"x-content-type-options", b"nosniff")]
END = {"type": "http.response.body", "body": b"", "more_body": False}


@dataclass(frozen=True, slots=True)
class Request:
    """What a stream request asks for, once checked."""

    topic: str
    last_id: int | None
    finished: bool  # a finished task with nothing left to replay


class StreamEndpoints:
    """ASGI middleware: serves the SSE endpoints itself, passes every other request on."""

    def __init__(self, app: Quart, inner: ASGIApp) -> None:
        self.app = app
        self.inner = inner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] != "GET" or not (
            path == "/stream" or (path.startswith("/stream/") and path.count("/") == 2)
        ):
            await self.inner(scope, receive, send)
            return
        try:
            request = await self.check(scope, path.removeprefix("/stream").removeprefix("/"))
        except HitlError as error:
            await send_json(send, error.status, {"error": error.message})
            return
        await send({"type": "http.response.start", "status": 200, "headers": RAW_HEADERS})
        if request.finished:
            await send({"type": "http.response.body", "body": RETRY + STREAM_CLOSED})
            return
        broker = cast(Broker, self.app.extensions["broker"])
        async with broker.subscribe(request.topic, request.last_id) as subscription:
            client_gone = asyncio.ensure_future(until_disconnect(receive, subscription))
            try:
                if request.topic == GLOBAL:
                    ended = await stream_all(subscription, send)
                else:
                    ended = await stream_task(subscription, send)
            finally:
                client_gone.cancel()
        if not ended:
            await send(END)

    async def check(self, scope: Scope, task_id: str) -> Request:
        """Parse and check the request; raises HitlError for a bad one."""
        last_id = parse_last_id(last_event_id(scope))
        if not task_id:
            return Request(GLOBAL, last_id, finished=False)
        runner = cast(Runner, self.app.extensions["runner"])
        status, last_seq = await runner.task_state(checked_id(task_id))
        return Request(task_id, last_id, finished=status.terminal and (last_id or 0) >= last_seq)


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


async def send_json(send: Send, status: int, body: dict[str, str]) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
        (b"x-content-type-options", b"nosniff")]})
    await send({"type": "http.response.body", "body": payload, "more_body": False})
