"""The record of who did what: who submitted, who decided, how they signed in, shown safely."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from hitl import Config, create_app
from hitl.accounts import Accounts, Role
from hitl.store import MIGRATIONS, Store

from .serverproc import run_cli


@pytest.fixture
def config(config: Config) -> Config:
    return config.with_changes(auth="accounts")


@pytest.fixture
async def tokens(app: Quart) -> dict[str, str]:
    accounts: Accounts = app.extensions["identity"].accounts
    people = {"ada": (Role.ADMIN, (), "Ada Lovelace"),
              "rita": (Role.REVIEWER, ("legal",), "Rita \u05e9"),  # a right-to-left letter
              "rex": (Role.REVIEWER, (), ""), "sam": (Role.SUBMITTER, (), "")}
    tokens = {}
    for name, (role, groups, display) in people.items():
        await accounts.add_user(name, role, groups=groups, display_name=display or None)
        tokens[name] = (await accounts.create_token(name, f"{name}'s laptop"))[1]
    return tokens


def auth(tokens: dict[str, str], person: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens[person]}"}


async def submit(client: Client, headers: dict[str, str], **options: Any) -> str:
    response = await client.post("/submit", headers=headers, json={"data": "x", **options})
    assert response.status_code == 202, await response.get_data(as_text=True)
    return str((await response.get_json())["task_id"])


async def reach(client: Client, headers: dict[str, str], task_id: str, status: str,
                attempt: int = 1) -> dict[str, Any]:
    async def reached() -> dict[str, Any]:
        while True:
            task: dict[str, Any] = await (await client.get(f"/api/tasks/{task_id}",
                                                           headers=headers)).get_json()
            if task["status"] == status and task["attempt"] == attempt:
                return task
            await asyncio.sleep(0.01)

    return await asyncio.wait_for(reached(), 10)


async def test_a_decision_is_recorded_as_the_signed_in_user_whatever_the_body_says(
    app: Quart, client: Client, tokens: dict[str, str]
) -> None:
    ada, rita = auth(tokens, "ada"), auth(tokens, "rita")
    task_id = await submit(client, auth(tokens, "sam"), reviewers=["group:legal"])
    await reach(client, ada, task_id, "waiting_for_review")
    response = await client.post(f"/feedback/{task_id}", headers=rita, json={
        "feedback": "rejected", "comment": "shorter", "reviewer": "ada (CEO)"})
    assert response.status_code == 200
    await reach(client, ada, task_id, "waiting_for_review", attempt=2)
    assert (await client.post(f"/feedback/{task_id}", headers=ada,
                              json={"feedback": "approved"})).status_code == 200
    task = await reach(client, ada, task_id, "completed", attempt=2)
    audit = [{key: review[key] for key in ("reviewer", "display_name", "auth_method",
                                           "token_label", "admin_override")}
             for review in task["reviews"]]
    assert audit == [
        {"reviewer": "rita", "display_name": "Rita \u05e9", "auth_method": "token",
         "token_label": "rita's laptop", "admin_override": False},
        {"reviewer": "ada", "display_name": "Ada Lovelace", "auth_method": "token",
         "token_label": "ada's laptop", "admin_override": True},
    ]
    assert (task["submitted_by"], task["reviewers"]) == ("sam", ["group:legal"])
    messages = await app.extensions["store"].task_messages(task_id, 0)
    feedback = [json.loads(m.data) for m in messages if m.status == "processing_feedback"]
    assert feedback[0] == {"task_id": task_id, "status": "processing_feedback",
                           "feedback_value": "rejected", "comment": "shorter",
                           "reviewer": "rita", "attempt": 1}
    exported = await asyncio.to_thread(run_cli, "export", "--db", app.config["HITL"].db)
    [line] = exported.stdout.splitlines()
    assert json.loads(line)["reviews"] == task["reviews"]
    assert json.loads(line)["submitted_by"] == "sam"


async def test_without_sign_in_the_free_text_reviewer_names_the_decider(tmp_path: Path) -> None:
    app = create_app(Config(db=str(tmp_path / "none.db"), process_delay=0, auth="none"))
    async with app.test_app():
        client = app.test_client()
        task_id = await submit(client, {}, reviewers=["group:legal"])
        await reach(client, {}, task_id, "waiting_for_review")
        assert (await client.post(f"/feedback/{task_id}", json={
            "feedback": "approved", "reviewer": "Ann"})).status_code == 200
        task = await reach(client, {}, task_id, "completed")
    [review] = task["reviews"]
    assert task["submitted_by"] is None
    assert (review["reviewer"], review["auth_method"], review["admin_override"]) == (
        "Ann", "none", False)


@pytest.mark.parametrize("name", ["ann\u202e", "a\x00b", "bo\u200bb"])
async def test_a_free_text_reviewer_with_control_characters_is_refused(
    tmp_path: Path, name: str
) -> None:
    app = create_app(Config(db=str(tmp_path / "none.db"), process_delay=0, auth="none"))
    async with app.test_app():
        client = app.test_client()
        task_id = await submit(client, {})
        response = await client.post(f"/feedback/{task_id}", json={
            "feedback": "approved", "reviewer": name})
        assert response.status_code == 400
        assert "reviewer" in (await response.get_json())["error"]


async def test_the_task_page_says_who_may_decide_and_shows_buttons_only_to_them(
    client: Client, tokens: dict[str, str]
) -> None:
    ada = auth(tokens, "ada")
    task_id = await submit(client, auth(tokens, "sam"), reviewers=["group:legal", "rex"])
    await reach(client, ada, task_id, "waiting_for_review")
    pages = {person: await (await client.get(f"/tasks/{task_id}", headers=auth(tokens, person))
                            ).get_data(as_text=True) for person in ("rita", "rex", "sam", "ada")}
    for page in pages.values():
        assert re.search(r"Waiting for <bdi>group:legal</bdi> or <bdi>rex</bdi>", page)
        assert "Submitted by <bdi>sam</bdi>" in page
        assert 'name="reviewer"' not in page  # signed in: the decision is theirs
    assert ">Approve</button>" in pages["rita"] and ">Approve</button>" in pages["rex"]
    assert ">Approve</button>" not in pages["sam"]
    assert "submitters decide nothing" in pages["sam"]
    assert ">Approve</button>" in pages["ada"] and "admin override" in pages["ada"]


async def test_every_name_in_a_page_is_isolated(
    app: Quart, client: Client, tokens: dict[str, str]
) -> None:
    ada = auth(tokens, "ada")
    task_id = await submit(client, auth(tokens, "sam"))
    await reach(client, ada, task_id, "waiting_for_review")
    await client.post(f"/feedback/{task_id}", headers=auth(tokens, "rita"),
                      json={"feedback": "rejected", "comment": "again"})
    await reach(client, ada, task_id, "waiting_for_review", attempt=2)
    page = await (await client.get(f"/tasks/{task_id}", headers=ada)).get_data(as_text=True)
    assert re.search(r"Rejected</strong>\s+by <bdi class=\"reviewer\">Rita \u05e9</bdi> "
                     r"\(<bdi>rita</bdi>\)", page)
    for name in ("rita", "Rita \u05e9", "sam"):  # user names, a right-to-left display name
        isolated = re.findall(rf"<bdi[^>]*>{name}</bdi>", page)
        assert isolated and len(isolated) == page.count(name), name


async def test_the_migration_keeps_earlier_tasks_and_reviews(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:  # a database from before identities were recorded
        conn.execute("CREATE TABLE schema_version (version INTEGER)")
        for version, script in enumerate(MIGRATIONS[:4], start=1):  # up to the accounts
            conn.executescript(script)
            conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
        conn.execute("""INSERT INTO tasks VALUES ('old', 'input', 'completed', 1,
                        'output', 'output', NULL, 4, 1.0, 1.0)""")
        conn.execute("""INSERT INTO reviews (task_id, attempt, decision, comment, reviewer,
                        created_at) VALUES ('old', 1, 'approved', '', 'ann', 1.0)""")
    store = Store(str(db))
    await store.open()
    try:
        task = await store.get_task("old")
        [row], total = await store.list_tasks()
    finally:
        await store.close()
    assert task is not None and total == 1
    data = task.to_json()
    assert (data["submitted_by"], data["reviewers"], data["allow_self_review"]) == (
        None, [], False)
    [review] = data["reviews"]
    assert (review["reviewer"], review["display_name"], review["auth_method"],
            review["token_label"], review["admin_override"]) == ("ann", "", "none", None, False)
    assert row.to_json()["submitted_by"] is None
