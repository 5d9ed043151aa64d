"""News between hitl processes over Redis Streams; the database stays the truth.

Every process commits its changes to the shared database, then publishes each one
(:class:`~hitl.models.TaskEvent`, numbered by its global ``gid``) here; every process
hands every change to its local broker exactly once, in gid order.

Why Streams, not pub/sub: a stream keeps its entries, ordered by id, so a reader that
was busy or briefly cut off reads on from the last id it read, where pub/sub would
have dropped what was published meanwhile. And why the store anyway: Redis may restart
empty, trim the stream (``MAXLEN ~``) or be unreachable for a while. Gids are contiguous
and commit in order, so a gid that is not the next one means the ones between were
committed and their news lost: they are read from the store (``events_after``) before
going on; and with nothing new for a second (or all along while Redis is down) the
store's latest gid is compared with the last delivered one. Lost news only delays a
delivery, never loses, repeats or reorders one.

Hints to watchers (:meth:`RedisBackend.signal`) and notices between processes
(:meth:`RedisBackend.notify`) go on a second stream, read from its tail: they are not
in the store, and one lost (published while Redis is down, or trimmed) costs a delayed
re-read, never a wrong answer (see :class:`hitl.broker.Backend`).

Publishing never waits on Redis: news is queued (bounded: the oldest goes first when
Redis is away for long; the store covers it) for one sender task, which sends what has
piled up as one pipeline, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .broker import Backend, MemoryBackend, Receiver
from .errors import ConfigError
from .models import Message, TaskEvent

__all__ = ["RedisBackend", "make_backend", "parse_broker_url"]

log = logging.getLogger(__name__)

DEFAULT_PREFIX: Final = "hitl"
MESSAGES_MAXLEN: Final = 100_000  # entries kept in {prefix}:messages (about: MAXLEN ~)
SIGNALS_MAXLEN: Final = 10_000  # ... and in {prefix}:signals
MAX_QUEUED: Final = 10_000  # news waiting for the sender; past it the oldest is dropped
SEND_BATCH: Final = 1_000  # XADDs in one pipeline
READ_COUNT: Final = 1_000  # entries per stream in one XREAD
PAGE: Final = 500  # changes per store read when catching up

# Lost connection, as opposed to a command Redis refused (a ResponseError, say).
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)
_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
_USAGE = "expected 'memory' or redis://HOST:PORT/DB[?prefix=NAME]"

EventsAfter = Callable[[int, int], Awaitable[list[TaskEvent]]]
LatestGid = Callable[[], Awaitable[int]]


class NewsSource(Protocol):
    """What the backend reads the truth from: the store (SQLite or PostgreSQL)."""

    async def events_after(self, gid: int, limit: int = ...) -> list[TaskEvent]: ...
    async def latest_gid(self) -> int: ...


def parse_broker_url(setting: str) -> tuple[str, str]:
    """A ``redis://`` broker setting as (the URL for redis-py, the key prefix).

    Raises :class:`ConfigError` with one line saying what is wrong (never the password).
    """
    try:
        parts = urlsplit(setting)
        port = parts.port  # ValueError when not a number in range
    except ValueError as exc:
        raise ConfigError(f"broker: {_redacted(setting)} is not a valid URL ({exc}); "
                          f"{_USAGE}") from None
    shown = _redacted(setting)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(f"broker: {shown} is neither 'memory' nor a redis:// URL; {_USAGE}")
    if not parts.hostname:
        raise ConfigError(f"broker: {shown} names no host; {_USAGE}")
    if port == 0:
        raise ConfigError(f"broker: {shown} has port 0; {_USAGE}")
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ConfigError(f"broker: {shown}: the database must be a number, not {db!r}")
    prefix = DEFAULT_PREFIX
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key != "prefix":
            raise ConfigError(f"broker: {shown}: unknown option {key!r} (only prefix=NAME)")
        if not _PREFIX.fullmatch(value):
            raise ConfigError(f"broker: {shown}: the prefix must be 1 to 100 letters, digits "
                              "or _ . : -")
        prefix = value
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")), prefix


def _redacted(setting: str) -> str:
    """The setting as it may be shown: without a password."""
    try:
        parts = urlsplit(setting)
        if parts.password is None:
            return repr(setting)
        netloc = f"{parts.username or ''}:***@{parts.hostname or ''}"
        if parts.port is not None:
            netloc += f":{parts.port}"
    except ValueError:
        return "the URL given"
    query = urlencode(parse_qsl(parts.query, keep_blank_values=True))
    return repr(urlunsplit((parts.scheme, netloc, parts.path, query, "")))


def make_backend(broker_setting: str, store: NewsSource) -> Backend:
    """The backend the ``broker`` setting names: "memory" (one process) or a Redis URL."""
    if broker_setting.strip() == "memory":
        return MemoryBackend()
    return RedisBackend(broker_setting, store.events_after, store.latest_gid)


class RedisBackend:
    """Carries news between processes over Redis Streams; catches up from the store.

    ``events_after(gid, limit)`` and ``latest_gid()`` are the store's. The timings are
    for tests: ``block`` is the longest an XREAD waits; with nothing new for
    ``idle_poll`` seconds the store's latest gid is checked; while Redis is down it is
    checked every ``down_poll`` seconds, and the connection retried with a backoff
    doubling up to ``retry_cap``.
    """

    def __init__(self, url: str, events_after: EventsAfter, latest_gid: LatestGid, *,
                 block: float = 1.0, idle_poll: float = 1.0, down_poll: float = 0.5,
                 retry_cap: float = 2.0, max_queued: int = MAX_QUEUED) -> None:
        self.url, self.prefix = parse_broker_url(url)
        self.messages_key = f"{self.prefix}:messages"
        self.signals_key = f"{self.prefix}:signals"
        self._events_after = events_after
        self._latest_gid = latest_gid
        self.block, self.idle_poll, self.down_poll = block, idle_poll, down_poll
        self.retry_cap = retry_cap
        self.origin = uuid.uuid4().hex[:16]  # tags this backend's signals: never read back
        self._receiver: Receiver | None = None
        self._client: redis.Redis | None = None
        self._reader: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._outbox: deque[tuple[str, dict[str, str | bytes]]] = deque(maxlen=max_queued)
        self._wake = asyncio.Event()  # news queued for the sender
        self._drained = asyncio.Event()  # ... and all of it sent
        self._drained.set()
        self._up = asyncio.Event()  # Redis answers: the sender may try again
        self._down = False
        self._closing = False  # disconnect asked: the tasks stop at their next step
        self._ids: dict[str, bytes] = {}  # the last entry read, per stream
        self._checked = 0.0  # when the store's latest gid was last compared (monotonic)
        self._store_failing = False
        self._dropping = False
        self.last_gid = 0  # the last change handed to the receiver
        # Counts, for tests and logs.
        self.delivered = 0  # changes handed to the receiver
        self.filled = 0  # ... of which read from the store (their news was lost or late)
        self.duplicates = 0  # news of a change already delivered, skipped
        self.sent = 0  # entries XADDed
        self.dropped = 0  # entries never sent: queued past max_queued while Redis was away

    # The publishing side (hitl.broker.Backend).

    async def connect(self, receiver: Receiver) -> None:
        """Start from now: the store's latest gid and the streams' tails (if Redis answers;
        if not, it is retried in the background while the store is read instead)."""
        if self._reader is not None:
            return
        self._closing = False
        self._client = redis.Redis.from_url(
            self.url, protocol=2, decode_responses=False, socket_connect_timeout=2,
            socket_timeout=self.block + 3, retry=Retry(NoBackoff(), 1),
            client_name=f"hitl-news-{self.origin}")
        try:
            await self._find_tails()
        except (RedisError, OSError) as exc:
            self._went_down(exc)
        else:
            self._up.set()
        try:
            self.last_gid = await self._latest_gid()
        except BaseException:
            client, self._client = self._client, None
            await client.aclose()
            raise
        self._checked = time.monotonic()
        self._receiver = receiver
        self._reader = asyncio.create_task(self._read_forever(), name="hitl-redis-reader")
        self._sender = asyncio.create_task(self._send_forever(), name="hitl-redis-sender")

    async def disconnect(self) -> None:
        """Send what is queued (for a second at most, if Redis answers), then stop and
        close the connections; safe to call twice."""
        if self._sender is not None and not self._down and self._outbox:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), 1.0)
        tasks = {task for task in (self._reader, self._sender) if task is not None}
        self._reader = self._sender = None
        self._receiver = None
        self._closing = True
        self._wake.set()
        self._up.set()
        # redis-py can swallow a cancellation that lands inside a command (redis-py
        # #2028, #2551): each task also stops on seeing _closing, and is cancelled again.
        for _ in range(10):
            if not tasks:
                break
            for task in tasks:
                task.cancel()
            _, tasks = await asyncio.wait(tasks, timeout=0.5)
        if tasks:
            log.warning("redis news: %d task(s) would not stop", len(tasks))
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def publish(self, topic: str, message: Message) -> None:
        """A raw message (tests only): to this process's watchers alone."""
        if self._receiver is not None:
            self._receiver.deliver(topic, message)

    def publish_event(self, event: TaskEvent) -> None:
        """A committed change: queued for every process, and handed to this one's broker
        at once if it is the next one (its copy from Redis is then skipped)."""
        self._queue(self.messages_key, {
            "gid": str(event.gid), "task_id": event.task_id, "seq": str(event.seq),
            "status": event.status, "data": event.data,
            "submitted_by": event.submitted_by or ""})
        if self._receiver is not None and event.gid == self.last_gid + 1:
            self._deliver(event)

    def signal(self, topic: str, message: Message) -> None:
        """A hint to the watchers of a topic, here at once and on every other process."""
        self._queue(self.signals_key, {
            "kind": "hint", "name": topic, "id": str(message.id), "task_id": message.task_id,
            "status": message.status, "data": message.data, "frame": message.frame,
            "submitted_by": message.submitted_by or "", "origin": self.origin})
        if self._receiver is not None:
            self._guard(self._receiver.hint, topic, message)

    def notify(self, kind: str, text: str) -> None:
        """A notice to the parts listening for ``kind``, here at once and everywhere."""
        self._queue(self.signals_key, {"kind": "notice", "name": kind, "text": text,
                                       "origin": self.origin})
        if self._receiver is not None:
            self._guard(self._receiver.notice, kind, text)

    # What a test may look at.

    @property
    def queued(self) -> int:
        """Entries waiting for the sender."""
        return len(self._outbox)

    @property
    def down(self) -> bool:
        """Whether Redis is taken to be unreachable (the store is read every down_poll)."""
        return self._down

    # Sending.

    def _queue(self, key: str, fields: dict[str, str | bytes]) -> None:
        if len(self._outbox) == self._outbox.maxlen:
            self.dropped += 1  # the deque lets the oldest go
            if not self._dropping:
                self._dropping = True
                log.warning("redis news: %d entries queued, dropping the oldest until Redis "
                            "takes them (other processes read those changes from the store)",
                            len(self._outbox))
        self._outbox.append((key, fields))
        self._drained.clear()
        self._wake.set()

    async def _send_forever(self) -> None:
        while not self._closing:
            try:
                await self._send_queued()
            except Exception:  # a bug of ours: log it, keep sending
                log.exception("redis news: the sender failed; going on in a second")
                await asyncio.sleep(1.0)

    async def _send_queued(self) -> None:
        """XADD what has piled up, in order, one pipeline at a time; while Redis is away,
        keep it (bounded) and wait for the reader to find Redis back."""
        while not self._closing:
            if not self._outbox:
                self._dropping = False
                self._drained.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self._up.is_set():
                await self._up.wait()
                continue
            batch = [self._outbox.popleft() for _ in range(min(len(self._outbox), SEND_BATCH))]
            try:
                await self._send(batch)
            except _UNREACHABLE as exc:
                self._requeue(batch)
                if not self._closing:
                    self._went_down(exc)
            except RedisError as exc:  # refused (not a connection matter): drop, go on
                log.error("redis news: XADD refused, %d entries dropped: %s", len(batch), exc)
                await asyncio.sleep(1.0)
            else:
                self.sent += len(batch)

    async def _send(self, batch: list[tuple[str, dict[str, str | bytes]]]) -> None:
        assert self._client is not None
        pipe = self._client.pipeline(transaction=False)
        for key, fields in batch:
            maxlen = MESSAGES_MAXLEN if key == self.messages_key else SIGNALS_MAXLEN
            pipe.xadd(key, fields, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
        await pipe.execute()

    def _requeue(self, batch: list[tuple[str, dict[str, str | bytes]]]) -> None:
        """Put back a batch that was not sent, in front; the oldest go past the bound."""
        keep = self._outbox.maxlen
        if keep is not None:
            self.dropped += max(0, len(batch) + len(self._outbox) - keep)
        self._outbox = deque([*batch, *self._outbox], maxlen=keep)

    # Reading.

    async def _find_tails(self) -> None:
        """Read each stream from its last entry now: what came before is in the store
        (committed before it was published), and a stream that Redis lost on a restart
        starts again from nothing ("0-0"), whatever id was read before."""
        assert self._client is not None
        for key in (self.messages_key, self.signals_key):
            last: Any = await self._client.xrevrange(key, count=1)
            self._ids[key] = last[0][0] if last else b"0-0"

    async def _read_forever(self) -> None:
        while not self._closing:
            try:
                await self._read()
            except Exception:  # a bug of ours: log it, keep the news flowing
                log.exception("redis news: the reader failed; going on in a second")
                await asyncio.sleep(1.0)

    async def _read(self) -> None:
        while not self._closing:
            if self._down:
                await self._reconnect()
                continue
            try:
                assert self._client is not None
                streams: dict[Any, Any] = dict(self._ids)
                reply: Any = await self._client.xread(
                    streams, count=READ_COUNT, block=max(1, int(self.block * 1000)))
            except (RedisError, OSError) as exc:
                if not self._closing:
                    self._went_down(exc)
                continue
            for key, entries in reply or ():
                name = key.decode() if isinstance(key, bytes) else str(key)
                for entry_id, fields in entries:
                    self._ids[name] = entry_id
                    if name == self.messages_key:
                        await self._take(fields)
                    else:
                        self._take_signal(fields)
            if time.monotonic() - self._checked >= self.idle_poll:
                await self._check_store()

    async def _reconnect(self) -> None:
        """While Redis is down: read the store every ``down_poll`` and retry Redis with a
        backoff; return once it answers (and the store was read again)."""
        backoff = 0.1
        while not self._closing:
            retry_at = time.monotonic() + backoff
            backoff = min(backoff * 2, self.retry_cap)
            while (left := retry_at - time.monotonic()) > 0:
                if time.monotonic() - self._checked >= self.down_poll:
                    await self._check_store()
                await asyncio.sleep(min(left, self.down_poll))
            try:
                await self._find_tails()
            except (RedisError, OSError):
                continue
            self._came_back()
            await self._check_store()
            return

    async def _take(self, fields: dict[bytes, bytes]) -> None:
        try:
            event = TaskEvent(fields[b"task_id"].decode(), int(fields[b"seq"]),
                              int(fields[b"gid"]), fields[b"status"].decode(),
                              fields[b"data"].decode(), fields[b"submitted_by"].decode() or None)
        except (KeyError, ValueError) as exc:  # not ours: its change, if any, is in the store
            log.warning("redis news: an entry of %s is not a change (%r), skipped",
                        self.messages_key, exc)
            return
        if event.gid > self.last_gid + 1 and not await self._fill(event.gid - 1):
            return  # the store failed: this one comes with the rest once it answers
        if event.gid > self.last_gid:
            self._deliver(event)
        else:  # delivered already: this process's own, or read from the store
            self.duplicates += 1

    def _take_signal(self, fields: dict[bytes, bytes]) -> None:
        if self._receiver is None or fields.get(b"origin", b"").decode() == self.origin:
            return  # ours: delivered here when it was sent
        try:
            kind, name = fields[b"kind"], fields[b"name"].decode()
            if kind == b"hint":
                message = Message(int(fields[b"id"]), fields[b"task_id"].decode(),
                                  fields[b"status"].decode(), fields[b"data"].decode(),
                                  fields[b"frame"], fields[b"submitted_by"].decode() or None)
                self._guard(self._receiver.hint, name, message)
            elif kind == b"notice":
                self._guard(self._receiver.notice, name, fields[b"text"].decode())
        except (KeyError, ValueError) as exc:
            log.warning("redis news: an entry of %s is not a signal (%r), skipped",
                        self.signals_key, exc)

    async def _check_store(self) -> None:
        """Catch up with the store if it has changes after the last one delivered."""
        self._checked = time.monotonic()
        try:
            latest = await self._latest_gid()
        except Exception as exc:  # the store is down too: try again next time
            self._store_failed(exc)
            return
        if latest > self.last_gid:
            await self._fill(latest)

    async def _fill(self, target: int) -> bool:
        """Deliver the store's changes after the last delivered, in order, up to at least
        ``target`` (or as far as the store has: what it no longer has is gone); False if
        the store could not be read."""
        while self.last_gid < target:
            try:
                page = await self._events_after(self.last_gid,
                                                min(PAGE, target - self.last_gid))
            except Exception as exc:
                self._store_failed(exc)
                return False
            if not page:
                break
            for event in page:  # this process may have delivered some meanwhile
                if event.gid > self.last_gid:
                    self.filled += 1
                    self._deliver(event)
        self._checked = time.monotonic()
        if self._store_failing:
            self._store_failing = False
            log.info("redis news: the store answers again")
        return True

    def _deliver(self, event: TaskEvent) -> None:
        self.last_gid = event.gid
        self.delivered += 1
        self._checked = time.monotonic()  # news flows: no need to ask the store yet
        if self._receiver is not None:
            self._guard(self._receiver.receive, event)

    # State and errors.

    def _went_down(self, exc: BaseException) -> None:
        self._up.clear()
        if not self._down:
            self._down = True
            log.warning("redis news: Redis unreachable (%s: %s); reading changes from the "
                        "store every %.1f s until it is back", type(exc).__name__, exc,
                        self.down_poll)

    def _came_back(self) -> None:
        if self._down:
            self._down = False
            log.info("redis news: Redis answers again; %d entries queued to send",
                     len(self._outbox))
        self._up.set()

    def _store_failed(self, exc: Exception) -> None:
        if not self._store_failing:
            self._store_failing = True
            log.warning("redis news: cannot read the store to catch up (%s: %s); trying again",
                        type(exc).__name__, exc)

    @staticmethod
    def _guard(call: Callable[..., None], *args: Any) -> None:
        """Hand news to the receiver; a failing listener is logged, never fatal here."""
        try:
            call(*args)
        except Exception:
            log.exception("redis news: the receiver failed on %s", call.__name__)
