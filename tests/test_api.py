"""The JSON API through Quart's test client: the reference service's contract, and errors."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from hitl import Config

from .conftest import within

ON_POSTGRESQL = True  # and on SQLite (tests/conftest.py)


async def submit(client: Client, data: str = "write a haiku") -> str:
    response = await client.post("/submit", json={"data": data})
    assert response.status_code == 202
    body = await response.get_json()
    assert body["message"] == "Task submitted"
    return str(body["task_id"])


async def wait_status(client: Client, task_id: str, status: str) -> dict[str, Any]:
    for _ in range(500):
        body: dict[str, Any] = await (await client.get(f"/api/tasks/{task_id}")).get_json()
        if body["status"] == status:
            return body
        await asyncio.sleep(0.01)
    raise AssertionError(f"task never reached {status}: {body['status']}")


async def test_submit_review_loop_and_task_detail(client: Client) -> None:
    task_id = await submit(client, "translate 'bonjour'")
    await wait_status(client, task_id, "waiting_for_review")
    response = await client.post(f"/feedback/{task_id}",
                                 json={"feedback": "rejected", "comment": "be formal",
                                       "reviewer": "ann"})
    assert response.status_code == 200
    assert await response.get_json() == {"message": "Feedback 'rejected' received"}
    body = await wait_status(client, task_id, "waiting_for_review")
    assert body["attempt"] == 2 and "be formal" in body["processed_output"]
    response = await client.post(f"/feedback/{task_id}", json={"feedback": "approved",
                                                               "reviewer": "bob"})
    assert response.status_code == 200
    body = await wait_status(client, task_id, "completed")
    assert body["final_result"] == body["processed_output"]
    reviews = [(r["decision"], r["attempt"], r["comment"], r["reviewer"]) for r in body["reviews"]]
    assert reviews == [("rejected", 1, "be formal", "ann"), ("approved", 2, "", "bob")]
    assert body["task_input"] == "translate 'bonjour'" and body["error"] is None
    assert body["created_at"] <= body["updated_at"]


async def test_feedback_when_no_review_is_pending_is_409(client: Client) -> None:
    task_id = await submit(client)
    await wait_status(client, task_id, "waiting_for_review")
    assert (await client.post(f"/feedback/{task_id}", json={"feedback": "approved"})
            ).status_code == 200
    await wait_status(client, task_id, "completed")
    response = await client.post(f"/feedback/{task_id}", json={"feedback": "approved"})
    assert response.status_code == 409
    assert "completed" in (await response.get_json())["error"]


async def test_decision_on_a_stale_attempt_is_409(client: Client) -> None:
    task_id = await submit(client)
    await wait_status(client, task_id, "waiting_for_review")
    response = await client.post(f"/feedback/{task_id}", json={"feedback": "approved",
                                                               "attempt": 2})
    assert response.status_code == 409
    assert "attempt 2" in (await response.get_json())["error"]


async def test_no_get_records_a_decision(client: Client) -> None:
    task_id = await submit(client)
    await wait_status(client, task_id, "waiting_for_review")
    for path in (f"/feedback/{task_id}", f"/feedback/{task_id}?feedback=approved"):
        assert (await client.get(path)).status_code == 405
    assert (await wait_status(client, task_id, "waiting_for_review"))["reviews"] == []


async def test_cancel_ends_the_task_and_a_second_cancel_is_409(client: Client) -> None:
    task_id = await submit(client)
    await wait_status(client, task_id, "waiting_for_review")
    response = await client.post(f"/api/tasks/{task_id}/cancel")
    assert response.status_code == 200 and (await response.get_json())["status"] == "cancelled"
    assert (await client.post(f"/api/tasks/{task_id}/cancel")).status_code == 409
    assert (await client.post(f"/feedback/{task_id}", json={"feedback": "approved"})
            ).status_code == 409


async def test_task_list_is_newest_first_filtered_and_paginated(
    client: Client,
) -> None:
    ids = [await submit(client, f"task {n}") for n in range(5)]
    for task_id in ids:
        await wait_status(client, task_id, "waiting_for_review")
    await client.post(f"/feedback/{ids[0]}", json={"feedback": "approved"})
    await wait_status(client, ids[0], "completed")
    body = await (await client.get("/api/tasks?limit=2&offset=1")).get_json()
    assert [t["task_id"] for t in body["tasks"]] == ids[::-1][1:3]
    assert body["total"] == 5 and body["limit"] == 2 and body["offset"] == 1
    body = await (await client.get("/api/tasks?status=completed")).get_json()
    assert [t["task_id"] for t in body["tasks"]] == [ids[0]] and body["total"] == 1
    assert (await client.get("/api/tasks?status=bogus")).status_code == 400
    assert (await client.get("/api/tasks?limit=0")).status_code == 400


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "fragment"),
    [
        ("/submit", {"data": b"{not json", "headers": {"Content-Type": "application/json"}},
         400, "JSON"),
        ("/submit", {"data": b"data=x", "headers": {"Content-Type": "text/plain"}}, 415,
         "application/json"),
        ("/submit", {"json": {}}, 400, "data"),
        ("/submit", {"json": {"data": ""}}, 400, "data"),
        ("/submit", {"json": {"data": "   "}}, 400, "empty"),
        ("/submit", {"json": {"data": 42}}, 400, "data"),
        ("/submit", {"json": ["data"]}, 400, ""),
        ("/feedback/abc", {"json": {"feedback": "maybe"}}, 400, "feedback"),
        ("/feedback/abc", {"json": {"feedback": "approved", "attempt": 0}}, 400, "attempt"),
        ("/feedback/abc", {"json": {"feedback": "approved"}}, 404, "abc"),
        ("/feedback/" + "x" * 65, {"json": {"feedback": "approved"}}, 400, "too long"),
        ("/api/tasks/nope/cancel", {}, 404, "nope"),
    ],
)
async def test_bad_input_gets_a_clear_json_error(
    client: Client, path: str, kwargs: dict[str, Any], status: int, fragment: str
) -> None:
    response = await client.post(path, **kwargs)
    assert response.status_code == status
    body = await response.get_json()
    assert set(body) == {"error"} and fragment in body["error"]


async def test_unknown_and_overlong_ids_on_get(client: Client) -> None:
    for path, status in (("/api/tasks/unknown", 404), ("/stream/unknown", 404), ("/stream/", 404),
                         ("/api/tasks/" + "a" * 300, 400), ("/stream/" + "a" * 300, 400),
                         ("/no/such/page", 404)):
        response = await client.get(path)
        assert response.status_code == status, path
        assert "error" in await response.get_json()


async def test_bad_last_event_id_is_400(client: Client) -> None:
    task_id = await submit(client)
    response = await client.get(f"/stream/{task_id}", headers={"Last-Event-ID": "abc"})
    assert response.status_code == 400


async def test_a_last_event_id_query_is_checked_whatever_the_header(
    client: Client,
) -> None:
    """Found by schemathesis: a header, even empty, hid a bad ``last_event_id`` (a 200)."""
    task_id = await submit(client)
    response = await within(client.get(f"/stream/{task_id}?last_event_id=null",
                                       headers={"Last-Event-ID": ""}), 5, "the answer")
    assert response.status_code == 400
    assert "not a message id" in (await response.get_json())["error"]
    response = await within(client.get(f"/stream/{task_id}?last_event_id=x",
                                       headers={"Last-Event-ID": "1"}), 5, "the answer")
    assert response.status_code == 400  # a header does not hide a bad query either


async def test_a_method_not_allowed_names_the_allowed_ones(client: Client) -> None:
    """Found by schemathesis: 405s lacked the Allow header (RFC 9110), and other methods
    on the streams were 404s (Quart has no rule for them: they are served in plain ASGI)."""
    for method, path, allowed in (("PUT", "/submit", "OPTIONS, POST"),
                                  ("DELETE", "/api/tasks", "GET, HEAD, OPTIONS"),
                                  ("POST", "/stream", "GET, HEAD"),
                                  ("PATCH", "/stream/abc", "GET, HEAD")):
        response = await client.open(path, method=method)
        assert response.status_code == 405, (method, path)
        assert response.headers["Allow"] == allowed
        assert "not allowed" in (await response.get_json())["error"]


async def test_a_bad_query_on_a_post_is_a_400_not_a_415(client: Client) -> None:
    """Found by schemathesis: a POST's query error was blamed on its (absent) JSON body."""
    response = await client.post("/api/queue/next?after=" + "0" * 65)
    assert response.status_code == 400
    assert (await response.get_json())["error"].startswith("after:")


@pytest.fixture
def config(config: Config) -> Config:
    return config.with_changes(max_body=1024)


async def test_body_over_the_limit_is_413_and_the_service_goes_on(
    client: Client,
) -> None:
    response = await client.post("/submit", json={"data": "x" * 5000})
    assert response.status_code == 413
    assert "too large" in (await response.get_json())["error"]
    await submit(client)


async def test_healthz_and_openapi(client: Client, app: Quart) -> None:
    assert (await (await client.get("/healthz")).get_json())["status"] == "ok"
    spec = await (await client.get("/openapi.json")).get_json()
    assert {"/submit", "/feedback/{task_id}"} <= set(spec["paths"])
