"""Following a task's stream across dropped connections and restarts (both clients).

The stream's ids are the task's message numbers, and the server replays exactly what came
after a ``Last-Event-ID``: so reconnecting with the last id yielded loses nothing, and
skipping any id not above it repeats nothing, whatever the server sends again.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import quote

import httpx
from httpx_sse import ServerSentEvent

from . import calls
from .errors import HitlError, Unavailable
from .models import Event

FIRST_DELAY = 0.1  # seconds before the first reconnect; doubled each failure in a row
MAX_DELAY = 3.0  # the server's own retry hint (retry: 3000)
STREAM_CLOSED = "stream_closed"


class Watch:
    """Where a watch is (the last id yielded, whether it is over) and what to do next.

    With a ``timeout`` (``wait``), its deadline is counted from its making, and bounds
    both clients alike: every stream connection, every read and every reconnect delay.
    ``wait`` reads the task first, outside the deadline: a finished task is returned at
    once, however small the timeout.
    """

    def __init__(self, task_id: str, last_id: int | None, give_up_after: float, *,
                 timeout: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.task_id = task_id
        self.timeout = timeout  # seconds the task has to finish (for Client.wait)
        self.deadline = None if timeout is None else clock() + timeout
        self.path = "/stream/" + quote(task_id, safe="")
        self.last_id = last_id
        self.give_up_after = give_up_after
        self.clock = clock
        self.done = False
        self.failures = 0  # in a row, since the last event
        self.failing_since: float | None = None

    def headers(self) -> dict[str, str]:
        """The stream request's headers: from the last id yielded, if any (with none, the
        server sends the task's current state first)."""
        if self.last_id is None:
            return {}
        return {"Last-Event-ID": str(self.last_id)}

    def left(self) -> float | None:
        """Seconds to the deadline (None: there is none)."""
        return None if self.deadline is None else max(self.deadline - self.clock(), 0.0)

    def check_deadline(self) -> None:
        """Raise TimeoutError once the deadline has passed."""
        if self.left() == 0.0:
            raise self.timed_out()

    def timed_out(self) -> TimeoutError:
        return TimeoutError(timed_out(self.task_id, self.timeout))

    def opened(self, response: httpx.Response) -> None:
        """The stream's answer (its body read, if an error): its error raised, or the
        watch connected."""
        calls.opened(response)
        self.connected()

    def connected(self) -> None:
        """The stream opened: the service is back, so giving up starts counting anew (the
        delay keeps growing until an event comes: a stream that opens and drops at once
        is not retried in a tight loop)."""
        self.failing_since = None

    def event(self, sse: ServerSentEvent) -> Event | None:
        """The event to yield for a message; None for one already yielded, or none at all.

        ``stream_closed`` (the task is finished) and a terminal status end the watch.
        """
        try:
            payload = json.loads(sse.data)
        except ValueError:
            return None
        if not isinstance(payload, dict):
            return None
        status = str(payload.get("status", ""))
        if status == STREAM_CLOSED:
            self.done = True
            return None
        if not (sse.id.isascii() and sse.id.isdigit()):
            return None
        number = int(sse.id)
        if self.last_id is not None and number <= self.last_id:
            return None
        self.last_id, self.failures, self.failing_since = number, 0, None
        event = Event(number, str(payload.get("task_id", self.task_id)), status, frozen(payload))
        self.done = event.terminal
        return event

    def delay(self, error: Exception) -> float:
        """Seconds to wait before reconnecting after ``error``.

        Raises ``error`` itself when trying again cannot help (a 404, a 403...), and
        :class:`Unavailable` once reconnecting has failed for ``give_up_after`` seconds.
        """
        if isinstance(error, HitlError) and not isinstance(error, Unavailable):
            raise error
        self.check_deadline()
        now = self.clock()
        if self.failing_since is None:
            self.failing_since = now
        elif now - self.failing_since >= self.give_up_after:
            raise Unavailable(f"gave up watching task {self.task_id} after "
                              f"{now - self.failing_since:.0f} s: {error}") from error
        delay = min(MAX_DELAY, FIRST_DELAY * 2.0 ** self.failures)
        self.failures += 1
        delay *= random.uniform(0.5, 1.0)  # spread out many watchers' reconnects
        # The last try is made as giving up is due, and none after a deadline.
        delay = min(delay, self.failing_since + self.give_up_after - now)
        left = self.left()
        return delay if left is None else min(delay, left)


def timed_out(task_id: str, timeout: float | None) -> str:
    return f"task {task_id} did not finish within {timeout:g} s"


def ended(task_id: str) -> Unavailable:
    """A stream that ended before its task finished: the server stopped (reconnect)."""
    return Unavailable(f"the stream of task {task_id} ended before the task finished")


def frozen(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(payload)
