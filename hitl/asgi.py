"""The hot endpoints, answered in plain ASGI ahead of Quart.

Quart's per-request machinery (request and app contexts, request and response objects,
a receiver task, quart-schema's conversions) costs about 0.25 ms of CPU per request,
and about 12 KiB for each open stream. On the paths that every watcher and every
automated client takes, that was most of the server's work (``python -m bench
throughput``), so two kinds of request are answered here:

- ``GET /stream`` and ``GET /stream/<task_id>``: see :mod:`hitl.sse_asgi`;
- the JSON POSTs in :data:`hitl.routes.JSON_POSTS` with a well-formed body: the same
  handlers and pydantic models as their Quart routes (see :mod:`hitl.json_asgi`).

Everything else goes on to Quart, including every malformed POST (with its body
replayed), so the wording of errors and the OpenAPI document are written once, there.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from quart import Quart

from .json_asgi import JsonPost, serve_json_post
from .sse_asgi import is_stream_path, serve_stream

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


class HotPaths:
    """ASGI middleware: answers the hot endpoints itself, passes every other request on."""

    def __init__(self, app: Quart, inner: ASGIApp, posts: Sequence[JsonPost]) -> None:
        self.app = app
        self.inner = inner
        self.posts = posts

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """The coroutine that answers this request, for the server to await.

        Not a coroutine itself, so an open stream keeps no frame of the dispatcher. A
        server must be told this is ASGI (``hitl.server`` passes hypercorn ``mode="asgi"``);
        the Quart app object itself stays a plain async ASGI app for any server.
        """
        if scope["type"] == "http":
            method, path = scope["method"], scope["path"]
            if method == "GET" and is_stream_path(path):
                return serve_stream(self.app, path, scope, receive, send)
            if method == "POST":
                for post in self.posts:
                    arguments = post.match(path)
                    if arguments is not None:
                        return serve_json_post(self.app, self.inner, post, arguments, scope,
                                               receive, send)
        return self.inner(scope, receive, send)
