"""The webhook worker: moves each endpoint's cursor along the stored message log.

One asyncio task per endpoint, each with its own HTTP client, delivers that endpoint's
events one at a time, in the log's order: a slow or failing endpoint holds up only
itself, and the service never waits for any of them. A failed delivery is tried again
after an exponential, jittered wait (``--webhook-first-retry`` doubling up to
``--webhook-max-backoff``) for ``--webhook-retry-for`` seconds, then skipped and logged.

Where each endpoint stands (its cursor, the event it is retrying, how often, when next)
is stored, so a restart, or a crash, goes on where it left off: an event is sent at
least once (a crash between a receiver's 2xx and the cursor's UPDATE sends it again,
with the same ``webhook-id``). The journal wakes the workers after each commit; they
also look every ``--webhook-poll`` seconds, which is how endpoints added with the CLI,
or events stored by another process, are found.

On a shared store (several processes) every event is still delivered once, not once per
process: each endpoint is delivered to by one process at a time, its holder, under a
lease kept in its row (``holder``, ``holder_until``) that the holder renews every third
of ``--flow-lease``. The others' workers for it wait, trying every ``--webhook-poll``
seconds to take it, which succeeds once the lease lapses (its holder died) or is let go
(its holder stopped). Every move of the cursor is conditional on still holding it, and a
holder that lost its lease stops before its next try, so the one that took over goes on
from the stored cursor: an event is sent at least once, as after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import time
import uuid
from dataclasses import replace

import httpx
from quart import Quart

from . import logs, metrics
from .config import Config
from .journal import Journal
from .lifecycle import attach
from .models import TaskEvent, iso
from .store import Store
from .webhooks import AttemptRecord, Endpoint, Pending, Webhooks, secret_key, sign

log = logging.getLogger(__name__)

BATCH = 200  # messages read at a time (a few columns each, never a whole output)
STORE_EVERY = (20, 0.1)  # deliveries, seconds: how often a moving cursor is stored
JITTER = (0.8, 1.2)
MAX_REPLY = 64 * 1024  # bytes of a reply read, so that its connection can be kept


class Dispatcher:
    """Starts a worker per endpoint, stops those removed, wakes them on commits."""

    def __init__(self, config: Config, store: Store, journal: Journal) -> None:
        self.config = config
        self.webhooks = Webhooks(store)
        self.journal = journal
        self.base_url = (config.public_url or _own_url(config)).rstrip("/")
        self.shared = store.shared
        # This process, as an endpoint's holder (None: one process, which holds them all).
        self.me = (f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
                   if self.shared else None)
        self.lease = config.flow_lease
        self._held: set[str] = set()  # endpoints this process holds (a shared store)
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._wakers: dict[str, asyncio.Event] = {}
        self._supervisor: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None

    @property
    def poll(self) -> float:
        return max(self.config.webhook_poll, 0.05)

    def init_app(self, app: Quart) -> None:
        attach(app, "webhooks", self, self.start, self.close)

    async def start(self) -> None:
        self.journal.listeners.append(self.wake)
        if self.shared:  # and after each commit of another process, as its news comes
            self.journal.broker.listeners.append(self._changed)
        await self.sync()
        self._supervisor = asyncio.create_task(self._look_every_poll(), name="hitl-webhooks")
        if self.shared:
            self._renewer = asyncio.create_task(self._renew_every_third(),
                                                name="hitl-webhook-leases")

    async def close(self) -> None:
        """Stop every worker; an attempt cut short is made again after a restart."""
        with contextlib.suppress(ValueError):
            self.journal.listeners.remove(self.wake)
        with contextlib.suppress(ValueError):
            self.journal.broker.listeners.remove(self._changed)
        jobs = [job for job in (self._supervisor, self._renewer, *self._workers.values())
                if job is not None]
        for job in jobs:
            job.cancel()
        for job in jobs:
            with contextlib.suppress(asyncio.CancelledError):
                await job
        self._supervisor = self._renewer = None
        self._workers.clear()
        self._wakers.clear()
        if self.me is not None and self._held:  # another process may go on at once
            self._held.clear()
            try:
                await self.webhooks.let_go(self.me)
            except Exception:  # the store failing: the leases lapse instead
                log.exception("cannot let the webhook endpoints go")

    def wake(self) -> None:
        """New messages are stored: each worker looks (cheap: it sets an Event)."""
        for waker in self._wakers.values():
            waker.set()

    def _changed(self, event: TaskEvent) -> None:
        self.wake()

    async def sync(self) -> None:
        """Start a worker for each stored endpoint that has none; stop those removed."""
        ids = {endpoint.id for endpoint in await self.webhooks.endpoints()}
        for endpoint_id in ids - self._workers.keys():
            waker = self._wakers[endpoint_id] = asyncio.Event()
            self._workers[endpoint_id] = asyncio.create_task(
                self._work(endpoint_id, waker), name=f"hitl-webhook-{endpoint_id}")
        for endpoint_id in self._workers.keys() - ids:
            self._workers.pop(endpoint_id).cancel()
            self._wakers.pop(endpoint_id, None)

    async def _look_every_poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll)
            try:
                await self.sync()
            except Exception:  # the store is failing: look again later
                log.exception("cannot read the webhook endpoints")

    async def _renew_every_third(self) -> None:
        """Keep this process's endpoints while it lives (a shared store)."""
        assert self.me is not None
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                self._held = await self.webhooks.renew(self.me, self.lease)
            except Exception:  # the store failing: the cursor's conditions still hold
                log.exception("cannot renew the webhook leases")

    def holds(self, endpoint_id: str) -> bool:
        """Whether this process delivers to the endpoint now (always, with one process)."""
        return self.me is None or endpoint_id in self._held

    async def _hold(self, endpoint_id: str) -> bool:
        """Hold the endpoint, taking it if it is free or its holder's lease lapsed."""
        if self.holds(endpoint_id):
            return True
        assert self.me is not None
        if await self.webhooks.hold(endpoint_id, self.me, self.lease):
            self._held.add(endpoint_id)
            return True
        return False

    async def _work(self, endpoint_id: str, waker: asyncio.Event) -> None:
        async with httpx.AsyncClient(follow_redirects=False,
                                     headers={"user-agent": "hitl-webhooks"}) as http:
            while True:
                try:
                    await self._deliver_all(endpoint_id, waker, http)
                    break  # the endpoint was removed
                except Exception:  # the store failing, or a bug: never stop for good
                    log.exception("webhook %s: delivery stopped; trying again", endpoint_id)
                    await asyncio.sleep(self.poll)
        self._workers.pop(endpoint_id, None)
        self._wakers.pop(endpoint_id, None)
        self._held.discard(endpoint_id)

    async def _deliver_all(self, endpoint_id: str, waker: asyncio.Event,
                           http: httpx.AsyncClient) -> None:
        """Deliver the endpoint's events as they are stored, until it is removed."""
        while True:
            waker.clear()  # first: a commit from now on wakes the wait below
            endpoint = await self.webhooks.get(endpoint_id)
            if endpoint is None:
                return
            if not await self._hold(endpoint_id):  # another process delivers to it
                await asyncio.sleep(self.poll)
                continue
            horizon = await self.webhooks.horizon()
            if horizon <= endpoint.cursor:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll):
                        await waker.wait()
                continue
            batch = await self.webhooks.pending(endpoint.cursor, horizon, BATCH)
            progress = Progress(self.webhooks, endpoint, self.me)
            for item in batch:
                if item.type is None or not endpoint.wants(item.type):
                    continue  # passed over: the cursor moves past it with the next one
                if not await self._deliver(progress, item, http):
                    break  # the cursor moved meanwhile (another process): read it again
            else:
                await progress.store(horizon if len(batch) < BATCH else batch[-1].gid)

    async def _deliver(self, progress: Progress, item: Pending,
                       http: httpx.AsyncClient) -> bool:
        """Send one event until it is taken or has been retried for too long; False if the
        endpoint's cursor had moved meanwhile."""
        assert item.type is not None
        endpoint = progress.endpoint
        message_id = f"msg_{endpoint.id.removeprefix('wh_')}_{item.gid}"
        tries, since = 0, time.time()
        if endpoint.retry_gid == item.gid:  # retrying it before a restart: go on
            tries, since = endpoint.retry_tries, endpoint.retry_since or since
            if endpoint.next_retry is not None:
                await asyncio.sleep(max(0.0, endpoint.next_retry - time.time()))
        body = self.body(item, since)
        key = secret_key(endpoint.secret)
        give_up = since + self.config.webhook_retry_for
        while True:
            if not self.holds(endpoint.id):  # taken over: the new holder sends it
                return False
            tries += 1
            status, error = await self._post(http, endpoint.url, key, message_id, body)
            now = time.time()
            if error is None:
                metrics.webhook_delivered()
                return await progress.reached(item.gid, AttemptRecord(
                    message_id, item.gid, item.type, tries, now, status, None, "delivered",
                    None))
            metrics.webhook_failed()
            if now >= give_up:
                log.warning("webhook %s: gave up on %s (%s) after %d tries: %s",
                            endpoint.id, message_id, item.type, tries, error,
                            extra=logs.task(item.task_id))
                metrics.webhook_skipped()
                record = AttemptRecord(message_id, item.gid, item.type, tries, now, status,
                                       error, "skipped", None)
                return await progress.reached(item.gid, record) and await progress.store()
            wait = min(self.config.webhook_first_retry * 2 ** min(tries - 1, 60)
                       * random.uniform(*JITTER), self.config.webhook_max_backoff)
            next_at = min(now + wait, give_up)
            record = AttemptRecord(message_id, item.gid, item.type, tries, now, status, error,
                                   "failed", next_at)
            if not await progress.store() or not await self.webhooks.retrying(
                    progress.endpoint, record, since, holder=self.me):
                return False
            await asyncio.sleep(max(0.0, next_at - time.time()))

    async def _post(self, http: httpx.AsyncClient, url: str, key: bytes, message_id: str,
                    body: bytes) -> tuple[int | None, str | None]:
        """One signed POST: its status code and, unless a 2xx, what went wrong. The reply's
        body is read and dropped (a receiver cannot make hitl hold a large one)."""
        timestamp = int(time.time())
        headers = {"content-type": "application/json", "webhook-id": message_id,
                   "webhook-timestamp": str(timestamp),
                   "webhook-signature": sign(key, message_id, timestamp, body)}
        timeout = self.config.webhook_timeout
        try:
            async with asyncio.timeout(timeout):
                async with http.stream("POST", url, content=body, headers=headers,
                                       timeout=timeout) as response:
                    status = response.status_code
                    read = 0  # to its end, so its connection is kept, but never much of it
                    async for chunk in response.aiter_raw():
                        read += len(chunk)
                        if read > MAX_REPLY:
                            break
        except TimeoutError:
            return None, f"no answer within {timeout:g} s"
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return None, f"{type(exc).__name__}: {exc}"[:300] if str(exc) else type(exc).__name__
        if 200 <= status < 300:
            return status, None
        return status, f"HTTP {status}"

    def body(self, item: Pending, since: float) -> bytes:
        """The event's JSON: the same on every retry (its timestamp is the first try's)."""
        assert item.type is not None
        return json.dumps({
            "type": item.type, "timestamp": iso(since),
            "data": {"task_id": item.task_id, "status": item.status, "attempt": item.attempt,
                     "title": item.title, "metadata": item.metadata,
                     "url": f"{self.base_url}/tasks/{item.task_id}"},
        }, separators=(",", ":"), ensure_ascii=False).encode()


