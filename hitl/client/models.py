"""What the client returns: tasks, their reviews, stream events, a page of a list.

Each is made from the server's JSON and keeps all of it in ``raw``, so a field a newer
server adds is never lost and never breaks an older client: the typed fields are the
ones a program needs, ``raw`` has the rest.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any

TERMINAL = frozenset({"completed", "failed", "cancelled"})


def timestamp(value: object) -> datetime | None:
    """An ISO 8601 time as hitl writes them (UTC), or None for none (or one not parsed)."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def names(value: object) -> tuple[str, ...]:
    return tuple(str(name) for name in value) if isinstance(value, list) else ()


def frozen(data: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(data))


@dataclass(frozen=True, slots=True)
class Review:
    """One reviewer's decision on one attempt."""

    decision: str  # "approved" or "rejected"
    attempt: int
    comment: str
    reviewer: str
    created_at: datetime | None
    edited_output: str | None  # an approval with an edit: the text approved
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Review:
        return cls(str(data.get("decision", "")), int(data.get("attempt", 0)),
                   str(data.get("comment") or ""), str(data.get("reviewer") or ""),
                   timestamp(data.get("created_at")), text(data.get("edited_output")),
                   frozen(data))


@dataclass(frozen=True, slots=True)
class Task:
    """A task as ``GET /api/tasks/<id>`` shows it.

    From a list (:meth:`Client.list`) the texts are excerpts (the first 300 characters,
    ``…`` ending a cut one) and ``reviews`` is empty: :meth:`Client.get` has it whole.
    """

    task_id: str
    status: str
    attempt: int
    task_input: str
    processed_output: str | None  # the output of the current attempt (under review)
    final_result: str | None  # once completed: the approved output (or the edit approved)
    error: str | None  # once failed: why
    title: str
    metadata: Mapping[str, Any] | None
    submitted_by: str | None
    reviewers: tuple[str, ...]
    quorum: int
    created_at: datetime | None
    updated_at: datetime | None
    reviews: tuple[Review, ...]
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @property
    def finished(self) -> bool:
        """Completed, failed or cancelled: it changes no more."""
        return self.status in TERMINAL

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Task:
        metadata = data.get("metadata")
        return cls(
            task_id=str(data["task_id"]), status=str(data["status"]),
            attempt=int(data.get("attempt", 1)), task_input=str(data.get("task_input", "")),
            processed_output=text(data.get("processed_output")),
            final_result=text(data.get("final_result")), error=text(data.get("error")),
            title=str(data.get("title") or ""),
            metadata=frozen(metadata) if isinstance(metadata, Mapping) else None,
            submitted_by=text(data.get("submitted_by")), reviewers=names(data.get("reviewers")),
            quorum=int(data.get("quorum", 1)), created_at=timestamp(data.get("created_at")),
            updated_at=timestamp(data.get("updated_at")),
            reviews=tuple(Review.from_json(review) for review in data.get("reviews") or ()
                          if isinstance(review, Mapping)),
            raw=frozen(data))


@dataclass(frozen=True, slots=True)
class Event:
    """One message of a task's stream: its id (the task's message number), its status and
    the whole message (``data``: ``attempt``, ``progress``, ``output_to_review``,
    ``final_result``... as the status carries them)."""

    id: int
    task_id: str
    status: str
    data: Mapping[str, Any]

    @property
    def terminal(self) -> bool:
        """The task's last message: it is completed, failed or cancelled."""
        return self.status in TERMINAL


@dataclass(frozen=True, slots=True)
class TaskPage:
    """One page of ``GET /api/tasks``: its tasks (iterate the page itself, or ``tasks``),
    how many match in all, and the cursor of the next page (None on the last)."""

    tasks: tuple[Task, ...]
    total: int
    next: str | None
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TaskPage:
        return cls(tuple(Task.from_json(task) for task in data.get("tasks") or ()),
                   int(data.get("total", 0)), text(data.get("next")), frozen(data))

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)
