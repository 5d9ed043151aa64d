"""How ``hitl worker`` runs its processor: awaited if async, else in a thread of the job's own.

A thread cannot be stopped. When the service drops a job (409) while a blocking processor
works on it, its thread is *abandoned*: it runs on, its result ignored, and it no longer
counts as one of the worker's jobs. A fresh thread per job means the slot's next job
starts at once instead of queueing behind it (a pool of ``concurrency`` threads would hold
the next claimed job, and renew its lease, until the abandoned one ended). Abandoned
threads are bounded: past ``limit`` of them, :meth:`JobRunner.room` makes the slots wait
before claiming, so a processor that hangs on every job cannot pile up threads for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
from collections.abc import Awaitable
from typing import cast

from .processors import Job, Processor, is_async

log = logging.getLogger("hitl.worker")

Outcome = tuple[object, BaseException | None]


class JobRunner:
    """Runs ``processor`` on jobs, each in a thread of its own if it blocks (see the module)."""

    def __init__(self, processor: Processor, limit: int) -> None:
        self.processor = processor
        self.is_async = is_async(processor)
        self.limit = limit  # abandoned threads at most, before claiming waits
        self.abandoned = 0  # threads still running for jobs that were dropped
        self.busy = 0  # processors running in a thread right now (abandoned or not)
        self._lock = threading.Lock()
        self._freed = asyncio.Event()

    async def run(self, job: Job) -> str:
        """The processor's output; cancelled, an async processor is cancelled and a
        thread is abandoned (logged)."""
        if self.is_async:
            result = await cast(Awaitable[object], self.processor(job))
        else:
            result = await self._in_thread(job)
        if not isinstance(result, str):
            raise TypeError(f"processor returned {type(result).__name__}, not str")
        return result

    async def room(self) -> None:
        """Return once fewer than ``limit`` abandoned threads run."""
        while self.abandoned >= self.limit:
            self._freed.clear()
            await self._freed.wait()

    async def _in_thread(self, job: Job) -> object:
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[Outcome] = loop.create_future()
        context = contextvars.copy_context()  # as asyncio.to_thread: log records keep it

        def call() -> None:
            try:
                outcome: Outcome = (context.run(self.processor, job), None)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting job
                outcome = (None, exc)
            finally:
                with self._lock:
                    self.busy -= 1
            with contextlib.suppress(RuntimeError):  # the loop is closed: the worker exited
                loop.call_soon_threadsafe(settle, ended, outcome)

        name = f"hitl-job-{job.task_id}-{job.attempt}"
        with self._lock:
            self.busy += 1
        try:
            threading.Thread(target=call, name=name, daemon=True).start()
        except RuntimeError:  # no thread could be started: no job runs
            with self._lock:
                self.busy -= 1
            raise
        try:
            result, error = await asyncio.shield(ended)
        except asyncio.CancelledError:
            if not ended.done():
                self._abandon(job, ended)
            raise
        if error is not None:
            raise error
        return result

    def _abandon(self, job: Job, ended: asyncio.Future[Outcome]) -> None:
        self.abandoned += 1
        ended.add_done_callback(self._thread_ended)
        log.warning("task %s attempt %d: left while its processor runs in a thread, which "
                    "cannot be stopped: the thread is abandoned, its result will be ignored "
                    "(%d abandoned thread(s) running)", job.task_id, job.attempt,
                    self.abandoned)

    def _thread_ended(self, _: asyncio.Future[Outcome]) -> None:
        self.abandoned -= 1
        self._freed.set()


def settle(future: asyncio.Future[Outcome], outcome: Outcome) -> None:
    if not future.done():
        future.set_result(outcome)
