"""The ``hitl`` command: its help, and the task commands over a database."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from hitl.config import SETTINGS, default_db_path, default_of, env_var
from hitl.models import Review, Status, Task
from hitl.store import Store, Write

from .serverproc import run_cli


def write_tasks(db: Path, *tasks: Task) -> None:
    async def write() -> None:
        store = Store(str(db))
        await store.open()
        await store.write([Write(task.row(), None, review)
                           for task in tasks for review in (task.reviews or [None])])
        await store.close()

    asyncio.run(write())


def test_tasks_list_shows_one_short_line_per_task(tmp_path: Path) -> None:
    db = tmp_path / "hitl.db"
    write_tasks(db, Task("a" * 32, "first line\nsecond " + "x" * 200_000, Status.COMPLETED,
                         processed_output="the output " + "y" * 200_000))
    result = run_cli("tasks", "list", "--db", str(db))
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    assert line.startswith("a" * 32) and "completed" in line
    assert "first line second xxx" in line and "→ the output yyy" in line
    assert len(line) < 250 and line.count("…") == 2


def test_serve_help_lists_each_option_once_with_its_variable_and_default() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    options = " ".join(result.stdout.split("options:", 1)[1].split())  # after the usage
    for setting in SETTINGS:
        flag = "--" + setting.name.replace("_", "-")
        default = default_db_path() if setting.name == "db" else default_of(setting.name)
        assert options.count(f"{flag} ") == 1, flag
        assert options.count(env_var(setting.name)) == 1, setting.name
        assert f"default {'off' if default is None else default}" in options, setting.name
    assert "flags win over environment variables" in options


def test_tasks_show_prints_the_whole_task_as_json(tmp_path: Path) -> None:
    db = tmp_path / "hitl.db"
    task = Task("b" * 32, "x" * 5_000, Status.COMPLETED, processed_output="y" * 5_000,
                reviews=[Review("approved", 1, "fine", "ann")])
    write_tasks(db, task)
    shown = json.loads(run_cli("tasks", "show", task.task_id, "--db", str(db)).stdout)
    assert shown["task_input"] == task.task_input and shown["reviews"][0]["reviewer"] == "ann"
