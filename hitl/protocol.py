"""hypercorn 0.18's HTTP/1.1 protocol, changed where an ASGI app cannot act for itself.

hypercorn builds one per HTTP/1.1 connection: ``hypercorn.protocol.ProtocolWrapper``
looks the class up in its module, where :func:`hitl.server.serve` puts this one.

- **Its own answers.** A request h11 refuses (a malformed request line or header: 400;
  a header block over ``h11_max_incomplete_size``: 431) never reaches the app, and
  hypercorn answered it with no body and none of hitl's headers. Now it is hitl's JSON
  error, with the security headers.
- **A request pipelined behind a stream.** While a request waits behind the one being
  answered, hypercorn reads nothing more from the connection (h11 pauses) until that
  answer is complete. A stream's answer never is: hypercorn would never see the client
  leave and never tell the app, so the stream and its subscription stayed for good
  (1,000 such requests left 1,000 subscribers). Now a request behind an event stream
  ends it: the app is told the client has gone, as it would be at a close. hitl's JSON
  streams then finish their answer and the request behind is answered; a Quart stream
  (the pages' HTML ones) is cut off, and the connection closed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import h11
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.events import Response
from hypercorn.protocol.h11 import H11Protocol as HypercornH11Protocol
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream
from hypercorn.typing import Event as IOEvent
from werkzeug.http import HTTP_STATUS_CODES

from .errors import error_body
from .security import secured

PROTOCOL_ERRORS = {400: "malformed HTTP request",
                   431: "request header fields too large ({limit} KiB at most)"}


class H11Protocol(HypercornH11Protocol):
    """hypercorn's HTTP/1.1, answering broken requests as hitl, ending pipelined streams."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.request_behind = False  # a request waits behind the one being answered
        self.can_read = ReadGate(self.can_read, self._request_waits)

    async def _send_error_response(self, status_code: int) -> None:
        """Answer a request h11 refused, then close: a JSON error with our headers."""
        limit = self.config.h11_max_incomplete_size // 1024
        body = error_body(PROTOCOL_ERRORS.get(status_code, "").format(limit=limit)
                          or HTTP_STATUS_CODES.get(status_code, "bad request").lower())
        headers = secured([(b"content-type", b"application/json"),
                           (b"content-length", b"%d" % len(body)), (b"connection", b"close")])
        await self._send_h11_event(h11.Response(
            status_code=status_code, headers=headers + self.config.response_headers("h11")))
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())

    async def _create_stream(self, request: h11.Request) -> None:
        self.request_behind = False
        await super()._create_stream(request)

    async def stream_send(self, event: StreamEvent) -> None:
        await super().stream_send(event)
        if isinstance(event, Response) and self.request_behind:  # it came before the answer
            await self._end_event_stream()

    async def _request_waits(self) -> None:
        """hypercorn is about to stop reading: a request has come behind this one."""
        self.request_behind = True
        await self._end_event_stream()

    async def _end_event_stream(self) -> None:
        stream = self.stream
        if (isinstance(stream, HTTPStream) and stream.state is not ASGIHTTPState.CLOSED
                and is_event_stream(getattr(stream, "response", None))):
            await stream.app_put({"type": "http.disconnect"})

    async def _maybe_recycle(self) -> None:
        """After an answer: the next request on the connection, or (here) its close."""
        connection = self.connection
        if isinstance(connection, h11.Connection) and (
                connection.our_state is not h11.DONE or connection.their_state is not h11.DONE
                or self.context.terminated.is_set()):
            self.connection = Closing()  # type: ignore[assignment]
        await super()._maybe_recycle()


class Closing:
    """Stands in for the h11 connection once hypercorn closes it after an answer (one cut
    off, a request not read to its end, or shutdown): nothing more is read or sent.

    hypercorn's read loop, paused on a request pipelined behind that answer, would wait
    on it for good and keep the connection's task alive; what is still in h11's buffer
    must not be parsed as a request either. Like hypercorn's own ``H11WSConnection``,
    it has only what ``H11Protocol`` uses.
    """

    our_state = their_state = h11.CLOSED
    they_are_waiting_for_100_continue = False
    trailing_data = (b"", True)

    def receive_data(self, data: bytes) -> None:
        pass

    def next_event(self) -> h11.ConnectionClosed:
        return h11.ConnectionClosed()

    def send(self, event: object) -> bytes:
        return b""

    def start_next_cycle(self) -> None:
        raise h11.LocalProtocolError("the connection is closing")


class ReadGate:
    """hypercorn's ``can_read`` event, which it waits on only while a request waits behind
    the one being answered: ``wait`` first tells the protocol so."""

    def __init__(self, event: IOEvent, on_wait: Callable[[], Awaitable[None]]) -> None:
        self.event = event
        self.on_wait = on_wait

    async def clear(self) -> None:
        await self.event.clear()

    async def set(self) -> None:
        await self.event.set()

    async def wait(self) -> None:
        await self.on_wait()
        await self.event.wait()

    def is_set(self) -> bool:
        return self.event.is_set()


def is_event_stream(response: Any) -> bool:
    """Whether an ASGI ``http.response.start`` (or None, none yet) starts an event stream."""
    if response is None:
        return False
    for name, value in response.get("headers", ()):
        if bytes(name).lower() == b"content-type":
            return bytes(value).startswith(b"text/event-stream")
    return False
