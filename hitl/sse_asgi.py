"""The JSON SSE endpoints, ``/stream`` and ``/stream/<task_id>``, in plain ASGI.

A watcher is a long-lived request, and Quart's per-request machinery would cost about
12 KiB of memory per open stream and CPU per message (see :mod:`hitl.asgi`). Here a
stream costs a subscription, the coroutine sending it, and one task that notices the
client leaving (``python -m bench fanout``: memory per idle watcher).

This path only ever answers a stream it could open. A request it refuses (or a bug in
checking it) is handed to Quart with the error, so Quart's error handlers answer it as
they answer every other error: one renderer, JSON or a page for a browser.

A stream is opened only to a reader who may see its task (the runner asks the policy);
the all-tasks stream of a submitter carries only their tasks' messages, filtered by the
submitter each message carries, so the filter costs no query.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast
from urllib.parse import parse_qs

from quart import Quart, request

from .broker import GLOBAL, HEARTBEAT, RESET, Broker, Subscription
from .guard import Guard
from .models import Message
from .routes import who
from .runner import Runner
from .schemas import checked_id
from .security import secured
from .streams import HEADERS as STREAM_HEADERS
from .streams import RETRY, STREAM_CLOSED, encode, parse_last_id

if TYPE_CHECKING:
    from .asgi import ASGIApp, Receive, Scope, Send

RAW_HEADERS = secured([(name.lower().encode(), value.encode())
                       for name, value in STREAM_HEADERS.items()])

# Where a refused stream request carries its error to Quart (see :func:`answer_refused`).
REFUSED = "hitl.refused"


@dataclass(frozen=True, slots=True)
class Stream:
    """What a stream request asks for, once checked."""

    topic: str
    last_id: int | None
    finished: bool  # a finished task with nothing left to replay
    owner: str | None = None  # the submitter whose messages alone it carries (None: all)


def is_stream_path(path: str) -> bool:
    """``/stream``, or ``/stream/`` and a task id (as Quart's routing would match them)."""
    return path == "/stream" or (path.startswith("/stream/") and path.count("/") == 2
                                 and len(path) > len("/stream/"))


async def check_stream(app: Quart, scope: Scope) -> Stream:
    """Check a stream request as Quart checks every other one, then parse it; raises
    HitlError for a bad one."""
    await cast(Guard, app.extensions["guard"]).check_request(scope)
    identity = who(scope)
    task_id = scope["path"].removeprefix("/stream").removeprefix("/")
    last_id = last_event_id(scope)
    runner = cast(Runner, app.extensions["runner"])
    if not task_id:
        return Stream(GLOBAL, last_id, finished=False, owner=runner.watch_scope(identity))
    task_id = await runner.resolve(checked_id(task_id), by=identity)  # a prefix names it too
    status, last_seq, _ = await runner.task_state(task_id, by=identity)
    if last_id is None:  # no Last-Event-ID: the task's current state (its latest message) first
        last_id = max(last_seq - 1, 0)
    return Stream(task_id, last_id, finished=status.terminal and last_id >= last_seq)


async def serve_stream(app: Quart, scope: Scope, receive: Receive, send: Send,
                       quart: ASGIApp) -> None:
    """Replay, then live messages, until the task finishes, the client leaves or we stop.

    Every object this keeps while it waits is kept once per idle watcher: so the loop is
    inline, and neither the last batch nor its chunk outlives its send.
    """
    try:
        stream = await check_stream(app, scope)
    except Exception as error:  # refused, or a bug: Quart answers it, as every error
        scope[REFUSED] = error
        await quart(scope, receive, send)
        return
    await send({"type": "http.response.start", "status": 200, "headers": RAW_HEADERS})
    if scope["method"] == "HEAD":  # the headers it would have, at once, and no subscription
        await send({"type": "http.response.body", "body": b""})
        return
    if stream.finished:
        await send({"type": "http.response.body", "body": RETRY + STREAM_CLOSED})
        return
    broker = cast(Broker, app.extensions["broker"])
    head, more = RETRY, True  # the retry hint goes out with the replay, in one write
    async with broker.subscribe(stream.topic, stream.last_id) as subscription:
        if not subscription.ready():  # nothing to replay: the client sees the stream open now
            await send({"type": "http.response.body", "body": head, "more_body": True})
            head = b""
        client_gone = asyncio.ensure_future(until_disconnect(receive, subscription))
        try:
            while more:
                batch = await subscription.batch()
                if not batch:  # ended: we are stopping, or it fell too far behind
                    break
                if stream.owner is not None and not (batch := owned(batch, stream.owner)):
                    continue
                chunk, more = encode(batch, ends_at_terminal=stream.topic != GLOBAL)
                await send({"type": "http.response.body", "body": head + chunk,
                            "more_body": more})
                head = chunk = b""
                del batch
        finally:
            client_gone.cancel()
    if more:
        await send({"type": "http.response.body", "body": head, "more_body": False})


async def answer_refused() -> None:
    """Quart's ``before_request``: a stream request refused above fails here, with its error."""
    error = request.scope.get(REFUSED)
    if isinstance(error, Exception):
        raise error


def owned(batch: list[Message], owner: str) -> list[Message]:
    """The messages of ``owner``'s tasks (and heartbeats and resets): all a submitter may see."""
    return [m for m in batch if m.submitted_by == owner or m is HEARTBEAT or m.status == RESET]


def last_event_id(scope: Scope) -> int | None:
    """The ``Last-Event-ID`` header, else a ``last_event_id`` query parameter; each is
    checked when given, and an empty header names no event."""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    from_query = parse_last_id(query["last_event_id"][0]) if "last_event_id" in query else None
    for name, value in scope["headers"]:
        if name == b"last-event-id" and value.strip():
            return parse_last_id(cast(bytes, value).decode("latin-1"))
    return from_query


async def until_disconnect(receive: Receive, subscription: Subscription) -> None:
    """When the client goes away, end its subscription: the stream then stops at once."""
    while (await receive())["type"] != "http.disconnect":
        pass
    subscription.close()
