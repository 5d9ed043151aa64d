"""The README's curl walk-through, run as written against a live server, so it cannot rot."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from hitl import Config

from .conftest import LiveServer
from .test_docs import README

HITL_LINE = re.compile(r"^HITL=http://127\.0\.0\.1:8000\b", re.MULTILINE)


def walkthrough() -> str:
    """The first ``sh`` block of the README's walk-through section."""
    section = README.split("## Walk-through with curl", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```sh\n(.+?)\n```", section, re.DOTALL)
    assert match, "the walk-through has no sh block"
    return match[1]


@pytest.fixture
def config(config: Config) -> Config:
    # A short heartbeat: a watch that grep has stopped reading notices at its next write.
    # Sign-in on, as `hitl serve` runs by default: the walk-through makes its own tokens.
    return config.with_changes(heartbeat=0.2, auth="accounts")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is missing")
async def test_the_readme_walkthrough_runs_as_written(live_server: LiveServer) -> None:
    script = walkthrough()
    assert HITL_LINE.search(script), "the walk-through sets HITL=http://127.0.0.1:8000 first"
    commands = [line for line in HITL_LINE.sub("", script).splitlines()
                if not line.lstrip().startswith("#")]
    assert not [line for line in commands if "8000" in line or "…" in line]  # nothing to edit
    script = HITL_LINE.sub(f"HITL={live_server.url}", script, count=1)
    # Its `hitl` commands run on the server's database, as they would on the server's machine.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", script, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LC_ALL": "C.UTF-8", "HITL_DB": live_server.app.config["HITL"].db,
             "PATH": path})
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
    output = out.decode()
    assert proc.returncode == 0, output + err.decode()
    assert "Feedback 'rejected' received" in output and "Feedback 'approved' received" in output
    assert '"status":"waiting_for_review"' in output and '"attempt":2' in output
    store = live_server.app.extensions["store"]
    [row], _ = await store.list_tasks()
    assert row.task_id in output and row.submitted_by == "bot"
    for _ in range(200):
        task = await store.get_task(row.task_id)
        if task.status == "completed":
            break
        await asyncio.sleep(0.05)
    assert task.status == "completed", task
    assert [(r.decision, r.attempt, r.reviewer, r.auth_method, r.token_label)
            for r in task.reviews] == [("rejected", 1, "ann", "token", "walk-through"),
                                       ("approved", 2, "ann", "token", "walk-through")]
