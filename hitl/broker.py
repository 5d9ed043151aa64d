"""Fan-out of task messages to every SSE subscriber, each with its own bounded queue.

Topics: one per task (named by its id) and :data:`GLOBAL`, which carries every task's
messages. A message arrives already encoded (:class:`~hitl.models.Message`), so the
broker's per-subscriber work is a single append of a shared object.

Ids are contiguous on every topic (a task's ``seq``, the global ``gid``), which is what
makes replay exact: a subscription registers first, then reads what it missed, a page at
a time (from memory, else the store); when its replay ends it checks that the first live
message follows on, and reads the missing ids again if not. What the store no longer has
(or never had: an id above the latest) is never skipped silently: the watcher gets
:func:`reset_message` and goes on live after it.

The backend decides how a published message reaches the broker of every process: the
in-memory one hands it straight back; a multi-process one (Redis, say) would go over
the network. The local fan-out below is written once, whatever the backend.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from itertools import islice
from typing import Final, Protocol

from quart import Quart

from .lifecycle import attach
from .models import Message, sse_frame

log = logging.getLogger(__name__)

GLOBAL: Final = "*"
HEARTBEAT: Final = Message(0, "", "", "", b": keep-alive\n\n")
RESET: Final = "reset"  # the status of reset_message
PAGE_SIZE: Final = 500  # messages per replay read: a long replay holds one page at a time
PAGE_BYTES: Final = 256 * 1024  # ... and about this much data
BATCH_BYTES: Final = 64 * 1024  # one send: all a watcher that stops reading holds up
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


class Backend(Protocol):
    """Carries published messages to the broker of every process."""

    async def connect(self, deliver: Callable[[str, Message], None]) -> None: ...
    async def disconnect(self) -> None: ...
    def publish(self, topic: str, message: Message) -> None: ...


class MemoryBackend:
    """One process: a published message is delivered at once, in publish order."""

    def __init__(self) -> None:
        self._deliver: Callable[[str, Message], None] | None = None

    async def connect(self, deliver: Callable[[str, Message], None]) -> None:
        self._deliver = deliver

    async def disconnect(self) -> None:
        self._deliver = None

    def publish(self, topic: str, message: Message) -> None:
        if self._deliver is not None:
            self._deliver(topic, message)


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
        self.broker._register(self)
        try:
            if self._fetch:
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
            if message is not HEARTBEAT and self.last_id is not None:
                if message.id > self.last_id + 1:  # published while its replay was read
                    self._fetch = _GAP
                    return None
                if message.id <= self.last_id:  # replayed already
                    self._pop()
                    continue
                self.last_id = message.id
            elif message is not HEARTBEAT:
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
        messages, self._fetch = page.messages, None
        if messages and messages[0].id == after + 1:
            self._backlog, self._next = contiguous(messages), 0
            if self._backlog[-1].id < page.latest:
                self._fetch = _PAGE
        elif messages or after != page.latest or head > after + 1:  # deleted, or never given
            latest = max(page.latest, head - 1)
            self._backlog, self._next = [reset_message(self.name, latest)], 0
            self.broker.resets_total += 1
            log.info("reset a watcher of %s: nothing after %d to replay (latest %d)",
                     self.name, after, latest)

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


def contiguous(messages: list[Message]) -> list[Message]:
    """The leading run of ``messages`` whose ids follow on one from the other."""
    for count in range(1, len(messages)):
        if messages[count].id != messages[count - 1].id + 1:
            return messages[:count]
    return messages


@dataclass(eq=False)
class Topic:
    """A topic's subscribers, and its latest messages: a contiguous run, bounded."""

    max_messages: int
    max_bytes: int
    history: deque[Message] = field(default_factory=deque)
    history_bytes: int = 0
    subscribers: set[Subscription] = field(default_factory=set)
    released: bool = False

    def remember(self, message: Message) -> None:
        history = self.history
        if history and message.id != history[-1].id + 1:
            if message.id <= history[-1].id:
                return  # had it already (read from the store before it was published)
            history.clear()  # not contiguous: start the run again
            self.history_bytes = 0
        history.append(message)
        self.history_bytes += len(message.frame)
        while len(history) > 1 and (len(history) > self.max_messages
                                    or self.history_bytes > self.max_bytes):
            self.history_bytes -= len(history.popleft().frame)

    def covers(self, after: int) -> bool:
        """Whether memory alone can say what follows ``after``."""
        history = self.history
        return bool(history) and history[0].id <= after + 1 <= history[-1].id + 1

    def page(self, after: int, limit: int, max_bytes: int) -> HistoryPage:
        messages: list[Message] = []
        size = 0
        for message in islice(self.history, after + 1 - self.history[0].id, None):
            if len(messages) == limit or (messages and size >= max_bytes):
                break
            messages.append(message)
            size += len(message.frame)
        return HistoryPage(messages, self.history[-1].id)


