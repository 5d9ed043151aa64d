"""Owns every running flow: starts, resumes, decides, cancels and stops them.

Routes call these service functions; nothing else creates a flow or touches a task's
runtime handles. Each takes who is asking (``by``) and asks :mod:`hitl.policy` first, so
every path to a task, whatever its form, is checked alike and once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from pocketflow import AsyncFlow
from quart import Quart

from . import deadlines, logs, metrics, policy
from .accounts import SYSTEM_NAMES, Identity
from .broker import Broker
from .config import Config
from .errors import (
    ConfigError,
    Conflict,
    DuplicateKey,
    Invalid,
    NotFound,
    StorageUnavailable,
    Superseded,
    TaskFailed,
    Unavailable,
)
from .flow import Step, build_flow
from .journal import Journal
from .lifecycle import attach
from .models import (
    Decision,
    Review,
    Status,
    Task,
    TaskEvent,
    TaskRow,
    new_task_id,
    options_row,
)
from .nodes import check_attempts_left, up_for_review
from .processors import EXTERNAL, Pool, Processor, ProcessorPool, load_processor
from .store import IdempotencyKey, Store, TaskPage, TaskState, View
from .tracker import Tracker
from .work import WorkQueue

log = logging.getLogger(__name__)

RECENTLY_FINISHED = 1024  # finished tasks whose stream state is kept in memory
RECOVERY_WAIT = (0.2, 5.0)  # first and longest wait between checks that storage is back
SUPERSEDED_RETRIES = 5  # a decision made again from a fresh read, when another process won


class Runner:
    """The workflow side of the service."""

    def __init__(self, config: Config, store: Store, journal: Journal, broker: Broker,
                 processor: Processor | None = None, work: WorkQueue | None = None) -> None:
        self.config = config
        self.store = store
        self.journal = journal
        self.broker = broker
        self.pool: Pool
        if processor is None and config.processor == EXTERNAL:
            if work is None:
                raise ConfigError("--processor external needs the work queue of the app "
                                  "(hitl.app.create_app passes it)")
            self.pool = work.pool()
        else:
            self.pool = ProcessorPool(processor or load_processor(config.processor))
        self.trackers: dict[str, Tracker] = {}
        self.accepting = False
        self._janitor: asyncio.Task[None] | None = None
        self._recovery: asyncio.Task[None] | None = None
        self._submitting: dict[str, asyncio.Future[Task]] = {}  # by Idempotency-Key
        self._stranded: set[str] = set()  # unfinished tasks whose flow stopped on a failure
        self._finished: OrderedDict[str, TaskState] = OrderedDict()
        self._leases: asyncio.Task[None] | None = None  # a shared store: renew, take over
        self._reloads: set[asyncio.Task[None]] = set()
        journal.on_refused = self._strand

    def init_app(self, app: Quart) -> None:
        attach(app, "runner", self, self.start, self.close)

    async def start(self) -> None:
        """Resume every unfinished task (a shared store: those no live process owns), then
        take new work."""
        if self.store.shared:
            await self._take_over()
            self.broker.listeners.append(self._changed)
            self._leases = asyncio.create_task(self._keep_leases(), name="hitl-leases")
        else:
            for task in await self.store.unfinished_tasks():
                self._resume(task)
        self._janitor = asyncio.create_task(self._tidy_every_hour(), name="hitl-tidy")
        self.accepting = True

    async def close(self) -> None:
        """Stop taking work and stop every flow without marking it failed."""
        self.accepting = False
        for job in (self._janitor, self._recovery, self._leases):
            if job is not None:
                job.cancel()
        flows = [t.flow for t in self.trackers.values() if t.flow is not None]
        for flow in flows:
            flow.cancel()
        if flows:
            await asyncio.wait(flows, timeout=self.config.shutdown_timeout)
        self.pool.shutdown()
        if self.store.shared:  # stopped in order: the other processes take over at once,
            try:  # once what the flows stored last is committed (the journal's close waits)
                await self.journal.close()
                await self.store.let_go()
            except Exception as exc:
                log.warning("could not let go of this process's tasks (they are taken over "
                            "once their leases lapse): %s", exc)

    # A shared store (hitl.pg_store): each unfinished task's flow runs on the one process
    # that holds its lease; the others decide and cancel through the store (_detached).

    async def _keep_leases(self) -> None:
        """Renew this process's leases and take over lapsed ones, every third of a lease."""
        every = self.store.lease / 3
        while True:
            await asyncio.sleep(every)
            try:
                running = {task_id for task_id, tracker in self.trackers.items()
                           if tracker.started and tracker.flow is not None}
                # Only what runs here, or is to resume here: a task owned but never started
                # (a take-over whose read failed, say) lapses, and is taken over again.
                owned = await self.store.renew({*self.trackers, *self._stranded})
                for task_id in running:
                    if task_id not in owned:  # ended elsewhere, or taken over: read it again
                        self._stop_and_reload(task_id)
                    else:  # news of a change made elsewhere may be lost: the store says
                        self._outdated(task_id, owned[task_id])
                # A page at a time, within half a tick: a dead process's thousands of tasks
                # must not keep this one from renewing its own.
                await self._take_over(until=time.monotonic() + every / 2)
            except Exception as exc:
                log.warning("flow leases not renewed: %s", exc)

    async def _take_over(self, until: float | None = None) -> None:
        """Resume the unfinished tasks no live process owns (their owner stopped, or died),
        a page at a time (until ``until``, on the monotonic clock, if given)."""
        while True:
            taken = await self.store.take_over()
            for task, lapsed in taken:
                if task.task_id in self.trackers:
                    continue  # ours all along: renewed late
                if lapsed:
                    metrics.lease_taken_over("flow")
                    log.info("taking over task %s", task.task_id, extra=logs.task(task.task_id))
                if not task.status.terminal:
                    self._resume(task)
            if len(taken) < 100 or (until is not None and time.monotonic() >= until):
                return

    def _changed(self, event: TaskEvent) -> None:
        self._outdated(event.task_id, event.seq)

    def _outdated(self, task_id: str, stored_seq: int) -> None:
        """A change numbered ``stored_seq`` was committed: one this process did not make (a
        number above its own copy's) to a task whose flow runs here (a decision or cancel
        taken by another process) means the flow works from an outdated copy. Stop it; it
        resumes from the store, as after a restart."""
        tracker = self.trackers.get(task_id)
        if tracker is not None and stored_seq > tracker.task.last_seq:
            self._stop_and_reload(task_id)

    def _stop_and_reload(self, task_id: str) -> None:
        """Stop the task's flow here without writing, and read the task again: it goes on
        from the store if it is still this process's and unfinished (else another process
        runs it, or it ended)."""
        tracker = self.trackers.get(task_id)
        if (tracker is None or tracker.flow is None or tracker.flow.done()
                or tracker.finishing or tracker.outdated or tracker.task.status.terminal):
            return  # gone, stopping, or ending by itself (its end is stored: not renewed)
        log.info("task %s changed by another process (or is now another's); reading it "
                 "again", task_id, extra=logs.task(task_id))
        tracker.outdated = True
        tracker.flow.cancel()

    async def _reload(self, task_id: str) -> None:
        """Resume a task whose flow stopped for a change made elsewhere, from a fresh read."""
        try:
            task = await self.store.get_task(task_id)
            ours = task is not None and await self.store.owns(task_id)
        except Exception as exc:
            log.warning("could not reload task %s: %s", task_id, exc, extra=logs.task(task_id))
            self._stranded.add(task_id)  # the recovery tries again once the store answers
            self._recover_soon()
            return
        if task_id in self.trackers or not self.accepting:
            return
        if task is None or task.status.terminal or not ours:
            if not ours and task is not None and not task.status.terminal:
                log.warning("task %s: its flow lease went to another process", task_id,
                            extra=logs.task(task_id))
            self.journal.forgive(task_id)  # ended, or another process runs it now
            if task is not None and task.status.terminal:
                self.broker.release(task_id)
                self._finished[task_id] = task_state(task)
            return
        self._resume(task)

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

    async def submit(self, task_input: str, idempotency_key: str | None = None, *,
                     by: Identity, reviewers: tuple[str, ...] = (),
                     allow_self_review: bool = False, title: str = "",
                     metadata: dict[str, Any] | None = None, quorum: int | None = None,
                     review_timeout: float | None = None, on_timeout: str | None = None,
                     escalate_to: tuple[str, ...] = (),
                     max_attempts: int | None = None, output: str | None = None) -> Task:
        """Store a new task (pending), then start its flow; with an ``idempotency_key``
        already used for the same request within its window, the task it created.

        With an ``output`` it is a review-only task: stored waiting for review with that
        text as attempt 1's output, its flow starting at the review (a rejection's next
        attempt is the processor's, as ever).

        ``reviewers`` and ``allow_self_review`` say who may decide it (:mod:`hitl.policy`);
        it is recorded as submitted by ``by``. The other options (validated by
        :class:`~hitl.schemas.SubmitIn`) are stored with it, each None being the server's
        default of then. Runs to the end even if the client leaves: a submit creates a
        running task or none.
        """
        policy.can_submit(by).require()
        if not self.accepting:
            raise Unavailable("the service is shutting down; submit again shortly")
        config = self.config
        task = Task(new_task_id(), task_input,
                    submitted_by=None if policy.signed_out(by) else by.name,
                    reviewers=reviewers, allow_self_review=allow_self_review, title=title,
                    metadata=metadata, quorum=quorum or config.quorum,
                    review_timeout=review_timeout or config.review_timeout,
                    on_timeout=on_timeout or config.on_timeout, escalate_to=escalate_to,
                    max_attempts=max_attempts,  # None: the server's, as before
                    processed_output=output)
        if idempotency_key is None:
            return await asyncio.shield(self._create(task, None))
        key = IdempotencyKey(idempotency_key, request_hash(task))
        same = self._submitting.get(key.key)
        if same is None:  # the first of concurrent retries here; the store settles the rest
            same = self._submitting[key.key] = asyncio.ensure_future(self._submit_once(key,
                                                                                  task))
            same.add_done_callback(lambda _: self._submitting.pop(key.key, None))
        created = await asyncio.shield(same)
        return await self._check_same_request(created, key, by)

    async def _submit_once(self, key: IdempotencyKey, task: Task) -> Task:
        stored = await self.store.find_idempotent(key.key)
        if stored is None:
            try:
                return await self._create(task, key)
            except DuplicateKey:  # another process took the key first
                stored = await self.store.find_idempotent(key.key)
                if stored is None:  # ... and its window ended in between
                    raise Conflict(f"Idempotency-Key {key.key!r} is in use; "
                                   "send it again") from None
        return await self._stored(stored[0])

    async def _check_same_request(self, task: Task, key: IdempotencyKey, by: Identity) -> Task:
        stored = await self.store.find_idempotent(key.key)
        if stored is not None and stored[1] != key.request_hash:
            which = f" (task {stored[0]})" if policy.can_see(by, task) else ""
            raise Conflict(f"Idempotency-Key {key.key!r} was used for another request"
                           f"{which}; use a new key for a new task")
        return task

    async def _create(self, task: Task, key: IdempotencyKey | None) -> Task:
        """Store the new task, pending (or, given its output, waiting for review), then
        start its flow there."""
        tracker = Tracker(task, self.journal)
        task_id = tracker.task.task_id
        self.trackers[task_id] = tracker
        output = task.processed_output
        try:
            if output is None:
                await tracker.update(Status.PENDING, idempotency=key)
            else:
                now, due = time.time(), deadlines.deadline(task)
                await tracker.update(
                    Status.WAITING_FOR_REVIEW, idempotency=key, review_deadline=due,
                    event=up_for_review(task, output, task.attempt, due),
                    attempt_record={"output": output, "started_at": now, "finished_at": now,
                                    "error": None, "tries": 0})
        except BaseException:
            del self.trackers[task_id]
            self.journal.forgive(task_id)  # never stored: nothing to reload
            raise
        self._launch(tracker, "process" if output is None else "review")
        return tracker.task

    async def decide(self, task_id: str, decision: Decision, comment: str = "",
                     reviewer: str = "", attempt: int | None = None, *,
                     by: Identity, edited_output: str | None = None) -> Task:
        """Hand a reviewer's vote to the waiting flow; returns once it is stored.

        It is recorded as ``by``'s; ``reviewer`` (free text) names the decider only when
        no one signs in (``--auth none``). With quorum 1 the vote is the decision; above,
        see :meth:`Tracker.vote`. ``edited_output`` approves an edited text instead of the
        output (the same text unchanged is a plain approval).
        """
        if edited_output is not None and decision != "approved":
            raise Invalid("edited_output: only an approval carries an edited text")
        visible = await self._visible(task_id, by)
        attempt = attempt or visible.attempt  # the one the reviewer saw, on a retry too
        for retry in range(SUPERSEDED_RETRIES):
            try:
                return await self._decide_once(visible, decision, comment, reviewer, attempt,
                                               by, edited_output)
            except Superseded:  # another process changed the task first (another vote,
                if retry == SUPERSEDED_RETRIES - 1:  # say): the rules decide on a fresh read
                    raise
                visible = await self._visible(task_id, by)
        raise AssertionError("unreachable")

    async def _decide_once(self, visible: Task, decision: Decision, comment: str,
                           reviewer: str, attempt: int, by: Identity,
                           edited_output: str | None) -> Task:
        task_id = visible.task_id
        verdict = policy.can_decide(by, visible)
        verdict.require()
        tracker = await self._live(task_id, visible)
        task = tracker.task
        verdict = policy.can_decide(by, task)  # again, live: an escalation changes reviewers
        verdict.require()
        if edited_output == task.processed_output:
            edited_output = None
        if (edited_output is not None and task.quorum > 1
                and task.attempt >= task.attempts_allowed(self.config.max_attempts)):
            # an edit above quorum 1 is an attempt of its own: it counts toward the limit
            raise Conflict(f"task {task_id} has no attempt left for an edit (at most "
                           f"{task.attempts_allowed(self.config.max_attempts)}): approve "
                           f"or reject attempt {task.attempt}")
        review = Review(decision, attempt, comment,
                        **signature(by, reviewer, verdict), edited_output=edited_output)
        if tracker.detached:  # the flow runs on another process: the store decides
            return await self._detached(tracker, lambda: self._vote_detached(tracker, review))
        stored = tracker.vote(review)  # checks and Event.set(), no await between
        await asyncio.shield(stored)
        return task

    @staticmethod
    def _vote_detached(tracker: Tracker, review: Review) -> asyncio.Future[None]:
        stored = tracker.vote(review)
        if tracker.task.status is Status.PROCESSING_FEEDBACK and not tracker.decision_recorded:
            tracker.record_decision(review)  # what the review step does where a flow runs
        return stored

    async def _detached(self, tracker: Tracker,
                        change: Callable[[], Awaitable[None]]) -> Task:
        """Make a change to a task whose flow runs on another process, from the store's copy:
        the store takes it only over that copy (a change made there meanwhile refuses it),
        and the flow's owner, told of the change, resumes from the store."""
        await asyncio.shield(change())
        return tracker.task

    async def cancel(self, task_id: str, *, by: Identity) -> Task:
        """Cancel an unfinished task; its flow stops and the task ends as cancelled."""
        visible = await self._visible(task_id, by)
        policy.can_cancel(by, visible).require()
        tracker = await self._live(task_id, visible)
        if tracker.detached:
            return await self._detached(tracker, lambda: tracker.update(
                Status.CANCELLED, error="cancelled by request",
                event={"error": "cancelled by request"}))
        if tracker.flow is None or tracker.task.status.terminal:
            raise Conflict(f"task {task_id} is already {tracker.task.status}")
        if tracker.cancel_requested:
            raise Conflict(f"task {task_id} is already being cancelled")
        tracker.cancel_requested = True
        tracker.flow.cancel()
        await asyncio.wait([tracker.flow])
        if tracker.ended and tracker.task.status is Status.CANCELLED:
            return tracker.task
        if tracker.ended:  # it finished before the cancel reached it
            raise Conflict(f"task {task_id} is already {tracker.task.status}")
        raise tracker.finish_error or Unavailable(f"task {task_id} was not cancelled; "
                                                  "send it again shortly")

    async def get_task(self, task_id: str, *, by: Identity) -> Task:
        """The task as stored: what the API shows is never ahead of the database."""
        policy.can_read(by).require()
        task = await self.store.get_task(task_id)
        if task is None or not policy.can_see(by, task):
            raise NotFound(f"no task with id {task_id!r}")
        return task

    async def resolve(self, task_id: str, *, by: Identity) -> str:
        """The full id of the task named by its id or a unique prefix (8+ characters),
        among the tasks ``by`` may see."""
        policy.can_read(by).require()
        return await self.store.resolve_task_id(task_id, policy.owner_filter(by))

    async def task_state(self, task_id: str, *, by: Identity) -> TaskState:
        """Status, last message number and submitter, for a stream to decide what to replay.

        Live and recently finished tasks are answered from memory: a reconnect storm
        after a task finishes asks this thousands of times at once.
        """
        policy.can_read(by).require()
        tracker = self.trackers.get(task_id)
        state = (task_state(tracker.task) if tracker is not None
                 else self._finished.get(task_id) or await self.store.task_state(task_id))
        if state is None or not policy.can_see(by, state):
            raise NotFound(f"no task with id {task_id!r}")
        return state

    async def list_tasks(self, status: Status | None, limit: int, offset: int, *,
                         by: Identity) -> tuple[list[TaskRow], int]:
        """A page of the tasks ``by`` may see (a submitter: their own, filtered in SQL)."""
        policy.can_read(by).require()
        return await self.store.list_tasks(status, limit, offset, policy.owner_filter(by))

    def watch_scope(self, by: Identity) -> str | None:
        """Whose tasks ``by`` may watch on the all-tasks streams: everyone's (None), or
        only those this user submitted (a submitter); Forbidden for a worker."""
        policy.can_read(by).require()
        return policy.owner_filter(by)

    async def task_page(self, view: View, limit: int, after: str | None = None,
                        offset: int = 0, *, by: Identity) -> TaskPage:
        """A page of the view's tasks that ``by`` may see (a submitter: their own, in SQL)."""
        policy.can_read(by).require()
        view = dataclasses.replace(view, submitted_by=policy.owner_filter(by))
        return await self.store.task_page(view, limit, after, offset)

    async def oldest_waiting(self, after: str | None = None, *, by: Identity) -> str | None:
        """The task waiting longest that ``by`` may decide (after ``after``, round)."""
        policy.can_read(by).require()
        if not policy.decides_any(by):  # a viewer's or a submitter's queue is empty
            return None
        return await self.store.oldest_waiting(after, policy.review_scope(by))

    async def changes_since(self, since: int, limit: int, *, by: Identity
                            ) -> list[tuple[TaskRow, bool]]:
        """The tasks ``by`` may see that changed after message ``since``."""
        policy.can_read(by).require()
        return await self.store.changes_since(since, limit, policy.owner_filter(by))

    async def task_row(self, task_id: str) -> TaskRow | None:
        """One task as lists show it (excerpts), or None once it is deleted: for a stream
        that has checked the task is its reader's (a dashboard row, rendered once for all)."""
        return await self.store.task_row(task_id)

    async def status_counts(self, *, by: Identity) -> dict[str, int]:
        """How many stored tasks ``by`` may see are in each status (for dashboards)."""
        policy.can_read(by).require()
        return await self.store.status_counts(policy.owner_filter(by))

    def health(self) -> dict[str, object]:
        """Liveness and gauges; ``status`` is "degraded" while changes cannot be stored."""
        failure = self.journal.failure
        return {"status": "degraded" if failure else "ok", "accepting": self.accepting,
                "live_tasks": len(self.trackers), "subscribers": self.broker.subscriber_count(),
                **({"error": f"storage unavailable: {failure}"} if failure else {})}

    async def _stored(self, task_id: str) -> Task:
        task = await self.store.get_task(task_id)
        if task is None:
            raise NotFound(f"no task with id {task_id!r}")
        return task

    async def _visible(self, task_id: str, by: Identity) -> Task:
        """The task, live or stored, if ``by`` may see it (who submitted it and who may
        decide it never change: a live task's record answers without a read)."""
        policy.can_read(by).require()
        tracker = self.trackers.get(task_id)
        task = tracker.task if tracker is not None else await self.store.get_task(task_id)
        if task is None or not policy.can_see(by, task):
            raise NotFound(f"no task with id {task_id!r}")
        return task

    async def _live(self, task_id: str, read: Task | None = None) -> Tracker:
        """The tracker of a task whose flow runs, or the reason a change cannot be made; on a
        shared store, one with no flow for a task whose flow runs elsewhere, made from
        ``read`` if it is a read of the store made just now (not a live tracker's)."""
        tracker = self.trackers.get(task_id)
        if self.store.shared and (tracker is None or not tracker.started
                                  or task_id in self.journal.refused):
            # Its flow runs on another process, or is being reloaded here: the change is
            # made from the store's copy, and taken only over that copy.
            live = tracker.task if tracker is not None else None
            task = read if read is not None and read is not live else await self._stored(
                task_id)  # NotFound, or finished
            if task.status.terminal:
                raise Conflict(f"task {task_id} is already {task.status}")
            if not self.accepting:
                raise Unavailable("the service is shutting down; send it again shortly")
            return Tracker(task, self.journal, detached=True)
        if tracker is None:
            task = await self._stored(task_id)  # NotFound, or finished
            if task.status.terminal:
                raise Conflict(f"task {task_id} is already {task.status}")
            if not self.accepting:
                raise Unavailable("the service is shutting down; send it again shortly")
            self._stranded.add(task_id)  # unfinished with no flow: its flow stopped on a
            self._recover_soon()  # failed write; it resumes once writes succeed
            raise StorageUnavailable(self.journal.failure or "the task is being reloaded; "
                                                             "send it again shortly")
        if not tracker.started:  # resumed this very moment: its flow takes over first
            raise Unavailable(f"task {task_id} is being reloaded; send it again shortly")
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
        log.info("resuming task %s at %s (was %s)", task.task_id, step, task.status,
                 extra=logs.task(task.task_id))
        self._launch(tracker, step)

    def _launch(self, tracker: Tracker, step: Step) -> None:
        flow = build_flow(self.config, self.pool, step)
        tracker.flow = asyncio.create_task(self._drive(tracker, flow),
                                           name=f"hitl-task-{tracker.task.task_id}")
        # Whatever ends the flow, even a cancel before its first step, ends its tracker.
        tracker.flow.add_done_callback(lambda _: self._flow_done(tracker))

    async def _drive(self, tracker: Tracker, flow: AsyncFlow) -> None:
        tracker.started = True
        task = tracker.task
        logs.about_task(task.task_id)  # whatever the flow logs (its processor too) is about it
        try:
            if task.status is Status.PROCESSING_FEEDBACK and task.reviews:
                last = task.reviews[-1]  # resumed after a timeout that fails the task
                if last.auth_method == deadlines.TIMEOUT.method and deadlines.fails(task):
                    raise TaskFailed(deadlines.failure(task))
                check_attempts_left(tracker.shared, task.attempts_allowed(self.config.max_attempts))
            await flow.run_async(tracker.shared)
            tracker.ended = True
        except asyncio.CancelledError:
            if tracker.cancel_requested and task.task_id in self.journal.refused:
                tracker.finish_error = self._why_stopped(task.task_id)
            elif tracker.cancel_requested:
                tracker.ended = await self._finish(tracker, Status.CANCELLED,
                                                   error="cancelled by request")
            # else: shutting down, or a write failed; the task stays as stored, and
            # resumes at the next start or once storage recovers
        except StorageUnavailable as exc:
            log.warning("task %s stopped: %s", task.task_id, exc)
        except TaskFailed as exc:
            tracker.ended = await self._finish(tracker, Status.FAILED, error=str(exc))
        except Exception as exc:
            log.exception("task %s failed", task.task_id)
            tracker.ended = await self._finish(tracker, Status.FAILED,
                                               error=f"{type(exc).__name__}: {exc}")

    def _flow_done(self, tracker: Tracker) -> None:
        task = tracker.task
        tracker.active = False
        if self.trackers.get(task.task_id) is tracker:
            del self.trackers[task.task_id]
        if not tracker.decision_recorded:  # claimed, but the flow stopped before storing it
            tracker.settle_decision(self._why_stopped(task.task_id))
        if tracker.ended:
            self.broker.release(task.task_id)
            self._finished[task.task_id] = task_state(task)
            if len(self._finished) > RECENTLY_FINISHED:
                self._finished.popitem(last=False)
        elif tracker.outdated and self.accepting:  # changed elsewhere: reload it at once
            reload = asyncio.create_task(self._reload(task.task_id),
                                         name=f"hitl-reload-{task.task_id}")
            self._reloads.add(reload)
            reload.add_done_callback(self._reloads.discard)
        elif self.accepting:  # not shutting down: bring it back from the store
            self._stranded.add(task.task_id)
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
        """Once the store takes writes again, resume every stranded task from a fresh read.

        A task is read only once its old flow is gone, and resumed only if no flow took it
        meanwhile: nothing but a flow changes a task, so that read is its stored state.
        """
        wait, longest = RECOVERY_WAIT
        while self.accepting:
            await asyncio.sleep(wait)
            wait = min(wait * 2, longest)
            if not await self.journal.probe():
                continue
            for task_id in list(self._stranded):
                if task_id in self.trackers:  # its old flow is still stopping
                    continue
                try:
                    task = await self.store.get_task(task_id)
                    ours = task is not None and await self.store.owns(task_id)
                except Exception:
                    log.exception("could not read task %s to resume it", task_id,
                                  extra=logs.task(task_id))
                    break
                if task_id in self.trackers or not self.accepting:
                    continue
                self._stranded.discard(task_id)
                if task is not None and not ours:
                    self.journal.forgive(task_id)  # taken over meanwhile: its owner runs it
                    continue
                if task is not None and not task.status.terminal:
                    self._resume(task)
                else:
                    self.journal.forgive(task_id)
            if not self._stranded and self.journal.failure is None:
                return


