"""External work (``--processor external``): each attempt's processing is a job that a
worker claims over HTTP, holds under a lease, and reports on.

The job queue is a table (``jobs``: one row per task and attempt), and every rule of it
is a condition in one statement, run in a write transaction: a claim takes the oldest
job that is queued, or claimed under a lease that has expired, of a task still running
that attempt (``UPDATE ... WHERE ... RETURNING``), so a second process sharing the
database could not hand a job out twice. A heartbeat, a progress report, a completion or
a failure changes the job only while the reporting worker's lease holds: the same
attempt, the same ``lease_id`` and user, not expired, and the task still running it;
anything else is a 409 that says which of these failed.

The flow's side stays PocketFlow's: the ProcessNode's pool (:class:`ExternalPool`) queues
the job and awaits its result, in-process (a future, woken by the completion once it is
stored); a failure raises in ``exec``, so PocketFlow's own retry queues the next try.
After a restart a running task's flow queues its job again: one still claimed keeps its
lease (its worker can still complete it), one done gives its stored output, one queued
stays queued.

A claim that finds nothing waits (a long poll) on an in-process signal, set when a job is
queued or given back, and at the soonest lease expiry; never in a loop of queries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from quart import Quart

from . import policy
from .accounts import Identity
from .config import Config
from .errors import Conflict, HitlError, NotFound
from .lifecycle import attach
from .models import TERMINAL, Status, iso
from .processors import Job
from .progress import Coalescer
from .store import Store


class WorkerError(Exception):
    """A worker reported that its try of a job failed (``/fail``): PocketFlow retries."""


# A job for this attempt: new (try 1); or, after a failed try with tries left, the next
# try, queued again; any other job (claimed, queued, done) is kept as it is (a restart).
_ENQUEUE = """
    INSERT INTO jobs (task_id, attempt, state, tries, queued_at)
    VALUES (:task_id, :attempt, 'queued', 1, :now)
    ON CONFLICT (task_id, attempt) DO UPDATE SET
        state = 'queued', tries = jobs.tries + 1, queued_at = :now, worker = NULL,
        worker_user = NULL, lease_id = NULL, lease_seconds = NULL, lease_expires = NULL,
        claimed_at = NULL, error = NULL
     WHERE jobs.state = 'failed' AND jobs.tries < :retries
"""
_JOB_STATE = "SELECT state, tries, output, error FROM jobs WHERE task_id = :task_id " \
             "AND attempt = :attempt"
# A job a worker may take: queued, or claimed under an expired lease; of a task still
# running that attempt (a cancelled or finished task's job is never handed out).
_OPEN = "jobs.state IN ('queued', 'claimed')"  # as the partial index jobs_open: a claim
# reads the open jobs alone, however many done ones the table keeps
_TAKEABLE = f"""{_OPEN}
               AND (jobs.state = 'queued' OR jobs.lease_expires < :now)
               AND EXISTS (SELECT 1 FROM tasks WHERE tasks.task_id = jobs.task_id
                              AND tasks.attempt = jobs.attempt AND tasks.status = 'running')"""
_CLAIM = f"""
    UPDATE jobs SET state = 'claimed', worker = :worker, worker_user = :user,
                    lease_id = :lease_id, lease_seconds = :lease,
                    lease_expires = :now + :lease, claimed_at = :now
     WHERE rowid = (SELECT rowid FROM jobs WHERE {_TAKEABLE}
                     ORDER BY queued_at, task_id, attempt LIMIT 1)
       AND {_TAKEABLE}
    RETURNING task_id, attempt, lease_expires
"""
# When the next lease that could be taken over expires (a waiting claim wakes then).
_SOONEST_EXPIRY = f"""
    SELECT min(lease_expires) FROM jobs
     WHERE {_OPEN} AND state = 'claimed' AND EXISTS (
           SELECT 1 FROM tasks WHERE tasks.task_id = jobs.task_id
              AND tasks.attempt = jobs.attempt AND tasks.status = 'running')
