"""``hitl submit|watch|approve|reject|cancel|wait|next``: each a real subprocess against a
real ``hitl serve``, with its output and its exit status."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hitl.accounts import Role
from hitl.cli import build_parser
from hitl.client import Client, Task

from .clients import start_people_server
from .serverproc import ROOT, ServerProcess, free_port
from .test_docs import README

BOUND = 30  # seconds any one command may take


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path_factory.mktemp("cli") / "hitl.db",
                           extra=["--heartbeat", "0.2"]).start()
    yield server
    server.stop()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.url) as client:
        yield client


def environment(**variables: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items()
           if name not in ("HITL_URL", "HITL_TOKEN")}
    return {**env, "PYTHONPATH": str(ROOT), **variables}


def hitl(*args: str, url: str | None = None, stdin: str | None = None,
         **variables: str) -> subprocess.CompletedProcess[str]:
    """``hitl ARGS`` (with ``--url url`` when given), its output and exit status."""
    command = [sys.executable, "-m", "hitl", *args, *(["--url", url] if url else [])]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=BOUND,
                          input=stdin, env=environment(**variables))


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed command writes: ``hitl: ...``, never a traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hitl: "), result.stderr
    return lines[0]


def waiting(client: Client, task_id: str, attempt: int = 1) -> Task:
    for _ in range(500):
        task = client.get(task_id)
        if task.status == "waiting_for_review" and task.attempt == attempt:
            return task
        time.sleep(0.02)
    raise AssertionError(f"task {task_id} never waited for review of attempt {attempt}")


def test_submit_prints_the_task_id_and_passes_its_options(server: ServerProcess,
                                                           client: Client) -> None:
    result = hitl("submit", "draft a reply", "--title", "Reply", "--reviewer", "ann",
                  "--reviewer", "group:legal", "--quorum", "1", "--metadata", '{"ticket": 7}',
                  "--max-attempts", "2", url=server.url)
    assert result.returncode == 0, result.stderr
    task = client.get(result.stdout.strip())
    assert (task.task_input, task.title, task.reviewers, task.metadata) == (
        "draft a reply", "Reply", ("ann", "group:legal"), {"ticket": 7})
    assert task.raw["max_attempts"] == 2
    client.cancel(task.task_id)


def test_submit_dash_reads_the_input_from_standard_input(server: ServerProcess,
                                                         client: Client) -> None:
    result = hitl("submit", "-", url=server.url, stdin="line one\nline two\n")
    assert result.returncode == 0, result.stderr
    assert client.get(result.stdout.strip()).task_input == "line one\nline two\n"
    both = hitl("submit", "-", "--output", "-", url=server.url, stdin="x")
    assert both.returncode == 2
    assert one_error_line(both) == "hitl: standard input (-) can be read only once"


def test_watch_prints_one_line_per_event_until_the_task_ends(server: ServerProcess,
                                                             client: Client) -> None:
    task = waiting(client, client.submit("watch me").task_id)
    watch = subprocess.Popen([sys.executable, "-m", "hitl", "watch", task.task_id, "--since",
                              "0", "--url", server.url], cwd=ROOT, env=environment(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert watch.stdout is not None
        lines = [watch.stdout.readline() for _ in range(3)]  # the replay, as it comes
        approved = hitl("approve", task.task_id, "-m", "looks right", url=server.url)
        assert approved.returncode == 0 and approved.stdout == "", approved.stderr
        rest, errors = watch.communicate(timeout=BOUND)
    finally:
        watch.kill()
    assert watch.returncode == 0, errors
    lines += rest.splitlines(keepends=True)
    ids, statuses, data = zip(*(line.rstrip("\n").split(" ", 2) for line in lines),
                              strict=True)
    assert ids == ("1", "2", "3", "4", "5")
    assert statuses == ("pending", "running", "waiting_for_review", "processing_feedback",
                        "completed")
    assert json.loads(data[3])["comment"] == "looks right"
    assert json.loads(data[4])["final_result"] == task.processed_output


def test_approve_with_an_edit_file_and_wait_prints_the_result(
        server: ServerProcess, client: Client, tmp_path: Path) -> None:
    task = waiting(client, client.submit("draft").task_id)
    edit = tmp_path / "edit.txt"
    edit.write_text("Dear Ann,\nyes.\n")
    assert hitl("approve", task.task_id, "--edit", str(edit), url=server.url).returncode == 0
    result = hitl("wait", task.task_id, "--timeout", "20", url=server.url)
    assert (result.returncode, result.stdout) == (0, "Dear Ann,\nyes.\n\n"), result.stderr
    missing = hitl("approve", task.task_id, "--edit", str(tmp_path / "nope"), url=server.url)
    assert missing.returncode == 1 and "No such file or directory" in one_error_line(missing)


def test_reject_needs_a_comment_and_runs_the_next_attempt(server: ServerProcess,
                                                          client: Client) -> None:
    task = waiting(client, client.submit("a haiku").task_id)
    bare = hitl("reject", task.task_id, url=server.url)
    assert bare.returncode == 2 and "-m/--comment" in bare.stderr
    assert hitl("reject", task.task_id, "-m", "shorter", url=server.url).returncode == 0
    second = waiting(client, task.task_id, attempt=2)
    assert "revised for the comment 'shorter'" in (second.processed_output or "")
    stale = hitl("approve", task.task_id, "--attempt", "1", url=server.url)
    assert stale.returncode == 1
    assert one_error_line(stale) == ("hitl: attempt 1 is no longer under review (attempt 2 "
                                     "is)")
    client.cancel(task.task_id)


def test_wait_exits_1_for_a_failed_or_cancelled_task(server: ServerProcess,
                                                      client: Client) -> None:
    failing = waiting(client, client.submit("once only", max_attempts=1).task_id)
    client.reject(failing.task_id, "no")
    failed = hitl("wait", failing.task_id, url=server.url)
    assert failed.returncode == 1 and failed.stdout == ""
    assert one_error_line(failed).startswith(f"hitl: task {failing.task_id} failed: ")
    cancelled = client.submit("never mind")
    assert hitl("cancel", cancelled.task_id, url=server.url).returncode == 0
    result = hitl("wait", cancelled.task_id, url=server.url)
    assert result.returncode == 1
    assert one_error_line(result) == f"hitl: task {cancelled.task_id} was cancelled"


def test_wait_exits_3_when_it_times_out_or_the_service_is_unreachable(
        server: ServerProcess, client: Client) -> None:
    task = waiting(client, client.submit("nobody reviews this").task_id)
    late = hitl("wait", task.task_id, "--timeout", "0.5", url=server.url)
    assert late.returncode == 3
    assert one_error_line(late) == f"hitl: task {task.task_id} did not finish within 0.5 s"
    client.cancel(task.task_id)
    nowhere = f"http://127.0.0.1:{free_port()}"
    away = hitl("wait", task.task_id, url=nowhere)
    assert away.returncode == 3
    assert one_error_line(away).startswith(f"hitl: cannot reach hitl at {nowhere}: ")


def test_next_prints_the_task_reserved_and_exits_1_when_none_waits(
        server: ServerProcess, client: Client) -> None:
    while (left := client.next_review()) is not None:  # what other tests left waiting
        client.cancel(left.task_id)
    task = waiting(client, client.submit("review me next").task_id)
    result = hitl("next", url=server.url)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["task_id"] == task.task_id and shown["processed_output"] == task.processed_output
    client.approve(task.task_id)
    client.wait(task.task_id, timeout=BOUND)
    empty = hitl("next", url=server.url)
    assert (empty.returncode, empty.stdout) == (1, "")
    assert one_error_line(empty) == "hitl: no task waits for your review"


def test_a_refusal_is_the_servers_message_on_one_line(server: ServerProcess) -> None:
    result = hitl("approve", "nope", url=server.url)
    assert result.returncode == 1 and result.stdout == ""
    assert one_error_line(result) == "hitl: no task with id 'nope'"
    empty = hitl("submit", "  ", url=server.url)
    assert (empty.returncode, one_error_line(empty)) == (1, "hitl: data: must not be empty")


def test_url_and_token_come_from_the_flags_or_the_environment(tmp_path: Path) -> None:
    server, tokens = start_people_server(tmp_path / "hitl.db", {"sam": (Role.SUBMITTER, ()),
                                                               "rita": (Role.REVIEWER, ())})
    try:
        submitted = hitl("submit", "from the environment", HITL_URL=server.url,
                         HITL_TOKEN=tokens["sam"])
        assert submitted.returncode == 0, submitted.stderr
        task_id = submitted.stdout.strip()
        refused = hitl("approve", task_id, HITL_URL=server.url, HITL_TOKEN=tokens["sam"])
        assert one_error_line(refused) == "hitl: submitters decide nothing"
        flagged = hitl("approve", task_id, "--token", tokens["rita"], url=server.url,
                       HITL_TOKEN=tokens["sam"])  # the flag wins
        assert flagged.returncode == 0, flagged.stderr
        anonymous = hitl("wait", task_id, url=server.url)
        assert anonymous.returncode == 1
        assert one_error_line(anonymous).startswith("hitl: sign in first")
        done = hitl("wait", task_id, url=server.url, HITL_TOKEN=tokens["sam"])
        assert done.returncode == 0 and "from the environment" in done.stdout
    finally:
        server.stop()


def test_tasks_list_still_reads_the_database_it_is_given(server: ServerProcess,
                                                         client: Client) -> None:
    task = client.submit("kept in the file")
    result = hitl("tasks", "list", "--db", str(server.db))
    assert result.returncode == 0, result.stderr
    assert any(line.startswith(task.task_id) and "kept in the file" in line
               for line in result.stdout.splitlines())
    client.cancel(task.task_id)


def test_submit_output_makes_a_review_only_task(server: ServerProcess, client: Client) -> None:
    result = hitl("submit", "ticket 9", "--output", "-", url=server.url, stdin="my draft\n")
    assert result.returncode == 0, result.stderr
    task = client.get(result.stdout.strip())
    assert (task.status, task.processed_output) == ("waiting_for_review", "my draft\n")
    client.cancel(task.task_id)


def test_every_command_the_readme_shows_parses() -> None:
    section = README.split("## Python client and command line\n", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```sh\n(.+?)```", section, re.S)[0]
    lines = [line.split("  #")[0].strip() for line in block.splitlines()]
    parser = build_parser()
    for line in lines:
        command = line[line.index("hitl ") + len("hitl "):].removesuffix(")")
        parser.parse_args(shlex.split(command.replace('"$id"', "ID")))  # else: exit 2
    assert len(lines) == 7


def test_input_that_is_not_utf8_is_a_usage_error_naming_it(server: ServerProcess,
                                                           tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe")
    command = [sys.executable, "-m", "hitl"]
    with bad.open("rb") as stdin:
        piped = subprocess.run([*command, "submit", "-", "--url", server.url], stdin=stdin,
                               cwd=ROOT, capture_output=True, text=True, timeout=BOUND,
                               env=environment())
    assert (piped.returncode, one_error_line(piped)) == (
        2, "hitl: standard input: not UTF-8 text")
    edited = hitl("approve", "a" * 32, "--edit", str(bad), url=server.url)
    assert (edited.returncode, one_error_line(edited)) == (2, f"hitl: {bad}: not UTF-8 text")


@pytest.mark.parametrize(("flag", "variables"), [
    ([], {"HITL_URL": "notaurl"}), (["--url", "ftp://example.com"], {}),
    (["--url", "http://"], {}), (["--url", "http://host:port"], {})])
def test_a_url_that_is_not_one_is_a_usage_error_not_unreachable(
        flag: list[str], variables: dict[str, str]) -> None:
    result = hitl("next", *flag, **variables)
    given = "HITL_URL 'notaurl'" if variables else f"--url {flag[1]!r}"
    assert (result.returncode, one_error_line(result)) == (
        2, f"hitl: {given} is not an http:// or https:// URL")
