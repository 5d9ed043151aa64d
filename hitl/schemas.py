"""Request and response bodies of the JSON API (validated by quart-schema)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from werkzeug.datastructures import Headers

from .errors import Invalid

MAX_TEXT = 200_000
MAX_ID_LENGTH = 64
MAX_KEY_LENGTH = 255


def checked_id(task_id: str) -> str:
    """A task id from a URL, refused early when it cannot be one (over-long)."""
    if len(task_id) > MAX_ID_LENGTH:
        raise Invalid(f"task id is too long ({len(task_id)} characters; at most {MAX_ID_LENGTH})")
    return task_id


def idempotency_key(headers: Headers) -> str | None:
    """A submit's ``Idempotency-Key`` header: 1 to 255 visible ASCII characters."""
    key = headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 0 < len(key) <= MAX_KEY_LENGTH or not (key.isascii() and key.isprintable()):
        raise Invalid(f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} visible ASCII characters")
    return key


class SubmitIn(BaseModel):
    data: str = Field(max_length=MAX_TEXT, description="the task input")

    @field_validator("data")
    @classmethod
    def not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


class SubmitOut(BaseModel):
    message: str
    task_id: str


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    feedback: Literal["approved", "rejected"]
    comment: str = Field("", max_length=20_000)
    reviewer: str = Field("", max_length=200)
    attempt: int | None = Field(None, ge=1, description="the attempt the decision was made on")


class MessageOut(BaseModel):
    message: str


class TaskQuery(BaseModel):
    status: Literal["pending", "running", "waiting_for_review", "processing_feedback",
                    "completed", "failed", "cancelled"] | None = None
    limit: int = Field(50, ge=1, le=500)
    offset: int = Field(0, ge=0)


class ErrorOut(BaseModel):
    error: str
