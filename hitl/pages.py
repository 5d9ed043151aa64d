"""The browser UI: server-rendered pages, plain form posts, and their live HTML streams.

Every form works without JavaScript (POST, then a 303 redirect to a page); with htmx,
the decision form posts in place and the page updates from its stream. Task text is
user input: templates rely on Jinja's autoescaping and never mark it ``|safe``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import TypeVar, cast

from markupsafe import Markup
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from quart import Blueprint, Response, current_app, redirect, render_template, request, url_for
from quart.helpers import stream_with_context
from quart.typing import ResponseReturnValue
from quart_schema import DataSource, document_querystring, document_request
from werkzeug.http import HTTP_STATUS_CODES

from .errors import API_BLUEPRINTS, HitlError, Invalid, plain
from .forms import CsrfForm, DecisionForm, SubmitForm
from .guard import acts_for_the_user, identity_of
from .models import Status, iso
from .openapi import EVENTS, PAGE, SEE_OTHER, answers
from .routes import broker, queue, runner, submit_options, task_named, who
from .schemas import DashboardStreamQuery, FeedbackIn, NextQuery, SubmitIn, TaskQuery
from .store import View
from .streams import sse_response
from .ui_streams import FragmentCache, Standing, dashboard_events, task_events, task_view

pages = Blueprint("pages", __name__)

RECENT = 10  # tasks listed under the submit form
DASHBOARD = 50  # rows of a dashboard page; "Load more" adds the next
# Fragments of these streams are rendered once for every watcher (FragmentCache): they
# must carry no one's form token. htmx sends the page's own, from its meta tag.
SHARED_RENDERS = ("pages.task_stream", "pages.dashboard_stream")
FIELD_LABELS = {"data": "Text", "feedback": "Decision", "comment": "Comment",
                "reviewer": "Your name", "attempt": "Attempt", "q": "Search",
                "status": "Status", "after": "Page", "since": "Stream",
                "reviewers": "Reviewers", "allow_self_review": "Self-review",
                "title": "Title", "metadata": "Metadata", "quorum": "Approvals needed",
                "review_timeout": "Review timeout", "on_timeout": "On timeout",
                "escalate_to": "Escalate to", "max_attempts": "Max attempts",
                "edited_output": "Edited output"}

Form = TypeVar("Form", bound=BaseModel)


def is_htmx() -> bool:
    """Whether this request was made by htmx (rather than a page load or a plain form)."""
    return request.headers.get("HX-Request") == "true"


def wants_html() -> bool:
    """Errors become HTML for the UI's routes, JSON for the API's (webhooks' included), and
    elsewhere (sign-in, unknown paths) HTML for a client that prefers it to JSON (a
    browser: Chromium's Accept puts text/html first, */* after)."""
    if request.blueprint in (pages.name, *API_BLUEPRINTS):
        return request.blueprint == pages.name
    return request.accept_mimetypes.best_match(("application/json", "text/html")) == "text/html"


def fragments() -> FragmentCache:
    return cast(FragmentCache, current_app.extensions["fragments"])


def normalise(text: str) -> str:
    """Browsers submit textarea line ends as CRLF; store plain newlines."""
    return text.replace("\r\n", "\n")


async def form_data(model: type[Form]) -> Form:
    """Validate a form post with the JSON API's own schema, or a readable 400."""
    form = await request.form
    return checked(model, {key: normalise(value) for key, value in form.items()})


def checked(model: type[Form], values: Mapping[str, str]) -> Form:
    try:
        return model.model_validate(dict(values))
    except ValidationError as exc:
        raise Invalid("; ".join(describe(error) for error in exc.errors())) from None


def describe(error: ErrorDetails) -> str:
    """One form problem, named by the field's label: 'Text: must not be empty'."""
    field = str(error["loc"][0]) if error["loc"] else ""
    return f"{FIELD_LABELS.get(field, 'Form')}: {plain(error)}"


LISTS = ("reviewers", "escalate_to")  # form fields of names, separated by commas or spaces


async def submit_form() -> SubmitIn:
    """The submit form, checked by the API's schema: a field left empty is not given, a
    list of names is written as text, the metadata as JSON."""
    form = await request.form
    values: dict[str, object] = {}
    for key, value in form.items():
        value = normalise(value)
        if key == "data" or (value.strip() and key != "csrf_token"):
            values[key] = value
    for key in LISTS:
        if isinstance(values.get(key), str):
            values[key] = str(values[key]).replace(",", " ").split()
    if "metadata" in values:
        try:
            values["metadata"] = json.loads(str(values["metadata"]))
        except (ValueError, RecursionError):  # RecursionError: nested too deeply
            raise Invalid("Metadata: must be a JSON object") from None
    try:
        return SubmitIn.model_validate(values)
    except ValidationError as exc:
        raise Invalid("; ".join(describe(error) for error in exc.errors())) from None


def dashboard_view(query: TaskQuery) -> View:
    """The dashboard's view, checked by the API's own schema: waiting tasks the longest
    waiting first (a review queue), any other list the newest first."""
    view = query.view()
    return replace(view, order="waiting" if view.status is Status.WAITING_FOR_REVIEW
                   else "newest")


def view_args(view: View) -> dict[str, str]:
    """The query string that names ``view`` in a dashboard URL."""
    return {key: value for key, value in (("status", view.status), ("q", view.search))
            if value}


# What a failed post from the task page did not do, said before the reason.
NOT_DONE = {"pages.decide": "Your decision was not recorded", "pages.cancel":
            "The task was not cancelled"}


async def error_page(message: str, status: int) -> ResponseReturnValue:
    """A readable error: a fragment for htmx (swapped into the page), else a full page."""
    back = "/"
    if request.view_args and request.endpoint in NOT_DONE:
        back = url_for("pages.task_page", task_id=request.view_args["task_id"])
        message = f"{NOT_DONE[request.endpoint]}: {message}"
    template = "_error.html" if is_htmx() else "error.html"
    title = HTTP_STATUS_CODES.get(status, "Error")
    return await render_template(template, message=message, status=status, title=title,
                                 back=back), status


@pages.app_template_filter("status_label")
def status_label(status: str) -> str:
    return str(status).replace("_", " ")


@pages.app_template_filter("iso")
def iso_time(timestamp: float) -> str:
    return iso(timestamp)


@pages.app_template_filter("clock")
def clock(timestamp: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(timestamp))


@pages.app_template_filter("utc")
def utc(timestamp: float) -> str:
    """The date and time in UTC: a time's tooltip, once hitl.js shows it in local time."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


@pages.app_template_filter("age")
def age(timestamp: float) -> str:
    """How long ago, roughly; hitl.js keeps it fresh on an open page."""
    seconds = max(0, int(time.time() - timestamp))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


@pages.app_template_filter("left")
def left(deadline: float) -> str:
    """How long until a deadline, as hitl.js counts it down: "in 4 min 05 s", "now"."""
    return countdown(deadline - time.time())


def countdown(seconds: float) -> str:
    seconds = int(seconds)
    if seconds <= 0:
        return "now"
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"in {hours} h {minutes:02d} min"
    return f"in {minutes} min {seconds:02d} s" if minutes else f"in {seconds} s"


@pages.app_template_global("STATUSES")
def statuses() -> list[Status]:
    return list(Status)


@pages.app_template_global("waiting_count")
async def waiting_count() -> int | None:
    """How many tasks wait for review, for a page's title; None when the store cannot say
    (an error page must still render, for someone signed out too)."""
    identity = identity_of(request.scope)
    if identity is None:
        return None
    try:
        counts = await runner().status_counts(by=identity)
    except (sqlite3.Error, RuntimeError, HitlError):
        return None
    return counts.get(Status.WAITING_FOR_REVIEW.value, 0)


@pages.app_template_global("csrf_token")
def csrf_token() -> str:
    """The session's form token (see :meth:`hitl.guard.Guard.check_cross_site`)."""
    identity = identity_of(request.scope)
    if identity is None or request.endpoint in SHARED_RENDERS:
        return ""
    return identity.csrf or ""


@pages.app_template_global("csrf_field")
def csrf_field() -> Markup:
    """The hidden field every form carries; hitl.js fills it where a stream left it empty."""
    return Markup('<input type="hidden" name="csrf_token" value="{}">').format(csrf_token())


@pages.get("/")
@answers(ok={200: PAGE})
async def index() -> str:
    """The submit form and the most recent tasks."""
    tasks, total = await runner().list_tasks(None, RECENT, 0, by=who())
    return await render_template("index.html", tasks=tasks, total=total,
                                 defaults=runner().config)


@pages.post("/tasks")
@document_request(SubmitForm, source=DataSource.FORM)
@answers(ok={303: SEE_OTHER})
async def submit() -> ResponseReturnValue:
    """Submit from the form, then land on the task's page (303: a reload never resubmits)."""
    form = await submit_form()
    task = await runner().submit(form.data, by=who(), **submit_options(form))
    return redirect(url_for("pages.task_page", task_id=task.task_id), 303)


@pages.get("/tasks/<task_id>")
@answers(404, ok={200: PAGE, 303: SEE_OTHER})
async def task_page(task_id: str) -> ResponseReturnValue:
    """One task: its status, the output under review, the decision form (for those who
    may decide), its history.

    A prefix of the id (as the UI shows it) redirects to the task's own address.
    """
    full_id = await task_named(task_id)
    if full_id != task_id:
        return redirect(url_for("pages.task_page", task_id=full_id), 303)
    task = await runner().get_task(full_id, by=who())
    view = await task_view(runner(), task, Standing.of(who(), task))
    return await render_template("task.html", progress=None, **view)


@pages.post("/tasks/<task_id>/decision")
@document_request(DecisionForm, source=DataSource.FORM)
@answers(404, 409, ok={200: PAGE, 303: SEE_OTHER})
async def decide(task_id: str) -> ResponseReturnValue:
    """Approve or reject. htmx gets a notice (the stream updates the page); a form, a 303.

    The form asks for a comment with a rejection (the JSON API does not: the PocketFlow
    reference page rejects without one).
    """
    form = await form_data(FeedbackIn)
    if form.feedback == "rejected" and not form.comment.strip():
        raise Invalid("Comment: say what the next attempt should change")
    full_id = await task_named(task_id)
    await runner().decide(full_id, form.feedback, form.comment, form.reviewer, form.attempt,
                          by=who(), edited_output=form.edited_output)
    if is_htmx():
        return await render_template("_notice.html", decision=form.feedback,
                                     attempt=form.attempt, task_id=full_id)
    return redirect(url_for("pages.task_page", task_id=full_id), 303)


@pages.post("/tasks/<task_id>/cancel")
@document_request(CsrfForm, source=DataSource.FORM)
@answers(404, 409, ok={200: PAGE, 303: SEE_OTHER})
async def cancel(task_id: str) -> ResponseReturnValue:
    """Stop an unfinished task, as the API's cancel does. htmx gets a notice; a form, a 303."""
    full_id = await task_named(task_id)
    await runner().cancel(full_id, by=who())
    if is_htmx():
        return await render_template("_task_notice.html", message="The task was cancelled.")
    return redirect(url_for("pages.task_page", task_id=full_id), 303)


@pages.get("/tasks/<task_id>/stream")
@answers(404, ok={200: EVENTS})
async def task_stream(task_id: str) -> Response:
    """The task page's live regions as named HTML events; ends once the task has."""
    task = await runner().get_task(await task_named(task_id), by=who())
    events = stream_with_context(task_events)(runner(), broker(), fragments(), task, who())
    return sse_response(events)


@pages.get("/dashboard")
@document_querystring(TaskQuery)
@answers(ok={200: PAGE})
async def dashboard() -> str:
    """Every task, or those in one status or matching a search, a page at a time, with
    counts per status; kept live. Waiting for review is the queue: the longest waiting first."""
    query = checked(TaskQuery, request.args)
    view = dashboard_view(query)
    page = await runner().task_page(view, DASHBOARD, query.after, by=who())
    counts = await runner().status_counts(by=who())
    return await render_template("dashboard.html", page=page, view=view, counts=counts,
                                 args=view_args(view), after=query.after)


@pages.get("/dashboard/rows")
@document_querystring(TaskQuery)
@answers(ok={200: PAGE})
async def dashboard_rows() -> str:
    """A dashboard page's rows alone, for htmx: "Load more", or the list anew ("show")."""
    query = checked(TaskQuery, request.args)
    view = dashboard_view(query)
    page = await runner().task_page(view, DASHBOARD, query.after, by=who())
    return await render_template("_task_rows.html", tasks=page.rows, page=page, view=view,
                                 args=view_args(view), after=query.after)


@pages.get("/dashboard/stream")
@document_querystring(DashboardStreamQuery)
@answers(ok={200: EVENTS})
async def dashboard_stream() -> Response:
    """The dashboard's one stream: what changed since its page was read, then each change
    (of the tasks its reader may see)."""
    query = checked(DashboardStreamQuery, request.args)
    events = stream_with_context(dashboard_events)(runner(), broker(), fragments(),
                                                   dashboard_view(query), query.since, who())
    return sse_response(events)


@pages.get("/next")
@document_querystring(NextQuery)
@answers(ok={303: SEE_OTHER})
async def review_next() -> ResponseReturnValue:
    """Open the task that has waited longest for review among those the reader may decide
    and has not voted on (with ``?after=<id>``, the one after that task in the queue),
    reserved for them as ``POST /api/queue/next`` does; the empty queue when none waits.

    A link followed from another site, or a prefetch, only shows the way: it reserves
    nothing (a GET another site can make must not act in the user's name).
    """
    query = checked(NextQuery, request.args)
    if acts_for_the_user(request.scope):
        task = await queue().next(query.after, by=who())
        task_id = task.task_id if task is not None else None
    else:
        task_id = await runner().oldest_waiting(query.after, by=who())
    if task_id is None:
        return redirect(url_for("pages.dashboard", status=Status.WAITING_FOR_REVIEW.value), 303)
    return redirect(url_for("pages.task_page", task_id=task_id), 303)
