"""Fixtures: a config on a temporary database, the app, its test client, a real server."""

from __future__ import annotations

import asyncio
import html
import json
import os
import re
import socket
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from quart import Quart, Response
from quart.typing import TestClientProtocol as Client

from hitl import Config, create_app
from hitl.accounts import Accounts, Identity, Role
from hitl.identity import ANONYMOUS
from hitl.models import Status
from hitl.processors import Processor
from hitl.runner import Runner
from hitl.server import serve
from hitl.store import MIGRATIONS, Store, open_store

from .services import (  # noqa: F401 (fixtures)
    SKIP_REASONS,
    create_database,
    drop_database,
    postgres_url,
    redis_url,
)

T = TypeVar("T")


async def within(awaitable: Awaitable[T], seconds: float, what: str) -> T:
    """Await ``awaitable`` for at most ``seconds``; past that, fail saying what it was."""
    try:
        async with asyncio.timeout(seconds) as scope:
            return await awaitable
    except TimeoutError:
        if scope.expired():
            raise AssertionError(f"timed out after {seconds} s waiting for {what}") from None
        raise


async def until(check: Callable[[], bool], what: str, timeout: float = 10) -> None:
    """Poll ``check`` every 10 ms until it holds, for at most ``timeout`` seconds."""
    async def poll() -> None:
        while not check():
            await asyncio.sleep(0.01)

    await within(poll(), timeout, what)


def assert_contiguous(ids: Sequence[int], start: int | None = None) -> None:
    """Message ids run one by one: no gap, no repeat, none out of order (from ``start``)."""
    assert ids, "no message ids at all"
    first = ids[0] if start is None else start
    for at, (got, wanted) in enumerate(zip(ids, range(first, first + len(ids)), strict=True)):
        assert got == wanted, f"id {wanted} expected, got {got} after {list(ids[:at][-3:])}"

# Who a test is when it calls the runner itself: the one operator of --auth none, who may
# do everything (requests are someone: the guard says who).
OPERATOR = Identity(ANONYMOUS, "none")


# The database engines a test runs on. A module that sets ``ON_POSTGRESQL = True`` runs
# its tests that use these fixtures on a throwaway PostgreSQL database each too
# (tests/services.py); HITL_TEST_ENGINE=postgresql runs every such test on PostgreSQL alone.
ENGINE = os.environ.get("HITL_TEST_ENGINE", "sqlite")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "engine" not in metafunc.fixturenames:
        return
    both = (getattr(metafunc.module, "ON_POSTGRESQL", False)
            and metafunc.definition.get_closest_marker("sqlite_only") is None)
    engines = ["sqlite", "postgresql"] if both else ["sqlite"]
    metafunc.parametrize("engine", ["postgresql"] if ENGINE == "postgresql" else engines)


@pytest.fixture
async def database(tmp_path: Path, engine: str) -> AsyncIterator[str]:
    """The app's ``--db``: a SQLite file, or a PostgreSQL database of this test's own."""
    if engine != "postgresql":
        yield str(tmp_path / "hitl.db")
        return
    url = await create_database()
    yield url
    await drop_database(url)


@pytest.fixture
def config(database: str) -> Config:
    """Sign-in off (``--auth none``): the tests of identity and access turn it on."""
    return Config(db=database, process_delay=0, retry_wait=0, auth="none")


@pytest.fixture
async def store(tmp_path: Path, engine: str) -> AsyncIterator[Store]:
    """An open store of its own (not the app's database), for tests of the store alone."""
    url = await create_database() if engine == "postgresql" else str(tmp_path / "store.db")
    store = open_store(url)
    await store.open()
    yield store
    await store.close()
    if engine == "postgresql":
        await drop_database(url)


def old_database(db: Path) -> None:
    """A database from before attempts were kept (schema 2), with task 'old' waiting on
    its third attempt after two rejections by ann."""
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER)")
        for version, script in enumerate(MIGRATIONS[:2], start=1):
            conn.executescript(script)
            conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
        conn.execute("""INSERT INTO tasks VALUES ('old', 'input', 'waiting_for_review', 3,
                        'third output', NULL, NULL, 9, 1.0, 1.0)""")
        conn.execute("""INSERT INTO reviews (task_id, attempt, decision, comment, reviewer,
                        created_at) VALUES ('old', 1, 'rejected', 'no', 'ann', 1.0),
                        ('old', 2, 'rejected', 'still no', 'ann', 2.0)""")


@pytest.fixture
def processor() -> Processor | None:
    """Override in a test module to run the app with another processor."""
    return None


@pytest.fixture
async def app(config: Config, processor: Processor | None) -> AsyncIterator[Quart]:
    app = create_app(config, processor=processor)
    async with app.test_app():
        yield app


