"""The browser UI's streams: named SSE events carrying HTML fragments for htmx to swap in.

Each event is rendered from the same partial template the full page includes, so no
markup is written twice. A message's fragments are rendered once, however many pages
watch (:class:`FragmentCache`). htmx's SSE extension reconnects with a *new*
EventSource, which sends no ``Last-Event-ID``; so every connection starts with the
current state, and a finished task's stream ends with a ``close`` event the page's
``sse-close`` attribute acts on. The JSON API streams (:mod:`hitl.streams`) are apart.

A stream carries only what its reader may see: a task's stream is opened only to those
who may see the task, and the dashboard's skips other people's tasks for a submitter,
by the submitter each message carries (no query per message).
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar, cast

from quart import Quart, render_template

from . import policy
from .accounts import Identity
from .broker import GLOBAL, HEARTBEAT, Broker
from .models import Message, Status, Task, sse_frame
from .runner import Runner
from .streams import RETRY_MS

T = TypeVar("T")

RETRY = f"retry: {RETRY_MS}\n\n".encode()
CLOSE = sse_frame("closed", event="close")  # matches sse-close="close" on the task page


def frame(event: str, html: str) -> bytes:
    """One named event. Line ends are made ``\\n``: a lone CR would end an SSE line early."""
    return sse_frame(html.replace("\r\n", "\n").replace("\r", "\n").strip(), event=event)


def is_progress_tick(message: Message) -> bool:
    """A progress report within an attempt: only the status region changes.

    Cheap on purpose (no JSON parsing per watcher): the payload is compact JSON, and only
    progress reports carry the ``partial_output`` key.
    """
    return message.status == Status.RUNNING and '"partial_output":' in message.data


class FragmentCache:
    """Rendered frames by message id, shared by every watcher: one render per message.

    The first watcher to reach a message starts its render as a task; the others await
    the same task (shielded, so one watcher leaving does not cancel it for the rest).
    Old entries are evicted: a watcher that far behind renders again, still correctly.
    """

    def __init__(self, size: int = 512) -> None:
        self.size = size
        self.renders = 0
        self._entries: OrderedDict[Hashable, asyncio.Future[Any]] = OrderedDict()

    def init_app(self, app: Quart) -> None:
        app.extensions["fragments"] = self

    async def get(self, key: Hashable, render: Callable[[], Awaitable[T]]) -> T:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = asyncio.ensure_future(render())
            self.renders += 1
            if len(self._entries) > self.size:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        return cast(T, await asyncio.shield(entry))


def progress_of(task: Task, message: Message) -> dict[str, Any] | None:
    """The progress a running attempt last reported, if ``message`` is that report."""
    if task.status is not Status.RUNNING or message.status != Status.RUNNING:
        return None
    data: dict[str, Any] = json.loads(message.data)
    return data if data.get("attempt") == task.attempt else None


def snapshot(task: Task) -> Task:
    """A copy to render from: a live task's record keeps changing under its flow."""
    return replace(task, reviews=list(task.reviews))


@dataclass(frozen=True, slots=True)
class Standing:
    """How a task's regions differ by who watches: whether they may decide (the policy's
    answer, with its reason), and whether they type their name (sign-in off). Templates
    are given this, never the identity: so a render is shared by all with one standing."""

    verdict: policy.Decision
    ask_name: bool

    @classmethod
    def of(cls, identity: Identity, task: Task) -> Standing:
        return cls(policy.can_decide(identity, task), policy.signed_out(identity))


async def render_task_message(runner: Runner, message: Message, full: bool,
                              standing: Standing, by: Identity) -> bytes:
    """The task page's regions after ``message``; ``full`` adds more than the status."""
    task = snapshot(await runner.get_task(message.task_id, by=by))
    progress = progress_of(task, message)
    parts = [frame("status", await render_template("_task_status.html", task=task,
                                                   progress=progress))]
    if full:
        for region in ("review", "history", "result"):
            parts.append(frame(region, await render_template(f"_task_{region}.html", task=task,
                                                             standing=standing)))
    if message.terminal:
        parts.append(CLOSE)
    return b"".join(parts)


