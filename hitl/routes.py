"""The JSON API, kept compatible with the PocketFlow reference service.

Its two SSE endpoints are answered ahead of Quart, in plain ASGI (:mod:`hitl.asgi`).
Every route hands the runner who is asking (:func:`who`); the runner asks the policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from quart import Blueprint, Response, current_app, request
from quart_schema import (
    document_headers,
    validate_querystring,
    validate_request,
    validate_response,
)

from .accounts import Identity
from .broker import Broker
from .exporter import Exporter
from .guard import identity_of
from .identity import Unauthorized
from .openapi import METRICS, NO_CONTENT, answers
from .queue import ReviewQueue
from .responses import HealthOut, ReleaseOut, TaskListOut, TaskOut
from .runner import Runner
from .schemas import (
    FeedbackIn,
    MessageOut,
    NextQuery,
    SubmitHeaders,
    SubmitIn,
    SubmitOut,
    TaskQuery,
    checked_id,
    idempotency_key,
)

api = Blueprint("api", __name__)


def runner() -> Runner:
    return cast(Runner, current_app.extensions["runner"])


def queue() -> ReviewQueue:
    return cast(ReviewQueue, current_app.extensions["queue"])


def broker() -> Broker:
    return cast(Broker, current_app.extensions["broker"])


def exporter() -> Exporter:
    return cast(Exporter, current_app.extensions["metrics"])


def who(scope: Mapping[str, Any] | None = None) -> Identity:
    """Who is asking (in this request, or the one of ``scope``), as the guard found: every
    path but the public ones has someone."""
    identity = identity_of(request.scope if scope is None else scope)
    if identity is None:
        raise Unauthorized("sign in first (a session, or Authorization: Bearer <token>)")
    return identity


async def task_named(task_id: str) -> str:
    """The full id of the task a URL names: its id, or a unique prefix (8+ characters)."""
    return await runner().resolve(checked_id(task_id), by=who())


@api.post("/submit")
@validate_request(SubmitIn)
@validate_response(SubmitOut, 202)
@document_headers(SubmitHeaders)
@answers(409, 415)
async def submit(data: SubmitIn) -> tuple[SubmitOut, int]:
    """Submit a task; it is processed, then waits for a human review."""
    task = await runner().submit(data.data, idempotency_key(request.headers), by=who(),
                                 **submit_options(data))
    return SubmitOut(message="Task submitted", task_id=task.task_id), 202


def submit_options(data: SubmitIn) -> dict[str, Any]:
    """The runner's keyword arguments for a submit's options (the API's and the form's)."""
    return {"reviewers": tuple(data.reviewers), "allow_self_review": data.allow_self_review,
            "title": data.title, "metadata": data.metadata, "quorum": data.quorum,
            "review_timeout": data.review_timeout, "on_timeout": data.on_timeout,
            "escalate_to": tuple(data.escalate_to), "max_attempts": data.max_attempts,
            "output": data.output}


@api.post("/feedback/<task_id>")
@validate_request(FeedbackIn)
@validate_response(MessageOut)
@answers(404, 409, 415)
async def feedback(task_id: str, data: FeedbackIn) -> MessageOut:
    """Approve or reject the output under review (409 unless one is waiting)."""
    await runner().decide(await task_named(task_id), data.feedback, data.comment,
                          data.reviewer, data.attempt, by=who(),
                          edited_output=data.edited_output)
    return MessageOut(message=f"Feedback '{data.feedback}' received")


@api.get("/api/tasks")
@validate_querystring(TaskQuery)
@answers(ok={200: TaskListOut})
async def list_tasks(query_args: TaskQuery) -> dict[str, object]:
    """Tasks, newest first (or ``order=waiting``), each text an excerpt with its length;
    filter by ``status`` and ``q``, page with ``limit`` (at most 200) and ``after``."""
    page = await runner().task_page(query_args.view(), query_args.limit, query_args.after,
                                    query_args.offset, by=who())
    return {"tasks": [task.to_json() for task in page.rows], "total": page.total,
            "next": page.next, "limit": query_args.limit, "offset": query_args.offset}


@api.get("/api/tasks/<task_id>")
@answers(404, ok={200: TaskOut})
async def get_task(task_id: str) -> dict[str, object]:
    """One task with every review decision, and who made it."""
    return (await runner().get_task(await task_named(task_id), by=who())).to_json()


@api.post("/api/tasks/<task_id>/cancel")
@answers(404, 409, ok={200: TaskOut})
async def cancel_task(task_id: str) -> dict[str, object]:
    """Cancel an unfinished task (409 if it has already finished)."""
    return (await runner().cancel(await task_named(task_id), by=who())).to_json()


@api.post("/api/queue/next")
@validate_querystring(NextQuery)
@answers(ok={200: TaskOut, 204: NO_CONTENT})
async def queue_next(query_args: NextQuery) -> Response | dict[str, object]:
    """The oldest waiting task the caller may review and has not voted on, reserved for
    them (``--reservation`` seconds); 204 when none waits for them. ``after``: skip past
    that task in the queue."""
    task = await queue().next(query_args.after, by=who())
    if task is None:
        return Response(status=204)
    return task.to_json()


@api.post("/api/tasks/<task_id>/release")
@answers(404, ok={200: ReleaseOut})
async def release_task(task_id: str) -> dict[str, object]:
    """End the caller's reservation of the task (``released``: whether they held one)."""
    full_id = await task_named(task_id)
    return {"task_id": full_id, "released": await queue().release(full_id, by=who())}


@api.get("/healthz")
@answers(ok={200: HealthOut, 503: HealthOut})
async def healthz() -> tuple[dict[str, object], int]:
    """Liveness and a few gauges; 503 while changes cannot be stored."""
    health = runner().health()
    return health, 200 if health["status"] == "ok" else 503


@api.get("/metrics")
@answers(ok={200: METRICS})
async def metrics() -> Response:
    """Prometheus metrics in the text format: for admins and the ``--metrics-token``."""
    body, content_type = await exporter().scrape(by=who())
    return Response(body, content_type=content_type)