def _own_url(config: Config) -> str:
    host = f"[{config.host}]" if ":" in config.host else config.host
    return f"http://{host}:{config.port}"


class Progress:
    """Where one endpoint's worker has got to, stored every few deliveries (one commit
    for many under load): a crash sends again at most those since the last store."""

    def __init__(self, webhooks: Webhooks, endpoint: Endpoint,
                 holder: str | None = None) -> None:
        self.webhooks = webhooks
        self.endpoint = endpoint  # as stored
        self.holder = holder  # the process delivering (a shared store), whose lease it needs
        self.cursor = endpoint.cursor  # delivered up to here
        self.records: list[AttemptRecord] = []
        self.since = time.monotonic()

    async def reached(self, gid: int, record: AttemptRecord) -> bool:
        self.cursor = gid
        self.records.append(record)
        count, seconds = STORE_EVERY
        if len(self.records) >= count or time.monotonic() - self.since >= seconds:
            return await self.store()
        return True

    async def store(self, to: int | None = None) -> bool:
        """Store the cursor (moved on to ``to``, past messages that are not events, if
        given); False if it had moved meanwhile, elsewhere."""
        cursor = max(self.cursor, to or 0)
        if cursor > self.endpoint.cursor:
            if not await self.webhooks.advance(self.endpoint, cursor, self.records,
                                               holder=self.holder):
                return False
            self.endpoint = replace(self.endpoint, cursor=cursor, retry_gid=None,
                                    retry_since=None, retry_tries=0, next_retry=None)
        self.cursor, self.records, self.since = cursor, [], time.monotonic()
        return True
