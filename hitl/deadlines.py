"""Review deadlines: when a review times out, and what the timeout decides.

A task with a ``review_timeout`` gets an absolute ``review_deadline`` (stored on the task)
each time an attempt comes up for review. Its flow waits for a decision until then; at
the deadline the task's ``on_timeout`` decides, as the system identity :data:`TIMEOUT`
(never a user): ``reject`` and ``approve`` are that decision, ``fail`` a rejection that
fails the task, ``escalate`` hands the task to ``escalate_to`` with a new deadline, once
(a second timeout fails it). The flow resumes after a restart at its stored deadline, so
one that passed while the service was down fires at start-up. The decision is claimed
like a reviewer's (:meth:`hitl.tracker.Tracker.claim_decision`, no await between the
check and the claim), and the store refuses a second decision of a timed-out attempt.
"""

from __future__ import annotations

import time

from .accounts import Identity, Role, User
from .models import Decision, Review, Task

TIMEOUT = Identity(User("timeout", "review timeout", Role.REVIEWER), "system")
TIMED_OUT = "review timed out"


def deadline(task: Task, now: float | None = None) -> float | None:
    """When a review starting now times out, for a task with a timeout."""
    if not task.review_timeout:
        return None
    return (time.time() if now is None else now) + task.review_timeout


def escalates(task: Task) -> bool:
    """Whether this timeout escalates (the first, of a task that escalates) or decides."""
    return task.on_timeout == "escalate" and not task.escalated and bool(task.escalate_to)


def fails(task: Task) -> bool:
    """Whether this timeout fails the task (``fail``, or an escalated task's second)."""
    return task.on_timeout in ("fail", "escalate")


def timeout_review(task: Task) -> Review:
    """The timeout's decision on the attempt under review, signed by :data:`TIMEOUT`."""
    decision: Decision = "approved" if task.on_timeout == "approve" else "rejected"
    return Review(decision, task.attempt, TIMED_OUT, reviewer=TIMEOUT.name,
                  display_name=TIMEOUT.user.display_name, auth_method=TIMEOUT.method)


def failure(task: Task) -> str:
    """The error of a task that a timeout failed."""
    waited = f"{task.review_timeout:g} s" if task.review_timeout else "its deadline"
    after = " after escalation" if task.escalated else ""
    return f"{TIMED_OUT}{after}: no decision within {waited}"
