"""Fan-out of task messages to every SSE subscriber, each with its own bounded queue.

Topics: one per task (named by its id) and :data:`GLOBAL`, which carries every task's
messages. A message arrives already encoded (:class:`~hitl.models.Message`), so the
broker's per-subscriber work is a single ``put_nowait`` of a shared object.

The backend decides how a published message reaches the broker of every process: the
in-memory one hands it straight back; a multi-process one (Redis, say) would go over
the network. The local fan-out below is written once, whatever the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

from quart import Quart

from .lifecycle import attach
from .models import Message

log = logging.getLogger(__name__)

GLOBAL: Final = "*"
HEARTBEAT: Final = Message(0, "", "", "", b": keep-alive\n\n")
_CLOSE: Final = Message(0, "", "", "", b"")
_NO_BACKLOG: Final[list[Message]] = []  # shared, never appended to: only replaced and popped

HistoryLoader = Callable[[str, int], Awaitable[list[Message]]]


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
    registers it and loads the replay, leaving removes it, whatever ends the watch.
    Iterating yields messages (and :data:`HEARTBEAT`) until the broker closes the
    subscription or drops it for falling behind; replayed messages are not repeated.
    Kept small on purpose: there is one per open stream.
    """

    __slots__ = ("broker", "name", "last_id", "queue", "dropped", "closed", "_backlog")

    def __init__(self, broker: Broker, name: str, last_id: int | None) -> None:
        self.broker = broker
        self.name = name
        self.last_id = last_id
        self.queue: asyncio.Queue[Message] = asyncio.Queue(broker.queue_size)
        self.dropped = False
        self.closed = broker.closed  # shutting down: the stream ends at once
        self._backlog = _NO_BACKLOG  # the replay, reversed: the next one pops off the end

    async def __aenter__(self) -> Subscription:
        replay = self.broker._register(self)
        try:
            if replay is not None:
                self._backlog = (await replay)[::-1] or _NO_BACKLOG
        except BaseException:  # cancelled or failed while loading: never left registered
            self.broker._unregister(self)
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.broker._unregister(self)

    def offer(self, message: Message) -> bool:
        """Queue without waiting; False when the watcher is too far behind."""
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            return False
        return True

    def ready(self) -> bool:
        """True when the next message may already be here (no wait needed to look)."""
        return bool(self._backlog) or not self.queue.empty()

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(_CLOSE)

    def _admit(self, message: Message) -> Message | None:
        if message is HEARTBEAT:
            return message
        if message is _CLOSE or message.id <= (self.last_id or 0):
            return None
        self.last_id = message.id
        return message

    def _ready(self) -> Message | None:
        """The next message already here (replay first), skipping repeats; else None."""
        while not self.closed and (self._backlog or not self.queue.empty()):
            if self._backlog:
                message = self._admit(self._backlog.pop())
                if not self._backlog:
                    self._backlog = _NO_BACKLOG  # an idle watcher keeps no list of its own
            else:
                message = self._admit(self.queue.get_nowait())
            if message is not None:
                return message
        return None

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        while True:
            message = self._ready()
            if message is not None:
                return message
            if self.closed or self.dropped:
                raise StopAsyncIteration
            message = self._admit(await self.queue.get())
            if message is not None and not self.closed:
                return message

    async def batch(self) -> list[Message]:
        """The next message and every other one already here; [] once it has ended.

        A stream writes a batch as one chunk: a replay or a burst is one send. It waits
        on the queue itself, as ``__anext__`` does, rather than through it: a coroutine
        frame less for every idle watcher.
        """
        while (message := self._ready()) is None:
            if self.closed or self.dropped:
                return []
            message = self._admit(await self.queue.get())
            if message is not None and not self.closed:
                break
        batch = [message]
        while (message := self._ready()) is not None:
            batch.append(message)
        return batch


@dataclass(eq=False)
class Topic:
    history: deque[Message]
    subscribers: set[Subscription] = field(default_factory=set)
    released: bool = False


