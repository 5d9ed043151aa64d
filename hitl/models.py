"""Plain, storable data: tasks, review decisions and the events they publish.

Nothing here holds a runtime handle (no Event, no asyncio.Task, no queue), so every
object can be written to the store and read back unchanged.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal, Protocol

Decision = Literal["approved", "rejected"]
Outcome = Literal["fail", "reject", "approve", "escalate"]  # what a review timeout does
OUTCOMES: tuple[str, ...] = ("fail", "reject", "approve", "escalate")


class Status(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    WAITING_FOR_REVIEW = "waiting_for_review"
    PROCESSING_FEEDBACK = "processing_feedback"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})


def new_task_id() -> str:
    return uuid.uuid4().hex


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True, slots=True)
class Review:
    """One human decision on one attempt's output, and who made it.

    ``reviewer`` is the signed-in user's name (with ``--auth none``, the name they typed);
    ``auth_method`` says how they proved it, ``admin_override`` whether an admin decided
    a task that names other reviewers.
    """

    decision: Decision
    attempt: int
    comment: str = ""
    reviewer: str = ""
    created_at: float = field(default_factory=time.time)
    display_name: str = ""
    auth_method: str = "none"  # password, link, token, proxy or none
    token_label: str | None = None
    admin_override: bool = False
    edited_output: str | None = None  # approved with an edit: the text approved

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "created_at": iso(self.created_at)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Review:
        """The review back from :meth:`to_json` (an external worker's job has them so);
        keys it does not know are left out."""
        known = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        if isinstance(known.get("created_at"), str):
            known["created_at"] = datetime.fromisoformat(known["created_at"]).timestamp()
        return cls(**known)

    def vote(self) -> dict[str, Any]:
        """The review as one vote among an attempt's (the ``votes`` of messages)."""
        return {"reviewer": self.reviewer, "decision": self.decision, "comment": self.comment,
                "at": iso(self.created_at)}


def votes_on(reviews: list[Review], attempt: int) -> list[Review]:
    """The votes cast on one attempt, in order."""
    return [review for review in reviews if review.attempt == attempt]


def approvals(votes: list[Review]) -> int:
    return sum(1 for vote in votes if vote.decision == "approved")


@dataclass(frozen=True, slots=True)
class Reservation:
    """A reviewer holding a task's attempt in the review queue, until ``expires_at``
    (:mod:`hitl.queue`); the store shows only live ones."""

    reviewer: str
    display_name: str
    attempt: int
    created_at: float
    expires_at: float

    def to_json(self) -> dict[str, Any]:
        return {"reviewer": self.reviewer, "display_name": self.display_name,
                "attempt": self.attempt, "since": iso(self.created_at),
                "until": iso(self.expires_at)}


@dataclass(slots=True)
class Attempt:
    """One attempt's output (or the processor's error), with when it ran and how many tries.

    ``known`` is False for attempts made before hitl kept them: their output is unknown.
    """

    attempt: int
    output: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    tries: int = 0
    known: bool = True
    edited_by: str | None = None  # a reviewer's edit of the attempt before, not a processor's

    def row(self, task_id: str) -> dict[str, Any]:
        return {"task_id": task_id, "attempt": self.attempt, "output": self.output,
                "started_at": self.started_at, "finished_at": self.finished_at,
                "error": self.error, "tries": self.tries, "known": int(self.known),
                "edited_by": self.edited_by}

    def to_json(self, reviews: list[Review]) -> dict[str, Any]:
        votes = votes_on(reviews, self.attempt)
        return {"attempt": self.attempt, "output": self.output, "output_known": self.known,
                "started_at": iso(self.started_at) if self.started_at else None,
                "finished_at": iso(self.finished_at) if self.finished_at else None,
                "error": self.error, "tries": self.tries, "edited_by": self.edited_by,
                "reviews": [review.to_json() for review in votes],
                "votes": [vote.vote() for vote in votes], "approvals": approvals(votes)}


@dataclass(slots=True)
class Task:
    """The durable record of one task. Mutated only by its flow, through the tracker."""

    task_id: str
    task_input: str
    status: Status = Status.PENDING
    attempt: int = 1
    processed_output: str | None = None
    final_result: str | None = None
    error: str | None = None
    last_seq: int = 0
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    reviews: list[Review] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)  # loaded for one task, not lists
    # Who submitted it and who may decide it: set once, at submission (see hitl.policy).
    submitted_by: str | None = None  # None: submitted with sign-in off
    reviewers: tuple[str, ...] = ()  # user names and "group:NAME"; none: any reviewer
    allow_self_review: bool = False
    # Options given at submission (the server's defaults filled in), stored with the task.
    title: str = ""
    metadata: dict[str, Any] | None = None  # a JSON object, returned as given
    quorum: int = 1  # distinct approvals an attempt needs
    review_timeout: float | None = None  # seconds an attempt may wait for review
    on_timeout: str = "fail"  # an Outcome
    escalate_to: tuple[str, ...] = ()  # the reviewers after an escalation
    max_attempts: int | None = None  # None: the server's --max-attempts (older tasks)
    review_deadline: float | None = None  # when the current review times out (absolute)
    escalated: bool = False
    # Live reservations of its current attempt, as read from the store (never stored here).
    reservations: list[Reservation] = field(default_factory=list)

    @property
    def rejections(self) -> int:
        return sum(1 for review in self.reviews if review.decision == "rejected")

    def attempt_to_run(self) -> int:
        """The attempt the processor runs next: after the current one was rejected, the
        one after it; else the current one (the first, or one resumed mid-run). Edits
        (quorum above 1) add attempts of their own, so rejections alone do not number them."""
        rejected = any(review.attempt == self.attempt and review.decision == "rejected"
                       for review in self.reviews)
        return self.attempt + 1 if rejected else self.attempt

    def votes(self) -> list[Review]:
        """The votes on the attempt under review."""
        return votes_on(self.reviews, self.attempt)

    def tally(self) -> dict[str, Any]:
        """What a message says of the votes on the current attempt (quorum above 1)."""
        votes = self.votes()
        return {"votes": [vote.vote() for vote in votes], "approvals": approvals(votes),
                "quorum": self.quorum}

    def row(self) -> dict[str, Any]:
        """The task's columns, as named SQL parameters (an immutable snapshot)."""
        return {
            "task_id": self.task_id,
            "task_input": self.task_input,
            "status": self.status.value,
            "attempt": self.attempt,
            "processed_output": self.processed_output,
            "final_result": self.final_result,
            "error": self.error,
            "last_seq": self.last_seq,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "submitted_by": self.submitted_by,
            "reviewers": json.dumps(self.reviewers) if self.reviewers else "[]",
            "allow_self_review": self.allow_self_review,
            **options_row(self),
        }

    def attempts_allowed(self, default: int) -> int:
        """Attempts before the task fails unapproved: its own, else the server's."""
        return self.max_attempts if self.max_attempts is not None else default

    def to_json(self, *, reviews: bool = True) -> dict[str, Any]:
        data = self.row()
        data.update(created_at=iso(self.created_at), updated_at=iso(self.updated_at),
                    reviewers=list(self.reviewers), **options_json(self))
        if reviews:
            data["reviews"] = [review.to_json() for review in self.reviews]
            data["attempts"] = [attempt.to_json(self.reviews) for attempt in self.attempts]
            data["reservations"] = [held.to_json() for held in self.reservations]
        return data

    def output_before(self, attempt: int) -> str | None:
        """The output of the latest attempt before ``attempt`` (the draft its reviewers
        rejected, or a reviewer's edit of it), if one is known."""
        earlier = [record for record in self.attempts
                   if record.attempt < attempt and record.output is not None]
        return earlier[-1].output if earlier else None

    def current_attempt(self) -> Attempt:
        """The record of the attempt the task is on (made if it has none yet)."""
        if not self.attempts or self.attempts[-1].attempt != self.attempt:
            self.attempts.append(Attempt(self.attempt))
        return self.attempts[-1]


