"""Server-Sent Event streams of task messages, framed once per message by the broker."""

from __future__ import annotations

from collections.abc import AsyncIterator

from quart import Response

from .errors import Invalid
from .models import Message

STREAM_CLOSED = b'data: {"status":"stream_closed"}\n\n'
RETRY_MS = 3000
RETRY = f"retry: {RETRY_MS}\n\n".encode()
HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def parse_last_id(raw: str | None) -> int | None:
    """The ``Last-Event-ID`` a reconnecting client sent, as a message number.

    Only ASCII digits make one: ``str.isdigit`` (and ``int``) also take ``²`` or ``٣``.
    """
    if raw is None or raw.strip() == "":
        return None
    digits = raw.strip()
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 18:
        raise Invalid(f"Last-Event-ID {raw[:40]!r} is not a message id")
    return int(digits)


def sse_response(body: AsyncIterator[bytes]) -> Response:
    """A streaming response that no response or read timeout cuts off."""
    response = Response(body, headers=HEADERS)
    response.timeout = None
    return response


def encode(batch: list[Message], *, ends_at_terminal: bool) -> tuple[bytes, bool]:
    """A batch's frames as one chunk, and whether the stream goes on after it.

    A task's stream ends after its terminal status, with ``stream_closed``; the global
    stream carries every task's and goes on.
    """
    if ends_at_terminal:
        for count, message in enumerate(batch, start=1):
            if message.terminal:
                return b"".join(m.frame for m in batch[:count]) + STREAM_CLOSED, False
    return b"".join(message.frame for message in batch), True
