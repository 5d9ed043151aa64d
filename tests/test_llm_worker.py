"""examples/llm_worker.py as a real ``hitl worker`` process, against a local stand-in for an
OpenAI-compatible chat endpoint that streams its answer as the real ones do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from examples import llm_worker
from hitl import Config
from hitl.models import Review
from hitl.processors import Job
from tests.conftest import LiveServer, ReviewActions
from tests.serverproc import ROOT

pytestmark = pytest.mark.slow  # a worker process

WORDS = "Dear team, the release moves to Friday because the tests found a bug .".split()


class ChatStandIn(ThreadingHTTPServer):
    """``POST /v1/chat/completions`` with ``stream: true``: the answer a word per SSE chunk,
    ``TOKEN_GAP`` seconds apart, then ``data: [DONE]``. Keeps every request's messages."""

    TOKEN_GAP = 0.04

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ChatHandler)
        self.requests: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class ChatHandler(BaseHTTPRequestHandler):
    server: ChatStandIn

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        if self.path != "/v1/chat/completions" or body.get("stream") is not True:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()  # HTTP/1.0: the stream ends when the connection closes
        attempt = len(self.server.requests)
        for at, word in enumerate([*WORDS, f"(draft {attempt})"]):
            chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0,
                     "model": body["model"], "choices": [{
                         "index": 0, "finish_reason": None,
                         "delta": {"content": word if at == 0 else " " + word}}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
            threading.Event().wait(self.server.TOKEN_GAP)
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass


@pytest.fixture
def chat() -> Iterator[ChatStandIn]:
    server = ChatStandIn()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(db=str(tmp_path / "hitl.db"), process_delay=0, retry_wait=0, auth="none",
                  processor="external")


@pytest.fixture
def worker(live_server: LiveServer, chat: ChatStandIn,
           tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENAI_BASE_URL": chat.url,
           "OPENAI_API_KEY": "test-key", "HITL_LLM_MODEL": "stand-in-1"}
    with open(tmp_path / "worker.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hitl", "worker", "--url", live_server.url,
             "--processor", "examples.llm_worker:process", "--name", "llm"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    yield proc
    proc.terminate()
    assert proc.wait(15) == 0, (tmp_path / "worker.log").read_text()


async def test_streams_tokens_and_puts_every_comment_in_the_next_prompt(
        actions: ReviewActions, chat: ChatStandIn, worker: subprocess.Popen[bytes]) -> None:
    task_id = await actions.submit("Tell the team the release moves to Friday.")
    watcher = actions.watch(task_id, last_id=0)
    first = await watcher.wait_for("waiting_for_review", timeout=20, attempt=1)
    draft = " ".join([*WORDS, "(draft 1)"])
    assert first.data["output_to_review"] == draft
    partials = [e.data["partial_output"] for e in watcher.events
                if e.data.get("status") == "running" and e.data.get("partial_output")]
    assert partials, f"no partial output reached the watcher: {watcher.statuses()}"
    assert all(draft.startswith(partial) for partial in partials)
    assert len(partials) < len(WORDS), "every token was sent: the reports were not coalesced"

    assert (await actions.reject(task_id, "Say which bug.", attempt=1,
                                 reviewer="ann")).status_code == 200
    await watcher.wait_for("waiting_for_review", timeout=20, attempt=2)
    assert (await actions.reject(task_id, "Shorter, please.", attempt=2,
                                 reviewer="bob")).status_code == 200
    third = await watcher.wait_for("waiting_for_review", timeout=20, attempt=3)
    assert third.data["output_to_review"].endswith("(draft 3)")

    assert [r["model"] for r in chat.requests] == ["stand-in-1"] * 3
    prompts = [r["messages"][-1]["content"] for r in chat.requests]
    assert "Say which bug." not in prompts[0]
    assert "Say which bug." in prompts[1] and "ann" in prompts[1]
    assert f"Your previous draft, which the reviewers sent back:\n{draft}" in prompts[1]
    assert "Say which bug." in prompts[2] and "Shorter, please." in prompts[2]  # all of them


def test_the_prompt_says_what_each_review_asked_and_leaves_out_timeouts() -> None:
    reviews = (
        Review("rejected", 1, "Say which bug.", reviewer="ann"),
        Review("rejected", 2, "review timed out", reviewer="timeout", auth_method="system"),
        Review("rejected", 3, reviewer="bob"),
        Review("approved", 4, edited_output="Dear team, Friday.", reviewer="cy"),
        Review("approved", 4, reviewer="dee"),
        Review("rejected", 4, "Too short.", reviewer="eve"))
    job = Job("Tell the team.", 5, reviews, lambda fraction, partial_output="": None)
    request = llm_worker.prompt(job)[-1]["content"]
    assert isinstance(request, str)
    assert "draft 1, rejected by ann: Say which bug." in request
    assert "timed out" not in request and "timeout" not in request  # no one's comment
    assert "draft 3, rejected by bob without comment" in request
    assert "draft 4, approved by cy; they edited it to read:\nDear team, Friday." in request
    assert "dee" not in request  # an approval without a word asks nothing
    assert "draft 4, rejected by eve: Too short." in request
    assert "previous draft" not in request  # attempt 1's job has none
    later = Job(job.task_input, 5, reviews, job.report, previous_output="Dear Sir")
    later_request = llm_worker.prompt(later)[-1]["content"]
    assert isinstance(later_request, str)
    assert "Your previous draft, which the reviewers sent back:\nDear Sir" in later_request
