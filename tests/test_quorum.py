"""Quorum and edit-then-approve over real HTTP, with real users and API tokens.

An attempt is approved once ``quorum`` distinct eligible reviewers approved it; one
rejection vetoes it; a reviewer votes once per attempt (409 after), however many vote at
once; the store refuses what the service would. An approval with an edit: with quorum 1
the edit is the result, above it the edit is the next attempt, voted on by the others.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from hitl import Config
from hitl.accounts import Role
from hitl.errors import VoteRefused
from hitl.models import Review, Task
from hitl.store import MIGRATIONS, Store, Write, open_store

from .conftest import LiveServer, People, Watcher, add_people, read_sse, start_server, stop_server

ON_POSTGRESQL = True  # and on SQLite (tests/conftest.py)

REVIEWERS = ("ann", "bob", "cat", "dan")
CROWD = tuple(f"r{n:02d}" for n in range(20))


@pytest.fixture
def config(config: Config) -> Config:
    return config.with_changes(auth="accounts")


@dataclass
class Team(People):
    """A live server, a token per person: sam submits, the others review."""

    reader: str = "ann"
    watchers: list[Watcher] = field(default_factory=list)

    async def submit(self, **options: Any) -> str:
        task_id = await self.post_task("sam", **options)
        await self.wait(task_id, "waiting_for_review")
        return task_id

    async def wait(self, task_id: str, status: str, attempt: int | None = 1
                   ) -> dict[str, Any]:
        return await super().wait(task_id, status, attempt)

    async def vote(self, person: str, task_id: str, feedback: str = "approved",
                   **extra: Any) -> httpx.Response:
        return await self.http.post(f"/feedback/{task_id}", headers=self.auth(person),
                                    json={"feedback": feedback, **extra})

    def watch(self, task_id: str) -> Watcher:
        watcher = Watcher()
        watcher.task = asyncio.create_task(read_sse(self.http, f"/stream/{task_id}", watcher,
                                                    self.auth("ann")))
        self.watchers.append(watcher)
        return watcher


def team_of(reviewers: tuple[str, ...]) -> dict[str, tuple[Role, tuple[str, ...]]]:
    return {"sam": (Role.SUBMITTER, ()), **{name: (Role.REVIEWER, ()) for name in reviewers}}


@pytest.fixture
async def team(live_server: LiveServer) -> AsyncIterator[Team]:
    async with live_server.http() as http:
        team = Team(live_server, http, await add_people(
            live_server.app.extensions["identity"].accounts, team_of(REVIEWERS + CROWD)))
        yield team
        for watcher in team.watchers:
            if watcher.task is not None:
                watcher.task.cancel()


def tally(task: dict[str, Any], attempt: int = 1) -> list[tuple[str, str]]:
    [record] = [a for a in task["attempts"] if a["attempt"] == attempt]
    return [(vote["reviewer"], vote["decision"]) for vote in record["votes"]]


async def test_quorum_2_needs_two_distinct_reviewers(team: Team) -> None:
    task_id = await team.submit(quorum=2)
    watcher = team.watch(task_id)
    await watcher.wait_for("waiting_for_review", attempt=1)
    response = await team.vote("ann", task_id, comment="fine by me")
    assert response.status_code == 200, response.text
    task = await team.read_task(task_id)
    assert task["status"] == "waiting_for_review" and task["final_result"] is None
    assert tally(task) == [("ann", "approved")] and task["attempts"][0]["approvals"] == 1
    vote = await watcher.wait_for("waiting_for_review", approvals=1)
    assert vote.data["quorum"] == 2 and vote.data["attempt"] == 1
    assert vote.data["output_to_review"] == task["processed_output"]
    [cast] = vote.data["votes"]
    assert (cast["reviewer"], cast["decision"], cast["comment"]) == ("ann", "approved",
                                                                     "fine by me")
    assert cast["at"].endswith("+00:00")

    again = await team.vote("ann", task_id)
    assert again.status_code == 409 and "already approved" in again.json()["error"]
    rejected_again = await team.vote("ann", task_id, "rejected", comment="changed my mind")
    assert rejected_again.status_code == 409

    assert (await team.vote("bob", task_id)).status_code == 200
    done = await team.wait(task_id, "completed")
    assert done["final_result"] == done["processed_output"]
    assert tally(done) == [("ann", "approved"), ("bob", "approved")]
    assert (await team.vote("cat", task_id)).status_code == 409
    await watcher.ended()
    assert watcher.statuses()[-3:] == ["processing_feedback", "completed", "stream_closed"]
    assert watcher.statuses().count("completed") == 1


async def test_quorum_3_and_a_veto_that_starts_the_next_attempt(team: Team) -> None:
    task_id = await team.submit(quorum=3)
    for person in ("ann", "bob"):
        assert (await team.vote(person, task_id)).status_code == 200
    veto = await team.vote("cat", task_id, "rejected", comment="too stiff")
    assert veto.status_code == 200
    task = await team.wait(task_id, "waiting_for_review", attempt=2)
    assert "too stiff" in task["processed_output"]  # the veto's comment reached attempt 2
    assert tally(task, 1) == [("ann", "approved"), ("bob", "approved"), ("cat", "rejected")]
    assert tally(task, 2) == []
    assert (await team.vote("dan", task_id, attempt=1)).status_code == 409  # decided
    for person in ("ann", "bob"):  # a new attempt: everyone votes again
        assert (await team.vote(person, task_id)).status_code == 200
    assert (await team.wait(task_id, "waiting_for_review", attempt=2))["status"] == \
        "waiting_for_review"
    assert (await team.vote("cat", task_id)).status_code == 200
    done = await team.wait(task_id, "completed", attempt=2)
    assert tally(done, 2) == [("ann", "approved"), ("bob", "approved"), ("cat", "approved")]


async def test_20_concurrent_votes_count_exactly_the_quorum(team: Team) -> None:
    task_id = await team.submit(quorum=3)
    watcher = team.watch(task_id)
    await watcher.wait_for("waiting_for_review", attempt=1)
    responses = await asyncio.gather(*(team.vote(person, task_id) for person in CROWD))
    codes = sorted(response.status_code for response in responses)
    assert codes == [200] * 3 + [409] * 17, codes
    done = await team.wait(task_id, "completed")
    approvers = [name for name, _ in tally(done)]
    winners = [person for person, response in zip(CROWD, responses, strict=True)
               if response.status_code == 200]
    assert sorted(approvers) == sorted(winners) and len(set(approvers)) == 3
    await watcher.ended()
    assert watcher.statuses().count("completed") == 1
    assert watcher.statuses().count("processing_feedback") == 1
    counts = [event.data["approvals"] for event in watcher.events
              if event.data.get("status") == "waiting_for_review" and "approvals" in event.data]
    assert counts == [0, 1, 2]


async def test_the_task_page_shows_the_tally_and_a_voter_their_vote(team: Team) -> None:
    task_id = await team.submit(quorum=2)
    assert (await team.vote("bob", task_id)).status_code == 200
    mine = (await team.http.get(f"/tasks/{task_id}", headers=team.auth("bob"))).text
    theirs = (await team.http.get(f"/tasks/{task_id}", headers=team.auth("ann"))).text
    for page in (mine, theirs):
        assert "1 of 2 approvals: <bdi>bob</bdi>" in page
    assert "You approved attempt 1" in mine and 'value="approved"' not in mine
    assert "You approved" not in theirs and 'value="approved"' in theirs
    assert "Approve edited" in theirs


async def test_review_next_skips_a_task_the_reader_has_voted_on(team: Team) -> None:
    task_id = await team.submit(quorum=2)
    since = (await team.read_task(task_id))["updated_at"]
    assert (await team.vote("ann", task_id)).status_code == 200
    [row] = (await team.http.get("/api/tasks", headers=team.auth("bob"))).json()["tasks"]
    assert row["waiting_since"] == since  # a vote keeps its place in the queue
    for person, lands in (("ann", "/dashboard?status=waiting_for_review"),
                          ("bob", f"/tasks/{task_id}")):
        response = await team.http.get("/next", headers=team.auth(person))
        assert response.status_code == 303 and response.headers["Location"] == lands, person


async def test_edit_with_quorum_1_is_the_result_and_the_attempt_keeps_the_output(
        team: Team) -> None:
    task_id = await team.submit()
    output = (await team.read_task(task_id))["processed_output"]
    edited = output + " Kind regards, Ann."
    watcher = team.watch(task_id)
    waiting = await watcher.wait_for("waiting_for_review", attempt=1)
    assert set(waiting.data) == {"task_id", "status", "output_to_review", "attempt"}  # as ever
    response = await team.vote("ann", task_id, edited_output=edited, comment="signed it")
    assert response.status_code == 200, response.text
    done = await team.wait(task_id, "completed")
    assert done["final_result"] == edited and done["processed_output"] == output
    [attempt] = done["attempts"]
    assert attempt["output"] == output and attempt["edited_by"] is None
    [review] = done["reviews"]
    assert (review["decision"], review["edited_output"], review["reviewer"]) == (
        "approved", edited, "ann")
    await watcher.wait_for("processing_feedback", edited_output=edited)
    await watcher.wait_for("completed", final_result=edited)
    page = (await team.http.get(f"/tasks/{task_id}", headers=team.auth("bob"))).text
    assert "Edited by" in page and "3 words added, 0 removed" in page
    assert 'class="text diff edit-diff"' in page and "<ins>" in page


async def test_edit_with_quorum_2_is_the_next_attempt_for_the_others(team: Team) -> None:
    task_id = await team.submit(quorum=2)
    first = await team.read_task(task_id)
    output = first["processed_output"]
    edited = "A shorter reply."
    watcher = team.watch(task_id)
    await watcher.wait_for("waiting_for_review", attempt=1)
    assert (await team.vote("bob", task_id)).status_code == 200  # bob approved attempt 1
    response = await team.vote("ann", task_id, edited_output=edited)
    assert response.status_code == 200, response.text
    task = await team.wait(task_id, "waiting_for_review", attempt=2)
    assert task["processed_output"] == edited and task["final_result"] is None
    first_attempt, second = task["attempts"]
    assert first_attempt["output"] == output and second["output"] == edited
    assert second["edited_by"] == "ann" and second["tries"] == 0
    assert tally(task, 2) == [("ann", "approved")]  # ann approved the text she wrote
    shown = await watcher.wait_for("waiting_for_review", attempt=2)
    assert (shown.data["output_to_review"], shown.data["edited_by"], shown.data["approvals"],
            shown.data["quorum"]) == (edited, "ann", 1, 2)
    assert (await team.vote("ann", task_id)).status_code == 409  # she has voted on it
    assert (await team.vote("bob", task_id, attempt=1)).status_code == 409  # superseded
    assert (await team.vote("bob", task_id)).status_code == 200  # bob approves what he saw
    done = await team.wait(task_id, "completed", attempt=2)
    assert done["final_result"] == edited
    assert tally(done, 2) == [("ann", "approved"), ("bob", "approved")]
    page = (await team.http.get(f"/tasks/{task_id}", headers=team.auth("cat"))).text
    assert "Edited by <bdi>ann</bdi>" in page


async def test_only_eligible_reviewers_count(team: Team) -> None:
    task_id = await team.submit(quorum=2, reviewers=["ann", "bob"])
    refused = await team.vote("cat", task_id)
    assert refused.status_code == 403 and "only ann or bob" in refused.json()["error"]
    assert (await team.vote("ann", task_id)).status_code == 200
    assert (await team.vote("cat", task_id)).status_code == 403
    assert tally(await team.read_task(task_id)) == [("ann", "approved")]
    assert (await team.vote("bob", task_id)).status_code == 200
    await team.wait(task_id, "completed")


async def test_an_edit_of_an_edit_is_voted_on_anew(team: Team) -> None:
    task_id = await team.submit(quorum=2)
    assert (await team.vote("ann", task_id, edited_output="Ann's text.")).status_code == 200
    await team.wait(task_id, "waiting_for_review", attempt=2)
    assert (await team.vote("bob", task_id, edited_output="Bob's text.")).status_code == 200
    task = await team.wait(task_id, "waiting_for_review", attempt=3)
    assert [a["edited_by"] for a in task["attempts"]] == [None, "ann", "bob"]
    assert tally(task, 3) == [("bob", "approved")]
    assert (await team.vote("ann", task_id)).status_code == 200  # ann approves bob's text
    done = await team.wait(task_id, "completed", attempt=3)
    assert done["final_result"] == "Bob's text."


async def test_bad_edits_are_400(team: Team) -> None:
    task_id = await team.submit()
    blank = await team.vote("ann", task_id, edited_output="  ")
    assert blank.status_code == 400 and "edited_output" in blank.json()["error"]
    rejected = await team.vote("ann", task_id, "rejected", edited_output="x")
    assert rejected.status_code == 400 and "edited_output" in rejected.json()["error"]
    assert (await team.read_task(task_id))["status"] == "waiting_for_review"


async def test_votes_survive_a_restart(tmp_path: Path, config: Config) -> None:
    config = config.with_changes(db=str(tmp_path / "restart.db"))
    server = await start_server(config)
    try:
        async with server.http() as http:
            team = Team(server, http, await add_people(
                server.app.extensions["identity"].accounts, team_of(REVIEWERS)))
            task_id = await team.submit(quorum=2)
            assert (await team.vote("ann", task_id)).status_code == 200
    finally:
        await stop_server(server)
    server = await start_server(config)
    try:
        async with server.http() as http:
            team = Team(server, http, team.tokens)
            await team.wait(task_id, "waiting_for_review")
            assert (await team.vote("ann", task_id)).status_code == 409
            assert (await team.vote("bob", task_id)).status_code == 200
            done = await team.wait(task_id, "completed")
            assert tally(done) == [("ann", "approved"), ("bob", "approved")]
    finally:
        await stop_server(server)


async def test_a_vote_another_process_took_is_refused_by_the_store(team: Team) -> None:
    """A second hitl on the same database took ann's vote: this one's memory does not know
    it, the store does. Her vote here is 409, the task is reloaded with her vote, and
    bob's completes the quorum."""
    task_id = await team.submit(quorum=2)
    config = team.server.app.extensions["runner"].config
    other = open_store(config.db)
    await other.open()
    try:
        stored = await other.get_task(task_id)
        assert stored is not None
        await other.write([Write(stored.row(), review=Review("approved", 1,
                                                             reviewer="ann"))])
    finally:
        await other.close()
    response = await team.vote("ann", task_id)
    assert response.status_code == 409, response.text

    async def bob_votes() -> httpx.Response:
        while (answer := await team.vote("bob", task_id)).status_code == 503:
            await asyncio.sleep(0.05)  # being reloaded from the store
        return answer

    assert (await asyncio.wait_for(bob_votes(), 10)).status_code == 200
    done = await team.wait(task_id, "completed")
    assert tally(done) == [("ann", "approved"), ("bob", "approved")]


