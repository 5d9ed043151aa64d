"""Fan-out of task messages to every SSE subscriber, each with its own bounded queue.

Topics: one per task (named by its id) and :data:`GLOBAL`, which carries every task's
messages. A message arrives already encoded (:class:`~hitl.models.Message`), so the
broker's per-subscriber work is a single append of a shared object. Each topic keeps
its latest messages in memory (bounded in count and bytes) for replay; older ones come
from the loader (the store), a page at a time (see :mod:`hitl.subscription`).

The backend decides how a published message reaches the broker of every process: the
in-memory one hands it straight back; a multi-process one (Redis, say) would go over
the network. The local fan-out below is written once, whatever the backend.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from typing import Final, Protocol

from quart import Quart

from . import metrics
from .lifecycle import attach
from .models import Message, TaskEvent
from .subscription import (
    GLOBAL,
    HEARTBEAT,
    RESET,
    HistoryLoader,
    HistoryPage,
    Subscription,
    contiguous,
)

__all__ = ["GLOBAL", "HEARTBEAT", "RESET", "Broker", "HistoryPage", "Subscription"]

log = logging.getLogger(__name__)

PAGE_SIZE: Final = 500  # messages per replay read: a long replay holds one page at a time
PAGE_BYTES: Final = 256 * 1024  # ... and about this much data


class Receiver(Protocol):
    """What a backend hands news to: the broker of its process."""

    def receive(self, event: TaskEvent) -> None: ...
    def deliver(self, topic: str, message: Message) -> None: ...
    def hint(self, topic: str, message: Message) -> None: ...
    def notice(self, kind: str, text: str) -> None: ...


class Backend(Protocol):
    """Carries published news to the broker of every process.

    Three kinds: committed changes (:meth:`publish_event`; in gid order, none lost: a
    backend that misses some reads them from the store), side-band hints to watchers
    (:meth:`signal`) and notices between the parts of processes (:meth:`notify`, such as
    "a job was queued"); those two may be lost, costing a delay, never a wrong answer.
    """

    async def connect(self, receiver: Receiver) -> None: ...
    async def disconnect(self) -> None: ...
    def publish(self, topic: str, message: Message) -> None: ...
    def publish_event(self, event: TaskEvent) -> None: ...
    def signal(self, topic: str, message: Message) -> None: ...
    def notify(self, kind: str, text: str) -> None: ...


class MemoryBackend:
    """One process: published news is handed back at once, in publish order."""

    def __init__(self) -> None:
        self._receiver: Receiver | None = None

    async def connect(self, receiver: Receiver) -> None:
        self._receiver = receiver

    async def disconnect(self) -> None:
        self._receiver = None

    def publish(self, topic: str, message: Message) -> None:
        if self._receiver is not None:
            self._receiver.deliver(topic, message)

    def publish_event(self, event: TaskEvent) -> None:
        if self._receiver is not None:
            self._receiver.receive(event)

    def signal(self, topic: str, message: Message) -> None:
        if self._receiver is not None:
            self._receiver.hint(topic, message)

    def notify(self, kind: str, text: str) -> None:
        if self._receiver is not None:
            self._receiver.notice(kind, text)


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
        self.listeners: list[Callable[[TaskEvent], None]] = []  # told of each change received
        self._notices: dict[str, list[Callable[[str], None]]] = {}
        self.closed = False

    def init_app(self, app: Quart) -> None:
        attach(app, "broker", self, self.start, self.close)

    async def start(self) -> None:
        self.closed = False
        await self.backend.connect(self)
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

    def publish_event(self, event: TaskEvent) -> None:
        """Hand one committed change (its task's and its global message) to the backend,
        which brings it to the broker of every process; never waits on a subscriber."""
        self.backend.publish_event(event)

    def signal(self, name: str, message: Message) -> None:
        """Hand a side-band message (id 0: a hint to read the store again, such as a
        reservation taken) to the current watchers of a topic, on every process: never
        remembered nor replayed, and missed by a watcher too far behind (it reads anew)."""
        self.backend.signal(name, message)

    def notify(self, kind: str, text: str) -> None:
        """Tell the parts of every process listening for ``kind`` (:meth:`on_notice`)."""
        self.backend.notify(kind, text)

    def on_notice(self, kind: str, callback: Callable[[str], None]) -> None:
        self._notices.setdefault(kind, []).append(callback)

    # The receiving side, called by the backend (hitl.broker.Receiver).

    def receive(self, event: TaskEvent) -> None:
        """A committed change, from this process or another: to its watchers, then to the
        listeners (a flow owner learns here of a decision taken elsewhere)."""
        task_message, global_message = event.messages()
        self.deliver(event.task_id, task_message)
        self.deliver(GLOBAL, global_message)
        if task_message.terminal:  # every process frees it (once nobody watches it here)
            self.release(event.task_id)
        for listener in self.listeners:
            listener(event)

    def hint(self, name: str, message: Message) -> None:
        topic = self._topics.get(name)
        if topic is not None:
            for sub in topic.subscribers:
                sub.offer(message)

    def notice(self, kind: str, text: str) -> None:
        for callback in self._notices.get(kind, ()):
            callback(text)

    def _topic(self, name: str) -> Topic:
        topic = self._topics.get(name)
        if topic is None:
            topic = self._topics[name] = Topic(self.history_size, self.history_bytes)
        return topic

    def deliver(self, name: str, message: Message) -> None:
        topic = self._topic(name)
        topic.remember(message)
        laggards = [sub for sub in topic.subscribers if not sub.offer(message)]
        for sub in laggards:
            topic.subscribers.discard(sub)
            sub.drop()
        if laggards:
            self.dropped_total += len(laggards)
            metrics.watchers_dropped(len(laggards))
            log.info("dropped %d slow subscriber(s) of %s", len(laggards), name)

    def subscribe(self, name: str, last_id: int | None = None) -> Subscription:
        """Watch a topic (``async with``): messages after ``last_id`` first, then live ones.

        With no ``last_id`` a task topic replays its whole history (so a late joiner
        sees the current state) and the global topic starts live.
        """
        return Subscription(self, name, last_id)

    def _register(self, sub: Subscription) -> bool:
        """Add a subscriber; whether it replays first (registering first loses nothing)."""
        topic = self._topic(sub.name)
        topic.subscribers.add(sub)
        metrics.stream_opened()
        if sub.last_id is not None or sub.name != GLOBAL:
            return True
        if topic.history:
            sub.last_id = topic.history[-1].id
        return False

    def _unregister(self, sub: Subscription) -> None:
        metrics.stream_closed()  # once per _register: a subscription's exit, or failed entry
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
