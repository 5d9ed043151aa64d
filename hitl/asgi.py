"""The hot endpoints, answered in plain ASGI ahead of Quart.

Quart's per-request machinery (request and app contexts, request and response objects,
a receiver task, quart-schema's conversions) costs about 0.25 ms of CPU per request,
and about 12 KiB for each open stream. On the paths that every watcher and every
automated client takes, that was most of the server's work (``python -m bench
throughput``), so two kinds of request are answered here:

- ``GET /stream`` and ``GET /stream/<task_id>``: see :mod:`hitl.sse_asgi`;
- the JSON POSTs in :data:`hitl.routes.JSON_POSTS` with a well-formed body: the same
  handlers and pydantic models as their Quart routes.

Everything else goes on to Quart, including every malformed POST (with its body
replayed), so the wording of errors and the OpenAPI document are written once, there.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from pydantic import BaseModel, ValidationError
from quart import Quart

from .errors import INTERNAL_ERROR, HitlError
from .runner import Runner
from .security import RAW_SECURITY_HEADERS
from .sse_asgi import check_stream, is_stream_path, serve_stream

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]
Handler = Callable[..., Awaitable[BaseModel]]  # (runner, body, *path arguments)


@dataclass(frozen=True, slots=True)
class JsonPost:
    """A JSON POST endpoint of the API that is also served here, for a well-formed body."""

    path: str  # "/submit"; or "/feedback/", which a task id follows
    body: type[BaseModel]
    status: int
    handle: Handler

    def match(self, path: str) -> tuple[str, ...] | None:
        """The path's arguments, if ``path`` is this endpoint's."""
        if not self.path.endswith("/"):
            return () if path == self.path else None
        argument = path[len(self.path):] if path.startswith(self.path) else ""
        return (argument,) if argument and "/" not in argument else None


class HotPaths:
    """ASGI middleware: answers the hot endpoints itself, passes every other request on."""

    def __init__(self, app: Quart, inner: ASGIApp, posts: Sequence[JsonPost]) -> None:
        self.app = app
        self.inner = inner
        self.posts = posts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method, path = scope["method"], scope["path"]
            if method == "GET" and is_stream_path(path):
                try:
                    stream = await check_stream(self.app, path, scope)
                except HitlError as error:
                    await send_json(send, error.status, {"error": error.message})
                    return
                await serve_stream(self.app, stream, receive, send)
                return
            if method == "POST":
                for post in self.posts:
                    arguments = post.match(path)
                    if arguments is not None:
                        await self.json_post(post, arguments, scope, receive, send)
                        return
        await self.inner(scope, receive, send)

    async def json_post(self, post: JsonPost, arguments: tuple[str, ...], scope: Scope,
                        receive: Receive, send: Send) -> None:
        """Answer a well-formed request; hand anything else to Quart, which explains it."""
        limit = self.app.config["MAX_CONTENT_LENGTH"]
        length = content_length(scope)
        if not is_json(scope) or (length is not None and length > limit):
            await self.inner(scope, receive, send)  # Quart answers 415 or 413
            return
        try:
            async with asyncio.timeout(self.app.config["BODY_TIMEOUT"]):
                body = await read_body(receive, limit)
        except TimeoutError:
            await send_json(send, 408, {"error": "the request body did not arrive in time"})
            return
        if body is None:  # the client went away
            return
        if body.size > limit:
            await self.inner(scope, body.replay(receive), send)  # Quart answers 413
            return
        try:
            data = post.body.model_validate_json(body.data)
        except ValidationError:
            await self.inner(scope, body.replay(receive), send)  # Quart words the error
            return
        try:
            result = await post.handle(cast(Runner, self.app.extensions["runner"]), data,
                                       *arguments)
        except HitlError as error:
            await send_json(send, error.status, {"error": error.message})
            return
        except Exception:
            log.exception("unhandled error on POST %s", scope["path"])
            await send_json(send, 500, {"error": INTERNAL_ERROR})
            return
        await send_json(send, post.status, result.model_dump(mode="json"))


@dataclass(slots=True)
class Body:
    """A request body as read so far: all of it, or up to just past the size limit."""

    chunks: list[bytes]
    size: int
    complete: bool

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def replay(self, receive: Receive) -> Receive:
        """A ``receive`` that gives what was read, then carries on with ``receive``."""
        pending = [{"type": "http.request", "body": chunk, "more_body": True}
                   for chunk in self.chunks][::-1]
        pending[0]["more_body"] = not self.complete

        async def replaying() -> Message:
            return pending.pop() if pending else await receive()

        return replaying


async def read_body(receive: Receive, limit: int) -> Body | None:
    """The request body, or its start once past ``limit``; None if the client left first."""
    body = Body([], 0, complete=False)
    while not body.complete and body.size <= limit:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        body.chunks.append(chunk)
        body.size += len(chunk)
        body.complete = not message.get("more_body", False)
    return body


def content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def is_json(scope: Scope) -> bool:
    """True for ``Content-Type: application/json`` (with parameters or not)."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            return bool(value.split(b";", 1)[0].strip().lower() == b"application/json")
    return False


async def send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload)),
        *RAW_SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": payload, "more_body": False})
