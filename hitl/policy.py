"""Who may do what: the one policy, asked by the services (:mod:`hitl.runner`).

Every path (the JSON API, the form posts, htmx, the streams) reaches a task through the
runner, and the runner asks here; templates are given the answer, never decide. Each
question is a pure function of who asks and the task, so it costs nothing to ask.

Roles (:class:`~hitl.accounts.Role`):

- ``admin``: everything; decides any task, recorded as an admin override when the task
  names reviewers and not them;
- ``reviewer``: submits; decides the tasks whose ``reviewers`` name them (by name or as
  ``group:NAME``), or every task that names none; sees and watches every task;
- ``submitter``: submits; sees and watches only their own tasks (another's is unknown:
  404, not 403, so that its existence says nothing);
- ``viewer``: sees and watches every task, submits and decides nothing;
- ``worker``: only the external-worker endpoints (:func:`can_work`, admins too), so
  403 everywhere else.

No one decides a task they submitted, admins included, unless it has
``allow_self_review``. With ``--auth none`` everyone is the one anonymous operator, who
may do everything, as before sign-in existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .accounts import Identity, Role
from .identity import Forbidden
from .store import ReviewScope


class Owned(Protocol):
    """Whose a task is: all that seeing it depends on (a task, a list's row, its state)."""

    @property
    def submitted_by(self) -> str | None: ...


class Assigned(Owned, Protocol):
    """... and who may decide it (a :class:`~hitl.models.Task` or a list's row)."""

    @property
    def reviewers(self) -> tuple[str, ...]: ...
    @property
    def allow_self_review(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's answer: allowed, or the reason for the 403; and for a decision on a
    task, whether an admin takes it in place of the reviewers the task names."""

    allowed: bool
    reason: str = ""
    override: bool = False

    def require(self) -> None:
        """Raise :class:`~hitl.identity.Forbidden` with the reason, unless allowed."""
        if not self.allowed:
            raise Forbidden(self.reason)


ALLOWED = Decision(True)
WORKERS = Decision(False, "workers only claim and complete work")


def signed_out(identity: Identity) -> bool:
    """``--auth none``: no one signs in, and everything is allowed."""
    return identity.method == "none"


def can_submit(identity: Identity) -> Decision:
    role = identity.user.role
    if role in (Role.ADMIN, Role.REVIEWER, Role.SUBMITTER):
        return ALLOWED
    return WORKERS if role is Role.WORKER else Decision(False, "viewers submit nothing")


def can_work(identity: Identity) -> Decision:
    """Claim and report external work (:mod:`hitl.work`): workers and admins."""
    role = identity.user.role
    if signed_out(identity) or role in (Role.WORKER, Role.ADMIN):
        return ALLOWED
    return Decision(False, f"only workers claim and report work ({role.value}s do not)")


def can_read(identity: Identity) -> Decision:
    """Whether they may see tasks at all (lists, pages, streams); which ones: :func:`can_see`."""
    return WORKERS if identity.user.role is Role.WORKER else ALLOWED


def can_see(identity: Identity, task: Owned) -> bool:
    """Whether this task is theirs to see; when not, it reads as unknown (404)."""
    role = identity.user.role
    if role is Role.SUBMITTER:
        return task.submitted_by == identity.name
    return role is not Role.WORKER


def owner_filter(identity: Identity) -> str | None:
    """The submitter whose tasks alone they may see (themselves, for a submitter), or
    None for every task: lists filter by it in SQL, streams message by message."""
    return identity.name if identity.user.role is Role.SUBMITTER else None


def decides_any(identity: Identity) -> bool:
    """Whether their role decides tasks at all (which ones: :func:`can_decide`)."""
    return signed_out(identity) or identity.user.role in (Role.ADMIN, Role.REVIEWER)


def review_scope(identity: Identity) -> ReviewScope | None:
    """For one who :func:`decides_any`, the tasks they may decide, as the store filters
    them (the rule of :func:`can_decide`); None: any task (sign-in off)."""
    if signed_out(identity):
        return None
    if identity.user.role is Role.ADMIN:
        return ReviewScope(identity.name, None)
    return ReviewScope(identity.name, (identity.name, *(f"group:{group}"
                                                         for group in identity.user.groups)))


def can_decide(identity: Identity, task: Assigned) -> Decision:
    """Whether they may approve or reject this task's output (its status aside)."""
    if signed_out(identity):
        return ALLOWED
    role = identity.user.role
    if role is Role.WORKER:
        return WORKERS
    if role in (Role.VIEWER, Role.SUBMITTER):
        return Decision(False, f"{role.value}s decide nothing")
    if task.submitted_by == identity.name and not task.allow_self_review:
        return Decision(False, "you submitted this task")
    named = not task.reviewers or is_named(identity, task.reviewers)
    if role is Role.ADMIN:
        return Decision(True, override=not named)
    return ALLOWED if named else Decision(False, f"only {listed(task.reviewers)} may review "
                                                 "this task")


def can_cancel(identity: Identity, task: Assigned) -> Decision:
    """Its submitter, an admin, or a reviewer who may decide it; viewers and workers not."""
    role = identity.user.role
    if signed_out(identity) or role is Role.ADMIN:
        return ALLOWED
    if role is Role.WORKER:
        return WORKERS
    if role is Role.VIEWER:
        return Decision(False, "viewers cancel nothing")
    if task.submitted_by == identity.name or (role is Role.REVIEWER
                                              and can_decide(identity, task).allowed):
        return ALLOWED
    return Decision(False, "only its submitter, an admin or "
                           f"{listed(task.reviewers) if task.reviewers else 'a reviewer'} "
                           "may cancel this task")


def can_manage(identity: Identity) -> Decision:
    """Users, tokens and webhooks: admins only."""
    if identity.user.role is Role.ADMIN:
        return ALLOWED
    return Decision(False, "only admins manage users, tokens and webhooks")


def is_named(identity: Identity, reviewers: tuple[str, ...]) -> bool:
    return identity.name in reviewers or any(f"group:{group}" in reviewers
                                             for group in identity.user.groups)


def listed(names: tuple[str, ...]) -> str:
    """``ann``, ``ann or group:legal``, ``ann, bob or group:legal``."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
