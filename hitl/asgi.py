"""The app's ASGI entry: security headers on every answer, and one lean path for the streams.

Every response leaves through here: Quart's with the security headers added
(:func:`hitl.security.secured`), and an exception that escapes Quart becomes a logged
JSON 500 rather than hypercorn's bare one.

A watcher is a long-lived request: Quart's per-request machinery (request and app
contexts, request and response objects, a receiver task) would cost about 12 KiB for
each open stream, so ``GET`` and ``HEAD`` of ``/stream`` and ``/stream/<task_id>`` take a
lean path in plain ASGI (:mod:`hitl.sse_asgi`), with the same request check and service
functions. Every other request, every POST included, goes through Quart: one path to
guard, parse and answer it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from quart import Quart
from quart.asgi import ASGIHTTPConnection
from werkzeug.exceptions import MethodNotAllowed

from .errors import INTERNAL_ERROR, error_body
from .security import secured
from .sse_asgi import REFUSED, is_stream_path, serve_stream

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]
STREAM_METHODS = ("GET", "HEAD")  # the streams' lean path; other methods are refused (405)


class Edge:
    """ASGI middleware, outermost: the streams' lean path, else Quart with headers and a 500."""

    def __init__(self, app: Quart, inner: ASGIApp) -> None:
        self.app = app
        self.inner = inner
        self.secured_quart = self.quart  # bound once: every open stream keeps a reference

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """The coroutine that answers this request, for the server to await.

        Not a coroutine itself, so an open stream keeps no frame of the dispatcher. A
        server must be told this is ASGI (``hitl.server`` passes hypercorn ``mode="asgi"``);
        the Quart app object itself stays a plain async ASGI app for any server.
        """
        if scope["type"] != "http":
            return self.inner(scope, receive, send)  # lifespan
        if is_stream_path(scope["path"]):
            if scope["method"] in STREAM_METHODS:
                return serve_stream(self.app, scope, receive, send, self.secured_quart)
            scope[REFUSED] = MethodNotAllowed(list(STREAM_METHODS))  # Quart has no rule here
        return self.quart(scope, receive, send)

    async def quart(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Quart's answer with the security headers; a JSON 500 if an exception escapes it."""
        started = False

        async def send_secured(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = secured(message.get("headers", []))
            await send(message)

        try:
            await self.inner(scope, receive, send_secured)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if not started:  # else the answer is half sent: only a closed connection says so
                await send_error(send, 500, INTERNAL_ERROR)


class QuartHTTPConnection(ASGIHTTPConnection):
    """Quart's HTTP connection, answering in the server's task for the request instead of
    a task of its own: one task and an ``asyncio.wait`` less per request, found by profiling
    ``/submit``. As in Quart, a client that leaves cancels the answer (a stream ends).
    """

    async def __call__(self, receive: Any, send: Any) -> None:
        request = self._create_request_from_scope(send)
        answer = asyncio.current_task()
        assert answer is not None
        answered = False

        def on_client_gone(_: object) -> None:  # runs between steps of the answer, or after
            if not answered:
                answer.cancel()

        receiver = asyncio.ensure_future(self.handle_messages(request, receive))
        receiver.add_done_callback(on_client_gone)
        try:
            await self.handle_request(request, send)
        except asyncio.CancelledError:
            if not receiver.done() or receiver.cancelled():
                raise  # cancelled from outside: the server is stopping
            answer.uncancel()  # the client went away: done, as Quart is then
        finally:
            answered = True
            receiver.cancel()
        if receiver.done() and not receiver.cancelled() and receiver.exception() is not None:
            raise receiver.exception()  # type: ignore[misc]  # as Quart's own would


# The override above relies on Quart 0.22's ``handle_messages(request, receive)``; Quart
# 0.23 changed it (it takes the request's task), and there hitl keeps Quart's own answer.
ANSWERS_IN_SERVER_TASK = list(
    inspect.signature(ASGIHTTPConnection.handle_messages).parameters) == [
        "self", "request", "receive"]


async def send_error(send: Send, status: int, message: str) -> None:
    """Answer ``{"error": message}`` in plain ASGI, with the security headers."""
    body = error_body(message)
    await send({"type": "http.response.start", "status": status, "headers": secured([
        (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))])})
    await send({"type": "http.response.body", "body": body, "more_body": False})
