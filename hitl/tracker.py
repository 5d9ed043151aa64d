"""One live task: its record, its flow's shared store, and every change to its state.

The tracker is the only code that changes a task. Each change updates the plain
:class:`~hitl.models.Task` record and goes through the journal (stored, then
published), so a flow node says *what* happened and the tracker makes it durable.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, TypedDict

from .errors import Conflict
from .journal import Journal
from .models import Attempt, Review, Status, Task
from .processors import Progress
from .store import IdempotencyKey

log = logging.getLogger(__name__)


class SharedStore(TypedDict):
    """The PocketFlow shared store of one task (the reference service's keys, plus ours)."""

    task_id: str
    task_input: str
    current_attempt: int
    processed_output: str | None
    tries: int  # how many tries the processor took for the latest output
    feedback: Review | None
    review_event: asyncio.Event
    final_result: str | None
    tracker: Tracker


class Tracker:
    """Runtime handles of one task, kept apart from its storable record."""

    def __init__(self, task: Task, journal: Journal) -> None:
        self.task = task
        self.journal = journal
        self.loop = asyncio.get_running_loop()
        self.flow: asyncio.Task[None] | None = None
        self.started = False  # its flow has taken its first step
        self.ended = False  # its end (completed, failed, cancelled) is stored
        self.active = True  # False once its flow has stopped: late reports are ignored
        self.cancel_requested = False
        self.finishing = False  # recording its end: no one else stops it now
        self.decision_stored: asyncio.Future[None] | None = None
        self.decision_recorded = False  # the claimed decision is on its way to the store
        self.finish_error: Exception | None = None  # why its end could not be stored
        self.shared: SharedStore = {
            "task_id": task.task_id,
            "task_input": task.task_input,
            "current_attempt": task.attempt,
            "processed_output": task.processed_output,
            "tries": 0,
            "feedback": None,
            "review_event": asyncio.Event(),
            "final_result": task.final_result,
            "tracker": self,
        }

    async def update(self, status: Status, *, event: dict[str, Any] | None = None,
                     idempotency: IdempotencyKey | None = None,
                     attempt_record: dict[str, Any] | None = None, **changes: Any) -> None:
        """Move the task to ``status`` with ``changes`` (and its current attempt's record
        with ``attempt_record``); publish ``status`` plus ``event``.

        Returns once stored. If that fails, the runner drops this tracker and reloads the
        task from the store, which never saw the change.
        """
        for name, value in changes.items():
            setattr(self.task, name, value)
        self.task.status = status
        await self.journal.record(self.task, {"status": status.value, **(event or {})},
                                  idempotency=idempotency, attempt=self._attempt(attempt_record))

    async def record_attempt(self, **changes: Any) -> None:
        """Store a change to the current attempt's record alone (no status, no message)."""
        await self.journal.record(self.task, attempt=self._attempt(changes))

    def _attempt(self, changes: dict[str, Any] | None) -> Attempt | None:
        if changes is None:
            return None
        record = self.task.current_attempt()
        for name, value in changes.items():
            setattr(record, name, value)
        return record

    def reporter(self, attempt: int) -> Progress:
        """A progress callback for one attempt: callable from any thread, never blocks."""

        def report(fraction: float, partial_output: str = "") -> None:
            try:
                on_loop = asyncio.get_running_loop() is self.loop
            except RuntimeError:
                on_loop = False
            if on_loop:
                self._progress(attempt, fraction, partial_output)
            else:
                self.loop.call_soon_threadsafe(self._progress, attempt, fraction, partial_output)

        return report

    def _progress(self, attempt: int, fraction: float, partial_output: str) -> None:
        if (not self.active or self.task.status is not Status.RUNNING
                or self.task.attempt != attempt):
            return  # a late report from an attempt that has ended, or a stopped flow
        payload = {"status": Status.RUNNING.value, "attempt": attempt,
                   "progress": round(min(max(float(fraction), 0.0), 1.0), 4),
                   "partial_output": str(partial_output)}
        self.journal.record(self.task, payload).add_done_callback(_log_failure)

    def claim_decision(self, review: Review) -> asyncio.Future[None]:
        """Take a reviewer's decision, or raise Conflict. Synchronous: no await, no race.

        Of many concurrent decisions the first flips the status and wins; the rest see
        a task no longer waiting for review.
        """
        task = self.task
        if task.status is not Status.WAITING_FOR_REVIEW:
            taken = self.shared["feedback"]
            if taken is not None:  # lost the race, or came late to a decided attempt
                by = f" by {taken.reviewer}" if taken.reviewer else ""
                raise Conflict(f"attempt {taken.attempt} of task {task.task_id} was already "
                               f"{taken.decision}{by}; it is now {task.status}")
            raise Conflict(f"task {task.task_id} is not waiting for review (it is {task.status})")
        if review.attempt != task.attempt:
            raise Conflict(
                f"attempt {review.attempt} is no longer under review (attempt {task.attempt} is)"
            )
        task.status = Status.PROCESSING_FEEDBACK
        self.shared["feedback"] = review
        self.decision_stored = self.loop.create_future()
        self.shared["review_event"].set()
        return self.decision_stored

    def record_decision(self, review: Review) -> None:
        """Record the claimed decision with its status change, in one transaction.

        The reviewer's 200 waits for that commit; the flow does not, so the next step's
        change (completed, or the next attempt running) joins the same commit and every
        watcher gets both in one write.
        """
        self.task.reviews.append(review)
        self.task.review_deadline = None  # decided: no deadline until the next review
        self.decision_recorded = True
        event = {"feedback_value": review.decision, "comment": review.comment,
                 "reviewer": review.reviewer, "attempt": review.attempt}
        stored = self.journal.record(
            self.task, {"status": Status.PROCESSING_FEEDBACK.value, **event}, review
        )
        stored.add_done_callback(lambda done: self.settle_decision(done.exception()))

    def settle_decision(self, error: BaseException | None) -> None:
        waiter, self.decision_stored = self.decision_stored, None
        if waiter is not None and not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)


def _log_failure(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.warning("progress report not stored: %s", done.exception())
