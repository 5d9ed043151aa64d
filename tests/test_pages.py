"""The browser UI without a browser: pages, plain form posts, errors, escaping, streams."""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING

import pytest
from quart import Quart, Response

from .conftest import OPERATOR, csrf_token, post_form

if TYPE_CHECKING:  # imported for annotations only: pytest would collect a Test* class
    from quart.typing import TestClientProtocol

HOSTILE = '<img src=x onerror="alert(1)"><script>alert(2)</script>'
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'self'; form-action 'self'")


async def text(response: Response) -> str:
    return await response.get_data(as_text=True)


async def submit_form(client: TestClientProtocol, data: str = "draft a reply") -> str:
    response = await post_form(client, "/tasks", {"data": data})
    assert response.status_code == 303
    match = re.fullmatch(r"/tasks/([0-9a-f]{32})", response.headers["Location"])
    assert match, response.headers["Location"]
    return match[1]


async def waiting(app: Quart, task_id: str) -> None:
    """Wait until the task's output is up for review."""
    runner = app.extensions["runner"]
    for _ in range(500):
        if (await runner.get_task(task_id, by=OPERATOR)).status == "waiting_for_review":
            return
        await asyncio.sleep(0.01)
    raise AssertionError("task never waited for review")


async def test_index_has_the_submit_form_and_recent_tasks(client: TestClientProtocol) -> None:
    await submit_form(client, "an earlier task")
    response = await client.get("/")
    page = await text(response)
    assert response.status_code == 200
    assert '<form method="post" action="/tasks">' in page
    assert '<textarea id="data" name="data"' in page and ">Submit</button>" in page
    assert "an earlier task" in page


async def test_submitting_the_form_redirects_303_to_the_task_page(
    app: Quart, client: TestClientProtocol
) -> None:
    task_id = await submit_form(client, "line one\r\nline two")
    await waiting(app, task_id)
    page = await text(await client.get(f"/tasks/{task_id}"))
    assert "line one\nline two" in page  # textarea CRLF stored as plain newlines
    assert 'data-status="waiting_for_review"' in page
    assert "Attempt <strong>1</strong>" in page
    assert ">Approve</button>" in page and ">Reject</button>" in page
    assert 'name="reviewer"' in page and 'name="comment"' in page
    assert f'sse-connect="/tasks/{task_id}/stream"' in page


async def test_a_decision_without_javascript_redirects_back_and_is_recorded(
    app: Quart, client: TestClientProtocol
) -> None:
    task_id = await submit_form(client)
    await waiting(app, task_id)
    response = await post_form(client, f"/tasks/{task_id}/decision", {
        "feedback": "rejected", "attempt": "1", "comment": "more detail", "reviewer": " Ann "},
        page=f"/tasks/{task_id}")
    assert response.status_code == 303
    assert response.headers["Location"] == f"/tasks/{task_id}"
    await waiting(app, task_id)
    page = await text(await client.get(f"/tasks/{task_id}"))
    assert "Attempt <strong>2</strong>" in page
    assert re.search(r"Rejected</strong>\s+by <bdi class=\"reviewer\">Ann</bdi>", page)
    assert "more detail" in page


async def test_an_htmx_decision_gets_a_notice_fragment(
    app: Quart, client: TestClientProtocol
) -> None:
    task_id = await submit_form(client)
    await waiting(app, task_id)
    token = await csrf_token(client, f"/tasks/{task_id}")  # htmx sends it as a header
    response = await client.post(f"/tasks/{task_id}/decision", form={
        "feedback": "approved", "attempt": "1"}, headers={"HX-Request": "true",
                                                          "X-CSRF-Token": token})
    assert response.status_code == 200
    assert (await text(response)).startswith('<p class="notice notice-ok">')


