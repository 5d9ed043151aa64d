"""Write first, then publish: every state change is committed before anyone sees it.

Changes go through one queue to a single writer, which commits whatever has piled up in
one transaction and then publishes the batch in order: under load, one commit for many
changes (group commit), and watchers never see a state that is not stored.

A failed write fails only its own change. When a batch cannot be committed, its changes
are tried again one by one, so other tasks' changes still land. A task whose change
failed is *refused* from then on: its later changes, queued or new, fail too (a task's
messages never skip a number), until the runner reloads it from the store. Global
message numbers are given at commit, to committed changes only, so they have no gaps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from quart import Quart

from . import logs, metrics
from .broker import Broker
from .errors import DuplicateKey, StorageUnavailable, Superseded, VoteRefused
from .lifecycle import attach
from .models import Attempt, Review, Task, TaskEvent
from .store import IdempotencyKey, Store, Write

log = logging.getLogger(__name__)

_MAX_BATCH = 1000


@dataclass(slots=True)
class Pending:
    """A change waiting for the writer, and the future its caller awaits."""

    write: Write
    done: asyncio.Future[None]
    generation: int  # of its task: a change made before the task was reloaded is stale
    detached: bool = False  # made from a fresh read, not by a flow here (hitl.runner)


class Journal:
    """Records task changes durably, then fans their events out through the broker."""

    def __init__(self, store: Store, broker: Broker) -> None:
        self.store = store
        self.broker = broker
        self.failure: str | None = None  # why writes fail, while they do
        self.refused: set[str] = set()  # tasks whose last change could not be stored
        self._superseded: set[str] = set()  # ... because another process changed them first
        self._generations: dict[str, int] = {}  # of tasks reloaded after a refusal
        self.on_refused: Callable[[str], None] = lambda task_id: None
        self.listeners: list[Callable[[], None]] = []  # told after each commit (webhooks)
        self._queue: asyncio.Queue[Pending] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._next_gid = 1

    def init_app(self, app: Quart) -> None:
        attach(app, "journal", self, self.start, self.close)

    async def start(self) -> None:
        self._next_gid = await self.store.last_gid() + 1
        self._writer = asyncio.create_task(self._write_forever(), name="hitl-journal")

    async def close(self) -> None:
        """Commit what is queued, then stop; safe to call twice."""
        if self._writer is None:
            return
        await self._queue.join()
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        self._writer = None

    def record(self, task: Task, payload: dict[str, Any] | None = None,
               review: Review | None = None, idempotency: IdempotencyKey | None = None,
               attempt: Attempt | None = None, *, touch: bool = True,
               detached: bool = False) -> asyncio.Future[None]:
        """Queue the task's current row (and an event, a review, an attempt's record);
        done once committed.

        The task's message number is given here, synchronously, so a task's messages
        follow the order of the calls. ``touch`` False keeps ``updated_at`` (a quorum's
        vote: the task still waits since its attempt came up for review).

        A ``detached`` change (a shared store: one made from a fresh read of a task whose
        flow runs elsewhere) is never refused for this process's copy of the task, and its
        failure refuses nothing: the store takes it only over the copy it was made from.
        """
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if task.task_id in self.refused and not detached:
            done.set_exception(self._refusal(task.task_id))
            return done
        if touch:
            task.updated_at = time.time()
        event = None
        if payload is not None:
            task.last_seq += 1
            event = TaskEvent.create(task.task_id, task.last_seq, 0,
                                     {"task_id": task.task_id, **payload}, task.submitted_by)
        attempt_row = attempt.row(task.task_id) if attempt is not None else None
        self._queue.put_nowait(Pending(Write(task.row(), event, review, idempotency,
                                             attempt_row), done,
                                       self._generations.get(task.task_id, 0), detached))
        return done

    def check_writable(self, task_id: str) -> None:
        """Raise :class:`StorageUnavailable` now if the task's changes are refused."""
        if task_id in self.refused:
            raise self._refusal(task_id)

    def forgive(self, task_id: str) -> None:
        """The task was reloaded from the store: its changes are taken again, except those
        its stopped flow made before (still queued, maybe)."""
        self._superseded.discard(task_id)
        if task_id in self.refused:
            self.refused.discard(task_id)
            self._generations[task_id] = self._generations.get(task_id, 0) + 1

    async def probe(self) -> bool:
        """Whether the store takes writes again (a tiny real write while they failed)."""
        if self.failure is None:
            return True
        try:
            await self.store.probe()
        except StorageUnavailable as exc:
            self.failure = exc.reason
            return False
        log.info("storage writable again")
        self.failure = None
        return True

    async def _write_forever(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < _MAX_BATCH:
                batch.append(self._queue.get_nowait())
            try:
                await self._commit(batch)
            except Exception as exc:  # a bug of ours: fail the batch, keep writing
                log.exception("journal writer failed")
                for pending in batch:
                    if not pending.done.done():
                        self._fail(pending, StorageUnavailable(f"{type(exc).__name__}: {exc}"))
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _commit(self, batch: list[Pending]) -> None:
        """Commit the batch at once; if that fails, each change alone, in order."""
        batch = [pending for pending in batch if not self._refuse_if_failed(pending)]
        if not batch:
            return
        try:
            await self._store_and_publish(batch)
            return
        except (StorageUnavailable, DuplicateKey, VoteRefused) as exc:
            if len(batch) == 1:
                self._fail(batch[0], exc)
                return
        for pending in batch:
            if self._refuse_if_failed(pending):
                continue
            try:
                await self._store_and_publish([pending])
            except (StorageUnavailable, DuplicateKey, VoteRefused) as exc:
                self._fail(pending, exc)

    async def _store_and_publish(self, batch: list[Pending]) -> None:
        gid = self._next_gid
        if not self.store.numbers_messages:  # else the store numbers them as it commits
            for pending in batch:  # numbered in commit order: committed ids are contiguous
                event = pending.write.event
                if event is not None:
                    pending.write = replace(pending.write, event=replace(event, gid=gid))
                    gid += 1
        started = time.perf_counter()
        try:
            written = await self.store.write([pending.write for pending in batch])
        finally:
            metrics.store_written(time.perf_counter() - started)
        self._next_gid = gid
        self.failure = None
        for pending, write in zip(batch, written, strict=True):
            pending.write = write
            if write.event is not None:
                self.broker.publish_event(write.event)
            _settle(pending, None)
        for listener in self.listeners:
            listener()

    def _fail(self, pending: Pending, exc: Exception) -> None:
        task_id = pending.write.task_id
        if isinstance(exc, StorageUnavailable):
            if self.failure is None:
                log.error("storage unavailable: %s", exc.reason, extra=logs.task(task_id))
            self.failure = exc.reason
        if pending.detached:
            _settle(pending, exc)
            return
        self.refused.add(task_id)
        if isinstance(exc, Superseded):
            self._superseded.add(task_id)
        _settle(pending, exc)
        self.on_refused(task_id)

    def _refuse_if_failed(self, pending: Pending) -> bool:
        task_id = pending.write.task_id
        if pending.detached or (task_id not in self.refused
                                and pending.generation == self._generations.get(task_id, 0)):
            return False
        _settle(pending, self._refusal(task_id))
        return True

    def _refusal(self, task_id: str) -> Exception:
        if task_id in self._superseded:  # a lost race, not a database in trouble: 409
            return Superseded(f"task {task_id} was changed meanwhile (by another process); "
                              "send it again")
        return StorageUnavailable(self.failure or "an earlier change of this task was not "
                                                  "stored; it is being reloaded")


def _settle(pending: Pending, error: BaseException | None) -> None:
    if pending.done.done():
        return
    if error is None:
        pending.done.set_result(None)
    else:
        pending.done.set_exception(error)
