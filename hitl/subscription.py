"""One watcher's subscription: its replay, read a page at a time, then its live queue.

Ids are contiguous on every topic (a task's ``seq``, the global ``gid``), which is what
makes replay exact: a subscription registers first, so that nothing published from then
on is missed, then reads what came before, a page at a time (from the broker's memory,
else the store). When its replay ends it checks that the first live message follows on,
and reads the missing ids again if not (they were published while the replay was read).
What the store no longer has, or never had (an id above the latest), is never skipped
silently: the watcher gets :func:`reset_message`, then goes on live.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from .models import Message, sse_frame

if TYPE_CHECKING:
    from .broker import Broker

log = logging.getLogger(__name__)

GLOBAL: Final = "*"
HEARTBEAT: Final = Message(0, "", "", "", b": keep-alive\n\n")
RESET: Final = "reset"  # the status of reset_message
BATCH_BYTES: Final = 256 * 1024  # one send: about all a watcher that stops reading holds
_NO_BACKLOG: Final[list[Message]] = []  # shared, never changed
_PAGE: Final = "page"  # why a subscription must read before going on: its replay's next page,
_GAP: Final = "gap"  # or the ids missing before its first live message


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """Messages after some id, oldest first (one page of them), and the latest id then."""

    messages: list[Message]
    latest: int


# (topic, after, most messages, about most bytes) -> the page after ``after``
HistoryLoader = Callable[[str, int, int, int], Awaitable[HistoryPage]]


def reset_message(topic: str, latest: int) -> Message:
    """``{"status": "reset"}`` with the latest id: what was missed cannot be replayed.

    The client reloads the state it shows (``/api/tasks``, the task) and follows on from
    this id; a reconnect after it sends this id as its ``Last-Event-ID``.
    """
    data = '{"status":"reset"}'
    return Message(latest, "" if topic == GLOBAL else topic, RESET, data, sse_frame(data, latest))


def marked_reset(state: Message) -> Message:
    """A task's latest message again, with ``"replay": "reset"``: the state it is in, for a
    watcher whose ``Last-Event-ID`` cannot be replayed exactly."""
    data = state.data[:-1] + ',"replay":"reset"}'  # the payload is a compact JSON object
    return Message(state.id, state.task_id, state.status, data, sse_frame(data, state.id),
                   state.submitted_by)


def contiguous(messages: list[Message]) -> list[Message]:
    """The leading run of ``messages`` whose ids follow on one from the other."""
    for count in range(1, len(messages)):
        if messages[count].id != messages[count - 1].id + 1:
            return messages[:count]
    return messages


class Subscription:
    """One watcher's view of a topic: replayed backlog first, then live messages.

    Use it as ``async with broker.subscribe(topic, last_id) as sub``: entering
    registers it and reads the first page of replay, leaving removes it, whatever ends
    the watch (a failed or cancelled entry included). Iterating yields messages (and
    :data:`HEARTBEAT`) until the broker closes the subscription or drops it for falling
    behind; no id is repeated or skipped. Kept small on purpose: one per open stream.
    """

    __slots__ = ("broker", "name", "last_id", "dropped", "closed", "_queue", "_bytes",
                 "_waiter", "_backlog", "_next", "_fetch")

    def __init__(self, broker: Broker, name: str, last_id: int | None) -> None:
        self.broker = broker
        self.name = name
        self.last_id = last_id  # the last id handed out (or skipped past by a reset)
        self.dropped = False
        self.closed = broker.closed  # shutting down: the stream ends at once
        self._queue: deque[Message] = deque()  # live messages, bounded by count and bytes
        self._bytes = 0
        self._waiter: asyncio.Future[None] | None = None
        self._backlog = _NO_BACKLOG  # the replay page being handed out (shared, read-only)
        self._next = 0
        self._fetch: str | None = None  # _PAGE or _GAP: read before the next message

    async def __aenter__(self) -> Subscription:
        if self.broker._register(self):
            self._fetch = _PAGE
        try:
            if self._fetch and not self.closed:
                await self._refill()
        except BaseException:  # cancelled or failed while reading: never left registered
            self.broker._unregister(self)
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.broker._unregister(self)

    def offer(self, message: Message) -> bool:
        """Queue without waiting; False when the watcher is too far behind (in count or bytes)."""
        queue, size = self._queue, len(message.frame)
        if queue and (len(queue) >= self.broker.queue_size
                      or self._bytes + size > self.broker.queue_bytes):
            return False
        queue.append(message)
        self._bytes += size
        self._wake()
        return True

    def idle(self) -> bool:
        return not self._queue

    def ready(self) -> bool:
        """True when the next message may already be here (no wait needed to look)."""
        return self._next < len(self._backlog) or bool(self._queue) or self._fetch is not None

    def close(self) -> None:
        self.closed = True
        self._wake()

    def drop(self) -> None:
        """Fallen too far behind: end the stream and let go of what was queued for it."""
        self.dropped = True
        self._release()
        self._wake()

    def _release(self) -> None:
        self._queue.clear()
        self._bytes = 0
        self._backlog, self._next, self._fetch = _NO_BACKLOG, 0, None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _ready(self) -> Message | None:
        """The next message already here (replay first); None if it must wait or read."""
        if self.closed or self.dropped:
            return None
        if self._next < len(self._backlog):
            message = self._backlog[self._next]
            self._next += 1
            if self._next == len(self._backlog):
                self._backlog, self._next = _NO_BACKLOG, 0  # an idle watcher keeps no page
            self.last_id = message.id
            return message
        queue = self._queue
        while queue and not self._fetch:
            message = queue[0]
            if message.id == 0:  # a heartbeat or a signal: never numbered, never replayed
                return self._pop()
            if self.last_id is not None:
                if message.id > self.last_id + 1:  # published while its replay was read
                    self._fetch = _GAP
                    return None
                if message.id <= self.last_id:  # replayed already
                    self._pop()
                    continue
                self.last_id = message.id
            else:
                self.last_id = message.id
            return self._pop()
        return None

    def _pop(self) -> Message:
        message = self._queue.popleft()
        self._bytes -= len(message.frame)
        return message

    async def _refill(self) -> None:
        """Read the next page after ``last_id``: the replay, or the ids a gap left out."""
        after = self.last_id or 0
        head = next((m.id for m in self._queue if m is not HEARTBEAT and m.id > after), 0)
        # A gap is read afresh: a read shared with others may have started before it.
        page = await self.broker._page(self.name, after, shared=self._fetch != _GAP)
        if self.closed or self.dropped:  # ended while it read: keep nothing
            return
        messages, self._fetch = page.messages, None
        if messages and messages[0].id == after + 1:
            self._backlog, self._next = contiguous(messages), 0
            if self._backlog[-1].id < page.latest:
                self._fetch = _PAGE
        elif messages or after != page.latest or head > after + 1:  # deleted, or never given
            latest = max(page.latest, head - 1)
            self._backlog, self._next = [await self._reset(latest)], 0
            self.broker.resets_total += 1
            log.info("reset a watcher of %s: nothing after %d to replay (latest %d)",
                     self.name, after, latest)

    async def _reset(self, latest: int) -> Message:
        """What a watcher that cannot be replayed gets: on a task's topic, its current
        state (its latest message) marked ``"replay": "reset"``; on the global one,
        :func:`reset_message`."""
        if self.name != GLOBAL and latest > 0:
            page = await self.broker._page(self.name, latest - 1, shared=False)
            if page.messages and page.messages[-1].id == latest:
                return marked_reset(page.messages[-1])
        return reset_message(self.name, latest)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        while (message := self._ready()) is None:
            if self.closed or self.dropped:
                raise StopAsyncIteration
            await (self._refill() if self._fetch else self._wait())
        return message

    async def batch(self) -> list[Message]:
        """The next message and others already here, up to about :data:`BATCH_BYTES`;
        [] once it has ended.

        A stream writes a batch as one chunk: a replay or a burst is a few sends, and a
        watcher whose sends block holds one chunk, however far behind it is.
        """
        while (message := self._ready()) is None:
            if self.closed or self.dropped:
                return []
            await (self._refill() if self._fetch else self._wait())
        batch, size = [message], len(message.frame)
        while size < BATCH_BYTES and (message := self._ready()) is not None:
            batch.append(message)
            size += len(message.frame)
        return batch