class Options(Protocol):
    """A task's options, as a :class:`Task` and a list's :class:`TaskRow` both hold them."""

    @property
    def title(self) -> str: ...
    @property
    def metadata(self) -> dict[str, Any] | None: ...
    @property
    def quorum(self) -> int: ...
    @property
    def review_timeout(self) -> float | None: ...
    @property
    def on_timeout(self) -> str: ...
    @property
    def escalate_to(self) -> tuple[str, ...]: ...
    @property
    def max_attempts(self) -> int | None: ...
    @property
    def review_deadline(self) -> float | None: ...
    @property
    def escalated(self) -> bool: ...


def options_row(task: Options) -> dict[str, Any]:
    """The options' columns, as named SQL parameters."""
    return {"title": task.title,
            "metadata": None if task.metadata is None else json.dumps(task.metadata),
            "quorum": task.quorum, "review_timeout": task.review_timeout,
            "on_timeout": task.on_timeout, "escalate_to": json.dumps(task.escalate_to),
            "max_attempts": task.max_attempts, "review_deadline": task.review_deadline,
            "escalated": int(task.escalated)}


def options_json(task: Options) -> dict[str, Any]:
    """The options as the API shows them (the metadata as given, the deadline in ISO 8601)."""
    return {"title": task.title, "metadata": task.metadata, "quorum": task.quorum,
            "review_timeout": task.review_timeout, "on_timeout": task.on_timeout,
            "escalate_to": list(task.escalate_to), "max_attempts": task.max_attempts,
            "review_deadline": iso(task.review_deadline) if task.review_deadline else None,
            "escalated": task.escalated}


