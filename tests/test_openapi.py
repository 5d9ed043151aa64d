"""``/openapi.json`` describes every endpoint, and a live server answers as it says.

The unit tests hold every URL rule (and the two plain-ASGI streams) to documented answers,
so a route added without them fails here. The schemathesis runs fuzz a real ``hitl
serve`` (a subprocess on a free loopback port) with a bounded number of examples per
operation, once with sign-in off and once as a token's user, and fail on any server
error, undocumented status, wrong content type or body that breaks its schema.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from quart import Quart

from hitl import Config, create_app
from hitl.errors import API_BLUEPRINTS

from .serverproc import ROOT, ServerProcess, run_cli

SCHEMATHESIS = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or \
    shutil.which("schemathesis")
STREAMS = ("/stream", "/stream/{task_id}")
# What each run checks (schemathesis 4's names). Left out: positive_data_acceptance (a valid
# body for a task that does not exist is rightly a 404) and the checks that need links
# between operations.
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_headers_conformance,response_schema_conformance,"
          "negative_data_rejection,missing_required_header,unsupported_method,"
          "allow_header_conformance")
# Bounded: a few examples per operation, a stream read for one event or half a second. A
# body too large is rightly refused with a 413 (schemathesis expects 4xx codes without it).
# A browser form is text read leniently, as browsers send it: an empty field is not given,
# a repeated one is read once, and a token's caller needs no csrf_token; so "invalid" form
# bodies are not held to a 4xx (their server errors, codes and bodies still are).
SETTINGS = """
max-stream-events = 1
[checks.negative_data_rejection]
expected-statuses = [400, 401, 403, 404, 405, 409, 413, 415, 422, 429]
[[operations]]
include-path-regex = "stream"
request-timeout = 0.5
generation.max-examples = 3
[[operations]]
include-method = "POST"
include-path-regex = "^/(tasks|login|logout)"
checks.negative_data_rejection.enabled = false
"""


async def spec_of(app: Quart) -> dict[str, Any]:
    async with app.test_app():
        response = await app.test_client().get("/openapi.json")
        assert response.status_code == 200
        return dict(await response.get_json())


def openapi_path(rule: str) -> str:
    return re.sub(r"<(?:[^:<>]*:)?([^<>]+)>", r"{\1}", rule)


def undocumented(app: Quart, spec: dict[str, Any]) -> list[str]:
    """Each method and rule of ``app`` that ``spec`` leaves out, or documents without its
    recorded answers (``hitl.openapi.answers``: a success, and the errors with the edge's)."""
    missing = []
    for rule in app.url_map.iter_rules():
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            operation = spec["paths"].get(openapi_path(rule.rule), {}).get(method.lower())
            codes = set(operation["responses"]) if operation else set()
            if "400" not in codes or not any(code < "400" for code in codes):
                missing.append(f"{method} {rule.rule}")
    return missing


async def test_every_rule_is_documented_with_its_answers(config: Config) -> None:
    """A route added without its answers fails here (and so does a stream left out)."""
    app = create_app(config)
    spec = await spec_of(app)
    assert undocumented(app, spec) == []
    for path in STREAMS:
        assert "text/event-stream" in spec["paths"][path]["get"]["responses"]["200"]["content"]


async def test_a_route_without_its_answers_is_caught(config: Config) -> None:
    app = create_app(config)

    @app.get("/api/added")
    async def added() -> dict[str, str]:
        """A route someone forgot to document."""
        return {}

    assert undocumented(app, await spec_of(app)) == ["GET /api/added"]


async def test_api_errors_are_documented_as_the_error_schema(config: Config) -> None:
    app = create_app(config)
    assert set(app.blueprints) <= {*API_BLUEPRINTS, "pages", "auth"}, "JSON or pages?"
    spec = await spec_of(app)
    endpoints = {openapi_path(rule.rule): rule.endpoint for rule in app.url_map.iter_rules()}
    for path, operations in spec["paths"].items():
        blueprint = endpoints.get(path, "api.").partition(".")[0]
        if blueprint not in API_BLUEPRINTS:
            continue
        for method, operation in operations.items():
            for code, answer in operation["responses"].items():
                if code >= "400" and not (path == "/healthz" and code == "503"):
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorOut"}, \
                        f"{method} {path} {code}"
    assert spec["components"]["schemas"]["ErrorOut"]["required"] == ["error"]


async def test_headers_and_streams_are_described(config: Config) -> None:
    paths = (await spec_of(create_app(config)))["paths"]
    submit = paths["/submit"]["post"]
    assert {"idempotency-key"} <= {p["name"].lower() for p in submit["parameters"]}
    assert {"202", "409", "413", "415"} <= set(submit["responses"])
    stream = paths["/stream/{task_id}"]["get"]
    assert {("header", "Last-Event-ID"), ("path", "task_id")} <= {
        (p["in"], p["name"]) for p in stream["parameters"]}
    assert "404" in stream["responses"]
    assert "text/event-stream" in paths["/tasks/{task_id}/stream"]["get"]["responses"][
        "200"]["content"]
    form = paths["/tasks/{task_id}/decision"]["post"]["requestBody"]["content"]
    assert "feedback" in form["application/x-www-form-urlencoded"]["schema"]["properties"]
    assert set(paths["/api/queue/next"]["post"]["responses"]) >= {"200", "204"}


async def test_security_follows_the_sign_in_mode(config: Config, tmp_path: Path) -> None:
    """Tokens and sessions with sign-in on; nothing to present with ``--auth none``."""
    assert "security" not in await spec_of(create_app(config))
    signed = await spec_of(create_app(Config(db=str(tmp_path / "s.db"), auth="accounts")))
    assert signed["security"] == [{"bearer": []}, {"session": []}]
    assert signed["components"]["securitySchemes"]["bearer"] == {"type": "http",
                                                                 "scheme": "bearer"}
    assert signed["paths"]["/healthz"]["get"]["security"] == []  # public
    assert "401" in signed["paths"]["/api/tasks"]["get"]["responses"]


# --- against a live server ---------------------------------------------------------------


@dataclass
class Run:
    """One schemathesis run against its own ``hitl serve``, started in the background."""

    server: ServerProcess
    proc: subprocess.Popen[str]
    started: float = field(default_factory=time.monotonic)

    def result(self) -> tuple[int, str, float]:
        """The exit code, what it printed, and how long it took (bounded by a timeout)."""
        try:
            output, _ = self.proc.communicate(timeout=120)  # ~15 s each on an idle machine
        except subprocess.TimeoutExpired:
            self.proc.kill()
            output, _ = self.proc.communicate()
        return self.proc.returncode, output, time.monotonic() - self.started


def token_for(db: Path) -> str:
    """An admin's API token, made as an operator would (``hitl users add``, ``tokens``)."""
    assert run_cli("users", "add", "ops", "--role", "admin", "--db", str(db)).returncode == 0
    made = run_cli("tokens", "create", "--user", "ops", "--db", str(db))
    assert made.returncode == 0, made.stderr
    return made.stdout.strip().splitlines()[-1]


def seed_tasks(server: ServerProcess, headers: dict[str, str]) -> None:
    """Tasks to find: lists, pages, streams and claims then answer with bodies, not only
    404s (a review-only task waits for review whichever the processor)."""
    for task in ({"data": "review me"}, {"data": "and me", "output": "a draft"}):
        response = httpx.post(f"{server.url}/submit", json=task, headers=headers, timeout=5)
        assert response.status_code == 202, response.text


def fuzz(auth: str, processor: str, directory: Path) -> Run:
    """``hitl serve --auth AUTH --processor PROCESSOR`` holding two tasks, and schemathesis
    started against it: with sign-in on, as an admin's token (and a request without it
    must be refused)."""
    directory.mkdir()
    server = ServerProcess(directory / "hitl.db",
                           env={"HITL_AUTH": auth, "HITL_PROCESSOR": processor}).start()
    headers, checks = {}, CHECKS
    if auth != "none":
        headers, checks = {"Authorization": f"Bearer {token_for(server.db)}"}, \
            CHECKS + ",ignored_auth"
    seed_tasks(server, headers)
    (directory / "schemathesis.toml").write_text(SETTINGS)
    assert SCHEMATHESIS is not None, "schemathesis is in the test extra"
    command = [SCHEMATHESIS, "--config-file", "schemathesis.toml", "--no-color", "run",
               f"{server.url}/openapi.json", "--checks", checks, "--max-examples", "4",
               "--phases", "coverage,fuzzing", "--request-timeout", "5", "--no-shrink",
               "--workers", "1",  # its threads trip a race in Python 3.11's ast module
               "--seed", "20261202",  # reproducible: the same examples on every run
               "--warnings", "off", "--output-truncate", "true"]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    env = {**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command, cwd=directory, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env)
    return Run(server, proc)


def failures(output: str) -> str:
    """schemathesis's report of what failed (and its summary), each line cut short."""
    lines = output[output.find("FAILURES"):].splitlines() if "FAILURES" in output else \
        output.splitlines()[-40:]
    return "\n".join(line[:300] for line in lines if line.strip())[-8000:]


@pytest.mark.slow
def test_a_live_server_answers_as_documented(tmp_path: Path) -> None:
    """schemathesis, bounded, with sign-in off (in-process processing) and on (external
    workers' jobs to claim), both at once: no 5xx, only documented codes, content types,
    headers and bodies."""
    runs: dict[str, Run] = {}
    try:
        for auth, processor in (("none", "hitl.processors:simulate"), ("accounts", "external")):
            runs[auth] = fuzz(auth, processor, tmp_path / auth)
        for auth, run in runs.items():
            code, output, took = run.result()
            log = run.server.log()[-3000:]
            assert code == 0, (f"--auth {auth}: schemathesis failed after {took:.0f} s:\n"
                               f"{failures(output)}\n{log}")
            spec = httpx.get(f"{run.server.url}/openapi.json").json()
            operations = sum(map(len, spec["paths"].values())) - 1  # less the document
            assert re.search(rf"Tested:\s+{operations}\b", output), failures(output)
            assert "Traceback" not in run.server.log(), log
    finally:
        for run in runs.values():
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.communicate()
            run.server.stop()
