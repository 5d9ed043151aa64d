"""Owns every running flow: starts, resumes, decides, cancels and stops them.

Routes call these service functions; nothing else creates a flow or touches a task's
runtime handles.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from pocketflow import AsyncFlow
from quart import Quart

from .broker import Broker
from .config import Config
from .errors import Conflict, NotFound, TaskFailed, Unavailable
from .flow import Step, build_flow
from .journal import Journal
from .lifecycle import attach
from .models import Decision, Review, Status, Task, TaskRow, new_task_id
from .nodes import check_attempts_left
from .processors import Processor, ProcessorPool, load_processor
from .store import Store
from .tracker import Tracker

log = logging.getLogger(__name__)

RECENTLY_FINISHED = 1024  # finished tasks whose stream state is kept in memory


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
        self._finished: OrderedDict[str, tuple[Status, int]] = OrderedDict()

    def init_app(self, app: Quart) -> None:
        attach(app, "runner", self, self.start, self.close)

    async def start(self) -> None:
        """Resume every unfinished task, then take new work."""
        for task in await self.store.unfinished_tasks():
            self._resume(task)
        if self.config.retain_days:
            self._janitor = asyncio.create_task(self._purge_every_hour(self.config.retain_days))
        self.accepting = True

    async def close(self) -> None:
        """Stop taking work and stop every flow without marking it failed."""
        self.accepting = False
        if self._janitor is not None:
            self._janitor.cancel()
        flows = [t.flow for t in self.trackers.values() if t.flow is not None]
        for flow in flows:
            flow.cancel()
        if flows:
            await asyncio.wait(flows, timeout=self.config.shutdown_timeout)
        self.pool.shutdown()

    async def _purge_every_hour(self, days: float) -> None:
        """Retention: delete finished tasks older than ``days`` (at start, then hourly)."""
        while True:
            try:
                purged = await self.store.purge_finished(days)
                if purged:
                    self._finished.clear()  # a deleted task must read as unknown (404)
                    log.info("retention: deleted %d finished task(s)", purged)
            except Exception:
                log.exception("retention purge failed")
            await asyncio.sleep(3600)

    async def submit(self, task_input: str) -> Task:
        """Store a new task (pending), then start its flow."""
        if not self.accepting:
            raise Unavailable("the service is shutting down; submit again shortly")
        tracker = Tracker(Task(new_task_id(), task_input), self.journal)
        self.trackers[tracker.task.task_id] = tracker
        try:
            await tracker.update(Status.PENDING)
        except BaseException:
            del self.trackers[tracker.task.task_id]
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
        tracker.cancel_requested = True
        tracker.flow.cancel()
        await asyncio.wait([tracker.flow])
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

    async def list_tasks(self, status: Status | None, limit: int, offset: int
                         ) -> tuple[list[TaskRow], int]:
        return await self.store.list_tasks(status, limit, offset)

    async def task_row(self, task_id: str) -> TaskRow | None:
        """One task as lists show it (excerpts), or None once it is deleted."""
        return await self.store.task_row(task_id)

    async def status_counts(self) -> dict[str, int]:
        """How many stored tasks are in each status (for dashboards)."""
        return await self.store.status_counts()

    async def _live(self, task_id: str) -> Tracker:
        tracker = self.trackers.get(task_id)
        if tracker is None:
            task = await self.get_task(task_id)  # NotFound, or finished
            raise Conflict(f"task {task_id} is already {task.status}")
        return tracker

    def _resume(self, task: Task) -> None:
        """Restart a stored, unfinished task's flow at the step it had reached."""
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
        try:
            if task.status is Status.PROCESSING_FEEDBACK and task.reviews:
                check_attempts_left(tracker.shared, self.config.max_attempts)
            await flow.run_async(tracker.shared)
        except asyncio.CancelledError:
            if tracker.cancel_requested:
                await self._finish(tracker, Status.CANCELLED, error="cancelled by request")
            # else: shutting down; the task stays as stored and resumes at next start
        except TaskFailed as exc:
            await self._finish(tracker, Status.FAILED, error=str(exc))
        except Exception as exc:
            log.exception("task %s failed", task.task_id)
            await self._finish(tracker, Status.FAILED, error=f"{type(exc).__name__}: {exc}")
        finally:
            self.trackers.pop(task.task_id, None)
            if task.status.terminal:
                self.broker.release(task.task_id)
                self._finished[task.task_id] = (task.status, task.last_seq)
                if len(self._finished) > RECENTLY_FINISHED:
                    self._finished.popitem(last=False)

    async def _finish(self, tracker: Tracker, status: Status, error: str) -> None:
        try:
            await tracker.update(status, error=error, event={"error": error})
        except Exception:
            log.exception("could not record task %s as %s", tracker.task.task_id, status)
        tracker.settle_decision(Conflict(f"task {tracker.task.task_id} ended as {status}"))