@pytest.mark.parametrize("htmx", [False, True])
async def test_a_late_decision_is_a_readable_409_never_json(
    app: Quart, client: TestClientProtocol, htmx: bool
) -> None:
    task_id = await submit_form(client)
    await waiting(app, task_id)
    headers = {"HX-Request": "true"} if htmx else {}
    form = {"feedback": "approved", "attempt": "1"}
    page = f"/tasks/{task_id}"
    assert (await post_form(client, page + "/decision", form, page=page)).status_code == 303
    response = await post_form(client, page + "/decision", form, page=page, headers=headers)
    body = await text(response)
    assert response.status_code == 409
    assert response.content_type.startswith("text/html")
    assert "Your decision was not recorded" in body
    assert body.startswith('<p class="notice notice-error"') if htmx else "<!doctype html>" in body


@pytest.mark.parametrize(("form", "message"), [
    ({"data": "   "}, "Text: must not be empty"),
    ({}, "Text: is required"),
])
async def test_a_bad_submission_is_a_readable_400_page(
    client: TestClientProtocol, form: dict[str, str], message: str
) -> None:
    response = await post_form(client, "/tasks", form)
    assert response.status_code == 400
    assert message in await text(response)
    assert response.content_type.startswith("text/html")


async def test_a_bad_decision_is_a_400_and_a_stale_attempt_a_409(
    app: Quart, client: TestClientProtocol
) -> None:
    task_id = await submit_form(client)
    await waiting(app, task_id)
    response = await post_form(client, f"/tasks/{task_id}/decision", {"feedback": "maybe"})
    assert response.status_code == 400
    assert "Decision: must be &#39;approved&#39; or &#39;rejected&#39;" in await text(
        response)
    response = await post_form(client, f"/tasks/{task_id}/decision",
                               {"feedback": "approved", "attempt": "7"})
    assert response.status_code == 409
    assert "attempt 7 is no longer under review" in await text(response)


async def test_unknown_pages_are_html_for_browsers_and_json_for_the_api(
    client: TestClientProtocol,
) -> None:
    response = await client.get("/tasks/" + "f" * 32)
    assert response.status_code == 404
    assert "no task with id" in await text(response)
    assert response.content_type.startswith("text/html")
    response = await client.get("/nowhere", headers={"Accept": "text/html,*/*;q=0.8"})
    assert (response.status_code, response.content_type[:9]) == (404, "text/html")
    response = await client.get("/api/tasks/" + "f" * 32, headers={"Accept": "text/html"})
    assert response.status_code == 404 and "error" in await response.get_json()
    assert (await client.get("/dashboard?status=bogus")).status_code == 400


async def test_a_too_large_form_is_a_413_page(app: Quart, client: TestClientProtocol) -> None:
    size = app.config["HITL"].max_body + 1
    response = await post_form(client, "/tasks", {"data": "x" * size})
    assert response.status_code == 413
    assert "request body is too large" in await text(response)


async def test_task_text_is_escaped_on_every_page(
    app: Quart, client: TestClientProtocol
) -> None:
    task_id = await submit_form(client, HOSTILE)
    await waiting(app, task_id)
    await post_form(client, f"/tasks/{task_id}/decision", {
        "feedback": "rejected", "attempt": "1", "comment": HOSTILE, "reviewer": HOSTILE})
    await waiting(app, task_id)
    for path in ("/", f"/tasks/{task_id}", "/dashboard"):
        page = await text(await client.get(path))
        assert "<img src=x" not in page and "<script>alert" not in page, path
        assert "&lt;img src=x onerror=" in page, path


@pytest.mark.parametrize("path", ["/", "/dashboard", "/healthz", "/static/hitl.css"])
async def test_every_response_carries_the_content_security_policy(
    client: TestClientProtocol, path: str
) -> None:
    response = await client.get(path)
    assert response.status_code == 200
    assert response.headers["Content-Security-Policy"] == CSP


async def test_pages_load_only_their_own_vendored_files(client: TestClientProtocol) -> None:
    page = await text(await client.get("/"))
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert " style=" not in page and "<style" not in page and " on" + "click" not in page
    for name in ("htmx.min.js", "htmx-ext-sse.min.js", "htmx.LICENSE", "htmx-ext-sse.LICENSE"):
        assert (await client.get(f"/static/vendor/{name}")).status_code == 200
    assert '<meta name="htmx-config"' in page and '"includeIndicatorStyles": false' in page