async def task_events(runner: Runner, broker: Broker, cache: FragmentCache,
                      task: Task, by: Identity) -> AsyncIterator[bytes]:
    """A task page's stream (``task`` is one ``by`` may see): its current state, then each
    change, then ``close``.

    Subscribing from the message before the last one replays that last message, which
    renders the current state (with the progress it reported, if running).
    """
    yield RETRY
    first = True
    standing = Standing.of(by, task)  # who submitted it and who may decide never change
    async with broker.subscribe(task.task_id, max(task.last_seq - 1, 0)) as subscription:
        async for message in subscription:
            if message is HEARTBEAT:
                yield message.frame
                continue
            full = first or not is_progress_tick(message)
            key = ("task", task.task_id, message.id, full, standing)
            yield await cache.get(key, partial(render_task_message, runner, message, full,
                                               standing, by))
            first = False
            if message.terminal:
                return


@dataclass(frozen=True, slots=True)
class Row:
    """One dashboard row after a message, framed for each way a page may need it."""

    task_id: str
    status: Status
    update: bytes  # replaces the row already on the page
    new: bytes  # inserted at the top of the table
    remove: bytes  # an empty outerHTML swap: the row leaves a filtered view


async def render_row(runner: Runner, message: Message) -> Row | None:
    """The task's row as it is now, from its excerpts; None once deleted (retention)."""
    task = await runner.task_row(message.task_id)
    if task is None:
        return None
    html = await render_template("_task_row.html", task=task)
    return Row(task.task_id, task.status, frame(f"task-{task.task_id}", html),
               frame("task-new", html), frame(f"task-{task.task_id}", ""))


def place(row: Row, message: Message, shown: set[str], wanted: Status | None) -> bytes:
    """Update a row on the page, add a new (or newly matching) one, or drop one.

    A row shows the task as it is now, maybe a step past ``message``: whether the task
    is new is the message's to say (its first status), whether it matches a filter the row's.
    """
    if row.task_id in shown:
        if wanted is None or row.status is wanted:
            return row.update
        shown.discard(row.task_id)
        return row.remove
    joins = row.status is wanted if wanted else message.status == Status.PENDING
    if joins:
        shown.add(row.task_id)
        return row.new
    return b""


async def render_rows(runner: Runner, wanted: Status | None, limit: int, shown: set[str],
                      by: Identity) -> bytes:
    """The table's rows now; ``shown`` gets their ids, all a watcher keeps of them."""
    tasks, _ = await runner.list_tasks(wanted, limit, 0, by=by)
    shown.update(task.task_id for task in tasks)
    return frame("rows", await render_template("_task_rows.html", tasks=tasks))


async def render_counts(runner: Runner, wanted: Status | None, by: Identity) -> bytes:
    counts = await runner.status_counts(by=by)
    return frame("counts", await render_template("_counts.html", counts=counts, wanted=wanted))


async def dashboard_events(runner: Runner, broker: Broker, cache: FragmentCache,
                           wanted: Status | None, limit: int, by: Identity,
                           owner: str | None) -> AsyncIterator[bytes]:
    """The dashboard's one stream: the table and counts now, then each row as it changes;
    with an ``owner`` (:meth:`Runner.watch_scope`), of that user's tasks only.

    Counts are re-rendered only once this watcher has caught up, so a burst of messages
    costs one count query, not one per message.
    """
    yield RETRY
    async with broker.subscribe(GLOBAL) as subscription:
        shown: set[str] = set()
        yield await render_rows(runner, wanted, limit, shown, by)
        yield await render_counts(runner, wanted, by)
        counts_stale = False
        async for message in subscription:
            if message is HEARTBEAT:
                yield message.frame
                continue
            if owner is not None and message.submitted_by != owner:
                continue  # another's task: not this reader's to see
            if not is_progress_tick(message):  # progress shows on the task page only
                row = await cache.get(("row", message.id), partial(render_row, runner, message))
                update = place(row, message, shown, wanted) if row is not None else b""
                if update:
                    yield update
                counts_stale = True
            if counts_stale and not subscription.ready():  # caught up: counts now
                yield await cache.get(("counts", message.id, wanted, owner),
                                      partial(render_counts, runner, wanted, by))
                counts_stale = False