BARE_OPTIONS = {key: value for key, value in options_row(Task("", "")).items()
                if key not in ("review_deadline", "escalated")}


def task_state(task: Task) -> TaskState:
    return TaskState(task.status, task.last_seq, task.submitted_by)


def request_hash(task: Task) -> str:
    """What an Idempotency-Key stands for: the same input, from the same user, with the
    same reviewers, options and review-only output (a submit with sign-in off and no
    options hashes its input alone)."""
    text = task.task_input
    if task.submitted_by is not None or task.reviewers or task.allow_self_review:
        text += "\0" + json.dumps([task.submitted_by, task.reviewers, task.allow_self_review])
    options = options_row(task)
    del options["review_deadline"], options["escalated"]  # not the request's
    if options != BARE_OPTIONS:  # as before options existed: the hash is unchanged
        text += "\1" + json.dumps(options, sort_keys=True)
    if task.processed_output is not None:  # a review-only task: its output too
        text += "\2" + task.processed_output
    return hashlib.sha256(text.encode()).hexdigest()


def signature(by: Identity, reviewer: str, verdict: policy.Decision) -> dict[str, Any]:
    """Who made a decision, as the review records it: the signed-in user, however the
    request names its reviewer; with sign-in off, the name they typed."""
    if policy.signed_out(by):
        if reviewer.strip().lower() in SYSTEM_NAMES:
            raise Invalid(f"reviewer: {reviewer.strip()!r} is the service's own name")
        return {"reviewer": reviewer, "display_name": reviewer, "auth_method": "none"}
    return {"reviewer": by.name, "display_name": by.user.display_name,
            "auth_method": by.method, "token_label": by.token_label,
            "admin_override": verdict.override}
