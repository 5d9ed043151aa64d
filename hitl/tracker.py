"""One live task: its record, its flow's shared store, and every change to its state.

The tracker is the only code that changes a task. Each change updates the plain
:class:`~hitl.models.Task` record and goes through the journal (stored, then
published), so a flow node says *what* happened and the tracker makes it durable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, TypedDict

from . import metrics
from .deadlines import TIMEOUT
from .errors import Conflict
from .journal import Journal
from .models import Attempt, Review, Status, Task, approvals
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

    def __init__(self, task: Task, journal: Journal, *, detached: bool = False) -> None:
        self.task = task
        self.journal = journal
        self.detached = detached  # a fresh read of a task whose flow runs elsewhere
        self.loop = asyncio.get_running_loop()
        self.flow: asyncio.Task[None] | None = None
        self.started = False  # its flow has taken its first step
        self.ended = False  # its end (completed, failed, cancelled) is stored
        self.active = True  # False once its flow has stopped: late reports are ignored
        self.outdated = False  # another process changed it: its flow resumes from the store
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
        await self._record(self.task, {"status": status.value, **(event or {})},
                                  idempotency=idempotency, attempt=self._attempt(attempt_record))

    async def record_attempt(self, **changes: Any) -> None:
        """Store a change to the current attempt's record alone (no status, no message)."""
        await self._record(self.task, attempt=self._attempt(changes))

    def _attempt(self, changes: dict[str, Any] | None) -> Attempt | None:
        if changes is None:
            return None
        record = self.task.current_attempt()
        for name, value in changes.items():
            setattr(record, name, value)
        return record

    def _record(self, task: Task, payload: dict[str, Any] | None = None,
                review: Review | None = None, *, touch: bool = True,
                idempotency: IdempotencyKey | None = None,
                attempt: Attempt | None = None) -> asyncio.Future[None]:
        return self.journal.record(task, payload, review, idempotency, attempt, touch=touch,
                                   detached=self.detached)

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
        self._record(self.task, payload).add_done_callback(_log_failure)

    def vote(self, review: Review) -> asyncio.Future[None]:
        """Take a reviewer's vote, or raise Conflict. Synchronous: no await, no race.

        With quorum 1 a vote is the decision (:meth:`claim_decision`, as ever). Above it,
        a rejection vetoes at once and the approval that makes the quorum decides; any
        other vote is stored and announced (``waiting_for_review`` with the tally), and an
        approval with an edit puts the edited text up for review as the next attempt.
        The store checks the same rules again as it takes each vote.
        """
        task = self.task
        if task.quorum <= 1:
            return self.claim_decision(review)
        self._check_open(review)
        votes = task.votes()
        earlier = next((vote for vote in votes if vote.reviewer == review.reviewer), None)
        if earlier is not None:
            who = f"{review.reviewer} has" if review.reviewer else "you have"
            raise Conflict(f"{who} already {earlier.decision} attempt {task.attempt} of task "
                           f"{task.task_id}; each reviewer votes once per attempt")
        if review.edited_output is not None:
            return self._put_up_edit(review)
        if review.decision == "rejected" or approvals(votes) + 1 >= task.quorum:
            return self.claim_decision(review)
        task.reviews.append(review)
        # Still waiting since the attempt came up: the review queue keeps its place.
        return self._record(task, self._waiting(), review, touch=False)

    def _waiting(self, **extra: Any) -> dict[str, Any]:
        task = self.task
        return {"status": Status.WAITING_FOR_REVIEW.value, "output_to_review":
                task.processed_output, "attempt": task.attempt, **extra, **task.tally()}

    def _put_up_edit(self, review: Review) -> asyncio.Future[None]:
        """An approval of an edited text (quorum above 1): the text becomes the next attempt,
        made by this reviewer and approved by them; the others vote on what they see."""
        task = self.task
        edited_from = task.attempt
        task.attempt += 1
        review = dataclasses.replace(review, attempt=task.attempt)
        task.processed_output = review.edited_output
        self.shared["current_attempt"] = task.attempt
        self.shared["processed_output"] = review.edited_output
        self.shared["tries"] = 0
        now = time.time()
        record = self._attempt({"output": review.edited_output, "started_at": now,
                                "finished_at": now, "tries": 0, "error": None,
                                "edited_by": review.reviewer})
        task.reviews.append(review)
        return self._record(task, self._waiting(edited_by=review.reviewer,
                                                       edited_from=edited_from),
                                   review, attempt=record)

    def _check_open(self, review: Review) -> None:
        """Raise Conflict unless ``review``'s attempt is the one waiting for review."""
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

    def claim_decision(self, review: Review) -> asyncio.Future[None]:
        """Take a reviewer's decision, or raise Conflict. Synchronous: no await, no race.

        Of many concurrent decisions the first flips the status and wins; the rest see
        a task no longer waiting for review.
        """
        task = self.task
        self._check_open(review)
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
        if review.auth_method == TIMEOUT.method:  # the review timed out: the system decided
            event["timed_out"] = True
        if review.edited_output is not None:  # quorum 1: the edited text is the result
            event["edited_output"] = review.edited_output
        if self.task.quorum > 1:
            event |= self.task.tally()
        since = self._up_for_review_since()
        stored = self._record(
            self.task, {"status": Status.PROCESSING_FEEDBACK.value, **event}, review
        )
        stored.add_done_callback(lambda done: self._decision_stored(done, review, since))

    def _up_for_review_since(self) -> float:
        """When the attempt under review went up for review: its output's finishing time
        (an escalation or a vote leaves it), else the task's last change."""
        attempts = self.task.attempts
        if attempts and attempts[-1].attempt == self.task.attempt and attempts[-1].finished_at:
            return attempts[-1].finished_at
        return self.task.updated_at

    def _decision_stored(self, done: asyncio.Future[None], review: Review, since: float
                         ) -> None:
        error = done.exception()
        if error is None:
            outcome = "timed_out" if review.auth_method == TIMEOUT.method else review.decision
            metrics.decided(outcome, time.time() - since)
        self.settle_decision(error)

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