"""
# The reporting worker's lease holds: its job, attempt, lease and user; not expired; and
# the task still running that attempt.
_HELD = """task_id = :task_id AND attempt = :attempt AND state = 'claimed'
           AND lease_id = :lease_id AND worker_user IS :user AND lease_expires >= :now
           AND EXISTS (SELECT 1 FROM tasks WHERE tasks.task_id = jobs.task_id
                          AND tasks.attempt = jobs.attempt AND tasks.status = 'running')"""
_EXTEND = f"""
    UPDATE jobs SET lease_expires = :now + coalesce(:lease, lease_seconds)
     WHERE {_HELD} RETURNING lease_expires
"""
_COMPLETE = f"UPDATE jobs SET state = 'done', output = :output WHERE {_HELD} RETURNING tries"
_FAIL = f"UPDATE jobs SET state = 'failed', error = :error WHERE {_HELD} RETURNING tries"
_GIVE_BACK = f"""
    UPDATE jobs SET state = 'queued', worker = NULL, worker_user = NULL, lease_id = NULL,
                    lease_seconds = NULL, lease_expires = NULL, claimed_at = NULL
     WHERE {_HELD} RETURNING tries
"""
# Why a report was refused: the task, and its job for the reported attempt.
_WHY = """
    SELECT tasks.status AS status, tasks.attempt AS task_attempt, jobs.state AS state,
           jobs.lease_id AS lease_id, jobs.worker_user AS worker_user,
           jobs.worker AS worker, jobs.lease_expires AS lease_expires
      FROM tasks LEFT JOIN jobs ON jobs.task_id = tasks.task_id AND jobs.attempt = :attempt
     WHERE tasks.task_id = :task_id
"""
_JOB_TASK = "SELECT task_input, title, metadata FROM tasks WHERE task_id = :task_id"

@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """A job as a claim answers it."""

    task_id: str
    attempt: int
    lease_id: str
    lease_expires: float
    task_input: str
    title: str
    metadata: dict[str, Any] | None
    reviews: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "attempt": self.attempt, "lease_id": self.lease_id,
                "lease_expires": iso(self.lease_expires), "task_input": self.task_input,
                "title": self.title, "metadata": self.metadata, "reviews": self.reviews}


@dataclass(slots=True)
class Waiter:
    """The flow awaiting one attempt's job in this process."""

    result: asyncio.Future[str]
    progress: Coalescer