def vote_write(task: Task, reviewer: str, decision: str = "approved") -> Write:
    return Write(task.row(), review=Review(decision, 1, reviewer=reviewer))  # type: ignore[arg-type]


async def test_the_store_enforces_one_vote_each_and_the_quorum(store: Store) -> None:
    task = Task("t1", "input", quorum=2)
    await store.write([Write(task.row())])
    await store.write([vote_write(task, "ann")])
    with pytest.raises(VoteRefused):  # a second process's second vote by ann
        await store.write([vote_write(task, "ann")])
    await store.write([vote_write(task, "bob")])
    with pytest.raises(VoteRefused):  # the quorum is reached: the attempt is decided
        await store.write([vote_write(task, "cat")])
    vetoed = Task("t2", "input", quorum=3)
    await store.write([Write(vetoed.row()), vote_write(vetoed, "ann", "rejected")])
    with pytest.raises(VoteRefused):  # vetoed: no more votes on that attempt
        await store.write([vote_write(vetoed, "bob")])
    assert [r.reviewer for r in await store.reviews("t1")] == ["ann", "bob"]
    assert [r.reviewer for r in await store.reviews("t2")] == ["ann"]


async def test_the_vote_migration_keeps_earlier_reviews(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    votes = next(n for n, script in enumerate(MIGRATIONS) if "reviews_one_vote" in script)
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER)")
        for version, script in enumerate(MIGRATIONS[:votes], start=1):
            conn.executescript(script)
            conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
        conn.execute("""INSERT INTO tasks (task_id, task_input, status, attempt,
                        processed_output, final_result, last_seq, created_at, updated_at)
                        VALUES ('old', 'in', 'completed', 2, 'out', 'out', 6, 1.0, 1.0)""")
        conn.execute("""INSERT INTO attempts (task_id, attempt, output) VALUES
                        ('old', 1, 'first'), ('old', 2, 'out')""")
        conn.execute("""INSERT INTO reviews (task_id, attempt, decision, comment, reviewer,
                        created_at) VALUES ('old', 1, 'rejected', 'no', 'ann', 1.0),
                        ('old', 2, 'approved', '', 'ann', 2.0)""")
    store = Store(str(db))
    await store.open()
    try:
        task = await store.get_task("old")
        assert task is not None
        data = task.to_json()
        assert [(a["attempt"], a["edited_by"], a["approvals"]) for a in data["attempts"]] == [
            (1, None, 0), (2, None, 1)]
        assert [r["edited_output"] for r in data["reviews"]] == [None, None]
        with pytest.raises(VoteRefused):  # the new rule holds for old attempts too
            await store.write([Write(task.row(), review=Review("approved", 2,
                                                               reviewer="ann"))])
    finally:
        await store.close()


