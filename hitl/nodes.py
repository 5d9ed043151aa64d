"""The three steps of a task: process, wait for a human, finish.

Nodes keep PocketFlow's phases: ``prep`` reads the shared store, ``exec`` computes
without touching it, ``post`` records the result (through the tracker) and picks the
next action.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, cast

from pocketflow import AsyncNode

from .errors import TaskFailed
from .models import Decision, Review, Status
from .processors import Job, ProcessorPool
from .tracker import SharedStore


class ProcessNode(AsyncNode):  # type: ignore[misc]
    """Run the processor for the next attempt, off the event loop if it is synchronous."""

    def __init__(self, pool: ProcessorPool, *, delay: float, retries: int, wait: float) -> None:
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
                   tracker.reporter(attempt), self.delay)

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
    """Publish the output for review, then wait for the decision ``/feedback`` hands over."""

    def __init__(self, *, max_attempts: int) -> None:
        super().__init__()
        self.max_attempts = max_attempts

    async def prep_async(self, shared: SharedStore) -> asyncio.Event:
        tracker = shared["tracker"]
        event = shared["review_event"]
        if tracker.task.status is not Status.WAITING_FOR_REVIEW:  # else: resumed, still waiting
            event.clear()
            shared["feedback"] = None
            output = shared["processed_output"]
            tally = tracker.task.tally() if tracker.task.quorum > 1 else {}
            await tracker.update(
                Status.WAITING_FOR_REVIEW, processed_output=output,
                event={"output_to_review": output, "attempt": shared["current_attempt"],
                       **tally},
                attempt_record={"output": output, "finished_at": time.time(),
                                "tries": shared["tries"]},
            )
        return event

    async def exec_async(self, review_event: asyncio.Event) -> None:
        await review_event.wait()

    async def post_async(self, shared: SharedStore, prep: Any, _: None) -> Decision:
        review = cast(Review, shared["feedback"])
        shared["tracker"].record_decision(review)
        check_attempts_left(shared, shared["tracker"].task.attempts_allowed(self.max_attempts))
        return review.decision


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
