"""The policy alone: who may submit, see, decide, cancel and manage, and why not."""

from __future__ import annotations

import pytest

from hitl.accounts import Identity, Role, User
from hitl.identity import ANONYMOUS
from hitl.models import Task
from hitl.policy import (
    can_cancel,
    can_decide,
    can_manage,
    can_read,
    can_see,
    can_submit,
    can_work,
    owner_filter,
)

ADA = User("ada", "Ada", Role.ADMIN)
RITA = User("rita", "Rita", Role.REVIEWER, ("legal",))
REX = User("rex", "Rex", Role.REVIEWER)
SAM = User("sam", "Sam", Role.SUBMITTER)
SUE = User("sue", "Sue", Role.SUBMITTER)
VIC = User("vic", "Vic", Role.VIEWER)
WES = User("wes", "Wes", Role.WORKER)
NOBODY = Identity(ANONYMOUS, "none")


def who(user: User) -> Identity:
    return Identity(user, "token", token_label="ci")


def task(by: str | None = "sam", reviewers: tuple[str, ...] = ("group:legal",),
         allow_self_review: bool = False) -> Task:
    return Task("t" * 32, "input", submitted_by=by, reviewers=reviewers,
                allow_self_review=allow_self_review)


@pytest.mark.parametrize(("user", "allowed", "reason"), [
    (ADA, True, ""), (RITA, True, ""), (SAM, True, ""),
    (VIC, False, "viewers submit nothing"),
    (WES, False, "workers only claim and complete work"),
])
def test_who_may_submit(user: User, allowed: bool, reason: str) -> None:
    decision = can_submit(who(user))
    assert (decision.allowed, decision.reason) == (allowed, reason)


@pytest.mark.parametrize(("user", "allowed", "reason"), [
    (WES, True, ""), (ADA, True, ""),
    (RITA, False, "only workers claim and report work (reviewers do not)"),
    (SAM, False, "only workers claim and report work (submitters do not)"),
    (VIC, False, "only workers claim and report work (viewers do not)"),
])
def test_who_may_claim_and_report_work(user: User, allowed: bool, reason: str) -> None:
    decision = can_work(who(user))
    assert (decision.allowed, decision.reason) == (allowed, reason)


def test_with_sign_in_off_everyone_may_work() -> None:
    assert can_work(NOBODY).allowed


@pytest.mark.parametrize(("user", "allowed", "reason", "override"), [
    (ADA, True, "", True),  # outside group:legal: recorded as an admin override
    (RITA, True, "", False),
    (REX, False, "only group:legal may review this task", False),
    (SAM, False, "submitters decide nothing", False),
    (VIC, False, "viewers decide nothing", False),
    (WES, False, "workers only claim and complete work", False),
])
def test_who_may_decide_a_task_for_group_legal(user: User, allowed: bool, reason: str,
                                               override: bool) -> None:
    decision = can_decide(who(user), task())
    assert (decision.allowed, decision.reason, decision.override) == (allowed, reason, override)


def test_any_reviewer_decides_a_task_that_names_none_and_an_admin_is_no_override() -> None:
    assert can_decide(who(REX), task(reviewers=())).allowed
    assert can_decide(who(ADA), task(reviewers=())) == can_decide(who(RITA), task())
    assert not can_decide(who(ADA), task(reviewers=())).override


def test_reviewers_are_named_by_user_or_by_group() -> None:
    assert can_decide(who(REX), task(reviewers=("rex",))).allowed
    assert not can_decide(who(RITA), task(reviewers=("rex", "group:finance"))).allowed
    assert can_decide(who(RITA), task(reviewers=("rex", "group:legal"))).allowed
    assert not can_decide(who(ADA), task(reviewers=("ada",))).override
    assert (can_decide(who(RITA), task(reviewers=("rex", "ann", "group:finance"))).reason
            == "only rex, ann or group:finance may review this task")


@pytest.mark.parametrize("user", [ADA, RITA])
def test_no_one_reviews_their_own_task_unless_it_allows_self_review(user: User) -> None:
    own = task(by=user.name, reviewers=())
    assert can_decide(who(user), own).reason == "you submitted this task"
    assert not can_decide(who(user), own).allowed
    assert can_decide(who(user), task(by=user.name, reviewers=(),
                                      allow_self_review=True)).allowed


def test_without_sign_in_everything_is_allowed_as_before() -> None:
    for decision in (can_submit(NOBODY), can_read(NOBODY), can_manage(NOBODY),
                     can_decide(NOBODY, task()), can_cancel(NOBODY, task()),
                     can_decide(NOBODY, task(by=None))):
        assert decision.allowed and not decision.override
    assert can_see(NOBODY, task()) and owner_filter(NOBODY) is None


def test_submitters_see_only_their_own_tasks_and_workers_none() -> None:
    assert can_see(who(SAM), task()) and not can_see(who(SUE), task())
    assert owner_filter(who(SAM)) == "sam" and owner_filter(who(VIC)) is None
    assert all(can_see(who(user), task()) for user in (ADA, RITA, REX, VIC))
    assert not can_read(who(WES)).allowed and not can_see(who(WES), task())
    assert all(can_read(who(user)).allowed for user in (ADA, RITA, SAM, VIC))


@pytest.mark.parametrize(("user", "allowed"), [
    (ADA, True), (RITA, True), (SAM, True), (REX, False), (VIC, False), (WES, False),
])
def test_who_may_cancel(user: User, allowed: bool) -> None:
    assert can_cancel(who(user), task()).allowed is allowed


def test_a_reviewer_may_cancel_their_own_task_and_only_admins_manage() -> None:
    assert can_cancel(who(REX), task(by="rex")).allowed
    assert can_manage(who(ADA)).allowed
    assert not any(can_manage(who(user)).allowed for user in (RITA, SAM, VIC, WES))
