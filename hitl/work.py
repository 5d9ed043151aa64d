"""External work (``--processor external``): each attempt's processing is a job that a
worker claims over HTTP, holds under a lease, and reports on.

The job queue is a table (``jobs``: one row per task and attempt); its statements, each
rule a condition in one of them, are in :mod:`hitl.jobs`, and run here in the store's
write transactions. A refused report is a 409 (or 404) that says which rule failed.

The flow's side stays PocketFlow's: the ProcessNode's pool (:class:`ExternalPool`) queues
the job and awaits its result, in-process (a future, woken by the completion once it is
stored); a failure raises in ``exec``, so PocketFlow's own retry queues the next try.
After a restart a running task's flow queues its job again: one still claimed keeps its
lease (its worker can still complete it), one done gives its stored output, one queued
stays queued.

A claim that finds nothing waits (a long poll), never in a loop of queries: it sleeps in
a line of waiting claims until a job queued or given back in this process wakes it, or
the soonest lease expiry comes. One job wakes one claim, the longest waiting, not all of
them: each woken claim runs a claim statement, and a herd of them, all but one finding
nothing, would cost a write transaction per idle slot per job. A woken claim that finds
nothing (another took the job first) sleeps again; one that leaves before it has looked
(its client went away) passes its wake on to the next.

On a shared store (several processes, hitl.pg_store) the news crosses processes as the
broker's notices: a job queued or given back on one process wakes a waiting claim on
each of the others (:data:`QUEUED`), and a job completed or failed on one wakes the flow
awaiting it on the process that runs its task (:data:`ENDED`; that flow reads the job's
row, the truth). A notice may be lost, so each process also looks every :data:`RECHECK`
seconds while it has claims asleep (one read: is any job takeable? then it wakes one)
or flows waiting (one read of their jobs that ended): a lost notice costs a delay, never
a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

from quart import Quart

from . import jobs, metrics, policy
from .accounts import Identity
from .broker import Broker
from .config import Config
from .errors import HitlError
from .jobs import ClaimedJob
from .lifecycle import attach
from .processors import Job
from .progress import Coalescer
from .store import Store

log = logging.getLogger(__name__)

QUEUED = "work.queued"  # a notice: a job was queued or given back (text: by which process)
ENDED = "work.ended"  # a notice: a job's try ended (text: JSON [task_id, attempt])
PROGRESS = "work.progress"  # a notice: a worker's progress (JSON [task_id, attempt,
# fraction, partial output]), for the flow on another process to pass on
RECHECK = 1.0  # seconds between looks in a shared store, in case a notice was lost


class WorkerError(Exception):
    """A worker reported that its try of a job failed (``/fail``): PocketFlow retries."""


@dataclass(slots=True)
class Waiter:
    """The flow awaiting one attempt's job in this process."""

    job: Job
    result: asyncio.Future[str]
    progress: Coalescer
    tries: int | None = None  # its job's try, once queued: an ended try older is not its


