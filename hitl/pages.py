"""The browser UI: server-rendered pages, plain form posts, and their live HTML streams.

Every form works without JavaScript (POST, then a 303 redirect to a page); with htmx,
the decision form posts in place and the page updates from its stream. Task text is
user input: templates rely on Jinja's autoescaping and never mark it ``|safe``.
"""

from __future__ import annotations

import time
from typing import TypeVar, cast

from markupsafe import Markup
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from quart import Blueprint, Response, current_app, redirect, render_template, request, url_for
from quart.helpers import stream_with_context
from quart.typing import ResponseReturnValue
from werkzeug.http import HTTP_STATUS_CODES

from .errors import Invalid
from .guard import identity_of
from .models import Status, iso
from .routes import api, broker, runner, task_named, who
from .schemas import FeedbackIn, SubmitIn
from .streams import sse_response
from .ui_streams import FragmentCache, Standing, dashboard_events, snapshot, task_events

pages = Blueprint("pages", __name__)

RECENT = 10  # tasks listed under the submit form
DASHBOARD = 100  # tasks the dashboard lists (new ones are added live)
# Fragments of these streams are rendered once for every watcher (FragmentCache): they
# must carry no one's form token. htmx sends the page's own, from its meta tag.
SHARED_RENDERS = ("pages.task_stream", "pages.dashboard_stream")
FIELD_LABELS = {"data": "Text", "feedback": "Decision", "comment": "Comment",
                "reviewer": "Your name", "attempt": "Attempt", "reviewers": "Reviewers",
                "allow_self_review": "Self-review"}

Form = TypeVar("Form", bound=BaseModel)


def is_htmx() -> bool:
    """Whether this request was made by htmx (rather than a page load or a plain form)."""
    return request.headers.get("HX-Request") == "true"


def wants_html() -> bool:
    """Errors become HTML for the UI's routes, JSON for the API's, and elsewhere (sign-in,
    unknown paths) HTML for a client that prefers it to JSON (a browser: Chromium's Accept
    puts text/html first, */* after)."""
    if request.blueprint in (pages.name, api.name):
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
    try:
        return model.model_validate({key: normalise(value) for key, value in form.items()})
    except ValidationError as exc:
        raise Invalid("; ".join(describe(error) for error in exc.errors())) from None


def describe(error: ErrorDetails) -> str:
    """One form problem, named by the field's label: 'Text: must not be empty'."""
    field = str(error["loc"][0]) if error["loc"] else ""
    return f"{FIELD_LABELS.get(field, 'Form')}: {error['msg'].removeprefix('Value error, ')}"


def status_filter() -> Status | None:
    """The dashboard's ``?status=`` filter; none (every task) when empty."""
    raw = request.args.get("status", "")
    try:
        return Status(raw) if raw else None
    except ValueError:
        raise Invalid(f"unknown status {raw[:40]!r}") from None


async def error_page(message: str, status: int) -> ResponseReturnValue:
    """A readable error: a fragment for htmx (swapped into the page), else a full page."""
    back = "/"
    if request.view_args and request.endpoint == "pages.decide":
        back = url_for("pages.task_page", task_id=request.view_args["task_id"])
        message = f"Your decision was not recorded: {message}"
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


@pages.app_template_filter("age")
def age(timestamp: float) -> str:
    """How long ago, roughly; hitl.js keeps it fresh on an open page."""
    seconds = max(0, int(time.time() - timestamp))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


@pages.app_template_global("STATUSES")
def statuses() -> list[Status]:
    return list(Status)


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
async def index() -> str:
    """The submit form and the most recent tasks."""
    tasks, total = await runner().list_tasks(None, RECENT, 0, by=who())
    return await render_template("index.html", tasks=tasks, total=total)


@pages.post("/tasks")
async def submit() -> ResponseReturnValue:
    """Submit from the form, then land on the task's page (303: a reload never resubmits)."""
    form = await form_data(SubmitIn)
    task = await runner().submit(form.data, by=who(), reviewers=tuple(form.reviewers),
                                 allow_self_review=form.allow_self_review)
    return redirect(url_for("pages.task_page", task_id=task.task_id), 303)


@pages.get("/tasks/<task_id>")
async def task_page(task_id: str) -> ResponseReturnValue:
    """One task: its status, the output under review, the decision form (for those who
    may decide), its history.

    A prefix of the id (as the UI shows it) redirects to the task's own address.
    """
    full_id = await task_named(task_id)
    if full_id != task_id:
        return redirect(url_for("pages.task_page", task_id=full_id), 303)
    task = snapshot(await runner().get_task(full_id, by=who()))
    return await render_template("task.html", task=task, progress=None,
                                 standing=Standing.of(who(), task))


@pages.post("/tasks/<task_id>/decision")
async def decide(task_id: str) -> ResponseReturnValue:
    """Approve or reject. htmx gets a notice (the stream updates the page); a form, a 303."""
    form = await form_data(FeedbackIn)
    full_id = await task_named(task_id)
    await runner().decide(full_id, form.feedback, form.comment, form.reviewer, form.attempt,
                          by=who())
    if is_htmx():
        return await render_template("_notice.html", decision=form.feedback,
                                     attempt=form.attempt)
    return redirect(url_for("pages.task_page", task_id=full_id), 303)


@pages.get("/tasks/<task_id>/stream")
async def task_stream(task_id: str) -> Response:
    """The task page's live regions as named HTML events; ends once the task has."""
    task = await runner().get_task(await task_named(task_id), by=who())
    events = stream_with_context(task_events)(runner(), broker(), fragments(), task, who())
    return sse_response(events)


@pages.get("/dashboard")
async def dashboard() -> str:
    """Every task (or those in one status) with counts per status, kept live."""
    wanted = status_filter()
    tasks, total = await runner().list_tasks(wanted, DASHBOARD, 0, by=who())
    counts = await runner().status_counts(by=who())
    return await render_template("dashboard.html", tasks=tasks, total=total, counts=counts,
                                 wanted=wanted)


@pages.get("/dashboard/stream")
async def dashboard_stream() -> Response:
    """The dashboard's one stream: its table and counts, then each change (of the tasks
    its reader may see)."""
    owner = runner().watch_scope(who())
    events = stream_with_context(dashboard_events)(runner(), broker(), fragments(),
                                                   status_filter(), DASHBOARD, who(), owner)
    return sse_response(events)
