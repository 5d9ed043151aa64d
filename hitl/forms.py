"""The browser's form posts and query strings, as ``/openapi.json`` describes them.

Documentation only: the pages check each form with the JSON API's own schema
(:func:`hitl.pages.form_data`, :func:`hitl.pages.submit_form`), so a form's rules are
the API's. Every form carries the session's ``csrf_token`` (a token caller needs none).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from .limits import MAX_TEXT
from .schemas import FeedbackIn


class CsrfForm(BaseModel):
    csrf_token: str | None = Field(None, description="the session's form token (the page's)")


class SubmitForm(CsrfForm):
    """The submit form: ``POST /submit``'s fields, names and metadata written as text."""

    data: str = Field(max_length=MAX_TEXT, description="the task input")
    title: str | None = None
    reviewers: str | None = Field(None, description="user names and group:NAME, separated "
                                                    "by commas or spaces")
    allow_self_review: bool | None = None
    metadata: str | None = Field(None, description="a JSON object")
    quorum: int | None = None
    review_timeout: float | None = None
    on_timeout: Literal["fail", "reject", "approve", "escalate"] | None = None
    escalate_to: str | None = Field(None, description="as reviewers")
    max_attempts: int | None = None


class DecisionForm(CsrfForm, FeedbackIn):
    """A decision, as ``POST /feedback``'s; a rejection needs a comment here."""


class LoginForm(BaseModel):
    username: str = ""
    password: str = ""
    next: str | None = Field(None, description="a path on this site to go on to")


class LoginQuery(BaseModel):
    next: str | None = Field(None, description="a path on this site to go on to once "
                                               "signed in")
