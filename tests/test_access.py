"""Who may do what, over real HTTP: the README's permission table, run cell by cell.

The table is read from the README (after ``<!-- permissions -->``), so the documentation
and the behaviour cannot drift apart. Every actor uses an API token, the way a program
does (a token needs no CSRF field, so the page's form posts are tested here as well).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from hitl import Config
from hitl.accounts import Accounts, Role
from hitl.store import Store

from .conftest import LiveServer, People, add_people
from .serverproc import ServerProcess, run_cli
from .test_docs import README

# The table's columns, and who acts in each: the task under test is sam's, for group:legal.
COLUMNS = {
    "admin": "ada",
    "reviewer": "rita",
    "reviewer, not among the task's `reviewers`": "rex",
    "submitter, own task": "sam",
    "submitter, another's task": "sue",
    "viewer": "vic",
    "worker": "wes",
    "not signed in": None,
}
PEOPLE = {"ada": (Role.ADMIN, ()), "rita": (Role.REVIEWER, ("legal",)),
          "rex": (Role.REVIEWER, ()), "sam": (Role.SUBMITTER, ()), "sue": (Role.SUBMITTER, ()),
          "vic": (Role.VIEWER, ()), "wes": (Role.WORKER, ())}
OWN_ONLY = "own tasks only"
OVERRIDE = "as an admin override"


def permission_table() -> dict[str, dict[str, str]]:
    """The README's permission table: endpoint -> column -> expected outcome."""
    section = README.split("<!-- permissions -->", 1)[1].lstrip("\n")
    lines = [line for line in section.split("\n\n", 1)[0].splitlines() if line.startswith("|")]
    head = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert head[1:] == list(COLUMNS), head
    table = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        table[cells[0]] = dict(zip(head[1:], cells[1:], strict=True))
    return table


TABLE = permission_table()


@pytest.fixture
def config(config: Config) -> Config:
    return config.with_changes(auth="accounts")


@dataclass
class World(People):
    """A live server with one token per person, sam's task for group:legal, and sue's."""

    task: str = ""  # sam's, reviewers ["group:legal"], waiting for review
    theirs: str = ""  # sue's, waiting for review

    async def submit(self, person: str, **options: Any) -> str:
        task_id = await self.post_task(person, **options)
        await self.wait(task_id, "waiting_for_review")
        return task_id

    async def sams_task(self) -> str:
        return await self.submit("sam", reviewers=["group:legal"])


@pytest.fixture
async def world(live_server: LiveServer) -> AsyncIterator[World]:
    async with live_server.http() as http:
        world = World(live_server, http,
                      await add_people(live_server.app.extensions["identity"].accounts,
                                       PEOPLE))
        world.task = await world.sams_task()
        world.theirs = await world.submit("sue")
        yield world


def seen(world: World, person: str | None, text: str) -> str:
    """", own tasks only" when ``text`` names only the person's own task of the two."""
    has = (world.task in text, world.theirs in text)
    if has == (True, True):
        return ""
    own = {"sam": (True, False), "sue": (False, True)}.get(person or "")
    return f", {OWN_ONLY}" if has == own else f", sees {has}"


async def overridden(world: World, task_id: str) -> str:
    [review] = (await world.wait(task_id, "completed"))["reviews"]
    return f", {OVERRIDE}" if review["admin_override"] else ""


def outcome(response: httpx.Response) -> str:
    if response.status_code == 303 and response.headers["location"].startswith("/login?"):
        return "303 to `/login`"
    return str(response.status_code)


async def do_submit(world: World, person: str | None) -> str:
    return outcome(await world.http.post("/submit", headers=world.auth(person),
                                         json={"data": "x", "reviewers": ["group:legal"]}))


async def do_feedback(world: World, person: str | None) -> str:
    task_id = await world.sams_task()
    response = await world.http.post(f"/feedback/{task_id}", headers=world.auth(person),
                                     json={"feedback": "approved", "attempt": 1})
    return outcome(response) + (await overridden(world, task_id)
                                if response.status_code == 200 else "")


async def do_decision_form(world: World, person: str | None) -> str:
    task_id = await world.sams_task()
    response = await world.http.post(f"/tasks/{task_id}/decision", headers=world.auth(person),
                                     data={"feedback": "approved", "attempt": "1"})
    return outcome(response) + (await overridden(world, task_id)
                                if response.status_code == 303 else "")


