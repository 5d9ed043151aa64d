"""Request and response bodies of the JSON API (validated by quart-schema)."""

from __future__ import annotations

import json
import unicodedata
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from werkzeug.datastructures import Headers

from .accounts import MAX_NAME, checked_login, checked_name
from .errors import Invalid
from .limits import (
    MAX_ERROR,
    MAX_INTEGER,
    MAX_LEASE,
    MAX_LEASE_ID,
    MAX_TEXT,
    MAX_WAIT,
    MAX_WORKER,
)
from .models import Status
from .store import View

MAX_ID_LENGTH = 64
MAX_KEY_LENGTH = 255
MAX_LIMIT = 200  # tasks one list answers at most
MAX_SEARCH = 200  # characters of a search
MAX_REVIEWERS = 50  # entries a task's reviewers list may have
GROUP = "group:"
MAX_TITLE = 200  # characters of a task's title
MAX_METADATA = 16 * 1024  # bytes of a task's metadata, as compact JSON
MAX_QUORUM = MAX_REVIEWERS
MAX_TIMEOUT = 366 * 86400  # seconds: a review may wait a year at most
MAX_ATTEMPTS = 100


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


def not_blank(value: str) -> str:
    """A text that must say something: not empty, not only white space."""
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def one_line(value: str) -> str:
    """Shown to people: one line, no control or formatting characters (stripped, NFC)."""
    value = unicodedata.normalize("NFC", value.strip())
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in value):
        raise ValueError("must be one line, without control or formatting characters")
    return value


NonBlank = AfterValidator(not_blank)
OneLine = AfterValidator(one_line)
# A task's input or an output: at most MAX_TEXT characters, and not blank (the length is
# checked first, inside the type, so an optional one keeps the plain "at most" message).
Text = Annotated[str, Field(max_length=MAX_TEXT), NonBlank]


def reviewer_entry(entry: str) -> str:
    """A user name or ``group:NAME``, as sign-in names are written (lower-case, plain)."""
    name = entry.removeprefix(GROUP)
    try:
        name = checked_login(name)
    except Invalid as exc:
        raise ValueError(f"{entry[:80]!r} is not a user name or group:NAME ({exc})") from None
    return GROUP + name if entry.startswith(GROUP) else name


class SubmitHeaders(BaseModel):
    idempotency_key: str | None = Field(
        None, min_length=1, max_length=MAX_KEY_LENGTH, pattern=r"^[ -~]+$",
        description="a retry with the same key within 24 h answers the same task and "
                    "creates none (the same key for another request: 409)")


