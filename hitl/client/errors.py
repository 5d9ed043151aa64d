"""What the client raises: one exception per kind of answer, each with the server's message.

They are the client's own (not :mod:`hitl.errors`, the server's), so a program that talks to
hitl over HTTP needs nothing of the server installed to catch them.
"""

from __future__ import annotations

import httpx


class HitlError(Exception):
    """hitl answered with an error (``status``, its HTTP status) or did not answer at all
    (``status`` None); ``message`` is the server's ``error``, word for word."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message if self.status is None else f"{self.message} (HTTP {self.status})"


class Invalid(HitlError):
    """The request was refused as malformed or too large (400, 413, 415, 422, 431)."""


class Unauthorized(HitlError):
    """No valid token or session (401)."""


class Forbidden(HitlError):
    """Signed in, but not allowed to do this (403): the message says why."""


class NotFound(HitlError):
    """No such task, or none this caller may see (404)."""


class Conflict(HitlError):
    """The task is not in a state that allows it (409): finished, not waiting for review,
    a stale attempt, a vote already cast, another request's Idempotency-Key."""


class Unavailable(HitlError):
    """The service cannot answer now (503, a gateway's 502 or 504), or could not be
    reached at all (connection refused or dropped, a timeout): worth trying again later."""


BY_STATUS: dict[int, type[HitlError]] = {
    400: Invalid, 413: Invalid, 415: Invalid, 422: Invalid, 431: Invalid,
    401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict,
    502: Unavailable, 503: Unavailable, 504: Unavailable,
}


def error_of(response: httpx.Response) -> HitlError:
    """The exception for an error answer (its body already read)."""
    kind = BY_STATUS.get(response.status_code, HitlError)
    return kind(message_of(response), response.status_code)


def message_of(response: httpx.Response) -> str:
    """The server's ``{"error": "..."}``; for a body that is not one (a proxy's page), its
    reason phrase."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError, UnicodeDecodeError):  # not JSON, or not an object
        error = None
    if isinstance(error, str) and error:
        return error
    return response.reason_phrase.lower() or f"HTTP {response.status_code}"


def unreachable(url: str, error: httpx.TransportError) -> Unavailable:
    """The exception for a request that got no answer: what went wrong, and where."""
    reason = str(error) or type(error).__name__
    if isinstance(error, httpx.TimeoutException):
        reason = f"timed out ({type(error).__name__})"
    return Unavailable(f"cannot reach hitl at {url}: {reason}")


__all__ = ["Conflict", "Forbidden", "HitlError", "Invalid", "NotFound", "Unauthorized",
           "Unavailable", "error_of", "unreachable"]
