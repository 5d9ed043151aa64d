"""Edit, then approve, from the task page's plain form (no JavaScript): a post and a 303,
with the session's form token like every other form; sign-in off, names typed."""

from __future__ import annotations

from quart import Quart
from quart.typing import TestClientProtocol as Client

from hitl.models import Status

from .conftest import OPERATOR, post_form, reach
from .test_pages import submit_form, text, waiting


async def test_the_edit_form_approves_the_edited_text(app: Quart, client: Client) -> None:
    task_id = await submit_form(client)
    await waiting(app, task_id)
    page = await text(await client.get(f"/tasks/{task_id}"))
    assert 'class="edit-form"' in page and "Approve edited" in page
    assert 'name="edited_output"' in page
    response = await post_form(client, f"/tasks/{task_id}/decision", {
        "feedback": "approved", "attempt": "1", "edited_output": "My own words.\r\nTwo lines.",
        "comment": "", "reviewer": "ann"}, page=f"/tasks/{task_id}")
    assert response.status_code == 303
    runner = app.extensions["runner"]
    await reach(runner, task_id, Status.COMPLETED)
    task = await runner.get_task(task_id, by=OPERATOR)
    assert task.final_result == "My own words.\nTwo lines."  # CRLF from the textarea: LF
    assert task.reviews[-1].edited_output == task.final_result
    page = await text(await client.get(f"/tasks/{task_id}"))
    assert "Edited by" in page and "(edited)" in page


async def test_two_typed_names_make_a_quorum_of_2_from_the_form(app: Quart,
                                                               client: Client) -> None:
    response = await post_form(client, "/tasks", {"data": "x", "quorum": "2"})
    task_id = response.headers["Location"].rsplit("/", 1)[1]
    await waiting(app, task_id)
    path = f"/tasks/{task_id}/decision"
    form = {"feedback": "approved", "attempt": "1", "comment": ""}
    assert (await post_form(client, path, {**form, "reviewer": "ann"})).status_code == 303
    page = await text(await client.get(f"/tasks/{task_id}"))
    assert "1 of 2 approvals: <bdi>ann</bdi>" in page
    again = await post_form(client, path, {**form, "reviewer": "ann"})
    assert again.status_code == 409
    assert (await post_form(client, path, {**form, "reviewer": "bob"})).status_code == 303


    await reach(app.extensions["runner"], task_id, Status.COMPLETED)
