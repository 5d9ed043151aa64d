"""Write first, then publish: every state change is committed before anyone sees it.

Changes are numbered as they are recorded (per-task ``seq``, global ``gid``) and go
through one queue to a single writer, which commits whatever has piled up in one
transaction and then publishes the batch in order. Under load that is one commit for
many changes (group commit), and watchers never see a state that is not stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from quart import Quart

from .broker import GLOBAL, Broker
from .lifecycle import attach
from .models import Review, Task, TaskEvent
from .store import Store, Write

log = logging.getLogger(__name__)

_MAX_BATCH = 1000

Pending = tuple[Write, "asyncio.Future[None]"]


class Journal:
    """Records task changes durably, then fans their events out through the broker."""

    def __init__(self, store: Store, broker: Broker) -> None:
        self.store = store
        self.broker = broker
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

    def record(
        self, task: Task, payload: dict[str, Any] | None = None, review: Review | None = None
    ) -> asyncio.Future[None]:
        """Queue the task's current row (and an event, a review); done once committed.

        Numbering happens here, synchronously, so ids follow the order of the calls.
        """
        task.updated_at = time.time()
        event = None
        if payload is not None:
            task.last_seq += 1
            event = TaskEvent.create(task.task_id, task.last_seq, self._next_gid,
                                     {"task_id": task.task_id, **payload})
            self._next_gid += 1
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((Write(task.row(), event, review), done))
        return done

    async def _write_forever(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < _MAX_BATCH:
                batch.append(self._queue.get_nowait())
            try:
                await self._commit(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _commit(self, batch: list[Pending]) -> None:
        try:
            await self.store.write([write for write, _ in batch])
        except Exception as exc:
            log.exception("could not store %d change(s)", len(batch))
            while not self._queue.empty():  # later changes must not land without these
                batch.append(self._queue.get_nowait())  # (the caller marks them done)
            for _, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        for write, done in batch:
            if write.event is not None:
                task_message, global_message = write.event.messages()
                self.broker.publish(write.event.task_id, task_message)
                self.broker.publish(GLOBAL, global_message)
            if not done.done():
                done.set_result(None)