@pytest.fixture
def client(app: Quart) -> Client:
    return app.test_client()


CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


async def csrf_token(client: Client, page: str = "/") -> str:
    """The session's form token, read as a browser's page has it: from the page's meta tag."""
    body = await (await client.get(page)).get_data(as_text=True)
    match = CSRF_META.search(body)
    assert match, f"{page} carries no csrf-token meta tag"
    return html.unescape(match[1])


async def post_form(client: Client, path: str, form: dict[str, str], *, page: str = "/",
                    headers: dict[str, str] | None = None) -> Response:
    """Post ``form`` as a browser would from ``page``: with the token the page gave it."""
    token = await csrf_token(client, page)
    return await client.post(path, form={**form, "csrf_token": token}, headers=headers)


@dataclass
class LiveServer:
    """A real hypercorn serving the app on a free loopback port."""

    app: Quart
    url: str
    stop: asyncio.Event
    task: asyncio.Task[None]

    def http(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(10, read=30), **kwargs)


async def start_server(config: Config, processor: Processor | None = None, port: int = 0
                       ) -> LiveServer:
    """Serve a new app on ``port`` (default: a free one), and wait until it answers."""
    app = create_app(config, processor=processor)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart on the same port
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    sock.set_inheritable(True)
    port = sock.getsockname()[1]
    stop = asyncio.Event()
    task = asyncio.create_task(serve(app, config, stop=stop, bind=[f"fd://{sock.detach()}"]))
    url = f"http://127.0.0.1:{port}"

    async def answering() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=2) as http:
            while not task.done():
                try:
                    await http.get("/healthz")
                    return
                except httpx.TransportError:
                    await asyncio.sleep(0.02)
        raise AssertionError(f"the server stopped before it answered: {task.exception()!r}")

    await within(answering(), 15, f"the server on {url} to answer /healthz")
    return LiveServer(app, url, stop, task)


async def stop_server(server: LiveServer) -> None:
    server.stop.set()
    await within(server.task, 15, f"the server on {server.url} to stop")


@pytest.fixture
async def live_server(config: Config, processor: Processor | None) -> AsyncIterator[LiveServer]:
    server = await start_server(config, processor)
    try:
        yield server
    finally:
        await stop_server(server)


@dataclass
class Event:
    id: int | None
    data: dict[str, Any]


@dataclass
class Watcher:
    """Reads one SSE stream in the background, collecting its messages."""

    events: list[Event] = field(default_factory=list)
    comments: int = 0
    retry: int | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    error: Exception | None = None

    def statuses(self) -> list[str]:
        return [event.data.get("status", "") for event in self.events]

    def ids(self) -> list[int]:
        return [event.id for event in self.events if event.id is not None]

    async def wait_for(self, status: str, timeout: float = 10, **fields: Any) -> Event:
        """The first message with ``status`` (and these ``fields``), once it has arrived."""
        def matches(event: Event) -> bool:
            return event.data.get("status") == status and all(
                event.data.get(name) == value for name, value in fields.items())

        async def seen() -> Event:
            while True:
                for event in self.events:
                    if matches(event):
                        return event
                if self.done.is_set():
                    raise AssertionError(f"stream ended without {status!r} {fields}: "
                                         f"{self.statuses()}")
                await asyncio.sleep(0.01)

        try:
            return await asyncio.wait_for(seen(), timeout)
        except TimeoutError:
            raise AssertionError(f"no {status!r} {fields} within {timeout} s: "
                                 f"{self.statuses()}") from None

    async def ended(self, timeout: float = 10) -> None:
        """Wait until the stream has ended (closed by the server, or the server went away)."""
        try:
            await asyncio.wait_for(self.done.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"stream still open after {timeout} s: "
                                 f"{self.statuses()}") from None


async def read_sse(http: httpx.AsyncClient, path: str, watcher: Watcher,
                   headers: dict[str, str] | None = None) -> None:
    try:
        async with http.stream("GET", path, headers=headers) as response:
            assert response.status_code == 200, response.status_code
            event_id: int | None = None
            data: list[str] = []
            async for line in response.aiter_lines():
                if line.startswith("id:"):
                    event_id = int(line[3:].strip())
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif line.startswith("retry:"):
                    watcher.retry = int(line[6:].strip())
                elif line.startswith(":"):
                    watcher.comments += 1
                elif line == "" and data:
                    watcher.events.append(Event(event_id, json.loads("\n".join(data))))
                    event_id, data = None, []
    except httpx.TransportError as exc:  # the server went away: the stream has ended
        watcher.error = exc
    finally:
        watcher.done.set()


