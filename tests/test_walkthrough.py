"""The README's curl walk-through, run as written against a live server, so it cannot rot."""

from __future__ import annotations

import asyncio
import os
import re
import shutil

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
    return config.with_changes(heartbeat=0.2)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is missing")
async def test_the_readme_walkthrough_runs_as_written(live_server: LiveServer) -> None:
    script = walkthrough()
    assert HITL_LINE.search(script), "the walk-through sets HITL=http://127.0.0.1:8000 first"
    commands = [line for line in HITL_LINE.sub("", script).splitlines()
                if not line.lstrip().startswith("#")]
    assert not [line for line in commands if "8000" in line or "…" in line]  # nothing to edit
    script = HITL_LINE.sub(f"HITL={live_server.url}", script, count=1)
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LC_ALL": "C.UTF-8"})
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
    output = out.decode()
    assert proc.returncode == 0, output + err.decode()
    assert "Feedback 'rejected' received" in output and "Feedback 'approved' received" in output
    assert '"status":"waiting_for_review"' in output and '"attempt":2' in output
    async with live_server.http() as http:
        [task] = (await http.get("/api/tasks")).json()["tasks"]
        assert task["task_id"] in output
        for _ in range(200):
            task = (await http.get(f"/api/tasks/{task['task_id']}")).json()
            if task["status"] == "completed":
                break
            await asyncio.sleep(0.05)
    assert task["status"] == "completed", task
    assert [(r["decision"], r["attempt"]) for r in task["reviews"]] == [("rejected", 1),
                                                                       ("approved", 2)]
