"""Cross-site request forgery: every form carries the session's token, and only a page of
hitl's own origin can send it (a form post from elsewhere is refused, nothing changes)."""

from __future__ import annotations

import asyncio
import re

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from .conftest import OPERATOR, csrf_token, post_form
from .test_pages import submit_form, text, waiting

FIELD = re.compile(r'<input type="hidden" name="csrf_token" value="([^"]*)">')


async def test_every_form_and_the_page_head_carry_the_sessions_token(
    app: Quart, client: Client
) -> None:
    token = await csrf_token(client)
    task_id = await submit_form(client)
    await waiting(app, task_id)
    for path, forms in (("/", 1), (f"/tasks/{task_id}", 3)):  # the decision, Edit, Cancel
        page = await text(await client.get(path))
        assert page.count("<form") == forms + page.count('action="/logout"'), path
        assert FIELD.findall(page) == [token] * page.count("<form"), path
        assert f'<meta name="csrf-token" content="{token}">' in page, path


async def test_a_form_post_without_its_token_is_refused_and_changes_nothing(
    app: Quart, client: Client
) -> None:
    task_id = await submit_form(client)
    await waiting(app, task_id)
    for form in ({}, {"csrf_token": ""}, {"csrf_token": "guessed"}):
        response = await client.post(f"/tasks/{task_id}/decision", form={
            "feedback": "approved", "attempt": "1", **form})
        assert response.status_code == 403, form
        assert "CSRF token" in await text(response)
        response = await client.post("/tasks", form={"data": "forged", **form})
        assert response.status_code == 403, form
    runner = app.extensions["runner"]
    assert (await runner.get_task(task_id, by=OPERATOR)).status == "waiting_for_review"
    assert (await runner.list_tasks(None, 10, 0, by=OPERATOR))[1] == 1


async def test_a_token_that_is_not_ascii_is_refused_not_an_error(
    app: Quart, client: Client
) -> None:
    """Found by schemathesis: ``hmac.compare_digest`` raised on a non-ASCII str (a 500)."""
    task_id = await submit_form(client)
    await waiting(app, task_id)
    for headers, form in (({}, {"csrf_token": "jeton-\u00e9\u4f60"}),
                          ({"HX-Request": "true", "X-CSRF-Token": "\u00e9"}, {})):
        response = await client.post(f"/tasks/{task_id}/decision", headers=headers, form={
            "feedback": "approved", "attempt": "1", **form})
        assert response.status_code == 403, form
        assert "CSRF token" in await text(response)


async def test_a_method_no_route_takes_is_a_405_even_as_a_form(client: Client) -> None:
    """Found by schemathesis: a form sent with a method no route takes was a 403 (no CSRF
    token) rather than the 405 it is; it reaches no view, so it changes nothing."""
    for method, path in (("PUT", "/logout"), ("TRACE", "/tasks"), ("PATCH", "/stream")):
        response = await client.open(path, method=method, form={"csrf_token": "x"})
        assert response.status_code == 405, (method, path)


async def test_htmx_sends_the_token_as_a_header(app: Quart, client: Client) -> None:
    task_id = await submit_form(client)
    await waiting(app, task_id)
    headers = {"HX-Request": "true", "X-CSRF-Token": await csrf_token(client)}
    response = await client.post(f"/tasks/{task_id}/decision", headers=headers,
                                 form={"feedback": "approved", "attempt": "1"})
    assert response.status_code == 200, await text(response)


@pytest.mark.parametrize("origin", ["http://127.0.0.1:9999", "http://localhost:8001", "null",
                                    "https://localhost"])
async def test_another_origin_is_refused_even_with_the_token(
    app: Quart, client: Client, origin: str
) -> None:
    task_id = await submit_form(client)
    await waiting(app, task_id)
    response = await post_form(client, f"/tasks/{task_id}/decision",
                               {"feedback": "approved", "attempt": "1"},
                               headers={"Origin": origin})
    assert response.status_code == 403
    assert "cross-site request refused" in await text(response)
    response = await client.post(f"/feedback/{task_id}", json={"feedback": "approved"},
                                 headers={"Origin": origin})
    assert response.status_code == 403
    task = await app.extensions["runner"].get_task(task_id, by=OPERATOR)
    assert task.status == "waiting_for_review"


async def test_our_own_origin_is_accepted(app: Quart, client: Client) -> None:
    task_id = await submit_form(client)
    await waiting(app, task_id)
    response = await post_form(client, f"/tasks/{task_id}/decision",
                               {"feedback": "approved", "attempt": "1"},
                               headers={"Origin": "http://localhost"})
    assert response.status_code == 303


async def test_stream_fragments_carry_no_ones_token(app: Quart, client: Client) -> None:
    """A stream's fragments are rendered once for every watcher: a token in them would be
    one session's, shown to all. The page's meta tag (htmx's header) covers them."""
    token = await csrf_token(client)
    task_id = await submit_form(client)
    await waiting(app, task_id)
    async with client.request(f"/tasks/{task_id}/stream") as connection:
        body = b""
        while b'class="decision-form"' not in body:
            body += await asyncio.wait_for(connection.receive(), 10)
        await connection.disconnect()
    stream = body.decode()
    assert token not in stream
    assert '<input type="hidden" name="csrf_token" value="">' in stream
