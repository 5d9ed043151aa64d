"""``/api/work``: external workers claim jobs and report on them (``--processor external``).

Thin routes: the guard has found who asks (401 if no one); :class:`hitl.work.WorkQueue`
asks the policy (403 unless a worker or an admin) and keeps every rule in the store.
"""

from __future__ import annotations

from typing import cast

from quart import Blueprint, Response, current_app
from quart_schema import validate_request, validate_response

from .models import iso
from .openapi import NO_CONTENT, answers
from .routes import who
from .schemas import (
    ClaimIn,
    CompleteIn,
    FailIn,
    FailOut,
    HeartbeatIn,
    JobOut,
    LeaseIn,
    LeaseOut,
    MessageOut,
    ProgressIn,
    checked_id,
)
from .work import WorkQueue

work = Blueprint("work", __name__)


def queue() -> WorkQueue:
    return cast(WorkQueue, current_app.extensions["work"])


@work.post("/api/work/claim")
@validate_request(ClaimIn)
@validate_response(JobOut, 200)
@answers(415, ok={204: NO_CONTENT})
async def claim(data: ClaimIn) -> JobOut | Response:
    """The oldest job waiting for a worker, now this worker's under a lease; 204 when none
    came within ``wait`` seconds (a long poll)."""
    job = await queue().claim(data.worker, data.wait, data.lease, by=who())
    if job is None:
        return Response(status=204)
    return JobOut(**job.to_json())


@work.post("/api/work/<task_id>/heartbeat")
@validate_request(HeartbeatIn)
@validate_response(LeaseOut)
@answers(404, 409, 415)
async def heartbeat(task_id: str, data: HeartbeatIn) -> LeaseOut:
    """Extend the lease (409: the job is no longer this worker's; drop it)."""
    until = await queue().heartbeat(checked_id(task_id), data.attempt, data.lease_id,
                                    data.lease, by=who())
    return LeaseOut(lease_expires=iso(until))


@work.post("/api/work/<task_id>/progress")
@validate_request(ProgressIn)
@validate_response(LeaseOut)
@answers(404, 409, 415)
async def progress(task_id: str, data: ProgressIn) -> LeaseOut:
    """Report progress to the task's watchers (a ``running`` message); extends the lease."""
    until = await queue().progress(checked_id(task_id), data.attempt, data.lease_id,
                                   data.progress, data.partial_output, by=who())
    return LeaseOut(lease_expires=iso(until))


@work.post("/api/work/<task_id>/complete")
@validate_request(CompleteIn)
@validate_response(MessageOut)
@answers(404, 409, 415)
async def complete(task_id: str, data: CompleteIn) -> MessageOut:
    """The job's output, stored before this answer, then put up for review."""
    await queue().complete(checked_id(task_id), data.attempt, data.lease_id, data.output,
                           by=who())
    return MessageOut(message=f"attempt {data.attempt} completed; it goes up for review")


@work.post("/api/work/<task_id>/fail")
@validate_request(FailIn)
@validate_response(FailOut)
@answers(404, 409, 415)
async def fail(task_id: str, data: FailIn) -> FailOut:
    """This try failed: tried again up to ``--retries`` tries (``retrying``), then the task
    fails with this error."""
    retrying = await queue().fail(checked_id(task_id), data.attempt, data.lease_id,
                                  data.error, by=who())
    return FailOut(retrying=retrying)


@work.post("/api/work/<task_id>/release")
@validate_request(LeaseIn)
@validate_response(MessageOut)
@answers(404, 409, 415)
async def release(task_id: str, data: LeaseIn) -> MessageOut:
    """Give the job back unfinished (a worker stopping): queued again for another worker,
    not counted as a failed try."""
    await queue().give_back(checked_id(task_id), data.attempt, data.lease_id, by=who())
    return MessageOut(message=f"attempt {data.attempt} given back to the queue")
