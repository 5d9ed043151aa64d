"""The real ``hitl serve`` process: start-up errors, signals, shutdown with open streams."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import ReviewActions
from .serverproc import ServerProcess, run_cli

# CI adds a Python 3.13 (or 3.12) interpreter with hitl installed: the shutdown path differs.
PYTHONS = [sys.executable] + [p for p in os.environ.get("HITL_EXTRA_PYTHONS", "").split(",") if p]


@pytest.mark.parametrize("python", PYTHONS)
async def test_sigterm_with_open_streams_exits_within_seconds(tmp_path: Path, python: str
                                                              ) -> None:
    server = ServerProcess(tmp_path / "hitl.db", python=python).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            actions = ReviewActions(http)
            task_id = await actions.submit()
            watchers = [actions.watch(task_id) for _ in range(3)] + [actions.watch()]
            await asyncio.gather(*(w.wait_for("waiting_for_review") for w in watchers[:3]))
            started = time.monotonic()
            server.signal(signal.SIGTERM)
            code = await asyncio.to_thread(server.wait, 15)
            elapsed = time.monotonic() - started
            for watcher in watchers:
                await watcher.ended(2)
    finally:
        server.stop()
    assert code == 0, server.log()
    assert elapsed < 4, f"shutdown took {elapsed:.1f}s on {python}"
    assert "Traceback" not in server.log()
    assert all(w.retry == 3000 for w in watchers)  # browsers will come back


async def test_sigint_does_not_wait_for_a_processor_blocking_its_thread(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    server = ServerProcess(tmp_path / "hitl.db", env={"HITL_TEST_GATE": str(gate)},
                           extra=["--processor", "tests.procs:gated", "--shutdown-timeout", "30"]
                           ).start()
    try:
        httpx.post(server.url + "/submit", json={"data": "hold on"}).raise_for_status()
        await asyncio.sleep(0.3)
        started = time.monotonic()
        server.signal(signal.SIGINT)
        code = await asyncio.to_thread(server.wait, 10)
        assert time.monotonic() - started < 3
        assert code == 0 and "abandoning 1 running processor" in server.log()
        assert "Traceback" not in server.log()
    finally:
        server.stop()


def test_bad_settings_stop_start_up_with_one_line(tmp_path: Path) -> None:
    result = run_cli("serve", "--db", str(tmp_path / "x.db"), "--port", "abc")
    assert result.returncode == 2
    assert result.stderr.strip() == "hitl: error: --port='abc' is not a valid port number: " \
                                    "invalid literal for int() with base 10: 'abc'"
    env_result = run_cli("serve", "--db", ":memory:", "--processor", "no.such:thing")
    assert env_result.returncode == 2 and "cannot load processor" in env_result.stderr
    assert "Traceback" not in result.stderr + env_result.stderr


@pytest.mark.parametrize("problem", ["missing directory", "read-only", "corrupt", "future"])
def test_unusable_database_stops_start_up_cleanly(tmp_path: Path, problem: str) -> None:
    db = tmp_path / "hitl.db"
    if problem == "missing directory":
        db = tmp_path / "nope" / "hitl.db"
    elif problem == "read-only":
        assert run_cli("tasks", "list", "--db", str(db)).returncode == 0  # creates it
        db.chmod(0o444)
        tmp_path.chmod(0o555)
        if os.geteuid() == 0:  # root ignores file modes: open it read-only instead
            db = Path(f"file:{db}?mode=ro")
    elif problem == "corrupt":
        db.write_bytes(b"this is not a database" * 100)
    else:
        with contextlib.closing(sqlite3.connect(db)) as conn, conn:
            conn.execute("CREATE TABLE schema_version (version INTEGER)")
            conn.execute("INSERT INTO schema_version VALUES (99)")
    try:
        result = run_cli("serve", "--db", str(db), "--port", "0")
    finally:
        tmp_path.chmod(0o755)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"hitl: error: cannot use database '{db}'") or \
        "newer than this hitl" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


async def test_a_second_signal_exits_at_once_when_shutdown_is_stuck(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "hitl.db", extra=["--shutdown-timeout", "30"]).start()
    blocker = sqlite3.connect(server.db, timeout=0)
    try:
        blocker.execute("BEGIN EXCLUSIVE")  # the journal's next commit now waits (busy_timeout)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            stuck = asyncio.create_task(http.post("/submit", json={"data": "stuck"}))
            await asyncio.sleep(0.3)
            server.signal(signal.SIGTERM)  # shutdown waits for the queued write
            await asyncio.sleep(0.5)
            assert server.proc is not None and server.proc.poll() is None
            started = time.monotonic()
            server.signal(signal.SIGTERM)
            code = await asyncio.to_thread(server.wait, 5)
            assert time.monotonic() - started < 1
            assert code == 128 + signal.SIGTERM
            stuck.cancel()
    finally:
        blocker.rollback()
        blocker.close()
        server.stop()
    assert "second signal: exiting at once" in server.log()