EXCERPT = 300  # characters of each text a list shows
ELLIPSIS = "…"  # ends an excerpt that was cut


def excerpt(text: str | None, length: int | None) -> str | None:
    """A text read cut to its first :data:`EXCERPT` characters, marked if that cut it."""
    if text is None or length is None or length <= EXCERPT:
        return text
    return text[:EXCERPT] + ELLIPSIS


@dataclass(frozen=True, slots=True)
class TaskRow:
    """A task as lists show it: each text an excerpt, with the full text's length.

    Lists never hold whole texts: 100 tasks of 200,000 characters are 40 MB a page,
    held by every dashboard watcher. The whole task is :class:`Task`, read one at a time.
    """

    task_id: str
    status: Status
    attempt: int
    task_input: str
    task_input_length: int
    processed_output: str | None
    processed_output_length: int | None
    final_result: str | None
    final_result_length: int | None
    error: str | None
    error_length: int | None
    last_seq: int
    created_at: float
    updated_at: float
    submitted_by: str | None = None
    reviewers: tuple[str, ...] = ()
    allow_self_review: bool = False
    title: str = ""
    metadata: dict[str, Any] | None = None
    quorum: int = 1
    review_timeout: float | None = None
    on_timeout: str = "fail"
    escalate_to: tuple[str, ...] = ()
    max_attempts: int | None = None
    review_deadline: float | None = None
    escalated: bool = False
    reservations: tuple[Reservation, ...] = ()  # live ones (hitl.queue)

    @property
    def waiting_since(self) -> float | None:
        """When the attempt under review came up for it: a waiting task changes no more
        until it is decided, so its last change is when it began to wait."""
        return self.updated_at if self.status is Status.WAITING_FOR_REVIEW else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        since = self.waiting_since
        data.update(status=self.status.value, created_at=iso(self.created_at),
                    updated_at=iso(self.updated_at),
                    waiting_since=iso(since) if since is not None else None,
                    reviewers=list(self.reviewers), **options_json(self),
                    reservations=[held.to_json() for held in self.reservations])
        return data


@dataclass(frozen=True, slots=True)
class Message:
    """One published event, encoded once: its JSON and its SSE frame for one topic.

    ``id`` is the per-task sequence number on a task's topic and the global message
    number on the all-tasks topic.
    """

    id: int
    task_id: str
    status: str
    data: str
    frame: bytes
    submitted_by: str | None = None  # the task's, so a stream filters without a query

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def sse_frame(data: str, event_id: int | None = None, event: str | None = None) -> bytes:
    """Frame ``data`` as one SSE message: one ``data:`` line per line of data."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    if event:
        head += f"event: {event}\n"
    body = "".join(f"data: {line}\n" for line in data.split("\n"))
    return (head + body + "\n").encode()


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """A state change of one task, as it is published and stored."""

    task_id: str
    seq: int
    gid: int
    status: str
    data: str  # the payload's JSON, serialized once
    submitted_by: str | None = None  # carried, not stored: the task's row has it

    @classmethod
    def create(cls, task_id: str, seq: int, gid: int, payload: dict[str, Any],
               submitted_by: str | None = None) -> TaskEvent:
        data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
        return cls(task_id, seq, gid, str(payload["status"]), data, submitted_by)

    def messages(self) -> tuple[Message, Message]:
        """Frame once for the task's topic (id = seq) and once for the global one (id = gid)."""
        return self.for_task(), self.for_global()

    def for_task(self) -> Message:
        return self._message(self.seq)

    def for_global(self) -> Message:
        return self._message(self.gid)

    def _message(self, number: int) -> Message:
        return Message(number, self.task_id, self.status, self.data, sse_frame(self.data, number),
                       self.submitted_by)