async def test_edits_count_toward_max_attempts(team: Team) -> None:
    """Above quorum 1 an edit is an attempt of its own: two reviewers taking turns at
    editing cannot grow a task past its max_attempts."""
    task_id = await team.submit(quorum=2, max_attempts=2)
    assert (await team.vote("ann", task_id, edited_output="Ann's text.")).status_code == 200
    await team.wait(task_id, "waiting_for_review", attempt=2)
    refused = await team.vote("bob", task_id, edited_output="Bob's text.")
    assert refused.status_code == 409 and "no attempt left for an edit" in refused.json()["error"]
    assert (await team.vote("bob", task_id)).status_code == 200  # a plain approval still counts
    done = await team.wait(task_id, "completed", attempt=2)
    assert done["final_result"] == "Ann's text." and len(done["attempts"]) == 2


async def test_the_store_refuses_a_vote_after_a_timeout_as_a_vote_not_a_fault(
    store: Store
) -> None:
    """The deadline's trigger (a second process's timeout) is a refused vote, 409, not a
    storage failure that would strand the task."""
    task = Task("t1", "input", quorum=3)
    await store.write([Write(task.row())])
    timed_out = Review("approved", 1, "review timed out", reviewer="timeout",
                       auth_method="system")
    await store.write([Write(task.row(), review=timed_out)])
    with pytest.raises(VoteRefused, match="already decided"):
        await store.write([vote_write(task, "ann")])