class WorkQueue:
    """``app.extensions["work"]``: the flows' side (:meth:`process`) and the workers'
    (claim, heartbeat, progress, complete, fail, give back), each asking the policy."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self.waiting = 0  # claims waiting for a job now (a gauge; tests check it drains)
        self.closing = False
        self._waiters: dict[tuple[str, int], Waiter] = {}
        self._changed = asyncio.Event()

    def init_app(self, app: Quart) -> None:
        attach(app, "work", self, self.start, self.close)

    async def start(self) -> None:
        self.closing = False

    async def close(self) -> None:
        self.stop_waiting()

    def stop_waiting(self) -> None:
        """Shutting down: every waiting claim answers now (204), and no new one waits."""
        self.closing = True
        self._wake()

    def pool(self) -> ExternalPool:
        return ExternalPool(self)

    def _wake(self) -> None:
        """Wake every waiting claim (a job was queued or given back): each looks again."""
        self._changed.set()
        self._changed = asyncio.Event()

    # The flow's side ----------------------------------------------------------------

    async def process(self, job: Job) -> str:
        """Queue the job of ``job``'s attempt (or keep the one stored) and await its output;
        raises :class:`WorkerError` when its worker reports a failure."""
        key = (job.task_id, job.attempt)
        waiter = Waiter(asyncio.get_running_loop().create_future(), Coalescer(job.report))
        self._waiters[key] = waiter  # first: a completion stored from now on finds it
        try:
            params = {"task_id": job.task_id, "attempt": job.attempt, "now": time.time(),
                      "retries": self.config.retries}
            async with self.store._transaction() as conn:
                await conn.execute(_ENQUEUE, params)
                row = next(iter(await conn.execute_fetchall(_JOB_STATE, params)))
            if row["state"] == "done":  # completed while the service was down
                return str(row["output"])
            if row["state"] == "failed":  # its last try failed before a restart
                raise WorkerError(row["error"])
            self._wake()
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
        try:
            while True:
                changed = self._changed  # before looking: a job queued meanwhile wakes it
                claimed, soonest = await self._take(worker, lease, by)
                if claimed is not None:
                    return claimed
                left = deadline - loop.time()
                if left <= 0 or self.closing:
                    return None
                if soonest is not None:  # a lease that may be taken over, once it expires
                    left = min(left, max(soonest - time.time(), 0.0) + 0.005)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), left)
        finally:
            self.waiting -= 1

    async def _take(self, worker: str, lease: float, by: Identity
                    ) -> tuple[ClaimedJob | None, float | None]:
        lease_id = secrets.token_urlsafe(18)
        params = {"worker": worker, "user": by.name, "lease_id": lease_id, "lease": lease,
                  "now": time.time()}
        async with self.store._transaction() as conn:
            rows = list(await conn.execute_fetchall(_CLAIM, params))
            if not rows:
                soonest = next(iter(await conn.execute_fetchall(_SOONEST_EXPIRY)))[0]
                return None, soonest
        row = rows[0]
        try:
            return await self._claimed(row["task_id"], row["attempt"], lease_id,
                                       row["lease_expires"]), None
        except asyncio.CancelledError:  # its client left before the answer: give it back
            await asyncio.shield(self._give_back_unanswered(row["task_id"], row["attempt"],
                                                            lease_id, by))
            raise

    async def _claimed(self, task_id: str, attempt: int, lease_id: str,
                       lease_expires: float) -> ClaimedJob:
        """The claimed job as its worker gets it: the task's input and every review."""
        task = next(iter(await self.store.reader.execute_fetchall(
            _JOB_TASK, {"task_id": task_id})))
        reviews = await self.store.reviews(task_id)
        metadata = task["metadata"]
        return ClaimedJob(task_id, attempt, lease_id, lease_expires, task["task_input"],
                          task["title"], None if metadata is None else json.loads(metadata),
                          [review.to_json() for review in reviews])

    async def _give_back_unanswered(self, task_id: str, attempt: int, lease_id: str,
                                    by: Identity) -> None:
        with contextlib.suppress(HitlError):  # expired or taken meanwhile: nothing to undo
            await self._report(_GIVE_BACK, task_id, attempt, lease_id, by)
            self._wake()

    async def heartbeat(self, task_id: str, attempt: int, lease_id: str,
                        lease: float | None = None, *, by: Identity) -> float:
        """Extend the worker's lease (by ``lease`` seconds, else the claim's); when it ends."""
        policy.can_work(by).require()
        return float(await self._report(_EXTEND, task_id, attempt, lease_id, by,
                                        lease=lease))

    async def progress(self, task_id: str, attempt: int, lease_id: str, fraction: float,
                       partial_output: str, *, by: Identity) -> float:
        """Extend the lease and tell the task's watchers (a ``running`` message, as an
        in-process processor's report, at a bounded rate: :class:`Coalescer`)."""
        policy.can_work(by).require()
        until = float(await self._report(_EXTEND, task_id, attempt, lease_id, by, lease=None))
        waiter = self._waiters.get((task_id, attempt))
        if waiter is not None:
            waiter.progress(fraction, partial_output)
        return until

    async def complete(self, task_id: str, attempt: int, lease_id: str, output: str, *,
                       by: Identity) -> None:
        """Store the job's output (done), then hand it to the waiting flow for review."""
        policy.can_work(by).require()
        await self._report(_COMPLETE, task_id, attempt, lease_id, by, output=output)
        self._settle(task_id, attempt, lambda result: result.set_result(output))

    async def fail(self, task_id: str, attempt: int, lease_id: str, error: str, *,
                   by: Identity) -> bool:
        """Store the try's failure; whether the attempt is tried again (else the task
        fails with this error)."""
        policy.can_work(by).require()
        tries = int(await self._report(_FAIL, task_id, attempt, lease_id, by, error=error))
        self._settle(task_id, attempt, lambda result: result.set_exception(WorkerError(error)))
        return tries < self.config.retries

    async def give_back(self, task_id: str, attempt: int, lease_id: str, *,
                        by: Identity) -> None:
        """The worker will not do the job (it is stopping): queued again for another, as
        the same try."""
        policy.can_work(by).require()
        await self._report(_GIVE_BACK, task_id, attempt, lease_id, by)
        self._wake()

    def _settle(self, task_id: str, attempt: int,
                settle: Callable[[asyncio.Future[str]], None]) -> None:
        waiter = self._waiters.get((task_id, attempt))
        if waiter is not None and not waiter.result.done():
            waiter.progress.close()
            settle(waiter.result)

    async def _report(self, statement: str, task_id: str, attempt: int, lease_id: str,
                      by: Identity, **values: Any) -> Any:
        """Run a report's statement while the worker's lease holds, returning its one
        value; else NotFound or Conflict, saying why (read in the same transaction)."""
        params = {"task_id": task_id, "attempt": attempt, "lease_id": lease_id,
                  "user": by.name, "now": time.time(), **values}
        async with self.store._transaction() as conn:
            rows = list(await conn.execute_fetchall(statement, params))
            if rows:
                return rows[0][0]
            why = list(await conn.execute_fetchall(_WHY, params))
        raise refusal(task_id, attempt, lease_id, by.name, why[0] if why else None,
                      params["now"])