@dataclass
class ReviewActions:
    """The steps a test takes against a live server, so tests read as the specification."""

    http: httpx.AsyncClient

    async def submit(self, data: str = "draft a reply") -> str:
        response = await self.http.post("/submit", json={"data": data})
        assert response.status_code == 202, response.text
        return str(response.json()["task_id"])

    def watch(self, task_id: str | None = None, last_id: int | None = None) -> Watcher:
        watcher = Watcher()
        headers = {"Last-Event-ID": str(last_id)} if last_id is not None else None
        path = f"/stream/{task_id}" if task_id else "/stream"
        watcher.task = asyncio.create_task(read_sse(self.http, path, watcher, headers))
        return watcher

    async def decide(self, task_id: str, feedback: str, **extra: Any) -> httpx.Response:
        return await self.http.post(f"/feedback/{task_id}", json={"feedback": feedback, **extra})

    async def approve(self, task_id: str, **extra: Any) -> httpx.Response:
        return await self.decide(task_id, "approved", **extra)

    async def reject(self, task_id: str, comment: str = "", **extra: Any) -> httpx.Response:
        return await self.decide(task_id, "rejected", comment=comment, **extra)


@pytest.fixture
async def actions(live_server: LiveServer) -> AsyncIterator[ReviewActions]:
    async with live_server.http() as http:
        yield ReviewActions(http)


async def reach(runner: Runner, task_id: str, status: Status, attempt: int = 1,
                timeout: float = 10) -> None:
    """Wait until the stored task is in ``status`` on ``attempt``; fail saying where it is."""
    async def poll() -> None:
        while (task := await runner.get_task(task_id, by=OPERATOR)).status is not status or (
                task.attempt != attempt):
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        task = await runner.get_task(task_id, by=OPERATOR)
        raise AssertionError(f"{task_id} never reached {status}/{attempt} in {timeout} s: "
                             f"it is {task.status}/{task.attempt}") from None


@dataclass
class People:
    """A live server with an API token per person, for tests of who may do what over real
    HTTP; ``reader`` reads tasks back (someone who sees them all)."""

    server: LiveServer
    http: httpx.AsyncClient
    tokens: dict[str, str] = field(default_factory=dict)
    reader: str = "ada"

    def auth(self, person: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[person]}"} if person else {}

    async def post_task(self, person: str, **options: Any) -> str:
        """Submit as ``person`` (the API's 202), and the new task's id."""
        response = await self.http.post("/submit", headers=self.auth(person),
                                        json={"data": "draft a reply", **options})
        assert response.status_code == 202, response.text
        return str(response.json()["task_id"])

    async def read_task(self, task_id: str) -> dict[str, Any]:
        response = await self.http.get(f"/api/tasks/{task_id}", headers=self.auth(self.reader))
        assert response.status_code == 200, response.text
        task: dict[str, Any] = response.json()
        return task

    async def wait(self, task_id: str, status: str, attempt: int | None = None
                   ) -> dict[str, Any]:
        """The task once it is in ``status`` (on ``attempt``, if given)."""
        async def reached() -> dict[str, Any]:
            while True:
                task = await self.read_task(task_id)
                if task["status"] == status and attempt in (None, task["attempt"]):
                    return task
                await asyncio.sleep(0.01)

        return await within(reached(), 10, f"task {task_id} to be {status}")


async def add_people(accounts: Accounts, people: Mapping[str, tuple[Role, tuple[str, ...]]],
                     display: Callable[[str], str] = str.title) -> dict[str, str]:
    """Each person as a user (role, groups) with a token: name -> token."""
    tokens = {}
    for name, (role, groups) in people.items():
        await accounts.add_user(name, role, groups=groups, display_name=display(name))
        tokens[name] = (await accounts.create_token(name, "tests"))[1]
    return tokens


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """With ``HITL_TEST_ENGINE=postgresql`` a test of SQLite itself (``sqlite_only``: its
    file, its lock, its PRAGMAs) has nothing to test, and is skipped saying why."""
    if ENGINE != "postgresql":
        return
    for item in items:
        marker = item.get_closest_marker("sqlite_only")
        if marker is not None:
            why = marker.kwargs.get("reason") or (marker.args[0] if marker.args else "")
            item.add_marker(pytest.mark.skip(
                reason=f"SQLite only (HITL_TEST_ENGINE=postgresql): {why}".rstrip(": ")))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """With ``HITL_REQUIRE_SERVICES=1`` (CI), a test skipped for want of PostgreSQL or Redis
    fails instead: the shared deployment is tested wherever CI runs, or CI says why not."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("HITL_REQUIRE_SERVICES") == "1":
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
        if any(why in reason for why in SKIP_REASONS):
            report.outcome = "failed"
            report.longrepr = f"HITL_REQUIRE_SERVICES=1, but: {reason}"
