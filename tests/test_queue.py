"""The review queue over real HTTP: real users with API tokens on a live hypercorn.

``POST /api/queue/next`` hands each reviewer the oldest task they may decide, reserved for
them; of many concurrent calls no task goes to two reviewers (quorum 1), and the rule is
the store's: two stores on one database file (two processes) keep it too.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from hitl import Config
from hitl.accounts import Accounts, Identity, Role
from hitl.broker import Broker
from hitl.queue import ReviewQueue
from hitl.store import Store

from .conftest import LiveServer, People, add_people, within

ON_POSTGRESQL = True  # and on SQLite (tests/conftest.py)

REVIEWERS = [f"r{number:02d}" for number in range(20)]


@pytest.fixture
def config(config: Config) -> Config:
    return config.with_changes(auth="accounts")


@dataclass
class Team(People):
    """A live server, a submitter (sam), an admin (ada), a viewer (vic), a worker (wes),
    twenty reviewers r00..r19 (r00 and r01 in group legal), each with an API token."""

    async def submit(self, count: int = 1, **options: Any) -> list[str]:
        ids = [await self.post_task("sam", **options) for _ in range(count)]
        for task_id in ids:
            await self.wait(task_id, "waiting_for_review")
        return ids

    async def next(self, person: str, after: str | None = None) -> httpx.Response:
        params = {"after": after} if after else None
        return await self.http.post("/api/queue/next", headers=self.auth(person), params=params)

    async def next_id(self, person: str, after: str | None = None) -> str | None:
        response = await self.next(person, after)
        assert response.status_code in (200, 204), response.text
        return str(response.json()["task_id"]) if response.status_code == 200 else None

    async def holders(self, task_id: str) -> list[str]:
        return [held["reviewer"] for held in (await self.read_task(task_id))["reservations"]]


TEAM = {"sam": (Role.SUBMITTER, ()), "ada": (Role.ADMIN, ()), "vic": (Role.VIEWER, ()),
        "wes": (Role.WORKER, ()),
        **{name: (Role.REVIEWER, ("legal",) if name in ("r00", "r01") else ())
           for name in REVIEWERS}}


@pytest.fixture
async def team(live_server: LiveServer) -> AsyncIterator[Team]:
    async with live_server.http() as http:
        yield Team(live_server, http,
                   await add_people(live_server.app.extensions["identity"].accounts, TEAM,
                                    display=str.upper))


async def test_twenty_concurrent_nexts_hand_no_task_to_two_reviewers(team: Team) -> None:
    tasks = await team.submit(7)
    answers = await asyncio.gather(*(team.next(person) for person in REVIEWERS))
    handed = [str(a.json()["task_id"]) for a in answers if a.status_code == 200]
    assert sorted(handed) == sorted(tasks)  # each task to exactly one reviewer
    assert [a.status_code for a in answers].count(204) == len(REVIEWERS) - len(tasks)
    for answer in answers:
        if answer.status_code == 200:
            [held] = answer.json()["reservations"]
            assert held["reviewer"] != "" and held["attempt"] == 1
    for task_id in tasks:
        assert len(await team.holders(task_id)) == 1
    # A second wave: everyone who holds one keeps it, the rest still get nothing.
    again = await asyncio.gather(*(team.next(person) for person in REVIEWERS))
    assert sorted(str(a.json()["task_id"]) for a in again if a.status_code == 200) == sorted(
        tasks)
    assert [a.status_code for a in answers] == [a.status_code for a in again]


async def test_next_is_the_oldest_and_others_skip_a_reserved_task(team: Team) -> None:
    first, second = await team.submit(2)
    assert await team.next_id("r02") == first
    assert await team.next_id("r03") == second  # first is r02's
    assert await team.next_id("r04") is None
    assert await team.holders(first) == ["r02"]
    [held] = (await team.read_task(first))["reservations"]
    assert held["display_name"] == "R02" and held["until"] > held["since"]
    assert await team.next_id("r02") == first  # asked again: the one held, held longer


async def test_release_and_a_decision_end_a_reservation(team: Team) -> None:
    [task_id] = await team.submit()
    assert await team.next_id("r02") == task_id
    assert await team.next_id("r03") is None
    released = await team.http.post(f"/api/tasks/{task_id}/release", headers=team.auth("r02"))
    assert released.json() == {"task_id": task_id, "released": True}
    again = await team.http.post(f"/api/tasks/{task_id[:8]}/release", headers=team.auth("r02"))
    assert again.json() == {"task_id": task_id, "released": False}
    assert await team.holders(task_id) == []
    assert await team.next_id("r03") == task_id
    decided = await team.http.post(f"/feedback/{task_id}", headers=team.auth("r03"),
                                   json={"feedback": "rejected", "comment": "shorter"})
    assert decided.status_code == 200
    task = await team.wait(task_id, "waiting_for_review")  # attempt 2 now
    assert task["attempt"] == 2 and task["reservations"] == []
    store = team.server.app.extensions["store"]
    rows = await store.reader.execute_fetchall("SELECT count(*) FROM reservations")
    assert [tuple(row) for row in rows] == [(0,)]


async def test_a_reservation_never_stops_another_reviewer_deciding(team: Team) -> None:
    [task_id] = await team.submit()
    assert await team.next_id("r02") == task_id
    decided = await team.http.post(f"/feedback/{task_id}", headers=team.auth("r05"),
                                   json={"feedback": "approved"})
    assert decided.status_code == 200
    task = await team.wait(task_id, "completed")
    assert task["reviews"][0]["reviewer"] == "r05"
    assert task["reservations"] == []  # decided: nobody holds it any more
    assert await team.next_id("r02") is None  # nothing waits any more: r02 holds nothing


async def test_next_with_after_moves_on_and_ends_the_one_held(team: Team) -> None:
    first, second, third = await team.submit(3)
    assert await team.next_id("r02") == first
    assert await team.next_id("r02", after=first) == second
    assert await team.holders(first) == [] and await team.holders(second) == ["r02"]
    assert await team.next_id("r02", after=second) == third
    assert await team.next_id("r02", after=third) == first  # round to the start
    assert [await team.holders(t) for t in (first, second, third)] == [["r02"], [], []]


async def test_the_queue_is_the_callers_own(team: Team) -> None:
    legal, anyone = await team.submit(1, reviewers=["group:legal"]) + await team.submit()
    assert await team.next_id("r05") == anyone  # not in legal: skips its task
    assert await team.next_id("r00") == legal
    for person in ("sam", "vic"):  # decide nothing: an empty queue
        assert (await team.next(person)).status_code == 204
    refused = await team.next("wes")
    assert refused.status_code == 403 and "workers" in refused.json()["error"]
    unsigned = await team.http.post("/api/queue/next")
    assert unsigned.status_code == 401
    assert (await team.http.post("/api/tasks/nope/release", headers=team.auth("r00"))
            ).status_code == 404
    own = await team.http.post("/submit", headers=team.auth("r07"), json={"data": "mine"})
    await team.wait(own.json()["task_id"], "waiting_for_review")
    assert await team.next_id("r07") is None  # their own task is not theirs to review


async def test_a_reservation_runs_out(team: Team, config: Config) -> None:
    team.server.app.extensions["queue"].config = config.with_changes(reservation=0.3)
    [task_id] = await team.submit()
    assert await team.next_id("r02") == task_id
    assert await team.next_id("r03") is None
    await asyncio.sleep(0.4)
    assert await team.holders(task_id) == []
    assert await team.next_id("r03") == task_id


async def test_review_next_in_the_ui_reserves_and_the_notice_offers_the_next(
    team: Team
) -> None:
    first, second = await team.submit(2)
    opened = await team.http.get("/next", headers=team.auth("r02"))
    assert opened.status_code == 303 and opened.headers["location"] == f"/tasks/{first}"
    assert await team.holders(first) == ["r02"]
    page = (await team.http.get(f"/tasks/{first}", headers=team.auth("r03"))).text
    assert "<bdi>R02</bdi> is reviewing" in page
    dashboard = (await team.http.get("/dashboard?status=waiting_for_review",
                                     headers=team.auth("r03"))).text
    assert "<bdi>R02</bdi> is reviewing" in dashboard
    decided = await team.http.post(f"/tasks/{first}/decision",
                                   headers={**team.auth("r02"), "HX-Request": "true"},
                                   data={"feedback": "approved", "attempt": "1"})
    assert decided.status_code == 200, decided.text
    assert f'href="/next?after={first}"' in decided.text
    moved = await team.http.get(f"/next?after={first}", headers=team.auth("r02"))
    assert moved.headers["location"] == f"/tasks/{second}"


async def read_lines(http: httpx.AsyncClient, path: str, headers: dict[str, str],
                     lines: list[str]) -> None:
    async with http.stream("GET", path, headers=headers) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            lines.append(line)


async def seen(lines: list[str], text: str, after: int = 0) -> int:
    async def look() -> int:
        while True:
            for at in range(after, len(lines)):
                if text in lines[at]:
                    return at
            await asyncio.sleep(0.01)

    return await within(look(), 10, f"{text!r} on the stream")


async def test_reservations_show_live_on_the_task_page_and_the_dashboard(team: Team) -> None:
    [task_id] = await team.submit()
    page: list[str] = []
    board: list[str] = []
    readers = [asyncio.create_task(read_lines(team.http, f"/tasks/{task_id}/stream",
                                              team.auth("vic"), page)),
               asyncio.create_task(read_lines(team.http, "/dashboard/stream?since=0",
                                              team.auth("vic"), board))]
    try:
        await seen(page, "event: review")
        await seen(board, "event: counts")
        assert await team.next_id("r02") == task_id
        taken = await seen(page, "<bdi>R02</bdi> is reviewing")
        row = await seen(board, "<bdi>R02</bdi> is reviewing")
        await team.http.post(f"/api/tasks/{task_id}/release", headers=team.auth("r02"))
        await seen(page, "event: review", taken + 1)
        await seen(board, f"event: task-{task_id}", row + 1)
        assert not any("is reviewing" in line for line in page[taken + 1:])
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


async def test_two_stores_on_one_database_never_hand_a_task_twice(tmp_path: Path) -> None:
    """Two processes' worth: two stores (each its own connections) on one file, claiming
    at once. The store's rule alone keeps each task to one reviewer."""
    path = str(tmp_path / "shared.db")
    stores = [Store(path), Store(path)]
    for store in stores:
        await store.open()
    try:
        accounts = Accounts(stores[0])
        identities = []
        for name in REVIEWERS:
            user = await accounts.add_user(name, Role.REVIEWER)
            identities.append(Identity(user, "token"))
        now = 1000.0
        with sqlite3.connect(path) as db:
            db.executemany(
                """INSERT INTO tasks (task_id, task_input, status, attempt, last_seq,
                                      created_at, updated_at)
                   VALUES (?, 'x', 'waiting_for_review', 1, 1, ?, ?)""",
                [(f"t{number}", now + number, now + number) for number in range(5)])
        config = Config(db=path)
        queues = [ReviewQueue(config, store, Broker()) for store in stores]
        handed = await asyncio.gather(*(queues[at % 2].next(by=identity)
                                        for at, identity in enumerate(identities)))
        ids = [task.task_id for task in handed if task is not None]
        assert sorted(ids) == [f"t{number}" for number in range(5)]
    finally:
        for store in stores:
            await store.close()


