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
from .broker import GLOBAL, HEARTBEAT, RESET, Broker
from .diffs import WordDiff, attempt_views, word_diff
from .models import Message, Review, Status, Task, sse_frame
from .queue import SIGNAL
from .runner import Runner
from .store import View
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
    return replace(task, reviews=list(task.reviews), attempts=list(task.attempts))


@dataclass(frozen=True, slots=True)
class Standing:
    """How a task's regions differ by who watches: whether they may decide and cancel (the
    policy's answers, with their reasons), and whether they type their name (sign-in off). Templates
    are given this, never the identity: so a render is shared by all with one standing."""

    verdict: policy.Decision
    cancel: policy.Decision
    ask_name: bool
    voter: str | None = None  # with quorum above 1: who watches, to show them their vote

    @classmethod
    def of(cls, identity: Identity, task: Task) -> Standing:
        signed_out = policy.signed_out(identity)
        voter = identity.name if task.quorum > 1 and not signed_out else None
        return cls(policy.can_decide(identity, task), policy.can_cancel(identity, task),
                   signed_out, voter)


async def task_view(runner: Runner, task: Task, standing: Standing) -> dict[str, Any]:
    """What the task page's regions render from: the task and its attempts compared, and
    the watcher's standing.

    The word diffs of long outputs take a while, so they are made in a worker thread.
    """
    task = snapshot(task)
    attempts, edit = await asyncio.to_thread(lambda: (attempt_views(task), edit_view(task)))
    return {"task": task, "attempts": attempts, "edit": edit,
            "max_attempts": task.attempts_allowed(runner.config.max_attempts),
            "standing": standing}


@dataclass(frozen=True, slots=True)
class EditView:
    """The edit a reviewer approved in place of the processor's output (quorum 1)."""

    review: Review
    diff: WordDiff


def edit_view(task: Task) -> EditView | None:
    """A completed task's final result when it was an edit, compared with the output."""
    last = task.reviews[-1] if task.reviews else None
    if (task.status is not Status.COMPLETED or last is None or last.edited_output is None
            or last.decision != "approved" or task.processed_output is None):
        return None
    return EditView(last, word_diff(task.processed_output, last.edited_output))


async def render_task_message(runner: Runner, message: Message, full: bool,
                              standing: Standing, by: Identity) -> bytes:
    """The task page's regions after ``message``; ``full`` adds more than the status."""
    task = snapshot(await runner.get_task(message.task_id, by=by))
    progress = progress_of(task, message)
    parts = [frame("status", await render_template("_task_status.html", task=task,
                                                   progress=progress))]
    if full:
        view = await task_view(runner, task, standing)
        for region in ("review", "history", "result"):
            parts.append(frame(region, await render_template(f"_task_{region}.html", **view)))
    if message.terminal:
        parts.append(CLOSE)
    return b"".join(parts)


async def render_review(runner: Runner, message: Message, standing: Standing,
                        by: Identity) -> bytes:
    """The task page's review region as stored now (its reservations changed)."""
    task = await runner.get_task(message.task_id, by=by)
    view = await task_view(runner, task, standing)
    return frame("review", await render_template("_task_review.html", **view))


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
            if message.status == SIGNAL:  # a reservation changed: the review region anew
                yield await cache.get(("review", message.data, standing),
                                      partial(render_review, runner, message, standing, by))
                continue
            full = first or not is_progress_tick(message)
            key = ("task", task.task_id, message.id, full, standing)
            yield await cache.get(key, partial(render_task_message, runner, message, full,
                                               standing, by))
            first = False
            if message.terminal:
                return


CATCH_UP = 200  # changed rows a dashboard stream sends on (re)connecting, at most


async def render_row(runner: Runner, task_id: str) -> bytes | None:
    """The task's row as it is now, framed to replace its row on any page showing it (a
    page ignores the rows it does not show); None once deleted (retention)."""
    task = await runner.task_row(task_id)
    if task is None:
        return None
    return frame(f"task-{task.task_id}", await render_template("_task_row.html", task=task))


def joins(view: View, status: str, submitted: bool) -> bool:
    """Whether a task is new work for ``view``: just submitted, for every task's view;
    come into the status, for one status's. A search announces none: it lists what
    matched when it was made (its rows are still kept up to date)."""
    if view.search:
        return False
    return status == view.status if view.status else submitted


def announce(task_id: str) -> bytes:
    """New work for a page: it counts it in its "new tasks" bar, never moves a row for it."""
    return frame("task-new", task_id)


async def render_counts(runner: Runner, view: View, by: Identity) -> bytes:
    counts = await runner.status_counts(by=by)
    return frame("counts", await render_template("_counts.html", counts=counts,
                                                 wanted=view.status))


async def catch_up(runner: Runner, view: View, since: int, by: Identity
                   ) -> AsyncIterator[bytes]:
    """The rows changed since the page was read, and the new work among them: a page
    stays true across the moment before its stream connects, and across reconnects."""
    changes = await runner.changes_since(since, CATCH_UP + 1, by=by)
    for task, submitted in changes[:CATCH_UP]:
        yield frame(f"task-{task.task_id}", await render_template("_task_row.html", task=task))
        if joins(view, task.status, submitted):
            yield announce(task.task_id)
    if len(changes) > CATCH_UP:
        yield frame("stale", await render_template("_stale.html"))


async def dashboard_events(runner: Runner, broker: Broker, cache: FragmentCache,
                           view: View, since: int | None, by: Identity
                           ) -> AsyncIterator[bytes]:
    """The dashboard's one stream: what changed since its page (``since``), the counts,
    then each task's row as it changes, rows in place and new work only announced; of the
    tasks ``by`` may see (a submitter: their own, by :meth:`Runner.watch_scope`).

    Each row is rendered once per message for every watcher, and sent to all: a page
    keeps the rows it loaded ("Load more") up to date without telling the server which.
    Counts are re-rendered only once this watcher has caught up, so a burst of messages
    costs one count query, not one per message.
    """
    owner = runner.watch_scope(by)
    yield RETRY
    async with broker.subscribe(GLOBAL) as subscription:  # first: no change in between
        if since is not None:
            async for update in catch_up(runner, view, since, by):
                yield update
        yield await render_counts(runner, view, by)
        counts_stale = False
        async for message in subscription:
            if message is HEARTBEAT:
                yield message.frame
                continue
            if owner is not None and message.status != RESET and message.submitted_by != owner:
                continue  # another's task: not this reader's to see
            if message.status == RESET:  # messages were missed: the page must read anew
                yield frame("stale", await render_template("_stale.html"))
                counts_stale = True
            elif message.status == SIGNAL:  # a reservation changed: the row anew
                row = await cache.get(("row", message.data),
                                      partial(render_row, runner, message.task_id))
                if row is not None:
                    yield row
            elif not is_progress_tick(message):  # progress shows on the task page only
                row = await cache.get(("row", message.id),
                                      partial(render_row, runner, message.task_id))
                if row is not None:
                    submitted = message.status == Status.PENDING  # a task's first message
                    yield row + (announce(message.task_id)
                                 if joins(view, message.status, submitted) else b"")
                counts_stale = True
            if counts_stale and not subscription.ready():  # caught up: counts now
                yield await cache.get(("counts", message.id, view.status, owner),
                                      partial(render_counts, runner, view, by))
                counts_stale = False
