"""The API's JSON POSTs in plain ASGI, for a well-formed body (see :mod:`hitl.asgi`).

The handler and the pydantic model are the Quart route's own. A request that is not
well-formed JSON for the model, too large, or not JSON at all goes on to Quart with
the body read so far replayed, so Quart's error handlers word every such answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from pydantic import BaseModel, ValidationError
from quart import Quart

from .errors import BODY_TIMEOUT_ERROR, INTERNAL_ERROR, HitlError
from .runner import Runner
from .security import RAW_SECURITY_HEADERS

if TYPE_CHECKING:
    from .asgi import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

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


async def serve_json_post(app: Quart, quart: ASGIApp, post: JsonPost,
                          arguments: tuple[str, ...], scope: Scope, receive: Receive,
                          send: Send) -> None:
    """Answer a well-formed request; hand anything else to Quart, which explains it."""
    limit = app.config["MAX_CONTENT_LENGTH"]
    length = content_length(scope)
    if not is_json(scope) or (length is not None and length > limit):
        await quart(scope, receive, send)  # Quart answers 415 or 413
        return
    try:
        async with asyncio.timeout(app.config["BODY_TIMEOUT"]):
            body = await read_body(receive, limit)
    except TimeoutError:
        await send_json(send, 408, {"error": BODY_TIMEOUT_ERROR})
        return
    if body is None:  # the client went away
        return
    if body.size > limit:
        await quart(scope, body.replay(receive), send)  # Quart answers 413
        return
    try:
        data = post.body.model_validate_json(body.data)
    except ValidationError:
        await quart(scope, body.replay(receive), send)  # Quart words the error
        return
    try:
        result = await post.handle(cast(Runner, app.extensions["runner"]), data,
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
    payload = (json.dumps(body, separators=(",", ":"), sort_keys=True) + "\n").encode()  # as Quart
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload)),
        *RAW_SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": payload, "more_body": False})