async def test_a_task_goes_to_as_many_reviewers_as_it_needs_votes(team: Team) -> None:
    [task_id] = await team.submit(quorum=3)
    answers = await asyncio.gather(*(team.next(person) for person in REVIEWERS))
    assert [a.status_code for a in answers].count(200) == 3
    assert len(await team.holders(task_id)) == 3


async def test_a_vote_ends_its_reservation_and_counts_against_what_is_needed(
    team: Team
) -> None:
    [task_id] = await team.submit(quorum=2)
    assert await team.next_id("r02") == task_id
    assert await team.next_id("r03") == task_id
    assert await team.next_id("r04") is None  # two hold it: both votes it needs
    voted = await team.http.post(f"/feedback/{task_id}", headers=team.auth("r02"),
                                 json={"feedback": "approved"})
    assert voted.status_code == 200, voted.text
    assert await team.holders(task_id) == ["r03"]
    assert await team.next_id("r04") is None  # one vote still needed, and r03 holds it
    assert await team.next_id("r02") is None  # r02 has voted on this attempt
    await team.http.post(f"/api/tasks/{task_id}/release", headers=team.auth("r03"))
    assert await team.next_id("r04") == task_id


@pytest.mark.parametrize("headers", [{"Sec-Fetch-Site": "cross-site"},
                                     {"Sec-Fetch-Site": "same-site"},
                                     {"Sec-Fetch-Site": "same-origin", "Sec-Purpose": "prefetch"}])
async def test_review_next_followed_from_another_site_reserves_nothing(
    team: Team, headers: dict[str, str]
) -> None:
    """A link on another site (or a prefetch) shows the way, but acts for no one."""
    [task_id] = await team.submit()
    shown = await team.http.get("/next", headers={**team.auth("r02"), **headers})
    assert shown.status_code == 303 and shown.headers["location"] == f"/tasks/{task_id}"
    assert await team.holders(task_id) == []
    own = await team.http.get("/next", headers={**team.auth("r02"),
                                                "Sec-Fetch-Site": "same-origin"})
    assert own.headers["location"] == f"/tasks/{task_id}"
    assert await team.holders(task_id) == ["r02"]
