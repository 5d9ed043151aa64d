"""Response bodies of the JSON API, as ``/openapi.json`` describes them.

Documentation only (quart-schema's ``document_response``): the routes return the
records' own ``to_json()``, and the schemathesis test (``tests/test_openapi.py``) checks
live answers against these. Every field is listed; a body may gain fields later.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from .schemas import StatusName

Decision = Literal["approved", "rejected"]
When = str  # an ISO 8601 UTC time, as every hitl timestamp


class ErrorOut(BaseModel):
    """Every error: what went wrong, in a sentence."""

    error: str


class ReviewOut(BaseModel):
    decision: Decision
    attempt: int
    comment: str
    reviewer: str = Field(description="the user's name (with --auth none, the name typed)")
    created_at: When
    display_name: str
    auth_method: str = Field(description="password, link, token, proxy or none")
    token_label: str | None
    admin_override: bool
    edited_output: str | None


class VoteOut(BaseModel):
    reviewer: str
    decision: Decision
    comment: str
    at: When


class AttemptOut(BaseModel):
    attempt: int
    output: str | None
    output_known: bool
    started_at: When | None
    finished_at: When | None
    error: str | None
    tries: int
    edited_by: str | None
    reviews: list[ReviewOut]
    votes: list[VoteOut]
    approvals: int


class ReservationOut(BaseModel):
    reviewer: str
    display_name: str
    attempt: int
    since: When
    until: When


class Options(BaseModel):
    """A task's options, the server's defaults filled in."""

    task_id: str
    status: StatusName
    attempt: int
    last_seq: int
    created_at: When
    updated_at: When
    submitted_by: str | None
    reviewers: list[str]
    allow_self_review: bool
    title: str
    metadata: dict[str, Any] | None
    quorum: int
    review_timeout: float | None
    on_timeout: str
    escalate_to: list[str]
    max_attempts: int | None
    review_deadline: When | None
    escalated: bool
    reservations: list[ReservationOut]


class TaskOut(Options):
    """One task, whole: its texts, every review and every attempt."""

    task_input: str
    processed_output: str | None
    final_result: str | None
    error: str | None
    reviews: list[ReviewOut]
    attempts: list[AttemptOut]


class TaskRowOut(Options):
    """A task as a list shows it: each text an excerpt, with the whole text's length."""

    task_input: str
    task_input_length: int
    processed_output: str | None
    processed_output_length: int | None
    final_result: str | None
    final_result_length: int | None
    error: str | None
    error_length: int | None
    waiting_since: When | None


class TaskListOut(BaseModel):
    """A page of tasks; ``next`` is the ``after`` of the page that follows (None: the last)."""

    tasks: list[TaskRowOut]
    total: int
    next: str | None
    limit: int
    offset: int


class ReleaseOut(BaseModel):
    task_id: str
    released: bool = Field(description="whether the caller held a reservation")


class HealthOut(BaseModel):
    """Liveness and gauges; ``degraded`` (with a 503) while changes cannot be stored."""

    status: Literal["ok", "degraded"]
    accepting: bool
    live_tasks: int
    subscribers: int
    error: str | None = None


class RetryingOut(BaseModel):
    message: int
    tries: int
    since: When | None
    next_retry: When | None


class WebhookOut(BaseModel):
    id: str
    url: str
    events: list[str]
    all_events: bool
    created_at: When
    cursor: int
    retrying: RetryingOut | None


class NewWebhookOut(WebhookOut):
    """The endpoint added, with its secret: shown this once."""

    secret: str


class DeliveryOut(BaseModel):
    webhook_id: str
    message: int
    type: str
    try_: int = Field(alias="try")
    at: When
    status_code: int | None
    error: str | None
    outcome: str
    next_retry: When | None


class ListedWebhookOut(WebhookOut):
    attempts: list[DeliveryOut]


class WebhookListOut(BaseModel):
    webhooks: list[ListedWebhookOut]
