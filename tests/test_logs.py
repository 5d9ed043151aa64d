"""``--log-format``: readable text by default; with ``json``, every line a real ``hitl
serve`` writes to stderr is one JSON object, naming the task when it concerns one."""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from hitl.logs import JsonFormatter, current_task

from .serverproc import ServerProcess, run_cli

FIELDS = {"time", "level", "logger", "message", "process"}


def json_lines(path: Path, pid: int) -> list[dict[str, Any]]:
    """Every line of ``path``, each of which must be a JSON object with the fields."""
    lines = path.read_text().splitlines()
    assert lines, "nothing was logged"
    entries = []
    for line in lines:
        entry = json.loads(line)  # raises on any line that is not JSON
        assert isinstance(entry, dict) and FIELDS <= entry.keys(), line
        assert datetime.fromisoformat(entry["time"]).utcoffset().total_seconds() == 0, line
        assert entry["process"] == pid and entry["level"] in ("debug", "info", "warning",
                                                              "error", "critical"), line
        entries.append(entry)
    return entries


def wait_status(server: ServerProcess, task_id: str, status: str) -> None:
    deadline = time.monotonic() + 10
    while httpx.get(f"{server.url}/api/tasks/{task_id}").json()["status"] != status:
        assert time.monotonic() < deadline, f"task {task_id} never became {status}"
        time.sleep(0.02)


def stopped(server: ServerProcess) -> None:
    server.signal(signal.SIGTERM)
    assert server.wait(15) == 0


def test_json_logs_are_one_object_a_line_and_name_the_task(tmp_path: Path) -> None:
    db = tmp_path / "hitl.db"
    options = ["--log-format", "json", "--processor", "tests.procs:logged"]
    first = ServerProcess(db, extra=options, stderr=tmp_path / "first.err").start()
    try:
        task_id = httpx.post(f"{first.url}/submit", json={"data": "x"}).json()["task_id"]
        wait_status(first, task_id, "waiting_for_review")
        stopped(first)
    finally:
        first.stop()
    assert first.proc is not None
    entries = json_lines(tmp_path / "first.err", first.proc.pid)
    assert any(entry["logger"] == "hypercorn.error" and "Running on" in entry["message"]
               for entry in entries), "hypercorn's own lines go through the same formatter"
    [processing] = [entry for entry in entries if entry["logger"] == "tests.procs"]
    assert processing["task_id"] == task_id  # from the processor's thread, inside the flow
    assert processing["message"] == "processing attempt 1"
    assert any("shutting down" in entry["message"] for entry in entries)

    again = ServerProcess(db, extra=options, stderr=tmp_path / "again.err").start()
    try:
        stopped(again)
    finally:
        again.stop()
    assert again.proc is not None
    entries = json_lines(tmp_path / "again.err", again.proc.pid)
    [resumed] = [entry for entry in entries if entry["message"].startswith("resuming task")]
    assert resumed["task_id"] == task_id and resumed["logger"] == "hitl.runner"
    assert all("task_id" not in entry for entry in entries if entry is not resumed)


def test_text_logs_stay_readable_by_default(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "hitl.db", stderr=tmp_path / "text.err").start()
    try:
        stopped(server)
    finally:
        server.stop()
    lines = (tmp_path / "text.err").read_text().splitlines()
    assert lines and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ", line)
                         for line in lines), lines
    assert any(" INFO hitl.cli: hitl on http://127.0.0.1:" in line for line in lines)


def test_a_bad_log_format_stops_start_up_with_one_line(tmp_path: Path) -> None:
    result = run_cli("serve", "--log-format", "xml", "--db", str(tmp_path / "hitl.db"))
    assert result.returncode == 2
    assert result.stderr == ("hitl: error: --log-format='xml' is not a valid log format: "
                             "must be one of text, json\n")


def record(message: str, **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("hitl.test", logging.WARNING, __file__, 1, message, (), None)
    record.__dict__.update(extra)
    return record


def test_a_record_names_its_task_from_extra_or_the_flow_context() -> None:
    formatter = JsonFormatter()
    assert "task_id" not in json.loads(formatter.format(record("plain")))
    assert json.loads(formatter.format(record("about", task_id="t1")))["task_id"] == "t1"
    token = current_task.set("t2")
    try:
        assert json.loads(formatter.format(record("in a flow")))["task_id"] == "t2"
        assert json.loads(formatter.format(record("named", task_id="t3")))["task_id"] == "t3"
    finally:
        current_task.reset(token)


def test_a_traceback_is_text_in_the_same_line() -> None:
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        failing = record("failed: %s")
        failing.args = ("it",)
        failing.exc_info = sys.exc_info()
    line = JsonFormatter().format(failing)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "failed: it" and entry["level"] == "warning"
    assert entry["exc_info"].startswith("Traceback") and "ValueError: bad" in entry["exc_info"]
    assert datetime.fromisoformat(entry["time"]).tzinfo == UTC