async def do_cancel(world: World, person: str | None) -> str:
    task_id = await world.sams_task()
    response = await world.http.post(f"/api/tasks/{task_id}/cancel", headers=world.auth(person))
    if response.status_code == 200:
        assert (await world.wait(task_id, "cancelled"))["status"] == "cancelled"
    return outcome(response)


async def do_get(world: World, person: str | None) -> str:
    return outcome(await world.http.get(f"/api/tasks/{world.task}", headers=world.auth(person)))


async def do_list(world: World, person: str | None) -> str:
    response = await world.http.get("/api/tasks?limit=200", headers=world.auth(person))
    return outcome(response) + (seen(world, person, response.text)
                                if response.status_code == 200 else "")


async def do_task_stream(world: World, person: str | None) -> str:
    async with world.http.stream("GET", f"/stream/{world.task}",
                                 headers=world.auth(person)) as response:
        return outcome(response)


async def do_global_stream(world: World, person: str | None) -> str:
    """Replay the whole global stream, up to a task this reader surely sees (a sentinel)."""
    headers = {**world.auth(person), "Last-Event-ID": "0"}
    async with world.http.stream("GET", "/stream", headers=headers) as response:
        if response.status_code != 200:
            return outcome(response)
        sentinel = await world.http.post("/submit", json={"data": "sentinel"}, headers=world.auth(
            person if person in ("ada", "rita", "rex", "sam", "sue") else "ada"))
        text = ""

        async def read_to_sentinel() -> None:
            nonlocal text
            async for line in response.aiter_lines():
                text += line + "\n"
                if sentinel.json()["task_id"] in line:
                    return

        await asyncio.wait_for(read_to_sentinel(), 10)
        return outcome(response) + seen(world, person, text)


async def do_task_page(world: World, person: str | None) -> str:
    return outcome(await world.http.get(f"/tasks/{world.task}", headers=world.auth(person)))


async def do_dashboard(world: World, person: str | None) -> str:
    response = await world.http.get("/dashboard", headers=world.auth(person))
    return outcome(response) + (seen(world, person, response.text)
                                if response.status_code == 200 else "")


async def do_queue_next(world: World, person: str | None) -> str:
    """A fresh task for group:legal and one for anyone: every reviewer has one to take."""
    await world.sams_task()
    await world.submit("sue")
    return outcome(await world.http.post("/api/queue/next", headers=world.auth(person)))


async def do_release(world: World, person: str | None) -> str:
    return outcome(await world.http.post(f"/api/tasks/{world.task}/release",
                                         headers=world.auth(person)))


async def do_claim(world: World, person: str | None) -> str:
    """No job is queued (the built-in processor runs in-process): a worker's claim is 204."""
    return outcome(await world.http.post("/api/work/claim", headers=world.auth(person),
                                         json={"worker": "w"}))


ENDPOINTS: dict[str, Callable[[World, str | None], Awaitable[str]]] = {
    "`POST /submit`": do_submit,
    "`POST /feedback/<id>`": do_feedback,
    "`POST /tasks/<id>/decision` (the page's form)": do_decision_form,
    "`POST /api/tasks/<id>/cancel`": do_cancel,
    "`GET /api/tasks/<id>`": do_get,
    "`GET /api/tasks`": do_list,
    "`GET /stream/<id>`": do_task_stream,
    "`GET /stream`": do_global_stream,
    "`GET /tasks/<id>` (the task page)": do_task_page,
    "`GET /dashboard`": do_dashboard,
    "`POST /api/queue/next`": do_queue_next,
    "`POST /api/tasks/<id>/release`": do_release,
    "`POST /api/work/claim`": do_claim,
}


def test_the_permission_table_names_every_endpoint() -> None:
    assert list(TABLE) == list(ENDPOINTS)


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
async def test_the_readme_permission_table_holds(world: World, endpoint: str) -> None:
    expected = TABLE[endpoint]
    actual = {column: await ENDPOINTS[endpoint](world, person)
              for column, person in COLUMNS.items()}
    assert actual == expected


