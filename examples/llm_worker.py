"""An external worker that drafts each task with an LLM, streaming as it writes.

It calls any OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp's server,
Ollama's ``/v1``, LiteLLM...) through the ``openai`` package, shows the tokens to the
task's watchers as they come (``partial_output``), and puts what the reviewers said of
the earlier drafts (their comments, their edits, a rejection without a word) into the next
attempt's prompt, with the draft they last saw once jobs carry it. From the repository
root::

    OPENAI_BASE_URL=http://127.0.0.1:11434/v1 OPENAI_API_KEY=unused HITL_LLM_MODEL=llama3.2 \\
    python -m hitl worker --url http://127.0.0.1:8000 --token "$WORKER_TOKEN" \\
        --processor examples.llm_worker:process

Settings, from the environment: ``OPENAI_BASE_URL`` (default OpenAI's), ``OPENAI_API_KEY``,
``HITL_LLM_MODEL`` (default ``gpt-4o-mini``), ``HITL_LLM_MAX_TOKENS`` (default 1024).
"""

from __future__ import annotations

import functools
import os

from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from hitl.models import Review
from hitl.processors import Job

SYSTEM = ("You write the text a user asks for. A human reviewer reads each draft and "
          "approves it or sends it back with comments; when there are comments, write a new "
          "draft that addresses every one of them. Answer with the draft only.")
# A review timeout decides in no one's name: hitl signs it "timeout" (a name no user may
# take), as the system. It says nothing about the draft, so the prompt leaves it out.
TIMEOUT_REVIEWER, SYSTEM_METHOD = "timeout", "system"


@functools.cache
def client() -> AsyncOpenAI:
    """One client for the worker's life (it keeps its connections)."""
    return AsyncOpenAI(base_url=os.environ.get("OPENAI_BASE_URL") or None,
                       api_key=os.environ.get("OPENAI_API_KEY") or "unused")


def prompt(job: Job) -> list[ChatCompletionMessageParam]:
    """The task, the draft reviewed last (if the job carries it), then what every review so
    far said (each attempt's verdicts, oldest first)."""
    request = job.task_input
    previous = job.previous_output
    if previous:
        request += f"\n\nYour previous draft, which the reviewers sent back:\n{previous}"
    notes = [note for review in job.reviews if (note := review_note(review)) is not None]
    if notes:
        request += ("\n\nWhat the reviewers said of the earlier drafts (address all of it):\n"
                    + "\n".join(notes))
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": request}]


def review_note(review: Review) -> str | None:
    """One review, for the model; None when it asks for nothing (a review timeout, an
    approval without a word)."""
    if review.reviewer == TIMEOUT_REVIEWER and review.auth_method == SYSTEM_METHOD:
        return None
    if review.decision == "approved" and not (review.comment or review.edited_output):
        return None
    note = f"- draft {review.attempt}, {review.decision} by {review.reviewer or 'a reviewer'}"
    if review.comment:
        note += f": {review.comment}"
    elif review.decision == "rejected":
        note += " without comment"
    if review.edited_output:
        note += f"; they edited it to read:\n{review.edited_output}"
    return note


async def process(job: Job) -> str:
    """Draft with the model; every token goes to the watchers as the draft so far."""
    max_tokens = int(os.environ.get("HITL_LLM_MAX_TOKENS", "1024"))
    stream = await client().chat.completions.create(
        model=os.environ.get("HITL_LLM_MODEL", "gpt-4o-mini"), messages=prompt(job),
        max_tokens=max_tokens, stream=True)
    text, chunks = "", 0
    async for chunk in stream:
        delta = chunk.choices[0].delta.content if chunk.choices else None
        if delta:
            text, chunks = text + delta, chunks + 1
            job.report(min(chunks / max_tokens, 0.99), text)  # the worker sends the latest
    if not text.strip():
        raise RuntimeError("the model answered with no text")
    return text
