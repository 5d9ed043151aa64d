"""Processors for tests that run hitl in a subprocess (``--processor tests.procs:gated``)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from hitl.processors import Job


def gated(job: Job) -> str:
    """Blocks (in its worker thread) on inputs with 'hold' until the gate file exists.

    'hold later' blocks from the second attempt on.
    """
    gate = Path(os.environ.get("HITL_TEST_GATE", "/nonexistent"))
    job.report(0.1, "started")
    deadline = time.monotonic() + 60
    hold = "hold" in job.task_input and not ("later" in job.task_input and job.attempt == 1)
    while hold and not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    comment = job.reviews[-1].comment if job.reviews else ""
    return f"{job.task_input} (attempt {job.attempt}) {comment}".strip()


def echo(job: Job) -> str:
    """Returns the input unchanged: a large input makes an equally large output."""
    return job.task_input


def counted(job: Job) -> str:
    """Writes 'start' and 'done' lines (input, attempt, pid) to $HITL_TEST_COUNT, so a test
    counts executions across worker processes. An input with 'hold' blocks until the
    $HITL_TEST_GATE file exists; one with 'slow' takes 0.3 s."""
    record("start", job)
    gate = Path(os.environ.get("HITL_TEST_GATE", "/nonexistent"))
    deadline = time.monotonic() + 60
    while "hold" in job.task_input and not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    if "slow" in job.task_input:
        time.sleep(0.3)
    record("done", job)
    return f"{job.task_input} (attempt {job.attempt}) by {os.getpid()}"


def record(what: str, job: Job) -> None:
    """One line, one write to a file opened for appending: lines of processes never mix."""
    line = f"{what}\t{job.task_input}\t{job.attempt}\t{os.getpid()}\n".encode()
    fd = os.open(os.environ["HITL_TEST_COUNT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def logged(job: Job) -> str:
    """Logs from its worker thread (the record should name the task), then echoes."""
    logging.getLogger("tests.procs").info("processing attempt %d", job.attempt)
    return job.task_input
