"""Both clients behind one awaitable face, so one test body checks :class:`Client` and
:class:`AsyncClient` alike against a real server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from hitl.accounts import Accounts, Role
from hitl.client import AsyncClient, Client, Event
from hitl.store import Store

from .conftest import add_people
from .serverproc import ServerProcess

KINDS = ["Client", "AsyncClient"]


class Both:
    """``await hitl.submit(...)``: the AsyncClient's call, or the blocking Client's made in a
    thread (as a program calls it, blocking), with the same arguments and results."""

    def __init__(self, client: Client | AsyncClient) -> None:
        self.client = client

    @property
    def kind(self) -> str:
        return type(self.client).__name__

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self.client, name)
        if isinstance(self.client, AsyncClient):
            return method  # type: ignore[no-any-return]
        return lambda *args, **kwargs: asyncio.to_thread(method, *args, **kwargs)

    async def collect(self, task_id: str, into: list[Event], **options: Any) -> list[Event]:
        """Watch the task to its end, appending each event to ``into`` as it comes."""
        if isinstance(self.client, AsyncClient):
            async for event in self.client.watch(task_id, **options):
                into.append(event)
        else:
            client = self.client

            def follow() -> None:
                for event in client.watch(task_id, **options):
                    into.append(event)

            await asyncio.to_thread(follow)
        return into


@asynccontextmanager
async def client_of(kind: str, url: str, token: str | None = None, **options: Any
                    ) -> AsyncIterator[Both]:
    """A client of ``kind`` with bounded waits: a test that fails cannot leave a thread
    blocked for good on a stream."""
    options = {"stream_timeout": 10.0, "give_up_after": 10.0, **options}
    if kind == "AsyncClient":
        async with AsyncClient(url, token, **options) as client:
            yield Both(client)
    else:
        with Client(url, token, **options) as sync:
            yield Both(sync)


def start_people_server(db: Path, people: Mapping[str, tuple[Role, tuple[str, ...]]],
                        *extra: str) -> tuple[ServerProcess, dict[str, str]]:
    """A ``hitl serve`` with sign-in on and these people, each with a token: name -> token."""

    async def make() -> dict[str, str]:
        store = Store(str(db))
        await store.open()
        try:
            return await add_people(Accounts(store), people)
        finally:
            await store.close()

    tokens = asyncio.run(make())
    return ServerProcess(db, env={"HITL_AUTH": "accounts"}, extra=list(extra)).start(), tokens