class Broker:
    """Publish, subscribe, history: the interface any backend sits behind."""

    def __init__(
        self,
        backend: Backend | None = None,
        *,
        queue_size: int = 1024,
        history_size: int = 1000,
        heartbeat: float = 15.0,
        loader: HistoryLoader | None = None,
    ) -> None:
        self.backend: Backend = backend or MemoryBackend()
        self.queue_size = queue_size
        self.history_size = history_size
        self.heartbeat = heartbeat
        self.loader = loader
        self.dropped_total = 0
        self._topics: dict[str, Topic] = {GLOBAL: Topic(deque(maxlen=history_size * 4))}
        self._ticker: asyncio.Task[None] | None = None
        self._loads: dict[tuple[str, int], asyncio.Future[list[Message]]] = {}
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
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        await self.backend.disconnect()

    def publish(self, topic: str, message: Message) -> None:
        """Hand one encoded message to the backend; never waits on a subscriber."""
        self.backend.publish(topic, message)

    def _deliver(self, name: str, message: Message) -> None:
        topic = self._topics.get(name)
        if topic is None:
            topic = self._topics[name] = Topic(deque(maxlen=self.history_size))
        topic.history.append(message)
        laggards = [sub for sub in topic.subscribers if not sub.offer(message)]
        for sub in laggards:
            topic.subscribers.discard(sub)
            sub.dropped = True
            self.dropped_total += 1
        if laggards:
            log.info("dropped %d slow subscriber(s) of %s", len(laggards), name)

    def subscribe(self, name: str, last_id: int | None = None) -> Subscription:
        """Watch a topic (``async with``): messages after ``last_id`` first, then live ones.

        With no ``last_id`` a task topic replays its whole history (so a late joiner
        sees the current state) and the global topic starts live.
        """
        return Subscription(self, name, last_id)

    def _register(self, sub: Subscription) -> Awaitable[list[Message]] | None:
        """Add a subscriber; what it must replay first (registering first loses nothing)."""
        topic = self._topics.get(sub.name)
        if topic is None:
            topic = self._topics[sub.name] = Topic(deque(maxlen=self.history_size))
        topic.subscribers.add(sub)
        if sub.last_id is not None or sub.name != GLOBAL:
            return self.history(sub.name, sub.last_id or 0)
        if topic.history:
            sub.last_id = topic.history[-1].id
        return None

    def _unregister(self, sub: Subscription) -> None:
        topic = self._topics.get(sub.name)
        if topic is not None:
            topic.subscribers.discard(sub)
            self._forget_if_idle(sub.name, topic)

    async def history(self, name: str, after: int) -> list[Message]:
        """Messages of a topic with ids above ``after``: from memory, else from the loader."""
        topic = self._topics.get(name)
        if topic is not None and topic.history and topic.history[0].id <= after + 1:
            return [message for message in topic.history if message.id > after]
        if self.loader is None:  # memory is all there is
            return [message for message in topic.history if message.id > after] if topic else []
        return await self._load(name, after)

    async def _load(self, name: str, after: int) -> list[Message]:
        """Read history from the loader once for everyone asking the same, and keep it.

        A reconnect storm asks for the same messages thousands of times at once: one
        read serves them all, and seeds the topic's memory for whoever comes next.
        """
        assert self.loader is not None
        key = (name, after)
        load = self._loads.get(key)
        if load is None:
            load = self._loads[key] = asyncio.ensure_future(self.loader(name, after))
            load.add_done_callback(lambda _: self._loads.pop(key, None))
        messages = await asyncio.shield(load)
        topic = self._topics.get(name)
        if messages and name != GLOBAL and topic is not None and not topic.history:
            topic.history.extend(messages)
            topic.released = topic.released or messages[-1].terminal
        return messages

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
        while True:
            await asyncio.sleep(self.heartbeat)
            for topic in self._topics.values():
                for sub in topic.subscribers:
                    if sub.queue.empty():
                        sub.offer(HEARTBEAT)
