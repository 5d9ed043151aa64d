"""Owns every running flow: starts, resumes, decides, cancels and stops them.

Routes call these service functions; nothing else creates a flow or touches a task's
runtime handles.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict

from pocketflow import AsyncFlow
from quart import Quart

from .broker import Broker
from .config import Config
from .errors import (
    Conflict,
    DuplicateKey,
    NotFound,
    StorageUnavailable,
    TaskFailed,
    Unavailable,
)
from .flow import Step, build_flow
from .journal import Journal
from .lifecycle import attach
from .models import Decision, Review, Status, Task, TaskRow, new_task_id
from .nodes import check_attempts_left
from .processors import Processor, ProcessorPool, load_processor
from .store import IdempotencyKey, Store
from .tracker import Tracker

log = logging.getLogger(__name__)

RECENTLY_FINISHED = 1024  # finished tasks whose stream state is kept in memory
RECOVERY_WAIT = (0.2, 5.0)  # first and longest wait between checks that storage is back


class Runner:
    """The workflow side of the service."""

    def __init__(self, config: Config, store: Store, journal: Journal, broker: Broker,
                 processor: Processor | None = None) -> None:
        self.config = config
        self.store = store
        self.journal = journal
        self.broker = broker
        self.pool = ProcessorPool(processor or load_processor(config.processor))
        self.trackers: dict[str, Tracker] = {}
        self.accepting = False
        self._janitor: asyncio.Task[None] | None = None
        self._recovery: asyncio.Task[None] | None = None
        self._submitting: dict[str, asyncio.Future[Task]] = {}  # by Idempotency-Key
        self._finished: OrderedDict[str, tuple[Status, int]] = OrderedDict()
        journal.on_refused = self._strand

    def init_app(self, app: Quart) -> None:
        attach(app, "runner", self, self.start, self.close)

    async def start(self) -> None:
        """Resume every unfinished task, then take new work."""
        for task in await self.store.unfinished_tasks():
            self._resume(task)
        self._janitor = asyncio.create_task(self._tidy_every_hour(), name="hitl-tidy")
        self.accepting = True

    async def close(self) -> None:
        """Stop taking work and stop every flow without marking it failed."""
        self.accepting = False
        for job in (self._janitor, self._recovery):
            if job is not None:
                job.cancel()
        flows = [t.flow for t in self.trackers.values() if t.flow is not None]
        for flow in flows:
            flow.cancel()
        if flows:
            await asyncio.wait(flows, timeout=self.config.shutdown_timeout)
        self.pool.shutdown()

    async def _tidy_every_hour(self) -> None:
        """Forget expired Idempotency-Keys and, with retention on, delete finished tasks
        older than ``retain_days`` (at start, then hourly)."""
        while True:
            try:
                await self.store.forget_expired_keys()
                if self.config.retain_days:
                    purged = await self.store.purge_finished(self.config.retain_days)
                    if purged:
                        self._finished.clear()  # a deleted task must read as unknown (404)
                        log.info("retention: deleted %d finished task(s)", purged)
            except Exception:
                log.exception("hourly tidy-up failed")
            await asyncio.sleep(3600)

    async def submit(self, task_input: str, idempotency_key: str | None = None) -> Task:
        """Store a new task (pending), then start its flow; with an ``idempotency_key``
        already used for the same request within its window, the task it created.

        Runs to the end even if the client leaves: a submit creates a running task or none.
        """
        if not self.accepting:
            raise Unavailable("the service is shutting down; submit again shortly")
        if idempotency_key is None:
            return await asyncio.shield(self._create(task_input, None))
        key = IdempotencyKey(idempotency_key, hashlib.sha256(task_input.encode()).hexdigest())
        same = self._submitting.get(key.key)
        if same is None:  # the first of concurrent retries here; the store settles the rest
            same = self._submitting[key.key] = asyncio.ensure_future(self._submit_once(key,
                                                                                  task_input))
            same.add_done_callback(lambda _: self._submitting.pop(key.key, None))
        task = await asyncio.shield(same)
        return await self._check_same_request(task, key)

    async def _submit_once(self, key: IdempotencyKey, task_input: str) -> Task:
        stored = await self.store.find_idempotent(key.key)
        if stored is None:
            try:
                return await self._create(task_input, key)
            except DuplicateKey:  # another process took the key first
                stored = await self.store.find_idempotent(key.key)
                if stored is None:
                    raise
        return await self.get_task(stored[0])

    async def _check_same_request(self, task: Task, key: IdempotencyKey) -> Task:
        stored = await self.store.find_idempotent(key.key)
        if stored is not None and stored[1] != key.request_hash:
            raise Conflict(f"Idempotency-Key {key.key!r} was used for another request "
                           f"(task {stored[0]}); use a new key for a new task")
        return task

    async def _create(self, task_input: str, key: IdempotencyKey | None) -> Task:
        tracker = Tracker(Task(new_task_id(), task_input), self.journal)
        task_id = tracker.task.task_id
        self.trackers[task_id] = tracker
        try:
            await tracker.update(Status.PENDING, idempotency=key)
        except BaseException:
            del self.trackers[task_id]
            self.journal.forgive(task_id)  # never stored: nothing to reload
            raise
        self._launch(tracker, "process")
        return tracker.task

    async def decide(self, task_id: str, decision: Decision, comment: str = "",
                     reviewer: str = "", attempt: int | None = None) -> Task:
        """Hand a reviewer's decision to the waiting flow; returns once it is stored."""
        tracker = await self._live(task_id)
        task = tracker.task
        review = Review(decision, attempt or task.attempt, comment, reviewer)
        stored = tracker.claim_decision(review)  # check and Event.set(), no await between
        await asyncio.shield(stored)
        return task

    async def cancel(self, task_id: str) -> Task:
        """Cancel an unfinished task; its flow stops and the task ends as cancelled."""
        tracker = await self._live(task_id)
        if tracker.flow is None or tracker.task.status.terminal:
            raise Conflict(f"task {task_id} is already {tracker.task.status}")
        if tracker.cancel_requested:
            raise Conflict(f"task {task_id} is already being cancelled")
        tracker.cancel_requested = True
        tracker.flow.cancel()
        await asyncio.wait([tracker.flow])
        if tracker.finish_error is not None:
            raise tracker.finish_error
        return tracker.task

    async def get_task(self, task_id: str) -> Task:
        """The task as stored: what the API shows is never ahead of the database."""
        task = await self.store.get_task(task_id)
        if task is None:
            raise NotFound(f"no task with id {task_id!r}")
        return task

    async def resolve(self, task_id: str) -> str:
        """The full id of the task named by its id or a unique prefix (8+ characters)."""
        return await self.store.resolve_task_id(task_id)

    async def task_state(self, task_id: str) -> tuple[Status, int]:
        """Status and last message number, for a stream to decide what to replay.

        Live and recently finished tasks are answered from memory: a reconnect storm
        after a task finishes asks this thousands of times at once.
        """
        tracker = self.trackers.get(task_id)
        if tracker is not None:
            return tracker.task.status, tracker.task.last_seq
        state = self._finished.get(task_id) or await self.store.task_state(task_id)
        if state is None:
            raise NotFound(f"no task with id {task_id!r}")
        return state

    async def longest_waiting(self, skip: str | None = None) -> str | None:
        """The id of the task that has waited longest for review, but ``skip``; or None."""
        return await self.store.longest_waiting(skip)

    async def list_tasks(self, status: Status | None, limit: int, offset: int
                         ) -> tuple[list[TaskRow], int]:
        return await self.store.list_tasks(status, limit, offset)

    async def task_row(self, task_id: str) -> TaskRow | None:
        """One task as lists show it (excerpts), or None once it is deleted."""
        return await self.store.task_row(task_id)

    async def status_counts(self) -> dict[str, int]:
        """How many stored tasks are in each status (for dashboards)."""
        return await self.store.status_counts()

    def health(self) -> dict[str, object]:
        """Liveness and gauges; ``status`` is "degraded" while changes cannot be stored."""
        failure = self.journal.failure
        return {"status": "degraded" if failure else "ok", "accepting": self.accepting,
                "live_tasks": len(self.trackers), "subscribers": self.broker.subscriber_count(),
                **({"error": f"storage unavailable: {failure}"} if failure else {})}

    async def _live(self, task_id: str) -> Tracker:
        tracker = self.trackers.get(task_id)
        if tracker is None:
            task = await self.get_task(task_id)  # NotFound, or finished
            if not task.status.terminal:  # its flow stopped when a write failed
                self._recover_soon()
                raise StorageUnavailable(self.journal.failure or "the task is being reloaded; "
                                                                 "send it again shortly")
            raise Conflict(f"task {task_id} is already {task.status}")
        self.journal.check_writable(task_id)
        return tracker

    def _resume(self, task: Task) -> None:
        """Restart a stored, unfinished task's flow at the step it had reached."""
        self.journal.forgive(task.task_id)
        tracker = Tracker(task, self.journal)
        self.trackers[task.task_id] = tracker
        step: Step = "process"
        if task.status is Status.WAITING_FOR_REVIEW:
            step = "review"
        elif task.status is Status.PROCESSING_FEEDBACK and task.reviews:
            tracker.shared["feedback"] = task.reviews[-1]
            step = "result" if task.reviews[-1].decision == "approved" else "process"
        log.info("resuming task %s at %s (was %s)", task.task_id, step, task.status)
        self._launch(tracker, step)

    def _launch(self, tracker: Tracker, step: Step) -> None:
        flow = build_flow(self.config, self.pool, step)
        tracker.flow = asyncio.create_task(self._drive(tracker, flow),
                                           name=f"hitl-task-{tracker.task.task_id}")

    async def _drive(self, tracker: Tracker, flow: AsyncFlow) -> None:
        task = tracker.task
        finished = False
        try:
            if task.status is Status.PROCESSING_FEEDBACK and task.reviews:
                check_attempts_left(tracker.shared, self.config.max_attempts)
            await flow.run_async(tracker.shared)
            finished = True
        except asyncio.CancelledError:
            if tracker.cancel_requested and task.task_id in self.journal.refused:
                tracker.finish_error = self._why_stopped(task.task_id)
            elif tracker.cancel_requested:
                finished = await self._finish(tracker, Status.CANCELLED,
                                              error="cancelled by request")
            # else: shutting down, or a write failed; the task stays as stored, and
            # resumes at the next start or once storage recovers
        except StorageUnavailable as exc:
            log.warning("task %s stopped: %s", task.task_id, exc)
        except TaskFailed as exc:
            finished = await self._finish(tracker, Status.FAILED, error=str(exc))
        except Exception as exc:
            log.exception("task %s failed", task.task_id)
            finished = await self._finish(tracker, Status.FAILED,
                                          error=f"{type(exc).__name__}: {exc}")
        finally:
            tracker.active = False
            self.trackers.pop(task.task_id, None)
            if not tracker.decision_recorded:  # claimed, but the flow stopped before storing it
                tracker.settle_decision(self._why_stopped(task.task_id))
            if finished:
                self.broker.release(task.task_id)
                self._finished[task.task_id] = (task.status, task.last_seq)
                if len(self._finished) > RECENTLY_FINISHED:
                    self._finished.popitem(last=False)
            elif self.accepting:  # not shutting down: bring it back from the store
                self._recover_soon()

    def _why_stopped(self, task_id: str) -> Exception:
        if task_id in self.journal.refused:
            return StorageUnavailable(self.journal.failure or "the task could not be stored")
        if not self.accepting:
            return Unavailable("the service is shutting down; the decision was not recorded, "
                               "send it again shortly")
        return Conflict(f"task {task_id} stopped before the decision was recorded")

    async def _finish(self, tracker: Tracker, status: Status, error: str) -> bool:
        """Record the task's end; False (and ``tracker.finish_error``) if not stored."""
        tracker.finishing = True  # no longer stopped from outside: it is ending
        try:
            await tracker.update(status, error=error, event={"error": error})
        except StorageUnavailable as exc:
            log.warning("could not record task %s as %s: %s", tracker.task.task_id, status, exc)
            tracker.finish_error = exc
            return False
        tracker.settle_decision(Conflict(f"task {tracker.task.task_id} ended as {status}"))
        return True

    def _strand(self, task_id: str) -> None:
        """A change of the task was not stored: stop its flow; it is reloaded from the store
        (which never saw that change) once writes succeed again."""
        tracker = self.trackers.get(task_id)
        if (tracker is not None and tracker.flow is not None and not tracker.flow.done()
                and not tracker.finishing):
            tracker.flow.cancel()
        self._recover_soon()

    def _recover_soon(self) -> None:
        if self.accepting and (self._recovery is None or self._recovery.done()):
            self._recovery = asyncio.create_task(self._recover(), name="hitl-recovery")

    async def _recover(self) -> None:
        """Once the store takes writes again, resume every unfinished task with no flow."""
        wait, longest = RECOVERY_WAIT
        while self.accepting:
            await asyncio.sleep(wait)
            wait = min(wait * 2, longest)
            stopping = [t.flow for t in self.trackers.values()
                        if t.task.task_id in self.journal.refused and t.flow is not None]
            if stopping or not await self.journal.probe():
                continue
            try:
                unfinished = await self.store.unfinished_tasks()
            except Exception:
                log.exception("could not read the tasks to resume")
                continue
            for task in unfinished:
                if task.task_id not in self.trackers and self.accepting:
                    self._resume(task)
            self.journal.refused.intersection_update(self.trackers)
            if not self.journal.refused and self.journal.failure is None:
                return
