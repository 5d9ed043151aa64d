"""Every call of the API, written once for both clients (sans I/O).

A call is a generator: it yields each :class:`Request` it needs, is sent back the
answer (a 2xx: :func:`checked` turned every other into its exception), and returns its
result. :class:`~hitl.client.Client` drives it with blocking I/O,
:class:`~hitl.client.AsyncClient` with ``await``; neither builds a request or reads an
answer itself, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypedDict, TypeVar
from urllib.parse import quote

import httpx
from httpx_sse import SSEError

from .errors import HitlError, Unavailable, error_of, unreachable
from .models import Task, TaskPage

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    json: Any = None
    params: Mapping[str, str | int] | None = None
    headers: Mapping[str, str] | None = None


Call = Generator[Request, httpx.Response, T]


class SubmitOptions(TypedDict, total=False):
    """The options of :meth:`Client.submit`; any left out takes the server's default."""

    title: str
    metadata: Mapping[str, Any]
    reviewers: Sequence[str]  # user names and "group:NAME"; none: any reviewer
    allow_self_review: bool
    quorum: int
    review_timeout: float  # seconds each attempt may wait for review
    on_timeout: Literal["fail", "reject", "approve", "escalate"]
    escalate_to: Sequence[str]
    max_attempts: int
    output: str  # a draft already made: the task starts waiting for review of it
    idempotency_key: str  # a retry with the same key returns the same task


OPTIONS = frozenset(SubmitOptions.__annotations__)


def checked(response: httpx.Response) -> httpx.Response:
    """The answer, if it is a success; else its exception (its body must be read)."""
    if not response.is_success:
        raise error_of(response)
    return response


@contextmanager
def no_answer_is_unavailable(url: str, task_id: str | None = None) -> Iterator[None]:
    """httpx's failures to get an answer (or, ``task_id``'s stream, a whole one), as
    :class:`Unavailable`: the same for both clients, requests and streams."""
    try:
        yield
    except httpx.TransportError as error:
        raise unreachable(url, error) from error
    except SSEError as error:
        raise Unavailable(f"the stream of task {task_id} broke: {error}") from error


def task_path(task_id: str, *rest: str) -> str:
    """``/api/tasks/<id>...``, the id quoted whole: an id is never more of the path."""
    return "/".join(("/api/tasks", quote(task_id, safe=""), *rest))


def submit(data: str, options: SubmitOptions) -> Call[Task]:
    unknown = set(options) - OPTIONS
    if unknown:
        raise TypeError(f"submit() got unexpected options: {', '.join(sorted(unknown))}")
    body: dict[str, Any] = {"data": data}
    given: dict[str, Any] = dict(options)
    key = given.pop("idempotency_key", None)
    for name in ("reviewers", "escalate_to"):
        if given.get(name) is not None:
            given[name] = list(given[name])
    if isinstance(given.get("metadata"), Mapping):
        given["metadata"] = dict(given["metadata"])
    body.update((name, value) for name, value in given.items() if value is not None)
    headers = {"Idempotency-Key": str(key)} if key is not None else {}
    answer = yield Request("POST", "/submit", json=body, headers=headers)
    return (yield from get(str(answer.json()["task_id"])))


def get(task_id: str) -> Call[Task]:
    answer = yield Request("GET", task_path(task_id))
    return Task.from_json(answer.json())


def list_tasks(status: str | None, limit: int, offset: int) -> Call[TaskPage]:
    params: dict[str, str | int] = {"limit": limit, "offset": offset}
    if status is not None:
        params["status"] = status
    answer = yield Request("GET", "/api/tasks", params=params)
    return TaskPage.from_json(answer.json())


def decide(task_id: str, feedback: Literal["approved", "rejected"], comment: str | None,
           *, edited_output: str | None = None, attempt: int | None = None,
           reviewer: str | None = None) -> Call[None]:
    body: dict[str, Any] = {"feedback": feedback}
    extra = {"comment": comment, "edited_output": edited_output, "attempt": attempt,
             "reviewer": reviewer}
    body.update((name, value) for name, value in extra.items() if value is not None)
    yield Request("POST", "/feedback/" + quote(task_id, safe=""), json=body)


def cancel(task_id: str) -> Call[Task]:
    answer = yield Request("POST", task_path(task_id, "cancel"))
    return Task.from_json(answer.json())


def next_review() -> Call[Task | None]:
    answer = yield Request("POST", "/api/queue/next")
    return None if answer.status_code == 204 else Task.from_json(answer.json())


@dataclass(frozen=True, slots=True)
class Settings:
    """What both clients are made with (see :class:`~hitl.client.Client`)."""

    url: str
    token: str | None
    timeout: float
    stream_timeout: float
    give_up_after: float

    def http_options(self) -> dict[str, Any]:
        """httpx's client options: the base URL, the token, the timeout of a request."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return {"base_url": self.url, "headers": headers, "timeout": self.timeout}

    def stream_timeouts(self, left: float | None = None) -> httpx.Timeout:
        """A stream's: it may be silent for ``stream_timeout`` (the server sends a heartbeat
        comment every 15 s by default), and no timeout outlasts a deadline ``left`` away."""
        timeout, silence = self.timeout, self.stream_timeout
        if left is not None:
            timeout, silence = min(timeout, left), min(silence, left)
        return httpx.Timeout(timeout, read=silence)


def opened(response: httpx.Response) -> None:
    """Check a stream's answer, once its body is read if it is an error: raise its
    exception, or :class:`HitlError` for an answer that is not an event stream at all."""
    checked(response)
    kind = response.headers.get("content-type", "").partition(";")[0].strip()
    if kind != "text/event-stream":
        raise HitlError(f"{response.url} is not an event stream (Content-Type {kind!r}): "
                        "is the URL hitl's?", response.status_code)