class Broker:
    """Publish, subscribe, history: the interface any backend sits behind."""

    def __init__(
        self,
        backend: Backend | None = None,
        *,
        queue_size: int = 1024,
        queue_bytes: int = 1024 * 1024,
        history_size: int = 1000,
        history_bytes: int = 4 * 1024 * 1024,
        heartbeat: float = 15.0,
        loader: HistoryLoader | None = None,
        page_size: int = PAGE_SIZE,
        page_bytes: int = PAGE_BYTES,
    ) -> None:
        self.backend: Backend = backend or MemoryBackend()
        self.queue_size = queue_size
        self.queue_bytes = queue_bytes
        self.history_size = history_size
        self.history_bytes = history_bytes
        self.heartbeat = heartbeat
        self.loader = loader
        self.page_size = page_size
        self.page_bytes = page_bytes
        self.dropped_total = 0
        self.resets_total = 0
        self._topics: dict[str, Topic] = {
            GLOBAL: Topic(history_size * 4, history_bytes * 4)}
        self._ticker: asyncio.Task[None] | None = None
        self._loads: dict[tuple[str, int], asyncio.Future[HistoryPage]] = {}
        self.closed = False

    def init_app(self, app: Quart) -> None:
        attach(app, "broker", self, self.start, self.close)

    async def start(self) -> None:
        self.closed = False
        await self.backend.connect(self._deliver)
        if self.heartbeat > 0 and self._ticker is None:
            self._ticker = asyncio.create_task(self._beat(), name="hitl-heartbeat")

    async def close(self) -> None:
        """End every subscription (their streams finish) and stop; safe to call twice."""
        self.closed = True
        for topic in self._topics.values():
            for sub in topic.subscribers:
                sub.close()
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
            self._ticker = None
        await self.backend.disconnect()

    def publish(self, topic: str, message: Message) -> None:
        """Hand one encoded message to the backend; never waits on a subscriber."""
        self.backend.publish(topic, message)

    def _topic(self, name: str) -> Topic:
        topic = self._topics.get(name)
        if topic is None:
            topic = self._topics[name] = Topic(self.history_size, self.history_bytes)
        return topic

    def _deliver(self, name: str, message: Message) -> None:
        topic = self._topic(name)
        topic.remember(message)
        laggards = [sub for sub in topic.subscribers if not sub.offer(message)]
        for sub in laggards:
            topic.subscribers.discard(sub)
            sub.drop()
        if laggards:
            self.dropped_total += len(laggards)
            log.info("dropped %d slow subscriber(s) of %s", len(laggards), name)

    def subscribe(self, name: str, last_id: int | None = None) -> Subscription:
        """Watch a topic (``async with``): messages after ``last_id`` first, then live ones.

        With no ``last_id`` a task topic replays its whole history (so a late joiner
        sees the current state) and the global topic starts live.
        """
        return Subscription(self, name, last_id)

    def _register(self, sub: Subscription) -> None:
        """Add a subscriber, then mark what it must read: registering first loses nothing."""
        topic = self._topic(sub.name)
        topic.subscribers.add(sub)
        if sub.last_id is not None or sub.name != GLOBAL:
            sub._fetch = _PAGE
        elif topic.history:
            sub.last_id = topic.history[-1].id

    def _unregister(self, sub: Subscription) -> None:
        sub._release()
        topic = self._topics.get(sub.name)
        if topic is not None:
            topic.subscribers.discard(sub)
            self._forget_if_idle(sub.name, topic)

    async def history(self, name: str, after: int = 0) -> list[Message]:
        """Every message of a topic after ``after``, read page by page (tools and tests)."""
        messages: list[Message] = []
        while True:
            page = await self._page(name, after)
            run = contiguous(page.messages) if page.messages else []
            if not run or run[0].id != after + 1:
                return messages
            messages.extend(run)
            after = run[-1].id
            if after >= page.latest:
                return messages

    async def _page(self, name: str, after: int, shared: bool = True) -> HistoryPage:
        """One page of a topic after ``after``: from memory if it has it, else the loader."""
        topic = self._topics.get(name)
        if topic is not None and topic.covers(after):
            return topic.page(after, self.page_size, self.page_bytes)
        if self.loader is None:  # memory is all there is
            return HistoryPage([], topic.history[-1].id if topic and topic.history else 0)
        if not shared:
            return await self.loader(name, after, self.page_size, self.page_bytes)
        return await self._load(name, after)

    async def _load(self, name: str, after: int) -> HistoryPage:
        """Read one page from the loader once for everyone asking the same at once.

        A reconnect storm asks for the same messages thousands of times at once: one
        read serves them all (each then checks for what was published since), and a
        task's page that reaches its latest message seeds the topic's memory.
        """
        assert self.loader is not None
        key = (name, after)
        load = self._loads.get(key)
        if load is None:
            load = self._loads[key] = asyncio.ensure_future(
                self.loader(name, after, self.page_size, self.page_bytes))
            load.add_done_callback(lambda done: self._loaded(key, done))
        page = await asyncio.shield(load)
        topic = self._topics.get(name)
        if (name != GLOBAL and topic is not None and not topic.history and page.messages
                and page.messages[-1].id == page.latest):
            for message in contiguous(page.messages):
                topic.remember(message)
            topic.released = topic.released or page.messages[-1].terminal
        return page

    def _loaded(self, key: tuple[str, int], done: asyncio.Future[HistoryPage]) -> None:
        if self._loads.get(key) is done:
            del self._loads[key]
        if not done.cancelled():
            done.exception()  # retrieved: every waiter may have left

    def release(self, name: str) -> None:
        """The topic will get no more messages: free its history once nobody watches."""
        topic = self._topics.get(name)
        if topic is not None:
            topic.released = True
            self._forget_if_idle(name, topic)

    def _forget_if_idle(self, name: str, topic: Topic) -> None:
        if name == GLOBAL or topic.subscribers:
            return
        if (topic.released or not topic.history) and self._topics.get(name) is topic:
            del self._topics[name]

    def subscriber_count(self, name: str | None = None) -> int:
        if name is not None:
            topic = self._topics.get(name)
            return len(topic.subscribers) if topic else 0
        return sum(len(topic.subscribers) for topic in self._topics.values())

    def topic_count(self) -> int:
        return len(self._topics) - 1

    async def _beat(self) -> None:
        """Every interval, a heartbeat to each idle subscriber, a slice at a time, so that
        10,000 watchers never hold the loop for one long walk."""
        while True:
            await asyncio.sleep(self.heartbeat)
            subscribers = [sub for topic in self._topics.values() for sub in topic.subscribers]
            for start in range(0, len(subscribers), 500):
                for sub in subscribers[start:start + 500]:
                    if sub.idle() and not (sub.closed or sub.dropped):
                        sub.offer(HEARTBEAT)
                await asyncio.sleep(0)
