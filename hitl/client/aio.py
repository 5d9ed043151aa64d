"""The asyncio client: :class:`~hitl.client.Client`'s methods, each awaited."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing
from types import TracebackType
from typing import TypeVar, Unpack, cast

import httpx
from httpx_sse import aconnect_sse

from . import calls
from .calls import Call, Request, Settings, SubmitOptions, no_answer_is_unavailable
from .errors import HitlError
from .models import Event, Task, TaskPage
from .watching import Watch, ended

T = TypeVar("T")


class AsyncClient:
    """:class:`~hitl.client.Client` for asyncio: the same methods and arguments, awaited
    (``watch`` is an async iterator): ``async with AsyncClient(url, token) as hitl: ...``.
    """

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 10.0,
                 stream_timeout: float = 60.0, give_up_after: float = 60.0) -> None:
        self.settings = Settings(url.rstrip("/"), token, timeout, stream_timeout, give_up_after)
        self._http = httpx.AsyncClient(**self.settings.http_options())

    async def submit(self, data: str, **options: Unpack[SubmitOptions]) -> Task:
        """Submit a task (with any of the options of ``POST /submit``); the task as stored."""
        return await self._run(calls.submit(data, options))

    async def get(self, task_id: str) -> Task:
        """One task, whole, with its reviews."""
        return await self._run(calls.get(task_id))

    async def list(self, status: str | None = None, limit: int = 50, offset: int = 0
                   ) -> TaskPage:
        """A page of tasks, newest first (texts cut to excerpts)."""
        return await self._run(calls.list_tasks(status, limit, offset))

    async def approve(self, task_id: str, comment: str | None = None,
                      edited_output: str | None = None, attempt: int | None = None, *,
                      reviewer: str | None = None) -> None:
        """Approve the output under review (``attempt``: only if it is still that one),
        or an edit of it. ``reviewer`` is the name recorded with ``--auth none``."""
        await self._run(calls.decide(task_id, "approved", comment, edited_output=edited_output,
                                     attempt=attempt, reviewer=reviewer))

    async def reject(self, task_id: str, comment: str, attempt: int | None = None, *,
                     reviewer: str | None = None) -> None:
        """Reject the output under review; the comment goes to the next attempt."""
        await self._run(calls.decide(task_id, "rejected", comment, attempt=attempt,
                                     reviewer=reviewer))

    async def cancel(self, task_id: str) -> Task:
        """Cancel an unfinished task; the task as it is now."""
        return await self._run(calls.cancel(task_id))

    async def next_review(self) -> Task | None:
        """The next task this caller may review, reserved for them; None if none waits."""
        return await self._run(calls.next_review())

    async def watch(self, task_id: str, *, last_event_id: int | None = None
                    ) -> AsyncGenerator[Event, None]:
        """The task's events as they happen, until its terminal one (see
        :meth:`Client.watch`): reconnected by itself, none twice, none lost."""
        async with aclosing(self._watch(Watch(task_id, last_event_id,
                                              self.settings.give_up_after))) as events:
            async for event in events:
                yield event

    async def wait(self, task_id: str, timeout: float | None = None) -> Task:
        """The task once it is finished, read from the store; TimeoutError if it is not
        within ``timeout`` seconds (read first, whatever the timeout, as in
        :meth:`Client.wait`)."""
        watch = Watch(task_id, None, self.settings.give_up_after, timeout=timeout)
        task = await self.get(task_id)
        if task.finished:
            return task
        try:  # the deadline also cuts off a read that heartbeats keep going (Client: cut_off_at)
            async with asyncio.timeout(watch.left()) as scope, \
                    aclosing(self._watch(watch)) as events:
                async for _ in events:
                    pass
        except TimeoutError:
            if scope.expired():
                raise watch.timed_out() from None
            raise
        return await self.get(task_id)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.aclose()

    async def _run(self, call: Call[T]) -> T:
        """Drive a call: send each request it makes, give it each answer, return its result."""
        try:
            request = next(call)
            while True:
                request = call.send(await self._send(request))
        except StopIteration as done:
            return cast(T, done.value)

    async def _send(self, request: Request) -> httpx.Response:
        with no_answer_is_unavailable(self.settings.url):
            response = await self._http.request(request.method, request.path,
                                                json=request.json, params=request.params,
                                                headers=request.headers)
        return calls.checked(response)

    async def _watch(self, watch: Watch) -> AsyncGenerator[Event, None]:
        while not watch.done:
            watch.check_deadline()
            try:
                async with aclosing(self._follow(watch)) as events:
                    async for event in events:
                        yield event
            except HitlError as error:
                await asyncio.sleep(watch.delay(error))

    async def _follow(self, watch: Watch) -> AsyncGenerator[Event, None]:
        """One connection's events; raises Unavailable if it ends before the task does."""
        with no_answer_is_unavailable(self.settings.url, watch.task_id):
            async with aconnect_sse(self._http, "GET", watch.path, headers=watch.headers(),
                                    timeout=self.settings.stream_timeouts(watch.left())
                                    ) as source:
                if not source.response.is_success:
                    await source.response.aread()
                watch.opened(source.response)
                async for sse in source.aiter_sse():
                    event = watch.event(sse)
                    if event is not None:
                        yield event
                    if watch.done:
                        return
        raise ended(watch.task_id)
