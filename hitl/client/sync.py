"""The blocking client."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TypeVar, Unpack, cast

import httpx
from httpx_sse import connect_sse

from . import calls
from .calls import Call, Request, Settings, SubmitOptions, no_answer_is_unavailable
from .errors import HitlError
from .models import Event, Task, TaskPage
from .watching import Watch, ended

T = TypeVar("T")


class Client:
    """A client of one hitl service, over HTTP: ``with Client(url, token) as hitl: ...``.

    ``timeout``: seconds for each request. A stream (:meth:`watch`, :meth:`wait`) may be
    silent for ``stream_timeout`` seconds before it counts as dropped; a dropped stream is
    reconnected by itself, until reconnecting has failed for ``give_up_after`` seconds.
    Every method raises a :class:`~hitl.client.HitlError` for an error answer, or
    :class:`~hitl.client.Unavailable` when there was none.
    """

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 10.0,
                 stream_timeout: float = 60.0, give_up_after: float = 60.0) -> None:
        self.settings = Settings(url.rstrip("/"), token, timeout, stream_timeout, give_up_after)
        self._http = httpx.Client(**self.settings.http_options())

    def submit(self, data: str, **options: Unpack[SubmitOptions]) -> Task:
        """Submit a task (with any of the options of ``POST /submit``); the task as stored."""
        return self._run(calls.submit(data, options))

    def get(self, task_id: str) -> Task:
        """One task, whole, with its reviews."""
        return self._run(calls.get(task_id))

    def list(self, status: str | None = None, limit: int = 50, offset: int = 0) -> TaskPage:
        """A page of tasks, newest first (texts cut to excerpts)."""
        return self._run(calls.list_tasks(status, limit, offset))

    def approve(self, task_id: str, comment: str | None = None, edited_output: str | None = None,
                attempt: int | None = None, *, reviewer: str | None = None) -> None:
        """Approve the output under review (``attempt``: only if it is still that one),
        or an edit of it. ``reviewer`` is the name recorded with ``--auth none``."""
        self._run(calls.decide(task_id, "approved", comment, edited_output=edited_output,
                               attempt=attempt, reviewer=reviewer))

    def reject(self, task_id: str, comment: str, attempt: int | None = None, *,
               reviewer: str | None = None) -> None:
        """Reject the output under review; the comment goes to the next attempt."""
        self._run(calls.decide(task_id, "rejected", comment, attempt=attempt, reviewer=reviewer))

    def cancel(self, task_id: str) -> Task:
        """Cancel an unfinished task; the task as it is now."""
        return self._run(calls.cancel(task_id))

    def next_review(self) -> Task | None:
        """The next task this caller may review, reserved for them; None if none waits."""
        return self._run(calls.next_review())

    def watch(self, task_id: str, *, last_event_id: int | None = None) -> Iterator[Event]:
        """The task's events as they happen, until its terminal one: from its current state,
        or after ``last_event_id`` (0: its whole history). A dropped connection or a
        restarted server is reconnected from the last event yielded: none twice, none lost.
        """
        return self._watch(Watch(task_id, last_event_id, self.settings.give_up_after))

    def wait(self, task_id: str, timeout: float | None = None) -> Task:
        """The task once it is finished (completed, failed or cancelled), read from the
        store; TimeoutError if it is not within ``timeout`` seconds.

        It is read first, whatever the timeout, so a finished task is returned at once and
        an unreachable service or an unknown task fails at once; the stream after that is
        reconnected as in :meth:`watch`, within the timeout (counted from the call)."""
        watch = Watch(task_id, None, self.settings.give_up_after, timeout=timeout)
        task = self.get(task_id)
        if task.finished:
            return task
        for _ in self._watch(watch):
            pass
        return self.get(task_id)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def _run(self, call: Call[T]) -> T:
        """Drive a call: send each request it makes, give it each answer, return its result."""
        try:
            request = next(call)
            while True:
                request = call.send(self._send(request))
        except StopIteration as done:
            return cast(T, done.value)

    def _send(self, request: Request) -> httpx.Response:
        with no_answer_is_unavailable(self.settings.url):
            response = self._http.request(request.method, request.path, json=request.json,
                                          params=request.params, headers=request.headers)
        return calls.checked(response)

    def _watch(self, watch: Watch) -> Iterator[Event]:
        while not watch.done:
            watch.check_deadline()
            try:
                yield from self._follow(watch)
            except HitlError as error:
                time.sleep(watch.delay(error))

    def _follow(self, watch: Watch) -> Iterator[Event]:
        """One connection's events; raises Unavailable if it ends before the task does."""
        with no_answer_is_unavailable(self.settings.url, watch.task_id), connect_sse(
                self._http, "GET", watch.path, headers=watch.headers(),
                timeout=self.settings.stream_timeouts(watch.left())) as source:
            if not source.response.is_success:
                source.response.read()
            watch.opened(source.response)
            with cut_off_at(source.response, watch.left()):
                for sse in source.iter_sse():
                    event = watch.event(sse)
                    if event is not None:
                        yield event
                    if watch.done:
                        return
        raise ended(watch.task_id)


@contextmanager
def cut_off_at(response: httpx.Response, left: float | None) -> Iterator[None]:
    """End the stream's connection ``left`` seconds from now, if it is still open then.

    A blocking read can be bounded no other way: httpx's read timeout starts again with
    every heartbeat, so a watch of a task that waits for days would never time out.
    Shutting the socket down wakes the read at once (it sees the connection end).
    """
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if left is None or not isinstance(sock, socket.socket):
        yield
        return
    timer = threading.Timer(left, shut_down, (sock,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def shut_down(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # closed already
        pass
