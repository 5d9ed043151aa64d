"""The three steps of a task: process, wait for a human, finish.

Nodes keep PocketFlow's phases: ``prep`` reads the shared store, ``exec`` computes
without touching it, ``post`` records the result (through the tracker) and picks the
next action.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any, cast

from pocketflow import AsyncNode

from . import deadlines
from .errors import Conflict, TaskFailed
from .models import Decision, Review, Status, Task, iso
from .processors import Job, Pool
from .tracker import SharedStore, Tracker


class ProcessNode(AsyncNode):  # type: ignore[misc]
    """Run the processor for the next attempt, off the event loop if it is synchronous
    (with ``--processor external``, its pool queues a job for a worker: :mod:`hitl.work`)."""

    def __init__(self, pool: Pool, *, delay: float, retries: int, wait: float) -> None:
        super().__init__(max_retries=retries, wait=wait)
        self.pool = pool
        self.delay = delay
        self.tries = 0  # of the current attempt: set per run, as the flow runs a copy

    async def prep_async(self, shared: SharedStore) -> Job:
        tracker = shared["tracker"]
        attempt = tracker.task.attempt_to_run()
        shared["current_attempt"] = attempt
        self.tries = 0
        await tracker.update(Status.RUNNING, attempt=attempt, processed_output=None,
                             event={"attempt": attempt, "progress": 0.0},
                             attempt_record={"started_at": time.time(), "finished_at": None,
                                             "output": None, "error": None, "tries": 0})
        return Job(shared["task_input"], attempt, tuple(tracker.task.reviews),
                   tracker.reporter(attempt), self.delay, tracker.task.task_id,
                   tracker.task.output_before(attempt))

    async def exec_async(self, job: Job) -> str:
        self.tries += 1
        return await self.pool.run(job)

    async def exec_fallback_async(self, job: Job, exc: Exception) -> ProcessingFailed:
        tries = "1 try" if self.tries == 1 else f"{self.tries} tries"
        return ProcessingFailed(f"processing failed after {tries}: {type(exc).__name__}: {exc}")

    async def post_async(self, shared: SharedStore, job: Job,
                         output: str | ProcessingFailed) -> str:
        if isinstance(output, ProcessingFailed):  # the attempt keeps its error; the task fails
            await shared["tracker"].record_attempt(error=output.error, finished_at=time.time(),
                                                   tries=self.tries)
            raise TaskFailed(output.error)
        shared["processed_output"] = output
        shared["tries"] = self.tries
        return "default"


@dataclass(frozen=True, slots=True)
class ProcessingFailed:
    """What an attempt whose every try raised produces instead of an output."""

    error: str


class ReviewNode(AsyncNode):  # type: ignore[misc]
    """Publish the output for review, then wait for the decision ``/feedback`` hands over,
    or, for a task with a review timeout, until its deadline (:mod:`hitl.deadlines`)."""

    def __init__(self, *, max_attempts: int) -> None:
        super().__init__()
        self.max_attempts = max_attempts

    async def prep_async(self, shared: SharedStore) -> tuple[Tracker, asyncio.Event]:
        tracker = shared["tracker"]
        event = shared["review_event"]
        if tracker.task.status is not Status.WAITING_FOR_REVIEW:  # else: resumed, still waiting
            event.clear()
            shared["feedback"] = None
            output = shared["processed_output"]
            due = deadlines.deadline(tracker.task)
            await tracker.update(
                Status.WAITING_FOR_REVIEW, processed_output=output, review_deadline=due,
                event=up_for_review(tracker.task, output, shared["current_attempt"], due),
                attempt_record={"output": output, "finished_at": time.time(),
                                "tries": shared["tries"]},
            )
        return tracker, event

    async def exec_async(self, prep: tuple[Tracker, asyncio.Event]) -> None:
        await wait_for_decision(*prep)

    async def post_async(self, shared: SharedStore, prep: Any, _: None) -> Decision:
        review = cast(Review, shared["feedback"])
        tracker = shared["tracker"]
        tracker.record_decision(review)
        if review.auth_method == deadlines.TIMEOUT.method and deadlines.fails(tracker.task):
            raise TaskFailed(deadlines.failure(tracker.task))
        check_attempts_left(shared, tracker.task.attempts_allowed(self.max_attempts))
        return review.decision


def up_for_review(task: Task, output: str | None, attempt: int, due: float | None
                  ) -> dict[str, Any]:
    """The message of an output put up for review (a processor's, or a review-only
    task's own)."""
    payload: dict[str, Any] = {"output_to_review": output, "attempt": attempt,
                               **(task.tally() if task.quorum > 1 else {})}
    if due is not None:
        payload["review_deadline"] = iso(due)
    return payload


async def wait_for_decision(tracker: Tracker, event: asyncio.Event) -> None:
    """Until a reviewer's decision is claimed, or the stored deadline passes and the
    timeout's is (a first timeout that escalates sets a new deadline and waits again)."""
    while not event.is_set():
        due = tracker.task.review_deadline
        if due is None:
            await event.wait()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), max(0.0, due - time.time()))
        if event.is_set():
            return  # a reviewer's decision came first (no await since the check: it won)
        task = tracker.task
        if deadlines.escalates(task) and task.status is Status.WAITING_FOR_REVIEW:
            due = deadlines.deadline(task)
            await tracker.update(
                Status.WAITING_FOR_REVIEW, reviewers=task.escalate_to, escalated=True,
                review_deadline=due,
                event={"output_to_review": task.processed_output, "attempt": task.attempt,
                       "review_deadline": iso(due) if due else None,
                       "escalated_to": list(task.escalate_to), "timed_out": True})
            continue
        with contextlib.suppress(Conflict):  # Conflict: a reviewer's claim came first
            claimed = tracker.claim_decision(deadlines.timeout_review(task))
            claimed.add_done_callback(_nobody_waits)  # no reviewer awaits the timeout's
        await event.wait()  # set by the claim: the timeout's, or the reviewer's
        return


def _nobody_waits(stored: asyncio.Future[None]) -> None:
    """Retrieve the outcome of a claim no request awaits (a timeout's): one refused because
    another process stored a decision first is that process's to report, not a loose end."""
    if not stored.cancelled():
        stored.exception()


class ResultNode(AsyncNode):  # type: ignore[misc]
    """Finalize an approved output."""

    async def post_async(self, shared: SharedStore, prep: Any, _: None) -> None:
        review = shared["feedback"]
        edited = review.edited_output if review is not None else None
        shared["final_result"] = edited if edited is not None else shared["processed_output"]
        await shared["tracker"].update(
            Status.COMPLETED, final_result=shared["final_result"],
            event={"final_result": shared["final_result"], "attempt": shared["current_attempt"]},
        )


def check_attempts_left(shared: SharedStore, max_attempts: int) -> None:
    """After a rejection: fail the task once ``max_attempts`` outputs were all rejected."""
    rejections = shared["tracker"].task.rejections
    if rejections >= max_attempts and shared["tracker"].task.reviews[-1].decision == "rejected":
        raise TaskFailed(f"not approved after {max_attempts} attempts (max attempts reached)")