class SubmitIn(BaseModel):
    data: Text = Field(description="the task input")
    reviewers: list[str] = Field(
        default_factory=list, max_length=MAX_REVIEWERS,
        description="who may decide it: user names and group:NAME entries (none: any "
                    "reviewer)")
    allow_self_review: bool = Field(False, description="may its submitter decide it too")
    # The options: each None takes the server's default (a setting of the same name).
    title: Annotated[str, OneLine] = Field("", max_length=MAX_TITLE,
                                           description="a short title, plain text")
    metadata: dict[str, Any] | None = Field(
        None, description=f"any JSON object (at most {MAX_METADATA} bytes), returned as given")
    quorum: int | None = Field(None, ge=1, le=MAX_QUORUM,
                               description="distinct approvals an attempt needs")
    review_timeout: float | None = Field(
        None, gt=0, le=MAX_TIMEOUT, allow_inf_nan=False,
        description="seconds each attempt may wait for review, then on_timeout")
    on_timeout: Literal["fail", "reject", "approve", "escalate"] | None = Field(
        None, description="what a review timeout does")
    escalate_to: list[str] = Field(
        default_factory=list, max_length=MAX_REVIEWERS,
        validate_default=True,
        description="with on_timeout escalate: the users and group:NAME who review next")
    max_attempts: int | None = Field(None, ge=1, le=MAX_ATTEMPTS,
                                     description="attempts before the task fails unapproved")
    output: Text | None = Field(
        None, description="a review-only task: this text is attempt 1's output, up for review at "
                    "once (a rejection's next attempt is the processor's)")

    @field_validator("reviewers", "escalate_to")
    @classmethod
    def plain_names(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(reviewer_entry(entry) for entry in value))

    @field_validator("metadata")
    @classmethod
    def small(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            try:  # NaN and Infinity would make the API's and the webhooks' JSON invalid
                text = json.dumps(value, separators=(",", ":"), ensure_ascii=False,
                                  allow_nan=False)
            except ValueError:
                raise ValueError("must hold only finite numbers (no NaN or Infinity)") from None
            size = len(text.encode())
            if size > MAX_METADATA:
                raise ValueError(f"must be at most {MAX_METADATA} bytes as JSON ({size})")
        return value

    @field_validator("quorum")
    @classmethod
    def reachable(cls, value: int | None, info: ValidationInfo) -> int | None:
        """A quorum the named reviewers can reach: with users alone (no group, whose size
        may change), at most as many as they are."""
        named = info.data.get("reviewers") or []
        if value and named and not any(name.startswith(GROUP) for name in named) \
                and value > len(named):
            raise ValueError(f"must be at most {len(named)}, the users named in reviewers "
                             "(a quorum they could never reach)")
        return value

    @field_validator("escalate_to")
    @classmethod
    def escalation(cls, value: list[str], info: ValidationInfo) -> list[str]:
        """Named iff the timeout escalates (checked after on_timeout, declared before)."""
        escalates = info.data.get("on_timeout") == "escalate"
        if escalates and not value:
            raise ValueError("is required with on_timeout escalate (who reviews next)")
        if value and not escalates:
            raise ValueError("is only for on_timeout escalate")
        return value


class SubmitOut(BaseModel):
    message: str
    task_id: str


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    feedback: Literal["approved", "rejected"]
    comment: str = Field("", max_length=20_000)
    reviewer: str = Field("", max_length=MAX_NAME, description="with --auth none only: who "
                                                               "decides (signed in: the user)")
    attempt: int | None = Field(None, ge=1, description="the attempt the decision was made on")
    edited_output: Text | None = Field(
        None, description="with an approval: the output as edited by the reviewer, "
                          "approved in its place")

    @field_validator("reviewer")
    @classmethod
    def plain_text(cls, value: str) -> str:
        """A name shown to people: no control or formatting characters (a right-to-left
        override would render another name)."""
        try:
            return checked_name(value, "reviewer") if value.strip() else ""
        except Invalid as exc:
            raise ValueError(exc.message) from None


class MessageOut(BaseModel):
    message: str


def between(low: int, high: int) -> AfterValidator:
    """An integer bound with a plain message ('must be at most 200'), documented in OpenAPI."""

    def check(value: int) -> int:
        if value < low:
            raise PydanticCustomError("too_small", "must be at least {low}", {"low": low})
        if value > high:
            raise PydanticCustomError("too_large", "must be at most {high}", {"high": high})
        return value

    return AfterValidator(check)


StatusName = Literal["pending", "running", "waiting_for_review", "processing_feedback",
                     "completed", "failed", "cancelled"]
# A page's cursor, as the store writes it: a sort key (a time, exactly) and a task id.
CURSOR = r"^\d{1,16}(\.\d{1,20})?(e-\d{1,3})?_[\w-]{1,64}$"


class TaskQuery(BaseModel):
    """A page of a task list: lists carry excerpts, so a page is small; ``limit`` is capped.

    ``q`` finds text literally (``%`` and ``_`` are plain characters); ``after`` is the
    ``next`` of the page before, so pages follow on while tasks change.
    """

    status: StatusName | None = None
    q: str = Field("", max_length=MAX_SEARCH, description="text in the input, output or id")
    order: Literal["newest", "waiting"] = Field(
        "newest", description="newest first, or the oldest change first (the longest waiting)")
    after: str | None = Field(None, pattern=CURSOR, description="the previous page's next")
    limit: Annotated[int, between(1, MAX_LIMIT),
                     Field(json_schema_extra={"minimum": 1, "maximum": MAX_LIMIT})] = 50
    offset: Annotated[int, between(0, MAX_INTEGER),
                      Field(json_schema_extra={"minimum": 0, "maximum": MAX_INTEGER})] = 0

    def view(self) -> View:
        return View(Status(self.status) if self.status else None, self.q.strip(), self.order)


class DashboardStreamQuery(TaskQuery):
    """The dashboard's stream: its page's view, and the last message before its page."""

    since: Annotated[int, between(0, MAX_INTEGER)] | None = None


class NextQuery(BaseModel):
    """``GET /next``: the task after which to look (the one on screen), if any."""

    after: str | None = Field(None, max_length=MAX_ID_LENGTH)




# The external-work API (hitl.work): a worker claims a job under a lease, then reports on it.
class ClaimIn(BaseModel):
    # one line, then not blank: a name of spaces is stripped to nothing
    worker: Annotated[str, OneLine, NonBlank] = Field(
        min_length=1, max_length=MAX_WORKER, description="the worker's name, shown with the job")
    # strict: a JSON number alone (lax pydantic reads false as 0 and "5" as 5)
    wait: float = Field(0, ge=0, le=MAX_WAIT, allow_inf_nan=False, strict=True,
                        description="seconds to wait for a job when none is queued (long poll)")
    lease: float | None = Field(None, ge=1, le=MAX_LEASE, allow_inf_nan=False, strict=True,
                                description="seconds the job is the worker's without a "
                                            "heartbeat (default: the server's --lease)")


class LeaseIn(BaseModel):
    """Which job a report is about: the attempt and the lease the claim gave."""

    attempt: int = Field(ge=1, le=MAX_INTEGER, strict=True, description="the job's attempt")
    lease_id: str = Field(min_length=1, max_length=MAX_LEASE_ID,
                          description="the lease_id the claim answered")


class HeartbeatIn(LeaseIn):
    lease: float | None = Field(None, ge=1, le=MAX_LEASE, allow_inf_nan=False, strict=True,
                                description="seconds from now (default: the claim's lease)")


class ProgressIn(LeaseIn):
    progress: float = Field(ge=0, le=1, allow_inf_nan=False, strict=True,
                            description="0 to 1")
    partial_output: str = Field("", max_length=MAX_TEXT, description="the output so far")


class CompleteIn(LeaseIn):
    output: Text = Field(description="the attempt's output, for review")


class FailIn(LeaseIn):
    error: str = Field(max_length=MAX_ERROR, description="why the job failed")


class JobOut(BaseModel):
    task_id: str
    attempt: int
    lease_id: str
    lease_expires: str = Field(description="ISO 8601, UTC")
    task_input: str
    title: str
    metadata: dict[str, Any] | None
    reviews: list[dict[str, Any]] = Field(description="every review so far, as in a task")
    previous_output: str | None = Field(description="the output of the attempt before "
                                                    "(the one the reviews judged); null "
                                                    "on attempt 1")


class LeaseOut(BaseModel):
    lease_expires: str = Field(description="ISO 8601, UTC")


class FailOut(BaseModel):
    retrying: bool = Field(description="whether the attempt is tried again (else the task "
                                       "fails)")
