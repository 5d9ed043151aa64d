"""Managing webhooks: ``hitl webhooks add|list|remove`` and ``/api/webhooks``, admins only,
over real HTTP with real users and tokens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from hitl import Config

from .conftest import LiveServer, add_people, until
from .receiver import Receiver
from .serverproc import run_cli
from .test_access import PEOPLE


@pytest.fixture
def config(config: Config) -> Config:
    return config.with_changes(auth="accounts", webhook_poll=0.2)


@pytest.fixture
async def people(live_server: LiveServer) -> dict[str, str]:
    return await add_people(live_server.app.extensions["identity"].accounts, PEOPLE)


@pytest.fixture
async def http(live_server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with live_server.http() as client:
        yield client


def bearer(people: dict[str, str], person: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {people[person]}"}


async def test_only_admins_manage_webhooks(http: httpx.AsyncClient,
                                           people: dict[str, str]) -> None:
    async with Receiver() as receiver:
        body = {"url": receiver.url}
        for person in ("rita", "sam", "vic", "wes"):
            for method, path in (("GET", "/api/webhooks"), ("POST", "/api/webhooks"),
                                 ("DELETE", "/api/webhooks/wh_x")):
                response = await http.request(method, path, json=body,
                                              headers=bearer(people, person))
                assert response.status_code == 403, (person, method)
                assert "only admins" in response.json()["error"]
        for method, path in (("GET", "/api/webhooks"), ("POST", "/api/webhooks"),
                             ("DELETE", "/api/webhooks/wh_x")):
            response = await http.request(method, path, json=body)
            assert response.status_code == 401, (method, path)
        assert (await http.get("/api/webhooks", headers=bearer(people, "ada"))
                ).json() == {"webhooks": []}


async def test_errors_are_json_for_a_browser_too(http: httpx.AsyncClient,
                                                 people: dict[str, str]) -> None:
    """Found with schemathesis: an API route must not send a browser to the sign-in page."""
    accept = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    response = await http.get("/api/webhooks", headers=accept)
    assert response.status_code == 401, response.headers
    assert response.json()["error"].startswith("sign in first")
    response = await http.get("/api/webhooks", headers={**accept, **bearer(people, "rita")})
    assert response.status_code == 403 and "only admins" in response.json()["error"]


async def test_an_admin_adds_lists_and_removes_an_endpoint(
    http: httpx.AsyncClient, people: dict[str, str]
) -> None:
    ada = bearer(people, "ada")
    async with Receiver() as receiver:
        added = await http.post("/api/webhooks", headers=ada,
                                json={"url": receiver.url, "events": ["task.waiting_for_review"]})
        assert added.status_code == 201, added.text
        endpoint = added.json()
        assert endpoint["secret"].startswith("whsec_") and endpoint["id"].startswith("wh_")
        assert endpoint["events"] == ["task.waiting_for_review"]
        submitted = await http.post("/submit", headers=bearer(people, "sam"), json={"data": "x"})
        await until(lambda: len(receiver.taken) == 1, "the delivery")  # at once: no poll wait
        [body] = receiver.verified(endpoint["secret"])
        assert body["data"]["task_id"] == submitted.json()["task_id"]

        async def attempts() -> list[dict[str, object]]:
            [shown] = (await http.get("/api/webhooks", headers=ada)).json()["webhooks"]
            assert "secret" not in shown and shown["url"] == receiver.url
            return list(shown["attempts"])

        await asyncio.sleep(0.1)  # the attempt's record commits just after the 2xx
        [attempt] = await attempts()
        assert (attempt["status_code"], attempt["outcome"], attempt["error"],
                attempt["type"]) == (204, "delivered", None, "task.waiting_for_review")
        removed = await http.delete(f"/api/webhooks/{endpoint['id']}", headers=ada)
        assert removed.status_code == 200
        again = await http.delete(f"/api/webhooks/{endpoint['id']}", headers=ada)
        assert again.status_code == 404 and endpoint["id"] in again.json()["error"]
        assert (await http.get("/api/webhooks", headers=ada)).json() == {"webhooks": []}


@pytest.mark.parametrize(("body", "why"), [
    ({"url": "ftp://x"}, "url"), ({}, "url"), ({"url": "http://h/x", "events": ["task.x"]},
                                               "events"),
    ({"url": "http://h/x", "secret": "s3cret"}, "secret"), ({"url": 5}, "url"),
    ({"url": "http://127.0.0.1:abc/"}, "url"), ({"url": "http://[::1"}, "url"),
    ({"url": "http://127.0.0.1:99999/"}, "url"),
])
async def test_a_bad_endpoint_is_a_400_naming_what(http: httpx.AsyncClient,
                                                    people: dict[str, str],
                                                    body: dict[str, object], why: str) -> None:
    response = await http.post("/api/webhooks", headers=bearer(people, "ada"), json=body)
    assert response.status_code == 400 and why in response.json()["error"], response.text


def test_the_cli_adds_lists_and_removes_endpoints(tmp_path: Path) -> None:
    db = str(tmp_path / "hitl.db")
    added = run_cli("webhooks", "add", "http://127.0.0.1:9/hook", "--event", "task.completed",
                    "--event", "task.failed", "--db", db)
    assert added.returncode == 0, added.stderr
    first_line, *_, secret = added.stdout.splitlines()
    endpoint_id = first_line.split()[2]
    assert endpoint_id.startswith("wh_") and "task.completed, task.failed" in first_line
    assert secret.startswith("whsec_")
    given = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    chosen = run_cli("webhooks", "add", "https://example.com/in", "--secret", given, "--db", db)
    assert chosen.returncode == 0 and "all events" in chosen.stdout and given not in chosen.stdout
    listing = run_cli("webhooks", "list", "--db", db)
    assert listing.returncode == 0
    assert endpoint_id in listing.stdout and "https://example.com/in" in listing.stdout
    assert secret not in listing.stdout and given not in listing.stdout
    bad = run_cli("webhooks", "add", "http://h/x", "--event", "task.nope", "--db", db)
    assert bad.returncode == 2 and "task.nope" in bad.stderr
    bad = run_cli("webhooks", "add", "http://h/x", "--secret", "plain", "--db", db)
    assert bad.returncode == 1 and "whsec_" in bad.stderr
    removed = run_cli("webhooks", "remove", endpoint_id, "--db", db)
    assert removed.returncode == 0
    assert endpoint_id not in run_cli("webhooks", "list", "--db", db).stdout
    again = run_cli("webhooks", "remove", endpoint_id, "--db", db)
    assert again.returncode == 1 and f"no webhook with id {endpoint_id!r}" in again.stderr
