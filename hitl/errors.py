"""Typed domain errors: services raise them, one handler turns them into responses."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

# What a client is told of a bug of ours (the details go to the log).
INTERNAL_ERROR = "internal error; it has been logged"
# ... and of a request body that stopped arriving (Quart's BODY_TIMEOUT).
BODY_TIMEOUT_ERROR = "the request body did not arrive in time"
# The blueprints whose errors are JSON whoever asks (the API's, the webhooks' and the work
# API's); the UI's pages answer HTML, and other paths as the client's Accept prefers
# (hitl.pages.wants_html).
API_BLUEPRINTS = ("api", "webhooks", "work")


def error_body(message: str) -> bytes:
    """The body of every JSON error, whichever layer answers: ``{"error": "..."}``."""
    return (json.dumps({"error": message}, separators=(",", ":")) + "\n").encode()


# pydantic's error types, said plainly (its own wording: "Input should be a valid string").
PLAIN = {
    "missing": "is required",
    "string_type": "must be a string",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "model_type": "must be a JSON object",
    "dict_type": "must be a JSON object",
    "string_too_long": "must be at most {max_length} characters",
    "string_too_short": "must be at least {min_length} characters",
    "greater_than_equal": "must be at least {ge}",
    "less_than_equal": "must be at most {le}",
    "literal_error": "must be {expected}",
    "value_error": "{error}",
}


def plain(error: Mapping[str, Any]) -> str:
    """What one pydantic error says, plainly: 'must not be empty', 'must be a string'."""
    template = PLAIN.get(error.get("type", ""))
    if template is not None:
        try:  # a float field's whole bound reads as written: "at most 60", not "60.0"
            return template.format(**{key: int(value) if isinstance(value, float)
                                      and value.is_integer() else value
                                      for key, value in error.get("ctx", {}).items()})
        except (KeyError, IndexError):
            pass
    message = str(error.get("msg", "is not valid")).removeprefix("Value error, ")
    return message.replace("Input should be", "must be", 1)


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


class VoteRefused(Conflict):
    """The store refused a vote: its reviewer voted on that attempt already, or the attempt
    was decided (by a veto, or the quorum reached), perhaps by another process."""


class Superseded(VoteRefused):
    """The store refused a change made from an outdated copy of its task: another process
    changed the task first (a shared store). Made again from a fresh read, it may be taken."""


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
