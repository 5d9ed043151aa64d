"""The app's ASGI entry: the JSON event streams take a lean path, everything else is Quart's.

A watcher is a long-lived request: Quart's per-request machinery (request and app
contexts, request and response objects, a receiver task) would cost about 12 KiB for
each open stream, so ``GET /stream`` and ``GET /stream/<task_id>`` are answered in plain
ASGI (:mod:`hitl.sse_asgi`), with the same service functions. Every other request, every
POST included, goes through Quart: one path to guard, parse and answer it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from quart import Quart

from .sse_asgi import is_stream_path, serve_stream

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


class HotPaths:
    """ASGI middleware: answers the JSON event streams itself, passes every other request on."""

    def __init__(self, app: Quart, inner: ASGIApp) -> None:
        self.app = app
        self.inner = inner

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """The coroutine that answers this request, for the server to await.

        Not a coroutine itself, so an open stream keeps no frame of the dispatcher. A
        server must be told this is ASGI (``hitl.server`` passes hypercorn ``mode="asgi"``);
        the Quart app object itself stays a plain async ASGI app for any server.
        """
        if scope["type"] == "http" and scope["method"] == "GET" and is_stream_path(scope["path"]):
            return serve_stream(self.app, scope["path"], scope, receive, send)
        return self.inner(scope, receive, send)
