"""Typed domain errors: services raise them, one handler turns them into responses."""

from __future__ import annotations

import json

# What a client is told of a bug of ours (the details go to the log).
INTERNAL_ERROR = "internal error; it has been logged"
# ... and of a request body that stopped arriving (Quart's BODY_TIMEOUT).
BODY_TIMEOUT_ERROR = "the request body did not arrive in time"


def error_body(message: str) -> bytes:
    """The body of every JSON error, whichever layer answers: ``{"error": "..."}``."""
    return (json.dumps({"error": message}, separators=(",", ":")) + "\n").encode()


class HitlError(Exception):
    """An error the client caused, with the HTTP status that says so."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Invalid(HitlError):
    status = 400


class NotFound(HitlError):
    status = 404


class Conflict(HitlError):
    """Not waiting for review, lost the race to decide, or a stale attempt."""

    status = 409


class Unavailable(HitlError):
    """The service is shutting down and takes no new work."""

    status = 503


class StorageUnavailable(Unavailable):
    """A change could not be stored (disk full, read-only file, I/O error): nothing of it
    is visible, and the client may send it again once storage recovers."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"storage unavailable: {reason}")
        self.reason = reason


class DuplicateKey(Exception):
    """A write broke a uniqueness rule of the store (an Idempotency-Key already used)."""


class ConfigError(Exception):
    """A bad setting: start-up stops with this one-line message."""


class StartupError(Exception):
    """The service cannot start (e.g. its database cannot be opened): one-line message."""


class TaskFailed(Exception):
    """Ends a task's flow as failed, with a message for the submitter."""