class WorkQueue:
    """``app.extensions["work"]``: the flows' side (:meth:`process`) and the workers'
    (claim, heartbeat, progress, complete, fail, give back), each asking the policy."""

    def __init__(self, config: Config, store: Store, broker: Broker | None = None) -> None:
        self.config = config
        self.store = store
        self.broker = broker
        self.me = uuid.uuid4().hex  # this process, as a notice's sender
        self._recheck: asyncio.Task[None] | None = None
        self._reads: set[asyncio.Task[None]] = set()  # job rows read on a notice
        if broker is not None:
            broker.on_notice(QUEUED, self._on_queued)
            broker.on_notice(ENDED, self._on_ended)
            broker.on_notice(PROGRESS, self._on_progress)
        self.waiting = 0  # claims waiting for a job now (a gauge; tests check it drains)
        self.looks = 0  # claim statements run, ever (tests count them)
        self.closing = False
        self._waiters: dict[tuple[str, int], Waiter] = {}
        self._sleepers: deque[asyncio.Future[None]] = deque()  # waiting claims, oldest first
        self._queued = 0  # jobs queued or given back in this process, ever

    def init_app(self, app: Quart) -> None:
        attach(app, "work", self, self.start, self.close)

    @property
    def shared(self) -> bool:
        """Whether other processes share the store (and their news comes as notices)."""
        return self.store.shared

    async def start(self) -> None:
        self.closing = False
        if self.shared and self._recheck is None:
            self._recheck = asyncio.create_task(self._look_every_recheck(),
                                                name="hitl-work-recheck")

    async def close(self) -> None:
        self.stop_waiting()
        running = [job for job in (self._recheck, *self._reads) if job is not None]
        self._recheck = None
        for job in running:
            job.cancel()
        for job in running:
            with contextlib.suppress(asyncio.CancelledError):
                await job

    def stop_waiting(self) -> None:
        """Shutting down: every waiting claim answers now (204), and no new one waits."""
        self.closing = True
        self._wake(len(self._sleepers))

    def pool(self) -> ExternalPool:
        return ExternalPool(self)

    def _wake(self, count: int = 1) -> None:
        """A job was queued or given back: wake ``count`` waiting claims, oldest first.
        A claim looking meanwhile (not asleep) sees ``_queued`` move and looks again."""
        self._queued += 1
        while count > 0 and self._sleepers:
            sleeper = self._sleepers.popleft()
            if not sleeper.done():
                sleeper.set_result(None)
                count -= 1

    def _queued_here(self) -> None:
        """A job was queued or given back here: a claim waiting here, or elsewhere, takes it."""
        self._wake()
        if self.shared and self.broker is not None:
            self.broker.notify(QUEUED, self.me)

    def _on_queued(self, sender: str) -> None:
        if sender != self.me:  # its own were woken at once
            self._wake()

    def _on_ended(self, text: str) -> None:
        """A job's try ended on another process: if its flow waits here, it reads the row."""
        try:
            task_id, attempt = json.loads(text)
        except (ValueError, TypeError):
            return
        if (task_id, attempt) in self._waiters and not self.closing:
            read = asyncio.get_running_loop().create_task(self._read_ended([(task_id, attempt)]))
            self._reads.add(read)
            read.add_done_callback(self._reads.discard)

    def _on_progress(self, text: str) -> None:
        try:
            task_id, attempt, fraction, partial_output = json.loads(text)
        except (ValueError, TypeError):
            return
        waiter = self._waiters.get((task_id, attempt))
        if waiter is not None and not waiter.result.done():
            waiter.progress(float(fraction), str(partial_output))

    async def _read_ended(self, keys: list[tuple[str, int]]) -> None:
        """Hand the flows waiting here for ``keys`` the tries that ended, as stored."""
        waiting = {key: self._waiters[key] for key in keys
                   if key in self._waiters and self._waiters[key].tries is not None}
        if not waiting:
            return
        try:
            rows = await self.store.reader.execute_fetchall(
                jobs.ENDED_TRIES, {"ids": json.dumps(sorted({key[0] for key in waiting}))})
        except Exception:  # the store failing: the next look tries again
            log.exception("cannot read the jobs that flows here await")
            return
        for row in rows:
            waiter = waiting.get((row["task_id"], row["attempt"]))
            if waiter is None or waiter.tries is None or row["tries"] < waiter.tries:
                continue
            outcome = (str(row["output"]) if row["state"] == "done"
                       else WorkerError(row["error"]))
            self._settle(row["task_id"], row["attempt"], outcome)

    async def _look_every_recheck(self) -> None:
        """On a shared store: the looks that make a lost notice cost a delay, not a hang."""
        while True:
            await asyncio.sleep(RECHECK)
            try:
                if self._waiters:
                    await self._read_ended(list(self._waiters))
                if self.asleep:
                    rows = await self.store.reader.execute_fetchall(
                        jobs.ANY_TAKEABLE, {"now": time.time(), "retries": self.config.retries})
                    if rows:
                        self._wake()
            except Exception:  # the store failing: look again later
                log.exception("cannot look for jobs")

    # The flow's side ----------------------------------------------------------------

    async def process(self, job: Job) -> str:
        """Queue the job of ``job``'s attempt (or keep the one stored) and await its output;
        raises :class:`WorkerError` when its worker reports a failure."""
        key = (job.task_id, job.attempt)
        waiter = Waiter(job, asyncio.get_running_loop().create_future(),
                        Coalescer(job.report))
        self._waiters[key] = waiter  # first: a completion stored from now on finds it
        try:
            params = {"task_id": job.task_id, "attempt": job.attempt, "now": time.time(),
                      "retries": self.config.retries}
            async with self.store.transaction() as conn:
                rows = await conn.execute_fetchall(jobs.ENQUEUE, params)
                row = next(iter(rows or await conn.execute_fetchall(jobs.JOB_STATE, params)))
            if row["state"] == "done":  # completed while the service was down
                return str(row["output"])
            if row["state"] == "failed":  # its last try failed before a restart
                raise WorkerError(row["error"])
            waiter.tries = int(row["tries"])
            self._queued_here()
            return await waiter.result
        finally:
            waiter.progress.close()
            if self._waiters.get(key) is waiter:
                del self._waiters[key]

    # The workers' side --------------------------------------------------------------

    async def claim(self, worker: str, wait: float = 0, lease: float | None = None, *,
                    by: Identity) -> ClaimedJob | None:
        """The oldest job a worker may take, now its ``worker``'s for ``lease`` seconds;
        None if none came within ``wait`` seconds."""
        policy.can_work(by).require()
        lease = lease or self.config.lease
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        self.waiting += 1
        woken = False  # holds a wake it has not yet looked with: passed on if it leaves
        try:
            while True:
                queued = self._queued  # before looking: a job queued meanwhile shows
                claimed, soonest = await self._take(worker, lease, by)
                woken = False
                if claimed is not None:
                    return claimed
                left = deadline - loop.time()
                if left <= 0 or self.closing:
                    return None
                if self._queued != queued:  # queued while it looked: it may have missed it
                    continue
                if soonest is not None:  # a lease that may be taken over, once it expires
                    left = min(left, max(soonest - time.time(), 0.0) + 0.005)
                woken = await self._sleep(left)
        finally:
            self.waiting -= 1
            if woken:
                self._wake()

    async def _sleep(self, seconds: float) -> bool:
        """Wait in line for a wake, up to ``seconds``; whether one came."""
        sleeper = asyncio.get_running_loop().create_future()
        self._sleepers.append(sleeper)
        try:
            await asyncio.wait((sleeper,), timeout=seconds)
        except asyncio.CancelledError:
            if sleeper.done():
                self._wake()  # woken as its client left: the wake goes to the next
            raise
        finally:
            if not sleeper.done():  # timed out (or left): it leaves the line
                sleeper.cancel()
                with contextlib.suppress(ValueError):
                    self._sleepers.remove(sleeper)
        return not sleeper.cancelled()

    @property
    def asleep(self) -> int:
        """Claims asleep in line now (a woken one has left it)."""
        return sum(not sleeper.done() for sleeper in self._sleepers)

    async def _take(self, worker: str, lease: float, by: Identity
                    ) -> tuple[ClaimedJob | None, float | None]:
        lease_id = secrets.token_urlsafe(18)
        params = {"worker": worker, "user": by.name, "lease_id": lease_id, "lease": lease,
                  "now": time.time(), "retries": self.config.retries}
        self.looks += 1
        soonest = None
        async with self.store.transaction() as conn:
            spent = list(await conn.execute_fetchall(jobs.GIVE_UP, params))
            rows = list(await conn.execute_fetchall(
                jobs.CLAIM_PG if self.store.dialect == "postgresql" else jobs.CLAIM, params))
            if not rows:
                soonest = next(iter(await conn.execute_fetchall(jobs.SOONEST_EXPIRY)))[0]
        for job in spent:  # stored: its flow fails the attempt as if the worker had said so
            self._ended(job["task_id"], job["attempt"], WorkerError(job["error"]))
        if not rows:
            return None, soonest
        row = rows[0]
        if row["taken_over"]:
            metrics.lease_taken_over("job")
        try:
            return await self._claimed(row, lease_id), None
        except asyncio.CancelledError:  # its client left before the answer: give it back
            await asyncio.shield(self._give_back_unanswered(row["task_id"], row["attempt"],
                                                            lease_id, by))
            raise

    async def _claimed(self, row: Any, lease_id: str) -> ClaimedJob:
        """The claimed job as its worker gets it: the task (from the claim's own row) and
        every review and the output they judged (from the flow awaiting it here, else the
        store)."""
        waiter = self._waiters.get((row["task_id"], row["attempt"]))
        if waiter is not None:
            reviews, previous = waiter.job.reviews, waiter.job.previous_output
        else:
            task = await self.store.get_task(row["task_id"])
            reviews = tuple(task.reviews) if task is not None else ()
            previous = task.output_before(row["attempt"]) if task is not None else None
        metadata = row["metadata"]
        return ClaimedJob(row["task_id"], row["attempt"], lease_id, row["lease_expires"],
                          row["task_input"], row["title"],
                          None if metadata is None else json.loads(metadata),
                          [review.to_json() for review in reviews], previous)

    async def _give_back_unanswered(self, task_id: str, attempt: int, lease_id: str,
                                    by: Identity) -> None:
        with contextlib.suppress(HitlError):  # expired or taken meanwhile: nothing to undo
            await self._report(jobs.GIVE_BACK, task_id, attempt, lease_id, by)
            self._queued_here()

    async def heartbeat(self, task_id: str, attempt: int, lease_id: str,
                        lease: float | None = None, *, by: Identity) -> float:
        """Extend the worker's lease (by ``lease`` seconds, else the claim's); when it ends."""
        policy.can_work(by).require()
        return float(await self._report(jobs.EXTEND, task_id, attempt, lease_id, by,
                                        lease=lease))

    async def progress(self, task_id: str, attempt: int, lease_id: str, fraction: float,
                       partial_output: str, *, by: Identity) -> float:
        """Extend the lease and tell the task's watchers (a ``running`` message, as an
        in-process processor's report, at a bounded rate: :class:`Coalescer`)."""
        policy.can_work(by).require()
        until = float(await self._report(jobs.EXTEND, task_id, attempt, lease_id, by, lease=None))
        waiter = self._waiters.get((task_id, attempt))
        if waiter is not None:
            waiter.progress(fraction, partial_output)
        elif self.shared and self.broker is not None:  # its flow may wait on another process
            self.broker.notify(PROGRESS, json.dumps([task_id, attempt, fraction,
                                                     partial_output]))
        return until

    async def complete(self, task_id: str, attempt: int, lease_id: str, output: str, *,
                       by: Identity) -> None:
        """Store the job's output (done), then hand it to the waiting flow for review."""
        policy.can_work(by).require()
        await self._report(jobs.COMPLETE, task_id, attempt, lease_id, by, output=output)
        self._ended(task_id, attempt, output)

    async def fail(self, task_id: str, attempt: int, lease_id: str, error: str, *,
                   by: Identity) -> bool:
        """Store the try's failure; whether the attempt is tried again (else the task
        fails with this error)."""
        policy.can_work(by).require()
        tries = int(await self._report(jobs.FAIL, task_id, attempt, lease_id, by, error=error))
        self._ended(task_id, attempt, WorkerError(error))
        return tries < self.config.retries

    async def give_back(self, task_id: str, attempt: int, lease_id: str, *,
                        by: Identity) -> None:
        """The worker will not do the job (it is stopping): queued again for another, as
        the same try."""
        policy.can_work(by).require()
        await self._report(jobs.GIVE_BACK, task_id, attempt, lease_id, by)
        self._queued_here()

    def _ended(self, task_id: str, attempt: int, outcome: str | WorkerError) -> None:
        """A try's outcome is stored: to its flow, here if it waits here, else (a shared
        store) told to every process, where the one whose flow waits reads it."""
        if not self._settle(task_id, attempt, outcome) and self.shared and (
                self.broker is not None):
            self.broker.notify(ENDED, json.dumps([task_id, attempt]))

    def _settle(self, task_id: str, attempt: int, outcome: str | WorkerError) -> bool:
        """Hand a stored outcome (the output, or the try's failure) to the flow awaiting
        that attempt in this process, if one does; whether one did."""
        waiter = self._waiters.get((task_id, attempt))
        if waiter is None:
            return False
        if not waiter.result.done():
            waiter.progress.close()
            if isinstance(outcome, WorkerError):
                waiter.result.set_exception(outcome)
            else:
                waiter.result.set_result(outcome)
        return True

    async def _report(self, statement: str, task_id: str, attempt: int, lease_id: str,
                      by: Identity, **values: Any) -> Any:
        """Run a report's statement while the worker's lease holds, returning its one
        value; else NotFound or Conflict, saying why (read in the same transaction)."""
        params = {"task_id": task_id, "attempt": attempt, "lease_id": lease_id,
                  "user": by.name, "now": time.time(), **values}
        async with self.store.transaction() as conn:
            rows = list(await conn.execute_fetchall(statement, params))
            if rows:
                return rows[0][0]
            why = list(await conn.execute_fetchall(jobs.WHY, params))
        raise jobs.refusal(task_id, attempt, lease_id, by.name, why[0] if why else None,
                           params["now"])


class ExternalPool:
    """The ProcessNode's pool for ``--processor external``: an attempt's run is a job."""

    busy = 0  # nothing runs in this process

    def __init__(self, work: WorkQueue) -> None:
        self.work = work

    async def run(self, job: Job) -> str:
        return await self.work.process(job)

    def shutdown(self) -> None:
        """Nothing to stop: a claimed job stays its worker's, a queued one queued."""
