"""Server-Sent Event streams of task messages, framed once per message by the broker."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from quart import Response

from .broker import Subscription
from .errors import Invalid
from .models import Message

STREAM_CLOSED = b'data: {"status":"stream_closed"}\n\n'
RETRY_MS = 3000
RETRY = f"retry: {RETRY_MS}\n\n".encode()
Send = Callable[[dict[str, Any]], Awaitable[None]]
HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def parse_last_id(raw: str | None) -> int | None:
    """The ``Last-Event-ID`` a reconnecting client sent, as a message number."""
    if raw is None or raw.strip() == "":
        return None
    if not raw.strip().isdigit() or len(raw) > 18:
        raise Invalid(f"Last-Event-ID {raw[:40]!r} is not a message id")
    return int(raw)


def sse_response(body: AsyncIterator[bytes]) -> Response:
    """A streaming response that no response or read timeout cuts off."""
    response = Response(body, headers=HEADERS)
    response.timeout = None
    return response


async def stream_task(subscription: Subscription, send: Send) -> bool:
    """Send a task's messages (replay, then live) until a terminal status.

    Plain coroutines writing to the ASGI ``send``: there is one per watcher, and every
    frame and object kept here is multiplied by the number of watchers. Returns True
    when it ended the response itself (the last chunk carries ``more_body=False``).
    """
    head = RETRY  # the retry hint goes out with the replay, in one write
    while batch := await subscription.batch():
        chunk, finished = encode(batch)
        await send({"type": "http.response.body", "body": head + chunk,
                    "more_body": not finished})
        head = b""
        if finished:
            return True
    if head:
        await send({"type": "http.response.body", "body": head, "more_body": True})
    return False


async def stream_all(subscription: Subscription, send: Send) -> bool:
    """Send every task's messages (ids are global message numbers) until the server stops."""
    await send({"type": "http.response.body", "body": RETRY, "more_body": True})
    while batch := await subscription.batch():
        chunk = b"".join(message.frame for message in batch)
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    return False


def encode(batch: list[Message]) -> tuple[bytes, bool]:
    """A batch's frames as one chunk, cut after a terminal status (then ``stream_closed``)."""
    for count, message in enumerate(batch, start=1):
        if message.terminal:
            return b"".join(m.frame for m in batch[:count]) + STREAM_CLOSED, True
    return b"".join(message.frame for message in batch), False
