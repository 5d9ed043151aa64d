"""A real HTTP receiver for webhooks on a free loopback port: plain asyncio, HTTP/1.1
with keep-alive, every request kept with the time it arrived; what it answers is up to
the test (a status, after a delay)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from standardwebhooks import Webhook


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float  # time.time() when it arrived

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    def json(self) -> Any:
        return json.loads(self.body)


Answer = Callable[[Received], Awaitable[int]]


async def ok(_: Received) -> int:
    return 204


@dataclass
class Receiver:
    """Collects requests; ``answer`` picks each one's status (and may sleep first)."""

    answer: Answer = ok
    requests: list[Received] = field(default_factory=list)
    taken: list[Received] = field(default_factory=list)  # those answered with a 2xx
    server: asyncio.Server | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> Receiver:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self.server.wait_closed()

    async def __aenter__(self) -> Receiver:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    def verified(self, secret: str) -> list[Any]:
        """Each taken delivery's body, its signature checked by ``standardwebhooks``."""
        hook = Webhook(secret)
        return [hook.verify(request.body, request.headers) for request in self.taken]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                request = Received(headers, body, time.time())
                self.requests.append(request)
                status = await self.answer(request)
                if 200 <= status < 300:
                    self.taken.append(request)
                writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