def refusal(task_id: str, attempt: int, lease_id: str, user: str, row: Any,
            now: float) -> Exception:
    """Why a worker's report on a job was refused: the worker must drop the job."""
    if row is None:
        return NotFound(f"no task with id {task_id!r}")
    status = Status(row["status"])
    drop = "drop this job"
    if status in TERMINAL:
        return Conflict(f"task {task_id} is {status}: {drop}")
    if row["task_attempt"] != attempt:
        return Conflict(f"attempt {attempt} of task {task_id} is stale (the task is on "
                        f"attempt {row['task_attempt']}): {drop}")
    if status is not Status.RUNNING:
        return Conflict(f"attempt {attempt} of task {task_id} is no longer being processed "
                        f"(the task is {status}): {drop}")
    state = row["state"]
    if state is None:
        return Conflict(f"attempt {attempt} of task {task_id} is not external work: {drop}")
    if state == "done":
        return Conflict(f"attempt {attempt} of task {task_id} was already completed: {drop}")
    if state == "failed":
        return Conflict(f"this try of attempt {attempt} of task {task_id} was already "
                        f"reported failed: {drop}")
    if state == "queued":
        return Conflict(f"the lease of attempt {attempt} of task {task_id} ended; the job "
                        f"is back in the queue: {drop}")
    if row["lease_id"] != lease_id or row["worker_user"] != user:
        return Conflict(f"the lease of attempt {attempt} of task {task_id} was taken over by "
                        f"another worker ({row['worker']}): {drop}")
    if row["lease_expires"] < now:
        return Conflict(f"the lease of attempt {attempt} of task {task_id} expired at "
                        f"{iso(row['lease_expires'])}; another worker may take it: {drop}")
    return Conflict(f"attempt {attempt} of task {task_id} changed meanwhile: {drop}")


class ExternalPool:
    """The ProcessNode's pool for ``--processor external``: an attempt's run is a job."""

    busy = 0  # nothing runs in this process

    def __init__(self, work: WorkQueue) -> None:
        self.work = work

    async def run(self, job: Job) -> str:
        return await self.work.process(job)

    def shutdown(self) -> None:
        """Nothing to stop: a claimed job stays its worker's, a queued one queued."""
