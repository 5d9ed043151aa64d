"""How the app's long-lived parts (store, broker, journal, runner) join it."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable

from quart import Quart


def attach(app: Quart, name: str, part: object, start: Callable[[], Awaitable[None]],
           close: Callable[[], Awaitable[None]]) -> None:
    """Make ``part`` ``app.extensions[name]``, started before serving and closed after.

    Parts attached later start later and close earlier (Quart nests ``while_serving``).
    """
    app.extensions[name] = part

    async def serving() -> AsyncGenerator[None, None]:
        await start()
        yield
        await close()

    app.while_serving(serving)