async def refusal(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json().get("error", "")


async def test_a_refused_decision_says_why_and_changes_nothing(world: World) -> None:
    for person, why in (("rex", "only group:legal may review this task"),
                        ("sam", "submitters decide nothing"), ("vic", "viewers decide nothing"),
                        ("wes", "workers only claim and complete work")):
        response = await world.http.post(f"/feedback/{world.task}", headers=world.auth(person),
                                          json={"feedback": "approved"})
        assert await refusal(response) == (403, why), person
    response = await world.http.post(f"/feedback/{world.task}", headers=world.auth("sue"),
                                      json={"feedback": "approved"})
    assert await refusal(response) == (404, f"no task with id {world.task!r}")
    task = await world.wait(world.task, "waiting_for_review")
    assert task["reviews"] == []


@pytest.mark.parametrize("person", ["rita", "ada"])
async def test_no_one_reviews_their_own_task_admins_included(world: World, person: str) -> None:
    own = await world.submit(person)
    response = await world.http.post(f"/feedback/{own}", headers=world.auth(person),
                                     json={"feedback": "approved"})
    assert await refusal(response) == (403, "you submitted this task")
    allowed = await world.submit(person, allow_self_review=True)
    response = await world.http.post(f"/feedback/{allowed}", headers=world.auth(person),
                                     json={"feedback": "approved"})
    assert response.status_code == 200
    [review] = (await world.wait(allowed, "completed"))["reviews"]
    assert (review["reviewer"], review["admin_override"]) == (person, False)


async def test_reviewers_are_named_by_user_or_by_group(world: World) -> None:
    task_id = await world.submit("sam", reviewers=["rex", "group:finance"])
    response = await world.http.post(f"/feedback/{task_id}", headers=world.auth("rita"),
                                     json={"feedback": "approved"})
    assert await refusal(response) == (403, "only rex or group:finance may review this task")
    response = await world.http.post(f"/feedback/{task_id}", headers=world.auth("rex"),
                                     json={"feedback": "rejected", "comment": "shorter"})
    assert response.status_code == 200
    anyone = await world.submit("sam")  # no reviewers named: any reviewer
    assert (await world.http.post(f"/feedback/{anyone}", headers=world.auth("rex"),
                                  json={"feedback": "approved"})).status_code == 200


async def test_submit_options_are_stored_and_shown(world: World) -> None:
    task = await world.wait(world.task, "waiting_for_review")
    assert (task["submitted_by"], task["reviewers"], task["allow_self_review"]) == (
        "sam", ["group:legal"], False)
    [row] = [row for row in (await world.http.get("/api/tasks", headers=world.auth("ada"))
                             ).json()["tasks"] if row["task_id"] == world.task]
    assert (row["submitted_by"], row["reviewers"], row["allow_self_review"]) == (
        "sam", ["group:legal"], False)


@pytest.mark.parametrize(("reviewers", "why"), [
    (["group:"], "reviewers"), (["ann smith"], "reviewers"), (["ann\u202e"], "reviewers"),
    (["x"] * 51, "reviewers"), ("ann", "reviewers"), ([""], "reviewers"),
])
async def test_reviewers_must_be_plain_names_and_few(world: World, reviewers: Any,
                                                     why: str) -> None:
    response = await world.http.post("/submit", headers=world.auth("sam"),
                                     json={"data": "x", "reviewers": reviewers})
    assert response.status_code == 400 and why in response.json()["error"], response.text


async def test_a_submitter_can_cancel_their_task_and_a_reviewer_who_may_decide(
    world: World
) -> None:
    for person in ("sam", "rita", "ada"):
        task_id = await world.sams_task()
        response = await world.http.post(f"/api/tasks/{task_id}/cancel",
                                         headers=world.auth(person))
        assert response.status_code == 200, (person, response.text)
    response = await world.http.post(f"/api/tasks/{world.task}/cancel", headers=world.auth("rex"))
    assert response.status_code == 403
    response = await world.http.post(f"/api/tasks/{world.task}/cancel", headers=world.auth("vic"))
    assert await refusal(response) == (403, "viewers cancel nothing")


async def test_another_submitters_task_is_unknown_on_every_path(world: World) -> None:
    for path in (f"/api/tasks/{world.task}", f"/api/tasks/{world.task[:8]}",
                 f"/stream/{world.task}", f"/tasks/{world.task}",
                 f"/tasks/{world.task}/stream"):
        response = await world.http.get(path, headers=world.auth("sue"))
        assert response.status_code == 404, path


async def test_the_dashboard_stream_carries_only_what_its_reader_sees(world: World) -> None:
    lines: list[str] = []

    async def read(person: str) -> None:
        async with world.http.stream("GET", "/dashboard/stream?since=0",
                                     headers=world.auth(person)) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                lines.append(line)

    reader = asyncio.create_task(read("sue"))
    try:
        while not any(line.startswith("event: counts") for line in lines):
            await asyncio.wait_for(asyncio.sleep(0.01), 5)
        sams = await world.sams_task()
        sues = await world.submit("sue")
        async def new_row_of_sue() -> None:
            while not any(f'id="task-{sues}"' in line for line in lines):
                await asyncio.sleep(0.01)

        await asyncio.wait_for(new_row_of_sue(), 10)
    finally:
        reader.cancel()
    text = "\n".join(lines)
    assert world.theirs in text and sams not in text and world.task not in text


@pytest.mark.parametrize("expires", [None, 1e-9])
async def test_a_revoked_or_expired_token_is_401(world: World, expires: float | None) -> None:
    accounts: Accounts = world.server.app.extensions["identity"].accounts
    info, token = await accounts.create_token("rita", "soon gone", expires)
    if expires is None:
        headers = {"Authorization": f"Bearer {token}"}
        assert (await world.http.get("/api/tasks", headers=headers)).status_code == 200
        await accounts.revoke_token(info.id)
    await asyncio.sleep(0.01)
    for method, path in (("GET", "/api/tasks"), ("POST", f"/feedback/{world.task}"),
                         ("GET", f"/stream/{world.task}"), ("GET", "/stream")):
        response = await world.http.request(method, path, json={"feedback": "approved"},
                                            headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401, (method, path)
        assert "revoked or expired" in json.loads(response.text)["error"]
    assert (await world.wait(world.task, "waiting_for_review"))["reviews"] == []


def test_the_log_and_the_database_never_hold_a_secret(tmp_path: Path) -> None:
    """A real ``hitl serve`` logging at debug level; users and a token made with the CLI."""
    db, password = tmp_path / "hitl.db", "correct horse battery staple"
    server = ServerProcess(db, env={"HITL_AUTH": "accounts", "HITL_LOG_LEVEL": "debug"})
    server.start()
    try:
        added = run_cli("users", "add", "pat", "--role", "reviewer", "--password-stdin",
                        "--db", str(db), stdin=password + "\n")
        assert added.returncode == 0, added.stderr
        created = run_cli("tokens", "create", "--user", "pat", "--label", "ci", "--db", str(db))
        assert created.returncode == 0, created.stderr
        token = created.stdout.splitlines()[-1]
        assert asyncio.run(verified(db, "pat", password))
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=10) as http:
            task_id = http.post("/submit", json={"data": "x"}).json()["task_id"]
            assert http.get(f"/api/tasks/{task_id}").status_code == 200
            bad = token[:-1] + ("x" if token[-1] != "x" else "y")
            assert http.get("/api/tasks", headers={"Authorization": f"Bearer {bad}"}
                            ).status_code == 401
    finally:
        server.stop()
    log = server.log() + added.stdout + added.stderr + created.stderr
    stored = b"".join(path.read_bytes() for path in sorted(tmp_path.glob("hitl.db*")))
    assert "hitl on http://" in log and task_id.encode() in stored  # it did log, and store, at all
    for secret in (password, token, token.removeprefix("hitl_"), bad):
        assert secret not in log
        assert secret.encode() not in stored


async def verified(db: Path, name: str, password: str) -> bool:
    store = Store(str(db))
    await store.open()
    try:
        return await Accounts(store).verify_password(name, password) is not None
    finally:
        await store.close()


async def test_review_next_opens_the_oldest_task_the_reader_may_decide(world: World) -> None:
    """``GET /next`` follows the policy: rita (group legal) gets sam's task for legal first;
    rex, not in legal, skips it for sue's; neither gets a task they submitted themselves;
    a viewer, who decides nothing, gets the empty queue."""
    rexs = await world.submit("rex")  # newer than both, and rex's own

    async def next_for(person: str, after: str | None = None) -> str:
        query = f"?after={after}" if after else ""
        response = await world.http.get(f"/next{query}", headers=world.auth(person))
        assert response.status_code == 303, response.text
        return response.headers["Location"]

    assert await next_for("rita") == f"/tasks/{world.task}"
    assert await next_for("rita", world.task) == f"/tasks/{world.theirs}"
    assert await next_for("rita", world.theirs) == f"/tasks/{rexs}"
    assert await next_for("rex") == f"/tasks/{world.theirs}"
    assert (await next_for("rex", world.theirs)).startswith("/dashboard")  # none but that one
    assert await next_for("ada") == f"/tasks/{world.task}"  # an admin: any, as an override
    for nobody in ("vic", "sue"):  # a viewer and a submitter decide nothing
        assert (await next_for(nobody)).startswith("/dashboard?status=waiting_for_review")
