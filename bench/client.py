"""A light asyncio load client: many SSE watchers and small JSON requests from one process.

httpx costs several KiB and a task per stream; an ``asyncio.Protocol`` per
stream, with a hand-written HTTP/1.1 + chunked + SSE parser, lets one process
hold 10,000+ streams. Every received message is timestamped with
``time.perf_counter()`` once per socket read, before any parsing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

HOST = "127.0.0.1"
_NO_GATE = contextlib.nullcontext()


def raise_nofile(target: int = 65_536) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``target`` (capped by the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return max(soft, want)


@dataclass(slots=True)
class Event:
    """One SSE message: ``id`` is None when the message carried no ``id:`` field."""

    id: int | None
    status: str
    task_id: str | None
    t: float


EventHook = Callable[["Watcher", Event], None]


class Watcher:
    """One SSE subscriber that can (re)connect; owns at most one live connection.

    ``events`` accumulates over reconnects (unless ``record`` is false), so a
    watcher's whole history can be checked for gaps and duplicates.
    """

    def __init__(
        self, port: int, path: str, on_event: EventHook | None = None, record: bool = True
    ) -> None:
        self.port, self.path, self.on_event, self.record = port, path, on_event, record
        self.events: list[Event] = []
        self.last_event_id: str | None = None
        self.stream_closed = False  # the server sent {"status": "stream_closed"}
        self.status_code: int | None = None
        self.connects = 0
        self.errors: list[str] = []  # what went wrong on established streams
        self.open_error: str | None = None  # why the last open() failed
        self.proto: _SSEProtocol | None = None
        self.ctx: Any = None  # free slot for scenario bookkeeping

    async def open(
        self,
        last_event_id: str | None = None,
        gate: asyncio.Semaphore | None = None,
        timeout: float = 60.0,
    ) -> bool:
        """Connect and wait for the response head; the stream then runs in the background.

        ``gate`` bounds how many connections are being set up at once. Returns
        whether the server answered 200.
        """
        loop = asyncio.get_running_loop()
        headers = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id is not None else ""
        request = (
            f"GET {self.path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
            f"Accept: text/event-stream\r\nCache-Control: no-cache\r\n{headers}{_authorization}"
            "Connection: close\r\n\r\n"
        ).encode()
        self.connects += 1
        proto = _SSEProtocol(self, request, loop)
        self.proto = proto
        try:
            async with gate if gate is not None else _NO_GATE, asyncio.timeout(timeout):
                await loop.create_connection(lambda: proto, HOST, self.port)
                await proto.head
        except (OSError, TimeoutError) as exc:
            self.open_error = f"{type(exc).__name__}: {exc}"
            proto.abort()
            return False
        if self.status_code != 200:
            self.open_error = f"HTTP {self.status_code}"
            proto.abort()
            return False
        return True

    @property
    def connected(self) -> bool:
        return self.proto is not None and not self.proto.done.done()

    def close(self) -> None:
        if self.proto is not None:
            self.proto.abort()

    def _deliver(self, block: bytes, t: float) -> None:
        event_id: int | None = None
        data: list[bytes] = []
        for line in block.split(b"\n"):
            if not line or line[0] == 58:  # blank or ":" comment (heartbeat)
                continue
            name, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                data.append(value)
            elif name == b"id":
                self.last_event_id = value.decode()
                event_id = int(value) if value.isdigit() else None
        if not data:
            return
        try:
            payload = json.loads(b"\n".join(data))
        except ValueError:
            self.errors.append("bad json")
            return
        status = payload.get("status", "")
        if status == "stream_closed":
            self.stream_closed = True
        event = Event(event_id, status, payload.get("task_id"), t)
        if self.record:
            self.events.append(event)
        if self.on_event is not None:
            self.on_event(self, event)


class _SSEProtocol(asyncio.Protocol):
    """HTTP/1.1 response parser: status line, headers, chunked or raw body, SSE frames."""

    def __init__(self, watcher: Watcher, request: bytes, loop: asyncio.AbstractEventLoop) -> None:
        self.watcher, self.request = watcher, request
        self.head: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.raw = bytearray()
        self.in_head, self.chunked = True, False
        self.chunk_left, self.need_crlf = 0, False
        self.sse = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        t = time.perf_counter()
        self.raw += data
        if self.in_head:
            end = self.raw.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.raw[:end]).split(b"\r\n")
            del self.raw[: end + 4]
            self.in_head = False
            self.watcher.status_code = int(lines[0].split(b" ", 2)[1])
            hdrs = {
                k.strip().lower(): v.strip() for k, _, v in (h.partition(b":") for h in lines[1:])
            }
            self.chunked = hdrs.get(b"transfer-encoding", b"").lower() == b"chunked"
            if not self.head.done():
                self.head.set_result(None)
        body = self._dechunk() if self.chunked else bytes(self.raw)
        if not self.chunked:
            self.raw.clear()
        if body:
            self._feed(body, t)

    def _dechunk(self) -> bytes:
        buf, pos, out = self.raw, 0, []
        while pos < len(buf):
            if self.chunk_left:
                piece = buf[pos : pos + self.chunk_left]
                out.append(bytes(piece))
                pos += len(piece)
                self.chunk_left -= len(piece)
                self.need_crlf = self.chunk_left == 0
            elif self.need_crlf:
                if len(buf) - pos < 2:
                    break
                pos, self.need_crlf = pos + 2, False
            else:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
                pos = eol + 2
                if size == 0:  # last chunk: the server ended the response
                    pos = len(buf)
                    break
                self.chunk_left = size
        del buf[:pos]
        return b"".join(out)

    def _feed(self, data: bytes, t: float) -> None:
        buf, held = self.sse + data, b""
        if b"\r" in buf:  # normalise CRLF / CR line ends; a trailing CR may be half a CRLF
            if buf[-1] == 13:
                buf, held = buf[:-1], b"\r"
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        blocks = buf.split(b"\n\n")
        self.sse = blocks.pop() + held
        for block in blocks:
            if block:
                self.watcher._deliver(block, t)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.watcher.errors.append(f"{type(exc).__name__}: {exc}")
        self._finish()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._finish()

    def _finish(self) -> None:
        if not self.head.done():
            self.head.set_exception(ConnectionError("closed before the response head"))
            self.head.exception()  # mark retrieved: nobody may be awaiting it
        if not self.done.done():
            self.done.set_result(None)


_authorization = ""  # the header every request carries: see use_token


def use_token(token: str | None) -> None:
    """Send ``Authorization: Bearer <token>`` with every request from now on (None: none),
    as a program does against hitl with sign-in on."""
    global _authorization
    _authorization = f"Authorization: Bearer {token}\r\n" if token else ""


def signed_in() -> bool:
    return bool(_authorization)


async def request_json(
    port: int, method: str, path: str, body: Any = None, timeout: float = 30.0
) -> tuple[int, Any]:
    """One HTTP/1.1 request on a fresh connection (``Connection: close``): (status, json)."""
    payload = b"" if body is None else json.dumps(body).encode()
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n{_authorization}Connection: close\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
    try:
        writer.write(head + payload)
        raw_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        lines = raw_head[:-4].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        hdrs = {k.strip().lower(): v.strip() for k, _, v in (h.partition(b":") for h in lines[1:])}
        if b"content-length" in hdrs:
            data = await asyncio.wait_for(reader.readexactly(int(hdrs[b"content-length"])), timeout)
        elif hdrs.get(b"transfer-encoding", b"").lower() == b"chunked":
            parts = []
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                parts.append((await reader.readexactly(size + 2))[:-2])
            data = b"".join(parts)
        else:
            data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    try:
        return status, json.loads(data) if data else None
    except ValueError:
        return status, data.decode(errors="replace")
