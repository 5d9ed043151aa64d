"""Storage faults: a change that cannot be stored is never acknowledged, never visible,
and never strands its task; the service carries on by itself once storage recovers.

Real faults on real files: a database made immutable (``chattr +i``) and a small tmpfs
filled to the last byte; both need root and are skipped cleanly where not allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from hitl import Config

from .conftest import LiveServer, ReviewActions, start_server, stop_server
from .serverproc import ServerProcess, run_cli

BOUND = 15  # seconds any one wait below may take
CHATTR = "the fault is a SQLite file made immutable (chattr +i)"


def can_chattr(tmp_path: Path) -> bool:
    probe = tmp_path / "chattr-probe"
    probe.write_text("x")
    if shutil.which("chattr") is None:
        return False
    ok = subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode == 0
    subprocess.run(["chattr", "-i", str(probe)], capture_output=True)
    return ok


@contextlib.contextmanager
def read_only(db: Path) -> Iterator[None]:
    """Make the database and its WAL immutable: every write fails with an I/O error."""
    files = [str(path) for path in (db, Path(f"{db}-wal")) if path.exists()]
    subprocess.run(["chattr", "+i", *files], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *files], check=True)


@pytest.fixture
def chattr_ok(tmp_path: Path) -> None:
    if not can_chattr(tmp_path):
        pytest.skip("chattr +i is not available here")


@pytest.fixture
async def server(config: Config) -> AsyncIterator[LiveServer]:
    server = await start_server(config)
    try:
        yield server
    finally:
        await stop_server(server)


async def until(check: object, what: str, bound: float = BOUND) -> None:
    """Poll an async predicate until it is true, failing after ``bound`` seconds."""
    async def poll() -> None:
        while not await check():  # type: ignore[operator]
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(poll(), bound)
    except TimeoutError:
        raise AssertionError(f"not within {bound} s: {what}") from None


async def status_of(http: httpx.AsyncClient, task_id: str) -> str:
    return str((await http.get(f"/api/tasks/{task_id}")).json()["status"])


async def healthy(http: httpx.AsyncClient) -> bool:
    return (await http.get("/healthz")).status_code == 200


def contiguous(ids: list[int]) -> bool:
    return ids == list(range(1, len(ids) + 1))


async def stored_ids(server: LiveServer, task_id: str) -> list[int]:
    store = server.app.extensions["store"]
    return [message.id for message in await store.task_messages(task_id, 0)]


@pytest.mark.sqlite_only(CHATTR)
@pytest.mark.usefixtures("chattr_ok")
async def test_a_decision_that_cannot_be_stored_gets_503_and_drives_nothing(
        server: LiveServer, config: Config) -> None:
    async with server.http() as http:
        actions = ReviewActions(http)
        task_id = await actions.submit()
        await until(lambda: _is(http, task_id, "waiting_for_review"), "waiting for review")
        with read_only(Path(config.db)):
            response = await actions.approve(task_id, reviewer="ann")
            assert response.status_code == 503, response.text
            assert response.json()["error"].startswith("storage unavailable: ")
            health = await http.get("/healthz")
            assert health.status_code == 503
            assert health.json()["status"] == "degraded"
            assert "storage unavailable" in health.json()["error"]
            task = (await http.get(f"/api/tasks/{task_id}")).json()
            assert task["status"] == "waiting_for_review"
            assert task["reviews"] == [] and task["final_result"] is None
            again = await actions.approve(task_id, reviewer="ann")
            assert again.status_code == 503, again.text  # never 409 "already ..."
        await until(lambda: healthy(http), "healthz ok once the file is writable")
        await until(lambda: _approved(actions, task_id), "the decision accepted again")
        await until(lambda: _is(http, task_id, "completed"), "completed")
        task = (await http.get(f"/api/tasks/{task_id}")).json()
        assert [r["decision"] for r in task["reviews"]] == ["approved"]
        assert contiguous(await stored_ids(server, task_id))


@pytest.mark.sqlite_only(CHATTR)
@pytest.mark.usefixtures("chattr_ok")
async def test_a_cancel_that_cannot_be_stored_gets_503_and_the_task_goes_on(
        server: LiveServer, config: Config) -> None:
    async with server.http() as http:
        actions = ReviewActions(http)
        task_id = await actions.submit()
        await until(lambda: _is(http, task_id, "waiting_for_review"), "waiting for review")
        with read_only(Path(config.db)):
            response = await http.post(f"/api/tasks/{task_id}/cancel")
            assert response.status_code == 503, response.text
            assert response.json()["error"].startswith("storage unavailable: ")
        await until(lambda: healthy(http), "healthz ok")
        assert await status_of(http, task_id) == "waiting_for_review"
        await until(lambda: _cancelled(http, task_id), "cancel accepted once writable")
        assert await status_of(http, task_id) == "cancelled"
        assert contiguous(await stored_ids(server, task_id))


@pytest.mark.sqlite_only(CHATTR)
@pytest.mark.usefixtures("chattr_ok")
async def test_submits_during_a_read_only_spell_get_503_and_leave_nothing(
        server: LiveServer, config: Config) -> None:
    async with server.http() as http:
        before = (await http.get("/api/tasks")).json()["total"]
        with read_only(Path(config.db)):
            response = await http.post("/submit", json={"data": "x"})
            assert response.status_code == 503, response.text
            assert response.json()["error"].startswith("storage unavailable: ")
        assert (await http.get("/api/tasks")).json()["total"] == before
        await until(lambda: healthy(http), "healthz ok")
        assert (await http.post("/submit", json={"data": "x"})).status_code == 202


async def _is(http: httpx.AsyncClient, task_id: str, status: str) -> bool:
    return await status_of(http, task_id) == status


async def _approved(actions: ReviewActions, task_id: str) -> bool:
    response = await actions.approve(task_id, reviewer="ann")
    assert response.status_code in (200, 503), response.text
    return response.status_code == 200


async def _cancelled(http: httpx.AsyncClient, task_id: str) -> bool:
    response = await http.post(f"/api/tasks/{task_id}/cancel")
    assert response.status_code in (200, 503), response.text
    return response.status_code == 200


# --- a full disk -------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, mounted for this test (needs root; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                            capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write a filler file until the disk is full, to the last byte."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


async def test_a_full_disk_loses_no_accepted_task_and_recovers_by_itself(
        small_disk: Path, tmp_path: Path) -> None:
    config = Config(db=str(small_disk / "hitl.db"), process_delay=0.05, retry_wait=0,
                    auth="none")
    server = await start_server(config)
    try:
        async with server.http() as http:
            accepted: list[str] = []

            async def submit(text: str) -> int:
                response = await http.post("/submit", json={"data": text})
                assert response.status_code in (202, 503), response.text
                if response.status_code == 202:
                    accepted.append(response.json()["task_id"])
                else:
                    assert response.json()["error"].startswith("storage unavailable: ")
                return response.status_code

            await asyncio.gather(*(submit(f"before {n}") for n in range(20)))
            filler = fill(small_disk)
            codes = await asyncio.gather(*(submit("x" * 20_000 + str(n)) for n in range(30)))
            assert 503 in codes, "the disk was full but every submit was accepted"
            health = await http.get("/healthz")
            assert health.status_code == 503 and health.json()["status"] == "degraded"
            filler.unlink()
            await until(lambda: healthy(http), "healthz ok once space is freed")

            async def all_waiting() -> bool:
                statuses = [await status_of(http, task_id) for task_id in accepted]
                assert "failed" not in statuses
                return all(status == "waiting_for_review" for status in statuses)

            await until(all_waiting, "every accepted task waiting for review")
            listed = (await http.get("/api/tasks", params={"limit": 200})).json()
            assert {task["task_id"] for task in listed["tasks"]} == set(accepted)
            for task_id in accepted:
                assert (await ReviewActions(http).approve(task_id)).status_code == 200
                assert contiguous(await stored_ids(server, task_id))
    finally:
        await stop_server(server)


async def test_start_up_on_a_full_disk_stops_with_one_line(small_disk: Path) -> None:
    fill(small_disk)
    result = await asyncio.to_thread(run_cli, "serve", "--db", str(small_disk / "hitl.db"),
                                     "--port", "0", timeout=BOUND)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hitl: error: "), result.stderr


async def test_a_second_server_on_the_same_database_stops_with_one_line(
        tmp_path: Path) -> None:
    first = await asyncio.to_thread(ServerProcess(tmp_path / "shared.db").start)
    try:
        result = await asyncio.to_thread(run_cli, "serve", "--db", str(first.db),
                                         "--port", "0", timeout=BOUND)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "in use by another hitl serve" in lines[0], result.stderr
        assert first.proc is not None and str(first.proc.pid) in lines[0]
        assert httpx.get(first.url + "/healthz", timeout=5).status_code == 200
    finally:
        first.stop()


# --- a unique key settles concurrent submits ---------------------------------------------

async def test_idempotency_key_returns_the_same_task(actions: ReviewActions,
                                                     live_server: LiveServer) -> None:
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = await actions.http.post("/submit", json={"data": "once"}, headers=key)
    again = await actions.http.post("/submit", json={"data": "once"}, headers=key)
    assert first.status_code == again.status_code == 202
    assert first.json()["task_id"] == again.json()["task_id"]
    other = await actions.http.post("/submit", json={"data": "other"}, headers=key)
    assert other.status_code == 409 and "Idempotency-Key" in other.json()["error"]
    assert (await actions.http.get("/api/tasks")).json()["total"] == 1


async def test_concurrent_retries_with_one_key_create_one_task(
        actions: ReviewActions) -> None:
    key = {"Idempotency-Key": "retry-1"}
    responses = await asyncio.gather(*(actions.http.post("/submit", json={"data": "once"},
                                                         headers=key) for _ in range(20)))
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["task_id"] for r in responses}) == 1
    assert (await actions.http.get("/api/tasks")).json()["total"] == 1


@pytest.mark.parametrize("key", [b"", b"x" * 256, "caf\u00e9".encode(), b"a\tb"])
async def test_a_bad_idempotency_key_is_a_400(actions: ReviewActions, key: bytes) -> None:
    response = await actions.http.post("/submit", json={"data": "x"},
                                       headers={"Idempotency-Key": key})
    assert response.status_code == 400, response.text
    assert "Idempotency-Key" in response.json()["error"]


async def test_an_idempotency_key_expires_after_its_window(actions: ReviewActions,
                                                           live_server: LiveServer) -> None:
    key = {"Idempotency-Key": "old"}
    first = (await actions.http.post("/submit", json={"data": "x"}, headers=key)).json()
    await until(lambda: _is(actions.http, first["task_id"], "waiting_for_review"), "waiting")
    store = live_server.app.extensions["store"]
    async with store.transaction() as conn:  # a day and a second ago
        await conn.execute("UPDATE idempotency_keys SET created_at = created_at - 86401")
    second = (await actions.http.post("/submit", json={"data": "x"}, headers=key)).json()
    assert second["task_id"] != first["task_id"]


async def test_an_idempotency_key_holds_across_a_restart(config: Config) -> None:
    key = {"Idempotency-Key": "across"}
    server = await start_server(config)
    async with server.http() as http:
        first = (await http.post("/submit", json={"data": "x"}, headers=key)).json()
    await stop_server(server)
    server = await start_server(config)
    try:
        async with server.http() as http:
            again = (await http.post("/submit", json={"data": "x"}, headers=key)).json()
            assert again["task_id"] == first["task_id"]
            assert (await http.get("/api/tasks")).json()["total"] == 1
    finally:
        await stop_server(server)
