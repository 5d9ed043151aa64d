"""The worker's side of the work API (``/api/work/*``): each call one request, each answer
a typed outcome, and one record of whether the service can be reached.

A worker tells three kinds of failure apart: the service is *away* (no connection, a
5xx: wait and try again), the job is *lost* (409 or 404: another worker has it, or the
task ended: drop it), or the request is *refused* (any other 4xx: retrying cannot help).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from .models import Review

log = logging.getLogger("hitl.worker")

CONNECT_TIMEOUT = 10.0
REQUEST_TIMEOUT = 30.0  # any one call but a claim, which waits its long poll on top


class Away(Exception):
    """The service did not answer, or answered 5xx: try again later."""


class Lost(Exception):
    """409 or 404: the job is not this worker's any more; drop it."""


class Refused(Exception):
    """Another 4xx: this request will never succeed (bad token, bad settings, too large)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


@dataclass(frozen=True, slots=True)
class Claimed:
    """One job as the service handed it out, with its lease."""

    task_id: str
    attempt: int
    lease_id: str
    task_input: str
    reviews: tuple[Review, ...]
    lease_left: float  # seconds of lease at the claim, by the service's clock
    previous_output: str | None = None  # the draft the reviews judged (None: attempt 1)

    @classmethod
    def from_response(cls, response: httpx.Response) -> Claimed:
        job = response.json()
        return cls(str(job["task_id"]), int(job["attempt"]), str(job["lease_id"]),
                   str(job["task_input"]),
                   tuple(Review.from_json(review) for review in job.get("reviews") or ()),
                   lease_left(job, response), job.get("previous_output"))

    @property
    def label(self) -> str:
        return f"task {self.task_id[:12]} attempt {self.attempt}"

    def ident(self) -> dict[str, Any]:
        """What names this job in every call about it."""
        return {"attempt": self.attempt, "lease_id": self.lease_id}


def lease_left(answer: dict[str, Any], response: httpx.Response) -> float:
    """Seconds until the ``lease_expires`` of an answer (its JSON, parsed once), by the
    service's own clock.

    The ``Date`` header (whole seconds, rounded down) says what time it was there, so
    a worker whose clock is off still renews in time; without it, the local clock.
    """
    expires = datetime.fromisoformat(answer["lease_expires"]).timestamp()
    try:
        now = parsedate_to_datetime(response.headers["date"]).timestamp() + 0.5
    except (KeyError, TypeError, ValueError):
        now = time.time()
    return max(expires - now, 0.0)


class Backoff:
    """Capped exponential delays with jitter: each in [d/2, d], d doubling up to ``cap``."""

    def __init__(self, first: float = 0.2, cap: float = 10.0) -> None:
        self.first, self.cap, self.failures = first, cap, 0

    def next(self) -> float:
        ceiling = min(self.cap, self.first * 2 ** self.failures)
        self.failures += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0


class Reachability:
    """Whether the service answers; logs a line when that changes, not one per retry."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.away_since: float | None = None

    def away(self, reason: str) -> None:
        if self.away_since is None:
            self.away_since = time.monotonic()
            log.warning("hitl at %s is away (%s): retrying with backoff", self.url, reason)

    def back(self, sent: float) -> None:
        """An answer came to a request sent at ``sent``: one sent before the service went
        away (a long poll answered as it shut down) does not say it is back."""
        if self.away_since is not None and sent >= self.away_since:
            away = time.monotonic() - self.away_since
            log.info("hitl at %s is back after %.1f s", self.url, away)
            self.away_since = None


class WorkClient:
    """The work API's calls over one connection pool, with the worker's token."""

    def __init__(self, url: str, token: str | None, connections: int) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.reach = Reachability(url)
        self.http = httpx.AsyncClient(
            base_url=url.rstrip("/"), headers=headers,
            timeout=httpx.Timeout(REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT),
            limits=httpx.Limits(max_connections=connections + 4),
        )

    async def claim(self, worker: str, wait: float, lease: float | None) -> Claimed | None:
        """A job, or None when none came within ``wait`` seconds (the long poll)."""
        body: dict[str, Any] = {"worker": worker, "wait": wait}
        if lease is not None:
            body["lease"] = lease
        response = await self._post("/api/work/claim", body, REQUEST_TIMEOUT + wait)
        if response.status_code == 204:
            return None
        try:
            return Claimed.from_response(response)
        except (KeyError, TypeError, ValueError) as exc:  # not the work API this speaks
            raise Refused(response.status_code, f"a job this worker cannot read: {exc!r}") \
                from None

    async def extend(self, job: Claimed, action: str, body: dict[str, Any]) -> float:
        """A ``heartbeat`` or ``progress``; returns the seconds of lease now left."""
        response = await self._post(f"/api/work/{job.task_id}/{action}", {**job.ident(), **body})
        return lease_left(response.json(), response)

    async def finish(self, job: Claimed, action: str, body: dict[str, Any]) -> dict[str, Any]:
        """``complete`` or ``fail``: the service's answer."""
        response = await self._post(f"/api/work/{job.task_id}/{action}", {**job.ident(), **body})
        answer = response.json()
        return answer if isinstance(answer, dict) else {}

    async def _post(self, path: str, body: dict[str, Any],
                    timeout: float = REQUEST_TIMEOUT) -> httpx.Response:
        sent = time.monotonic()
        try:
            response = await self.http.post(path, json=body, timeout=httpx.Timeout(
                timeout, connect=CONNECT_TIMEOUT))
        except httpx.TransportError as exc:
            self.reach.away(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            raise Away(str(exc)) from exc
        if response.status_code >= 500:
            message = error_of(response)
            self.reach.away(f"{response.status_code} {message}")
            raise Away(message)
        self.reach.back(sent)
        if response.status_code in (404, 409):
            raise Lost(error_of(response))
        if response.status_code >= 400:
            raise Refused(response.status_code, error_of(response))
        return response

    async def close(self) -> None:
        await self.http.aclose()


def error_of(response: httpx.Response) -> str:
    """The service's ``{"error": ...}``, or the start of whatever else came."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    return str(error) if error else (response.text[:200] or response.reason_phrase)
