"""A request pipelined behind a stream on one HTTP/1.1 connection ends the stream.

hypercorn reads nothing more from a connection while a request waits behind the one it
is answering, and a stream's answer never ends: without this, it would never see the
client leave, and the stream's subscription would stay for good.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from hitl import Config

from .conftest import LiveServer, ReviewActions


@pytest.fixture
def config(config: Config) -> Config:
    return config.with_changes(heartbeat=15)  # the default: nothing here waits for one


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


async def connect(server: LiveServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = server.url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def read_until(reader: asyncio.StreamReader, marker: bytes, timeout: float = 5) -> bytes:
    data = b""
    async with asyncio.timeout(timeout):
        while marker not in data:
            chunk = await reader.read(65536)
            assert chunk, f"connection closed before {marker!r}: {data[-300:]!r}"
            data += chunk
    return data


async def subscribers(server: LiveServer, baseline: int, timeout: float = 3) -> int:
    """The broker's subscriber count, once it is down to ``baseline`` (or the time is up)."""
    broker = server.app.extensions["broker"]
    async with asyncio.timeout(timeout):
        while broker.subscriber_count() > baseline:
            await asyncio.sleep(0.02)
    return int(broker.subscriber_count())


@pytest.mark.parametrize("later", [False, True])
async def test_a_request_behind_a_json_stream_ends_it_and_is_answered(
    live_server: LiveServer, actions: ReviewActions, later: bool
) -> None:
    task_id = await actions.submit()
    await actions.watch(task_id).wait_for("waiting_for_review")
    reader, writer = await connect(live_server)
    try:
        writer.write(get(f"/stream/{task_id}") + (b"" if later else get("/healthz")))
        data = b""
        if later:  # once the stream is open and has replayed
            data = await read_until(reader, b"waiting_for_review")
            writer.write(get("/healthz"))
        data += await read_until(reader, b'"status":"ok"')
    finally:
        writer.close()
    stream, _, after = data.partition(b"\r\n0\r\n\r\n")  # the stream's answer ends...
    assert b"text/event-stream" in stream and after.startswith(b"HTTP/1.1 200")  # ...then this
    health = json.loads(after.partition(b"\r\n\r\n")[2])
    assert health["subscribers"] == 1  # the watcher above; the pipelined stream has gone


async def test_hundreds_of_streams_with_requests_behind_them_leave_no_subscriber(
    live_server: LiveServer, actions: ReviewActions
) -> None:
    watcher = actions.watch()  # an ordinary watcher, unaffected
    broker = live_server.app.extensions["broker"]
    async with asyncio.timeout(5):
        while broker.subscriber_count() < 1:
            await asyncio.sleep(0.02)
    connections = [await connect(live_server) for _ in range(300)]
    for reader, writer in connections:
        writer.write(get("/stream"))
        await read_until(reader, b"retry: 3000")  # this stream is open
        writer.write(get("/api/tasks"))
    for _, writer in connections:
        writer.close()
    assert await subscribers(live_server, 1) == 1
    assert not watcher.done.is_set()


@pytest.mark.parametrize("path", ["/dashboard/stream", "/tasks/{task_id}/stream"])
async def test_a_request_behind_a_page_stream_ends_it_and_the_connection(
    live_server: LiveServer, actions: ReviewActions, path: str
) -> None:
    task_id = await actions.submit()
    await asyncio.sleep(0.2)
    tasks_before = len(asyncio.all_tasks())
    reader, writer = await connect(live_server)
    try:
        writer.write(get(path.format(task_id=task_id)) + get("/healthz"))
        async with asyncio.timeout(5):
            while await reader.read(65536):  # until the server closes the connection
                pass
    finally:
        writer.close()
    assert await subscribers(live_server, 0) == 0
    async with asyncio.timeout(3):  # nothing of the connection is left running
        while len(asyncio.all_tasks()) > tasks_before:
            await asyncio.sleep(0.02)


async def test_requests_pipelined_behind_ordinary_answers_are_all_answered(
    live_server: LiveServer,
) -> None:
    reader, writer = await connect(live_server)
    body = b'{"data": "pipelined"}'
    try:
        writer.write(b"POST /submit HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                     b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                     + get("/healthz") + get("/api/tasks"))
        data = await read_until(reader, b'"total":1')
    finally:
        writer.close()
    assert data.count(b"HTTP/1.1 ") == 3 and b"HTTP/1.1 202" in data
